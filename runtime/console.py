"""What a user sees: logging set up once (and kept clear of progress bars), and summary tables."""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from tqdm.auto import tqdm


class _TqdmHandler(logging.Handler):
    """Writes log records through tqdm so they do not tear an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


class _LogBar(tqdm):
    """A progress bar for a log file: a plain line (count, rate, time left, postfix) every ``mininterval`` seconds and
    at the end, through logging — no carriage returns, no redraws."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("mininterval", 30.0)
        # its own output goes nowhere (display() logs instead), and tqdm.write() leaves a bar on another file alone
        kwargs.update(bar_format="{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
                      dynamic_ncols=False, file=io.StringIO())
        self._logged_n = 0  # the count of the last line logged
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if not self.disable and self.n:
            self._log()
        return True

    def _log(self) -> None:
        logging.getLogger("progress").info("%s", self.format_meter(**self.format_dict))
        self._logged_n = self.n

    def close(self) -> None:
        # The end gets its line whatever mininterval says (tqdm's own close displays nothing once disabled).
        if not self.disable and self.n and self.n != self._logged_n:
            self._log()
        super().close()

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        # Shown with the next periodic line: a forced refresh per step would log a line per step, and with the
        # count an iterating tqdm has not written back yet (it does so only every mininterval).
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress(iterable: Any = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """tqdm's bar on a terminal; plain log lines when stderr is a file (a batch job's log); nothing when not
    ``enabled`` (--no-progress)."""
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, dynamic_ncols=True, **kwargs)
    return _LogBar(iterable, **kwargs)


def setup_logging(verbosity: int = 0) -> None:
    """Configure the root logger once: INFO by default, DEBUG with -v, WARNING with -q."""
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _TqdmHandler):
            root.removeHandler(handler)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    # Third-party chatter that says nothing a user can act on.
    for noisy in ("timm", "h5py", "matplotlib", "PIL", "onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows`` (dicts), columns in the given or first-seen order."""
    if not rows:
        return "(nothing)"
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(columns)]
    line = lambda cells: "| " + " | ".join(s.ljust(w) for s, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep, *(line(r) for r in body)])


class Phases:
    """Wall time per phase of one unit of work (a backbone), each logged to ``log`` as it ends, so nothing runs
    unannounced for long; ``seconds`` keeps the totals per phase."""

    def __init__(self, name: str, log: logging.Logger) -> None:
        self.name, self.log, self.seconds = name, log, {}

    @contextmanager
    def __call__(self, phase: str, detail: str = "") -> Iterator[SimpleNamespace]:
        """Time the ``with`` body; its line says ``detail``, which the body may set once it knows (``as step``,
        ``step.detail = ...``: whether an export was reused is known only after it)."""
        t0 = time.perf_counter()
        step = SimpleNamespace(detail=detail)
        yield step
        seconds = time.perf_counter() - t0
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self.log.info("%s: %s%s %.2fs", self.name, phase, f" ({step.detail})" if step.detail else "", seconds)
