"""The errors a command reports as one line (no traceback) and exits 2 on."""

from __future__ import annotations

import errno
import re

# What the operating system says when storage refuses a write, and what a user can do about it.
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error",
    errno.EFBIG: "file too large",
}


class UserError(Exception):
    """Something the user can fix — a bad option, dataset, backbone name, cache or weights file, a full disk.

    The message says what is wrong and what to do; the command line prints it and exits with status 2.
    Every stage's own error (``ConfigError``, ``DatasetError``, ``CacheError``, ...) derives from it.
    """


class WriteFailed(UserError):
    """A file could not be written; the command stops and publishes nothing that looks complete."""


def write_failed(exc: BaseException, path: object = None) -> WriteFailed:
    """``exc`` (a failed write of ``path``) as a :class:`WriteFailed` that says what to do."""
    code = getattr(exc, "errno", None)
    if code is None and (found := re.search(r"errno = (\d+)", str(exc))):  # HDF5 puts it in the message
        code = int(found.group(1))
    reason = STORAGE_ERRNOS.get(code) or (str(exc).splitlines() or [type(exc).__name__])[0]
    where = path if path is not None else getattr(exc, "filename", None)
    return WriteFailed(f"{reason} writing {where or 'a result file'}; free space (or fix the permission) and run "
                       "the same command again — it resumes where it stopped")


def is_storage_failure(exc: BaseException) -> bool:
    """A write the machine refused (full disk, quota, permission): the environment's fault, not a result."""
    return isinstance(as_user_error(exc), WriteFailed)


def as_user_error(exc: BaseException) -> UserError | None:
    """``exc`` as the one-line error a command prints, or ``None`` for a bug (which keeps its traceback)."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return write_failed(exc)
    # torch.save reports a failed write as a RuntimeError from its zip writer (inline_container.cc): "file write
    # failed", or on a full disk "unexpected pos N vs M" when a short write left the stream behind.
    if isinstance(exc, RuntimeError) and ("file write failed" in str(exc) or "inline_container.cc" in str(exc)):
        return write_failed(exc, "a checkpoint" if "errno" not in str(exc) else None)
    return None
