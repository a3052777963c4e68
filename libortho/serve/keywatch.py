"""KEYS.json picked up while the server runs: a key revoked, added or changed takes effect within
`config.keys_poll_s` seconds (the file's inode, size and modification time are polled) or at once
on SIGHUP, without a restart.

A changed file is read whole and checked like at start-up; only a valid one replaces the keys in
use (one reference swap, so a request sees the old keys or the new ones, never a mix). An invalid,
untrusted or missing file keeps the keys in use and is logged as one error line saying why.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from .errors import one_line
from .gate import AlphaGate
from .keys import KeysError, KeyStore

log = logging.getLogger("libortho.serve")

Signature = tuple[int, int, int, int] | None  # (device, inode, size, mtime in ns) of the file the path names


def signature(path: Path) -> Signature:
    """What changes when the file is edited in place or replaced (also through a symbolic link)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class KeysWatcher:
    """Keeps `gate.keys` in step with the KEYS.json at `path` (a background thread)."""

    def __init__(self, path: str | Path, gate: AlphaGate, poll_s: float, seen: Signature) -> None:
        """`seen`: the file's signature taken before the gate's keys were read from it."""
        self.path, self.gate, self.poll_s = Path(path), gate, poll_s
        self._seen = seen
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="libortho-keys", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self.poll_s + 1.0)

    def reload_soon(self) -> None:
        """Re-read the file now, changed or not (SIGHUP; safe to call from a signal handler)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            asked = self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stopped.is_set():
                return
            now = signature(self.path)
            if asked or now != self._seen:
                self._seen = now
                self.reload()

    def reload(self) -> bool:
        """Read the file and use its keys; False (keys in use kept, error logged) if it is not valid."""
        try:
            store = KeyStore.load(self.path)
        except (KeysError, OSError) as err:
            kept = len(self.gate.keys.entries) if self.gate.keys is not None else 0
            log.error("keys not reloaded, the %d keys in use stay: %s", kept, one_line(err))
            return False
        self.gate.keys = store
        log.info("keys reloaded from %s: %d keys", self.path, len(store.entries))
        return True
