"""The architecture, checked from the source with ``ast`` (nothing is imported): no import cycle
inside ``curvature/`` or ``experiments/``, module-level and function-level imports alike; the
experiments and configs use the library's public API only; and importing the library needs
neither matplotlib nor flax."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _modules(folder: str) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module under ``folder`` (a package's is its
    ``__init__.py``)."""
    out = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = {**_modules("curvature"), **_modules("experiments")}


def _is_package(name: str) -> bool:
    return MODULES.get(name, pathlib.Path()).name == "__init__.py"


def _imported(module: str, path: pathlib.Path):
    """``(target, names, line)`` for every import statement of a module, at any depth (inside
    functions too): ``target`` the absolute module named, ``names`` what ``from`` imports."""
    tree = ast.parse(path.read_text())
    package = module if _is_package(module) else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, (), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package upwards
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            yield base, tuple(a.name for a in node.names), node.lineno


def _edges(module: str, path: pathlib.Path) -> set[str]:
    """The project modules that importing ``module`` runs: each module it imports (the most
    specific one named) and the packages above it that ``module`` is not inside (their
    ``__init__`` runs first)."""
    out = set()
    for target, names, _ in _imported(module, path):
        found = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
        if target in MODULES and (not names or len(found) < len(names)):
            found.append(target)  # `import a.b`, or a name defined in a.b
        while not found and target and target not in MODULES:
            target = target.rpartition(".")[0]  # `import a.b.c` of a name in a.b
            found = [target] if target in MODULES else []
        for name in found:
            out.add(name)
            parent = name.rpartition(".")[0]
            while parent and not (module == parent or module.startswith(parent + ".")):
                out.add(parent)
                parent = parent.rpartition(".")[0]
    out.discard(module)
    return out


def _cycles(prefix: str) -> list[list[str]]:
    """Every strongly connected set of two or more modules under ``prefix`` (Tarjan)."""
    graph = {
        m: sorted(e for e in _edges(m, p) if e == prefix or e.startswith(prefix + "."))
        for m, p in MODULES.items()
        if m == prefix or m.startswith(prefix + ".")
    }
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("package", ["curvature", "experiments"])
def test_no_import_cycles(package):
    assert sum(m.split(".")[0] == package for m in MODULES) > 10  # the sources were found
    assert _cycles(package) == []


def test_the_cycle_check_sees_function_level_imports_and_packages(tmp_path, monkeypatch):
    # The checker itself: a cycle closed by an import inside a function, and one through a
    # package's __init__ that a module outside it imports a submodule of.
    fake = {"p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py", "p.q": tmp_path / "q/__init__.py"}
    fake["p.q.c"] = tmp_path / "q" / "c.py"
    (tmp_path / "q").mkdir()
    fake["p.a"].write_text("from p import b\n")
    fake["p.b"].write_text("def f():\n    import p.a\n")
    fake["p.q"].write_text("from p.q import c\nimport p.d\n")
    fake["p.q.c"].write_text("x = 1\n")
    fake["p.d"] = tmp_path / "d.py"
    fake["p.d"].write_text("from p.q.c import x\n")
    fake["p"] = tmp_path / "__init__.py"
    fake["p"].write_text("")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", fake)
    assert sorted(_cycles("p")) == [["p.a", "p.b"], ["p.d", "p.q"]]


def _exported(module: str) -> set[str] | None:
    """The names in a library module's ``__all__`` (``None`` when it has none)."""
    tree = ast.parse(MODULES[module].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return {elt.value for elt in node.value.elts}
    return None


def _private(module: str, name: str | None) -> bool:
    """Whether ``module`` (a library module) or its attribute ``name`` is not public: a part of
    the path starts with ``_``, or the name is neither a public submodule nor in ``__all__``."""
    if any(part.startswith("_") for part in module.split(".")):
        return True
    if name is None or f"{module}.{name}" in MODULES:
        return name is not None and name.startswith("_")
    exported = _exported(module)
    return name.startswith("_") or (exported is not None and name not in exported)


def _private_uses(path: pathlib.Path, module: str) -> set[str]:
    """``"module: curvature.x.name"`` for every private library module or name that a file
    imports or reaches as an attribute (``cv._x``, ``cvs.helper``)."""
    tree = ast.parse(path.read_text())
    bound, out = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "curvature":
                    continue
                if _private(alias.name, None):
                    out.add(f"{module}: {alias.name}")
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "curvature":
            for alias in node.names:
                if _private(node.module, alias.name):
                    out.add(f"{module}: {node.module}.{alias.name}")
                if f"{node.module}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
            continue
        target = bound.get(node.value.id)
        if target is None:
            continue
        chain, outer = [node.attr], node  # a.b.c is Attribute(Attribute(Name a, b), c)
        while isinstance(parents.get(outer), ast.Attribute) and parents[outer].value is outer:
            outer = parents[outer]
            chain.append(outer.attr)
        for attr in chain:
            if f"{target}.{attr}" in MODULES and not attr.startswith("_"):
                target = f"{target}.{attr}"
                continue
            if _private(target, attr):
                out.add(f"{module}: {target}.{attr}")
            break
    return out


def _private_library_uses() -> set[str]:
    found = set()
    for module, path in MODULES.items():
        if module.startswith("experiments"):
            found |= _private_uses(path, module)
    for path in sorted((ROOT / "configs").glob("*.py")):
        found |= _private_uses(path, f"configs.{path.stem}")
    return found


def test_experiments_use_the_public_library_api_only():
    # What the experiments need, the library offers publicly: no private module, function or
    # attribute of curvature is used by experiments/ or configs/.
    assert sorted(_private_library_uses()) == []


def test_the_private_use_check_sees_imports_and_attributes(tmp_path):
    path = tmp_path / "user.py"
    path.write_text(
        "import curvature as cv\nimport curvature.sharding as cvs\n"
        "from curvature import plotting\nfrom curvature.krylov import _eigsh, eigsh\n"
        "import curvature._checks\n"
        "cv.hessian, cv._closures, cv.stochastic_trace.monte_carlo, cvs.data_mesh, cvs._x\n"
        "plotting.series_style, cv.krylov.eigsh, cv.Layout.of\n"
    )
    assert _private_uses(path, "user") == {
        "user: curvature.krylov._eigsh",
        "user: curvature._checks",
        "user: curvature._closures",
        "user: curvature.stochastic_trace.monte_carlo",
        "user: curvature.sharding._x",
    }


def test_importing_the_library_needs_neither_matplotlib_nor_flax():
    code = "import sys, curvature; assert not {'matplotlib', 'flax', 'optax'} & set(sys.modules), sorted(sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode
        == 0
    )
