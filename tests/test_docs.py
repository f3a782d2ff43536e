"""The documentation site, checked without building it (CI builds it, strict, in ``.ci/run``):
every public name is on an API page, every API directive names a real object, every page and
tutorial the site has is in its navigation, and the README fits its budget and names the commands
CI runs."""

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# The modules whose public names (their ``__all__``) the API reference must cover.
PUBLIC_MODULES = (
    "curvature",
    "curvature.flax",
    "curvature.optim",
    "curvature.plotting",
    "curvature.sharding",
    "experiments",
    "experiments.measurements",
    "experiments.optimizers",
)
# Registries that live in modules without an ``__all__`` of public names.
REGISTRIES = (
    "experiments.models.MODELS",
    "experiments.models.ACTIVATIONS",
    "experiments.models.LOSSES",
    "experiments.data.SOURCES",
)
README_LINES = 250


def _resolve(dotted: str):
    """The object a mkdocstrings identifier names: the longest importable module prefix, then
    attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _directives() -> dict[str, str]:
    """``identifier -> page`` for every ``::: identifier`` line of the API pages."""
    out = {}
    for page in sorted((DOCS / "api").glob("*.md")):
        for match in re.finditer(r"^::: ([\w.]+)\s*$", page.read_text(), re.M):
            out[match.group(1)] = page.name
    return out


def _public_names() -> list[str]:
    names = []
    for module in PUBLIC_MODULES:
        names += [f"{module}.{name}" for name in importlib.import_module(module).__all__]
    return names + list(REGISTRIES)


def test_every_public_name_is_on_an_api_page():
    documented = {}
    for identifier in _directives():
        obj = _resolve(identifier)
        documented.setdefault(id(obj), []).append(identifier)
    missing = [name for name in _public_names() if id(_resolve(name)) not in documented]
    assert not missing, f"public names on no docs/api page (add a `::: name` line): {missing}"


def test_every_api_directive_names_a_public_object():
    directives = _directives()
    assert len(directives) > 80  # the pages were read
    for identifier in directives:
        obj = _resolve(identifier)  # raises for a renamed or removed object
        assert obj is not None, identifier


def _site_pages() -> set[str]:
    """The pages of the site: Markdown and tutorial files under docs/, less the build scripts
    (``_*.py``), the snippets and the study summaries that the study pages include."""
    pages = set()
    for path in DOCS.rglob("*"):
        rel = path.relative_to(DOCS)
        if path.suffix == ".py" and rel.parts[0] != "tutorials" or path.name.startswith("_"):
            continue
        if path.suffix in (".md", ".py") and not {"snippets", "summaries"} & set(rel.parts):
            pages.add(str(rel))
    return pages


def test_every_page_is_in_the_navigation():
    config = (ROOT / "mkdocs.yml").read_text()
    nav = re.search(r"^nav:\n((?:[ \t].*\n|\n)*)", config, re.M).group(1)  # up to the next key
    in_nav = set(re.findall(r"^\s*(?:- )?(?:[^:\n]*: )?([\w/]+\.(?:md|py))\s*$", nav, re.M))
    pages = _site_pages()
    assert pages - in_nav == set(), "pages missing from mkdocs.yml's nav"
    assert in_nav - pages == set(), "nav entries without a page"
    assert any(p.startswith("tutorials/") for p in in_nav)


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_fits_its_budget():
    lines = _readme().count("\n")
    assert lines <= README_LINES, f"README.md has {lines} lines; the budget is {README_LINES}"


@pytest.mark.parametrize("command", ["python -m pytest", "mkdocs build --strict"])
def test_ci_runs_the_readme_commands(command):
    """The README's test and docs commands are the ones ``.ci/run`` runs, word for word."""
    ci = (ROOT / ".ci" / "run").read_text()
    readme_lines = [line for line in _readme().splitlines() if command in line]
    assert readme_lines, f"the README shows no `{command}` command"
    for line in readme_lines:
        tail = line[line.index("pip install") :] if "pip install" in line else line.strip()
        assert tail in ci, f"README's `{tail}` is not what .ci/run runs"


def test_readme_layout_names_every_module():
    """The README's layout lists every module and subpackage, so it cannot go stale silently."""
    layout = _readme().split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = []
    for package in ("curvature", "experiments"):
        for path in sorted((ROOT / package).iterdir()):
            if path.suffix == ".py" and path.name != "__init__.py":
                name = path.name
            elif path.is_dir() and (path / "__init__.py").exists():
                name = path.name + "/"
            else:
                continue
            if not re.search(rf"(?<![\w/]){re.escape(name)}", layout):
                missing.append(f"{package}/{name}")
    assert not missing, f"README's Layout omits {missing}"


def test_tutorial_links_resolve():
    """mkdocs checks the links of Markdown pages, not those of notebook pages: a tutorial links
    by built address (``../../guide/scale/`` from ``tutorials/NAME/``), checked here."""
    for tutorial in sorted((DOCS / "tutorials").glob("*.py")):
        text = "\n".join(
            line[2:] for line in tutorial.read_text().splitlines() if line.startswith("# ")
        )
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            url = pathlib.PurePosixPath("tutorials", tutorial.stem, target.split("#")[0])
            parts = []
            for part in url.parts:
                if part == "..":
                    parts.pop()
                elif part != ".":
                    parts.append(part)
            page = "/".join(parts)
            found = [
                DOCS / f"{page}.md",
                DOCS / f"{page}.py",
                DOCS / page / "index.md",
                DOCS / page,
            ]
            assert target.endswith("/") and any(p.is_file() for p in found), (
                f"{tutorial.name} links to {target}, which is no page of the site (link by built "
                "address, e.g. ../../guide/scale/)"
            )
