"""The public corpus: the Python documentation shipped with the standard library
(``pydoc_data.topics``), split deterministically into disjoint ``train``, ``calibration`` and
``heldout`` texts, and its fingerprint."""
from __future__ import annotations

import hashlib
from functools import lru_cache

SPLITS = ("train", "calibration", "heldout")
_CHUNK_CHARS = 2000
_DEDUP_MIN_CHARS = 60  # paragraphs at least this long occur once in the whole corpus
_SPLIT_OF_CHUNK = {3: "heldout", 7: "calibration"}  # chunk index % 10 -> split; others: train


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


@lru_cache(maxsize=1)
def _split_texts() -> dict[str, str]:
    topics = _topics()
    seen: set[str] = set()
    chunks: list[str] = []
    for name in sorted(topics):
        paragraphs = []
        for para in topics[name].replace("\r\n", "\n").split("\n\n"):
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


def public_corpus(split: str) -> str:
    """Public text of one split: ``"train"``, ``"calibration"`` or ``"heldout"`` (deterministic, disjoint)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return _split_texts()[split]


@lru_cache(maxsize=1)
def corpus_fingerprint() -> str:
    """SHA-256 (16 hex) of the source documentation (it differs between Python versions)."""
    h = hashlib.sha256()
    for name, text in sorted(_topics().items()):
        h.update(name.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]

