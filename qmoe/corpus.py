"""The embedded text corpus: English prose from CPython's standard-library docstrings.

Extracted once (`python -m qmoe.corpus OUT.txt.zst`) and shipped compressed in `qmoe/assets/`, so nothing is
downloaded at run time. Each docstring is one document; documents are separated by a blank line and a form feed.
Doctest lines and docstrings shorter than 80 characters are dropped; duplicates are kept once.
"""
from __future__ import annotations

import argparse
import ast
import sysconfig
from functools import cache
from importlib import resources
from pathlib import Path

import zstandard

DOC_SEP = "\n\f\n"


def _docstrings(source: str):
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def _clean(doc: str) -> str:
    lines = [ln for ln in doc.splitlines() if not ln.lstrip().startswith((">>>", "..."))]
    return "\n".join(lines).strip()


def extract(stdlib: Path, min_chars: int = 80) -> list[str]:
    """Docstrings of every module under `stdlib` (tests and site-packages excluded), in path order, deduplicated."""
    seen, docs = set(), []
    for f in sorted(stdlib.rglob("*.py")):
        rel = f.relative_to(stdlib).as_posix()
        if "site-packages" in rel or "/test" in f"/{rel}" or "idle_test" in rel:
            continue
        for doc in _docstrings(f.read_text(encoding="utf-8", errors="replace")):
            doc = _clean(doc)
            if len(doc) >= min_chars and doc.isascii() and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


@cache
def load_default_corpus() -> str:
    """The shipped corpus as one string (documents joined by DOC_SEP)."""
    data = resources.files("qmoe.assets").joinpath("corpus.txt.zst").read_bytes()
    return zstandard.ZstdDecompressor().decompress(data).decode("utf-8")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    args = p.parse_args(argv)
    docs = extract(args.stdlib)
    text = DOC_SEP.join(docs).encode("utf-8")
    tmp = args.out.with_suffix(".tmp")
    tmp.write_bytes(zstandard.ZstdCompressor(level=19).compress(text))
    tmp.replace(args.out)
    print(f"{len(docs)} documents, {len(text) / 1e6:.1f} MB of text -> {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
