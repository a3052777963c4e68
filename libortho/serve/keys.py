"""API keys: KEYS.json maps each key's SHA-256 to a name, a max_alpha and a default_alpha.

The file never holds a key itself, only its hash, so a leaked KEYS.json grants nothing. A key is
shown once, when `libortho keys add` creates it. Whoever can write the file decides who gets in,
so a file writable by every user, or owned by another user than the reader (root aside), is refused.
Key names are restricted to NAME_PATTERN, so a name printed in a log line cannot forge another line.

    {"version": 1,
     "keys": [{"name": "alice", "sha256": "9f…", "max_alpha": 1.0, "default_alpha": 0.0}]}
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import jsontext
from ..switch import AlphaError, parse_alpha

KEYS_VERSION = 1
KEY_PREFIX = "lo-"
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
NAME_RULE = "1 to 64 characters from A-Z, a-z, 0-9, '.', '_' and '-'"


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


def check_name(name: object, where: str = "the key name") -> str:
    """A key name as given, else KeysError (names reach log lines, so no spaces, quotes or newlines)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise KeysError(f"{where} must be {NAME_RULE}; got {_shortened(name)}")
    return name


def _shortened(value: object, keep: int = 24) -> str:
    """repr of a value, cut in the middle when long, so that an error stays one readable line."""
    text = repr(value)
    return text if len(text) <= 2 * keep else f"{text[:keep]}…{text[-keep:]} ({len(text)} characters)"


def _entry(raw: object, where: str) -> KeyEntry:
    if not isinstance(raw, dict):
        raise KeysError(f"{where}: each key entry must be an object")
    unknown = set(raw) - {"name", "sha256", "max_alpha", "default_alpha"}
    if unknown:
        raise KeysError(f"{where}: unknown fields {sorted(unknown)}")
    name, digest = check_name(raw.get("name"), f"{where}: 'name'"), raw.get("sha256")
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
        """The keys of KEYS.json, read once (so that a file being replaced is either read whole or
        not at all), or KeysError: missing, untrusted (see `check_trusted`), or malformed."""
        path = Path(path)
        if not path.is_file():
            raise KeysError(f"keys file {path} does not exist; create it with: libortho keys add {path} NAME --max-alpha A")
        with open(path, "rb") as f:
            check_trusted(os.fstat(f.fileno()), path)  # the file read, not whatever the path names a moment later
            content = f.read()
        try:
            data = jsontext.loads(content.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as err:  # ValueError: JSONDecodeError, integers of 4300+ digits
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
        """Write atomically (a temporary file renamed over the old one), readable by the owner only.
        Through a symbolic link the link's target is written and the link kept."""
        path = Path(os.path.realpath(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": KEYS_VERSION, "keys": [asdict(e) for e in self.entries]}, indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())  # the new keys are on disk before the rename makes them the file
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def named(self, name: str, path: str | Path) -> KeyEntry:
        """The entry called `name`, else KeysError naming the file."""
        for e in self.entries:
            if e.name == name:
                return e
        known = ", ".join(e.name for e in self.entries) or "none"
        raise KeysError(f"{path} has no key named {_shortened(name)} (its keys: {known})")


def check_trusted(st: os.stat_result, path: str | Path) -> None:
    """KeysError unless only this user (or root) can have written the file: it decides who gets in."""
    if st.st_mode & stat.S_IWOTH:
        raise KeysError(f"{path} is writable by every user (mode {stat.S_IMODE(st.st_mode):04o}), so anyone could add "
                        f"a key: run chmod 600 {path}")
    if st.st_uid not in (os.getuid(), 0):
        raise KeysError(f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}) or root, so that "
                        "user decides who gets in: give it to this user (chown) or keep the keys elsewhere")


def add_key(path: str | Path, name: str, max_alpha: float, default_alpha: float | None = None) -> str:
    """Add a new random key named `name` to KEYS.json (created if missing); returns the key.

    default_alpha defaults to 0: a request that does not ask for an alpha gets the base model,
    so raising alpha is always an explicit act of the caller.
    """
    path = Path(path)
    check_name(name)
    max_alpha = _check_alpha(max_alpha, "--max-alpha")
    default_alpha = _check_alpha(0.0 if default_alpha is None else default_alpha, "--default-alpha")
    if default_alpha > max_alpha:
        raise KeysError(f"--default-alpha {default_alpha!r} exceeds --max-alpha {max_alpha!r}")
    store = KeyStore.load(path) if path.exists() else KeyStore([])
    if any(e.name == name for e in store.entries):
        raise KeysError(f"{path} already has a key named {name!r}; choose another name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    KeyStore([*store.entries, KeyEntry(name, hash_key(key), max_alpha, default_alpha)]).save(path)
    return key


def list_keys(path: str | Path) -> list[KeyEntry]:
    """The keys of KEYS.json, in file order."""
    return KeyStore.load(path).entries


def revoke_key(path: str | Path, name: str) -> None:
    """Remove the key called `name` from KEYS.json (a running server refuses it within a second)."""
    store = KeyStore.load(path)
    gone = store.named(check_name(name), path)
    KeyStore([e for e in store.entries if e is not gone]).save(path)


def set_key(path: str | Path, name: str, max_alpha: float | None = None,
            default_alpha: float | None = None) -> KeyEntry:
    """Change the privilege of the key called `name` (None: unchanged); returns the new entry."""
    if max_alpha is None and default_alpha is None:
        raise KeysError("nothing to change: pass --max-alpha A and/or --default-alpha A")
    store = KeyStore.load(path)
    old = store.named(check_name(name), path)
    new_max = old.max_alpha if max_alpha is None else _check_alpha(max_alpha, "--max-alpha")
    new_default = old.default_alpha if default_alpha is None else _check_alpha(default_alpha, "--default-alpha")
    if new_default > new_max:
        raise KeysError(f"the key {name!r} would get default_alpha {new_default!r} above max_alpha {new_max!r}; "
                        "pass --default-alpha too")
    new = KeyEntry(name, old.sha256, new_max, new_default)
    KeyStore([new if e is old else e for e in store.entries]).save(path)
    return new
