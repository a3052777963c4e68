"""The public corpus, split deterministically into disjoint ``train``, ``calibration`` and
``heldout`` texts, and its fingerprint. Two sources, both shipped with Python (nothing is
downloaded):

* ``pydoc``: the language reference topics of ``pydoc_data.topics`` (the default);
* ``stdlib``: the docstrings (200+ characters) of a fixed list of standard-library modules and
  packages, read from their source files: other public text, API documentation rather than the
  language reference.
"""
from __future__ import annotations

import ast
import hashlib
import sysconfig
import warnings
from functools import lru_cache
from pathlib import Path

SPLITS = ("train", "calibration", "heldout")
CORPORA = ("pydoc", "stdlib")
DEFAULT_CORPUS = "pydoc"  # the corpus of every scenario cached before there was a choice
_CHUNK_CHARS = 2000
_DEDUP_MIN_CHARS = 60  # paragraphs at least this long occur once in the whole corpus
_SPLIT_OF_CHUNK = {3: "heldout", 7: "calibration"}  # chunk index % 10 -> split; others: train


# Pure-Python modules and packages present in every supported Python: enough text (~470,000
# characters on 3.11) at a parse cost of about a second. Their test folders are left out.
_STDLIB_MODULES = (
    "argparse", "asyncio", "collections", "concurrent", "configparser", "csv", "dataclasses", "email",
    "enum", "functools", "http", "importlib", "inspect", "json", "logging", "multiprocessing", "pathlib",
    "pickle", "shutil", "socket", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing",
    "unittest", "urllib", "xml", "zipfile",
)
_STDLIB_MIN_DOCSTRING = 200  # shorter docstrings are mostly one-line summaries, not prose
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def _stdlib_files() -> list[tuple[str, Path]]:
    """(name relative to the stdlib folder, path) of every source file of ``_STDLIB_MODULES``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for name in _STDLIB_MODULES:
        package = root / name
        paths = sorted(package.rglob("*.py")) if package.is_dir() else [root / f"{name}.py"]
        for path in paths:
            rel = path.relative_to(root)
            if path.is_file() and not {"test", "tests"} & set(rel.parts):
                files.append((rel.as_posix(), path))
    return files


@lru_cache(maxsize=1)
def _stdlib_docstrings() -> dict[str, str]:
    """Source file name -> its long docstrings (module, classes, functions), in source order."""
    documents = {}
    for name, path in _stdlib_files():
        with warnings.catch_warnings():  # a newer Python may warn about an old file's escapes
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=name)
        docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, _DOCUMENTED)]
        long_docs = [d for d in docs if d and len(d) >= _STDLIB_MIN_DOCSTRING]
        if long_docs:
            documents[name] = "\n\n".join(long_docs)
    if not documents:  # e.g. a Python installed without its .py sources
        raise ValueError(f"no standard-library sources with docstrings under {sysconfig.get_paths()['stdlib']}")
    return documents


def _documents(source: str) -> dict[str, str]:
    """Document name -> text of a corpus source."""
    if source == "pydoc":
        return _topics()
    if source == "stdlib":
        return _stdlib_docstrings()
    raise ValueError(f"unknown public corpus {source!r}; expected one of {', '.join(CORPORA)}")


@lru_cache(maxsize=len(CORPORA))
def _split_texts(source: str) -> dict[str, str]:
    documents = _documents(source)
    seen: set[str] = set()
    chunks: list[str] = []
    for name in sorted(documents):  # a pydoc topic or a stdlib source file: chunks never span two
        paragraphs = []
        for para in documents[name].replace("\r\n", "\n").split("\n\n"):
            key = para.strip()
            if not key:
                continue
            if len(key) >= _DEDUP_MIN_CHARS:  # short lines ("Note:", "See also:") recur naturally
                if key in seen:
                    continue
                seen.add(key)
            paragraphs.append(para.strip("\n"))
        current: list[str] = []
        size = 0
        for para in paragraphs:
            current.append(para)
            size += len(para) + 2
            if size >= _CHUNK_CHARS:
                chunks.append("\n\n".join(current))
                current, size = [], 0
        if current:
            chunks.append("\n\n".join(current))
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i, chunk in enumerate(chunks):
        parts[_SPLIT_OF_CHUNK.get(i % 10, "train")].append(chunk)
    return {s: "\n\n".join(c) + "\n" for s, c in parts.items()}


def public_corpus(split: str, source: str = DEFAULT_CORPUS) -> str:
    """Public text of one split of a source (``CORPORA``): ``"train"``, ``"calibration"`` or
    ``"heldout"`` (deterministic, disjoint)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return _split_texts(source)[split]


@lru_cache(maxsize=len(CORPORA))
def corpus_fingerprint(source: str = DEFAULT_CORPUS) -> str:
    """SHA-256 (16 hex) of a source's documents (they differ between Python versions)."""
    h = hashlib.sha256()
    for name, text in sorted(_documents(source).items()):
        h.update(name.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]

