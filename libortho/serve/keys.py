"""API keys: KEYS.json maps each key's SHA-256 to a name, a max_alpha and a default_alpha.

The file never holds a key itself, only its hash, so a leaked KEYS.json grants nothing. A key is
shown once, when `libortho keys add` creates it.

    {"version": 1,
     "keys": [{"name": "alice", "sha256": "9f…", "max_alpha": 1.0, "default_alpha": 0.0}]}
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..switch import AlphaError, parse_alpha

KEYS_VERSION = 1
KEY_PREFIX = "lo-"


class KeysError(ValueError):
    """KEYS.json is malformed, inconsistent, or an edit would make it so."""


@dataclass(frozen=True)
class KeyEntry:
    """One key's privilege. Alphas are in [0, 1]; default_alpha <= max_alpha."""

    name: str
    sha256: str
    max_alpha: float
    default_alpha: float


def hash_key(key: str) -> str:
    """Hex SHA-256 of a key as presented in `Authorization: Bearer KEY`."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _check_alpha(value: object, what: str) -> float:
    """An alpha from KEYS.json or `keys add` as a float in [0, 1], else KeysError naming `what`."""
    try:
        return parse_alpha(value, what)
    except AlphaError as err:
        raise KeysError(str(err)) from None


def _entry(raw: object, where: str) -> KeyEntry:
    if not isinstance(raw, dict):
        raise KeysError(f"{where}: each key entry must be an object")
    unknown = set(raw) - {"name", "sha256", "max_alpha", "default_alpha"}
    if unknown:
        raise KeysError(f"{where}: unknown fields {sorted(unknown)}")
    name, digest = raw.get("name"), raw.get("sha256")
    if not isinstance(name, str) or not name:
        raise KeysError(f"{where}: 'name' must be a non-empty string")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise KeysError(f"{where} ({name}): 'sha256' must be 64 lowercase hex digits")
    max_alpha = _check_alpha(raw.get("max_alpha"), f"{where} ({name}): max_alpha")
    default_alpha = _check_alpha(raw.get("default_alpha"), f"{where} ({name}): default_alpha")
    if default_alpha > max_alpha:
        raise KeysError(f"{where} ({name}): default_alpha {default_alpha} exceeds max_alpha {max_alpha}")
    return KeyEntry(name, digest, max_alpha, default_alpha)


class KeyStore:
    """The keys of one KEYS.json, validated; look a presented key up with `lookup`."""

    def __init__(self, entries: list[KeyEntry]) -> None:
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise KeysError(f"duplicate key names: {sorted({n for n in names if names.count(n) > 1})}")
        self.entries = list(entries)
        self._by_hash: dict[str, KeyEntry] = {}
        for e in entries:
            if e.sha256 in self._by_hash:
                raise KeysError(f"keys {self._by_hash[e.sha256].name!r} and {e.name!r} have the same hash")
            self._by_hash[e.sha256] = e

    @classmethod
    def load(cls, path: str | Path) -> "KeyStore":
        path = Path(path)
        if not path.is_file():
            raise KeysError(f"keys file {path} does not exist; create it with: libortho keys add {path} NAME --max-alpha A")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise KeysError(f"{path} is not valid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("version") != KEYS_VERSION or not isinstance(data.get("keys"), list):
            raise KeysError(f"{path} is not a libortho keys file (expected {{\"version\": {KEYS_VERSION}, \"keys\": [...]}})")
        return cls([_entry(raw, f"{path} entry {i}") for i, raw in enumerate(data["keys"])])

    def lookup(self, key: str) -> KeyEntry | None:
        """The entry of a presented key, or None. Compares hashes, so timing reveals nothing about keys."""
        digest = hash_key(key)
        entry = self._by_hash.get(digest)
        # the dict lookup already matched; compare_digest keeps the check explicit and constant-time
        return entry if entry is not None and hmac.compare_digest(entry.sha256, digest) else None

    @property
    def max_alpha(self) -> float:
        """The highest alpha any key may use (0 when there are no keys)."""
        return max((e.max_alpha for e in self.entries), default=0.0)

    def save(self, path: str | Path) -> None:
        """Write atomically, readable by the owner only."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": KEYS_VERSION, "keys": [asdict(e) for e in self.entries]}, indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def add_key(path: str | Path, name: str, max_alpha: float, default_alpha: float | None = None) -> str:
    """Add a new random key named `name` to KEYS.json (created if missing); returns the key.

    default_alpha defaults to 0: a request that does not ask for an alpha gets the base model,
    so raising alpha is always an explicit act of the caller.
    """
    path = Path(path)
    if not name or not name.strip():
        raise KeysError("the key name must not be empty")
    max_alpha = _check_alpha(max_alpha, "--max-alpha")
    default_alpha = _check_alpha(0.0 if default_alpha is None else default_alpha, "--default-alpha")
    if default_alpha > max_alpha:
        raise KeysError(f"--default-alpha {default_alpha} exceeds --max-alpha {max_alpha}")
    store = KeyStore.load(path) if path.exists() else KeyStore([])
    if any(e.name == name for e in store.entries):
        raise KeysError(f"{path} already has a key named {name!r}; choose another name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    KeyStore([*store.entries, KeyEntry(name, hash_key(key), max_alpha, default_alpha)]).save(path)
    return key
