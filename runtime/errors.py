"""The one kind of error a command reports as a single line (no traceback) and exits 2 on."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix — a bad option, dataset, backbone name, cache or weights file.

    The message says what is wrong and what to do; the command line prints it and exits with status 2.
    Every stage's own error (``ConfigError``, ``DatasetError``, ``CacheError``, ...) derives from it.
    """
