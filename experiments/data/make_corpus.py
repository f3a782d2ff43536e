"""Freeze the bundled character corpus: ``python experiments/data/make_corpus.py``.

Writes ``corpus.txt`` (UTF-8, ``\\n`` line endings): the dataset descriptions that scikit-learn
ships (``sklearn/datasets/descr/*.rst``), in sorted file-name order, each followed by one blank
line; and ``CORPUS_LICENSE.txt``: scikit-learn's BSD-3-Clause notice with the version the text
was taken from. The output depends only on that version, so rerunning it with the same
scikit-learn reproduces both files byte for byte. The workbench reads the frozen files and never
this script, so a run's data (and its fingerprint) does not follow the installed scikit-learn.
"""

from __future__ import annotations

import importlib.metadata
import pathlib

HERE = pathlib.Path(__file__).resolve().parent


def corpus_text() -> tuple[str, str]:
    """The corpus and the scikit-learn version it comes from."""
    import sklearn.datasets

    folder = pathlib.Path(sklearn.datasets.__file__).parent / "descr"
    files = sorted(folder.glob("*.rst"), key=lambda p: p.name)
    if not files:
        raise SystemExit(f"{folder} holds no .rst files")
    parts = []
    for f in files:
        text = f.read_text(encoding="utf-8").replace("\r\n", "\n")
        parts.append(text.rstrip("\n") + "\n\n")
    return "".join(parts), importlib.metadata.version("scikit-learn")


def license_text(version: str) -> str:
    """scikit-learn's own BSD-3-Clause notice (the part of its ``COPYING`` before the notices of
    the binaries its wheels bundle), under a provenance header."""
    dist = importlib.metadata.distribution("scikit-learn")
    found = [f for f in dist.files or () if f.name in ("COPYING", "LICENSE")]
    if not found:
        raise SystemExit("the installed scikit-learn carries no COPYING or LICENSE file")
    notice = dist.locate_file(found[0]).read_text(encoding="utf-8").split("\n----")[0]
    return (
        "corpus.txt is the text of the dataset descriptions bundled with scikit-learn\n"
        f"(sklearn/datasets/descr/*.rst, scikit-learn {version}), concatenated in sorted\n"
        "file-name order by make_corpus.py. It is used under scikit-learn's license:\n\n"
        + notice.rstrip()
        + "\n"
    )


def main() -> None:
    text, version = corpus_text()
    (HERE / "corpus.txt").write_text(text, encoding="utf-8", newline="\n")
    (HERE / "CORPUS_LICENSE.txt").write_text(license_text(version), encoding="utf-8", newline="\n")
    print(f"corpus.txt: {len(text.encode('utf-8'))} bytes from scikit-learn {version}")


if __name__ == "__main__":
    main()
