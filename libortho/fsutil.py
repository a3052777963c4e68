"""Where libortho writes: output folders checked before the work, permissions that follow the
umask (except the private ortho stream), temp folders that name their owning process so a
later run can remove those left by a killed one, and folders written in one rename.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .artifact_format import ArtifactError

TEMP_PREFIX = ".libortho-tmp-"
# .libortho-tmp-<pid>@<host>-<label>-<random>: host so that a shared (NFS) folder never loses
# a temp folder of a live process on another machine whose pid happens to be free here.
_TEMP_NAME = re.compile(r"^\.libortho-tmp-(\d+)@([A-Za-z0-9_.]*)-")


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path, private: set[str] | None = None, private_mode: int = 0o600) -> None:
    """Give `path` (a folder) and its files the modes a plain `mkdir` / `open` would under the
    umask; files named in `private` get `private_mode` instead."""
    mask = current_umask()
    path.chmod(0o777 & ~mask)
    for item in path.rglob("*"):
        if item.is_symlink():
            continue
        if item.is_dir():
            item.chmod(0o777 & ~mask)
        elif private and item.name in private:
            item.chmod(private_mode)
        else:
            item.chmod(0o666 & ~mask)


def check_output_dir(out: str | Path, overwrite_if=None) -> Path:
    """Refuse an output folder that cannot take the result, before any work; returns it with
    symbolic links resolved. It may not exist yet (its parents are created later), or be an
    empty folder; a non-empty one only when `overwrite_if(path)` says so."""
    given = Path(out)
    target = given.resolve()  # a symlinked OUT is written where it points
    if target.exists():
        if not target.is_dir():
            raise ArtifactError(f"output path {given} exists and is not a folder")
        if any(target.iterdir()) and not (overwrite_if is not None and overwrite_if(target)):
            raise ArtifactError(f"output folder {given} exists and is not empty; choose a new folder")
    ancestor = target.parent
    while not ancestor.exists():
        if ancestor.is_symlink():
            raise ArtifactError(f"output path {given}: {ancestor} is a broken symbolic link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ArtifactError(f"output path {given} cannot be created: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ArtifactError(f"output path {given} cannot be created: {ancestor} is not writable")
    return target


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())


def make_temp_dir(parent: Path, label: str) -> Path:
    """A new temp folder in `parent` named after this process (removed by `remove_orphans` once it is gone)."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(parent)
    safe = re.sub(r"[^A-Za-z0-9_.]", "_", label)[:40]
    return Path(tempfile.mkdtemp(dir=parent, prefix=f"{TEMP_PREFIX}{os.getpid()}@{_host()}-{safe}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_orphans(parent: Path) -> list[Path]:
    """Remove this library's temp folders in `parent` whose process (on this host) is gone; returns them."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    host = _host()
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if not m or m.group(2) != host or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def replace_dir(tmp: Path, target: Path, *, concurrent: bool = False) -> None:
    """Put the finished folder `tmp` at `target`, replacing the folder there if any.

    `concurrent`: other processes may replace or remove `target` at the same time (a shared
    cache), so removing the old folder is best effort and the rename says whether it worked.
    Otherwise a folder that cannot be removed raises its own error, which names the culprit."""
    if target.exists():
        shutil.rmtree(target, ignore_errors=concurrent)
    os.replace(tmp, target)


@contextlib.contextmanager
def staged_dir(target: Path, *, concurrent: bool = False) -> Iterator[Path]:
    """A temp folder next to `target` to write into. When the block ends without an error it
    replaces `target` (see `replace_dir`); the temp folder is removed in every case, so readers
    of `target` never see a half-written folder."""
    tmp = make_temp_dir(target.parent, target.name)
    try:
        yield tmp
        replace_dir(tmp, target, concurrent=concurrent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
