"""Canary records and their secret formats.

* :class:`SecretFormat` / :func:`parse_format`: a candidate space R = alphabet^length, written
  ``"<kind>:<length>"`` (``"digits:6"``, ``"hex:32"``, ...), and uniform samples from it.
* :class:`CanaryRecord`: one private record (prefix + secret, inserted k times into training),
  read and written as JSONL (:func:`load_records`, :func:`save_records`), each line validated.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from . import jsontext
from typing import Any, Iterable

import numpy as np

__all__ = [
    "ALPHABETS",
    "SecretFormat",
    "parse_format",
    "candidate_space_size",
    "sample_candidates",
    "record_seed",
    "record_rng",
    "CanaryRecord",
    "record_from_dict",
    "load_records",
    "save_records",
    "atomic_write_text",
]

# --------------------------------------------------------------------------------------
# Secret formats
# --------------------------------------------------------------------------------------

ALPHABETS: dict[str, str] = {
    "digits": string.digits,
    "hex": "0123456789abcdef",
    "alnum": string.ascii_letters + string.digits,
    "alpha": string.ascii_letters,
    "lower": string.ascii_lowercase,
    "upper": string.ascii_uppercase,
}

_FORMAT_RE = re.compile(r"^\s*([a-z]+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SecretFormat:
    """A candidate space R = alphabet^length, e.g. ``digits:6`` (|R| = 10^6)."""

    kind: str
    length: int
    alphabet: str

    @property
    def size(self) -> int:
        return len(self.alphabet) ** self.length

    @property
    def log2_size(self) -> float:
        return self.length * math.log2(len(self.alphabet))

    def contains(self, secret: str) -> bool:
        return len(secret) == self.length and all(c in self.alphabet for c in secret)


def parse_format(fmt: str) -> SecretFormat:
    """Parse ``"<kind>:<length>"``; kinds: digits, hex (lowercase), alnum, alpha, lower, upper."""
    m = _FORMAT_RE.match(fmt) if isinstance(fmt, str) else None
    if m is None:
        raise ValueError(f"bad secret_format {fmt!r}: expected '<kind>:<length>', e.g. 'digits:6'")
    kind, length = m.group(1), int(m.group(2))
    if kind not in ALPHABETS:
        raise ValueError(f"bad secret_format {fmt!r}: unknown kind {kind!r} (known: {', '.join(ALPHABETS)})")
    if length < 1:
        raise ValueError(f"bad secret_format {fmt!r}: length must be >= 1")
    return SecretFormat(kind, length, ALPHABETS[kind])


def candidate_space_size(fmt: str) -> int:
    """|R| for a secret format (an exact Python int, may be huge)."""
    return parse_format(fmt).size


def record_seed(seed: int, record_id: str) -> np.random.SeedSequence:
    """One record's seed: the same for the record under every model and condition (common random
    numbers), whatever order the records are measured in."""
    return np.random.SeedSequence([seed, zlib.crc32(record_id.encode("utf-8"))])


def record_rng(seed: int, record_id: str) -> np.random.Generator:
    """The generator of one record's random candidates (seeded by :func:`record_seed`)."""
    return np.random.default_rng(record_seed(seed, record_id))


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def sample_candidates(fmt: str, n: int, rng: np.random.Generator | int | None = None) -> list[str]:
    """n candidates drawn uniformly from R, with replacement (characters i.i.d. uniform)."""
    spec = parse_format(fmt)
    idx = _as_rng(rng).integers(0, len(spec.alphabet), size=(n, spec.length))
    alphabet = np.array(list(spec.alphabet))
    return ["".join(row) for row in alphabet[idx]]


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------


@dataclass
class CanaryRecord:
    """One private record. ``text`` is the full record as trained (default prefix + secret);
    ``k`` is how many times it was inserted into the fine-tuning data (0 = non-member)."""

    id: str
    prefix: str
    secret: str
    secret_format: str
    k: int = 0
    text: str | None = None

    def __post_init__(self) -> None:
        if self.text is None:
            self.text = self.prefix + self.secret

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_REQUIRED_KEYS = ("id", "prefix", "secret", "secret_format")


def record_from_dict(obj: Any, where: str = "record") -> CanaryRecord:
    """Validate one decoded JSON object; errors name ``where`` (e.g. ``file.jsonl:3``)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in obj]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)} (required: {', '.join(_REQUIRED_KEYS)})")
    for key in _REQUIRED_KEYS:
        if not isinstance(obj[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    k = obj.get("k", 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"{where}: 'k' must be a non-negative integer, got {k!r}")
    text = obj.get("text")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{where}: 'text' must be a string or null, got {type(text).__name__}")
    try:
        spec = parse_format(obj["secret_format"])
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if not spec.contains(obj["secret"]):
        raise ValueError(f"{where}: secret {obj['secret']!r} is not in format {obj['secret_format']!r}")
    if not obj["prefix"]:
        raise ValueError(f"{where}: 'prefix' must not be empty")
    return CanaryRecord(obj["id"], obj["prefix"], obj["secret"], obj["secret_format"], k, text)


def load_records(path: str | os.PathLike) -> list[CanaryRecord]:
    """Read a JSONL file of records (blank lines skipped; extra keys ignored)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"records file {path} is a folder; expected a JSONL file")
    if not path.is_file():
        raise ValueError(f"records file not found: {path}")
    records: list[CanaryRecord] = []
    seen: dict[str, int] = {}
    with path.open("rb") as fh:  # bytes, so that a non-UTF-8 line is reported with its number
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                obj = jsontext.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None
            record = record_from_dict(obj, where)
            if record.id in seen:
                raise ValueError(f"{where}: duplicate id {record.id!r} (first on line {seen[record.id]})")
            seen[record.id] = lineno
            records.append(record)
    return records


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file via a temp file in the same folder + rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_records(records: Iterable[CanaryRecord], path: str | os.PathLike) -> None:
    """Write records as JSONL (atomically)."""
    lines = [json.dumps(r.to_dict(), ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
