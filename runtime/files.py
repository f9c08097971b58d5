"""Writing result files so that a reader never sees half of one — or half of a set of them."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from runtime.errors import write_failed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files written through a temporary file get the permissions any other file gets (mkstemp makes them 0600).
FILE_MODE = 0o666 & ~_umask()


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A file opened with ``mode`` ("w" or "wb") that becomes ``path`` when the block ends without an error: a reader
    sees the old file or the complete new one, never half of one, and a failed write (a full disk) leaves no file
    behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` so that a reader sees the old file or the new one, never half of one."""
    with atomic_file(path) as fh:
        fh.write(text)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``rows`` (dicts) as CSV, columns in first-seen order; lists and dicts as JSON cells."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    atomic_write_text(path, out.getvalue())


def save_torch(obj: Any, path: Path) -> Path:
    """``torch.save`` so that ``path`` is the old file or the complete new one, and a failed write (a full disk)
    is a :class:`~runtime.errors.WriteFailed` that names the file, not torch's zip-writer message."""
    import torch

    path = Path(path)
    try:
        with atomic_file(path, "wb") as fh:
            torch.save(obj, fh)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and shutil.disk_usage(path.parent).free < (1 << 20):
            exc = OSError(errno.ENOSPC, "No space left on device")  # torch only says "unexpected pos N vs M"
        raise write_failed(exc, path) from exc
    return path


def new_version(link: Path) -> Path:
    """An empty folder to write the next version of ``link``'s contents into (see :func:`publish`)."""
    versions = link.parent / f".{link.name}.versions"
    folder = versions / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    return folder


def publish(version: Path, link: Path) -> None:
    """Make ``link`` (a symbolic link) point to ``version`` in one atomic step.

    A reader that opens files under ``link`` sees the complete previous set or the complete new one, never
    a mix, whenever the writer is killed. The previous version is kept (a reader may still be in it);
    older ones, and versions of writers that were killed before publishing, are removed. The caller
    holds the lock that keeps a second writer out meanwhile.
    """
    versions = version.parent
    previous = None
    if link.is_symlink():
        previous = (link.parent / os.readlink(link)).resolve()
    elif link.exists():  # a plain folder from before versions were kept: it becomes the previous version
        previous = versions / f"{time.strftime('%Y%m%d-%H%M%S')}-before"
        os.rename(link, previous)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(version, link.parent), tmp)
    os.replace(tmp, link)
    for old in versions.iterdir():
        if old.resolve() not in (version.resolve(), previous):
            shutil.rmtree(old, ignore_errors=True)
