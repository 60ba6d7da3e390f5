"""One writer per folder: an exclusive lock on a run folder, a teacher cache or an NPNet pair store.

Every command and node that writes such a folder holds :func:`folder_lock` on it for its whole run; a
second writer is refused at once (:class:`FolderBusy`, one line naming the folder, the process that
holds it and what to do). Readers take no lock: several runs may train from one finished cache.

The lock is the field's library, ``filelock`` (it comes with torch and huggingface_hub): an OS lock on
``<folder>/.noisecraft.lock`` (``flock`` on Linux and macOS, ``LockFileEx`` on Windows) that the kernel
drops when the process dies, so a killed run never blocks the next one and no stale lock needs
breaking by hand. The lock file itself stays (filelock keeps it so that waiters share one inode), except
in a folder the lock created and nothing else wrote to (a run refused before any work leaves no folder);
whoever holds the lock also writes ``.noisecraft.lock.json`` next to it (pid, host, start time, command:
what the refusal prints) and removes it on release. A lock on a network file system is only as good as
that file system's ``flock``.

Inside one process the lock is re-entrant for the thread that holds it (the CLI locks its ``--out``
before the training loop, which locks the same folder again) and refused for any other thread (two
ComfyUI workers on one run name).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional

__all__ = ["FolderBusy", "folder_lock", "lock_holder", "LOCK_NAME", "HOLDER_NAME"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".noisecraft.lock"
HOLDER_NAME = ".noisecraft.lock.json"

_held: dict[str, list] = {}  # canonical folder -> [thread id, depth, FileLock]
_held_guard = threading.Lock()


class FolderBusy(ValueError):
    """Another writer holds the folder (``folder``; ``holder``: what it recorded, or None)."""

    def __init__(self, folder: Path, holder: Optional[dict], message: str):
        super().__init__(message)
        self.folder, self.holder = folder, holder


def lock_holder(folder: str | os.PathLike) -> Optional[dict]:
    """What the current (or last, if it was killed) holder of ``folder`` recorded: pid, host, started, command."""
    try:
        data = json.loads((Path(folder) / HOLDER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "another process (it has not said which yet)"
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command')}")


def _command_line() -> str:
    first = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    if os.path.basename(first) == "__main__.py":  # python -m package
        first = f"python -m {os.path.basename(os.path.dirname(first))}"
    argv = [os.path.basename(first) if os.sep in first else first] + list(sys.argv[1:])
    text = " ".join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, what: str = "folder", fix: str = "wait for it to finish or stop it, "
                "or choose another folder", command: Optional[str] = None) -> Iterator[Path]:
    """Hold the one-writer lock of ``folder`` (created if needed) for the block.

    Raises :class:`FolderBusy` at once when another process, or another thread of this one, holds it:
    "<what> <folder> is in use by <pid, host, start, command>: <fix>". ``command`` is what this holder
    records (default: this process's command line).
    """
    from filelock import FileLock, Timeout

    from .io import ensure_dir

    created = not Path(folder).exists()
    folder = ensure_dir(folder, None)
    key = os.path.realpath(folder)
    me = threading.get_ident()
    with _held_guard:
        entry = _held.get(key)
        if entry is not None:
            if entry[0] != me:
                holder = lock_holder(folder)
                raise FolderBusy(folder, holder, f"{what} {folder} is in use by another run of this process "
                                                 f"({_describe(holder)}): {fix}")
            entry[1] += 1
    if entry is not None:
        try:
            yield folder
        finally:
            with _held_guard:
                entry[1] -= 1
        return
    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = lock_holder(folder)
        raise FolderBusy(folder, holder, f"{what} {folder} is in use by {_describe(holder)}: {fix}") from None
    with _held_guard:
        _held[key] = [me, 1, lock]
    holder_path = folder / HOLDER_NAME
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                  "command": command or _command_line()}
        from .io import atomic_write_json

        atomic_write_json(holder_path, record)
        yield folder
    finally:
        with _held_guard:
            _held.pop(key, None)
        try:
            holder_path.unlink()
            if created and os.listdir(folder) == [LOCK_NAME]:  # a run refused before it wrote anything: no trace
                (folder / LOCK_NAME).unlink()
                folder.rmdir()
        except OSError:
            pass
        lock.release()
