"""Locks between processes on one workdir (users run array jobs on shared file systems).

A lock is an OS file lock (the ``filelock`` package: ``fcntl`` on POSIX), so the system releases it when
its process dies: a lock left by a killed process never blocks. Beside each lock file a note names its
holder (pid, host, since when), so a second process can say who it waits for or refuses to disturb.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from runtime.errors import UserError
from runtime.files import atomic_write_text

log = logging.getLogger(__name__)


class Busy(UserError):
    """Another process holds the lock."""


def _holder(note: Path) -> str:
    try:
        who = json.loads(note.read_text())
        return f"pid {who['pid']} on {who['host']}, since {who['since']}"
    except (OSError, ValueError, KeyError):
        return "another process"


@contextlib.contextmanager
def exclusive(workdir: Path, name: str, wait: bool = False) -> Iterator[None]:
    """Hold the lock ``name`` of ``workdir`` for the block. ``wait``: block until the holder is done (and say
    so); otherwise a :class:`Busy` error that names the holder."""
    folder = Path(workdir) / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / f"{name}.lock")
    note = folder / f"{name}.owner"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            raise Busy(f"{name} in {workdir} is in use by {_holder(note)}; wait for it to finish, or use another "
                       "--workdir") from None
        log.info("%s is in use by %s; waiting for it", name, _holder(note))
        lock.acquire()
    try:
        # Whole or not at all: a process that finds the lock taken reads the note to name its holder.
        atomic_write_text(note, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        yield
    finally:
        lock.release()
