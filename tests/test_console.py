"""What a user sees: progress bars on a terminal, plain lines in a log file (issue #13)."""

from __future__ import annotations

import logging
import sys

import pytest
from tqdm.auto import tqdm

from runtime.console import progress, setup_logging


def test_progress_in_a_log_file_is_plain_lines_without_carriage_returns(capsys: pytest.CaptureFixture) -> None:
    setup_logging(0)
    assert not sys.stderr.isatty()  # captured: as a batch job's log file
    outer = progress(total=3, desc="caches", unit="cache", mininterval=0)
    for _ in range(3):
        for _ in progress(range(4), desc="epochs", unit="epoch", leave=False, mininterval=0):
            logging.getLogger("probe").info("an ordinary log line")
        outer.update(1)
    outer.close()
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert sum("progress: caches: " in line for line in lines) == 3  # one line per step, no redraws
    assert "progress: caches: 3/3 cache" in lines[-1] and "cache/s" in lines[-1]
    assert sum("an ordinary log line" in line for line in lines) == 12


def test_a_postfix_per_step_adds_no_lines_to_a_log_file(capsys: pytest.CaptureFixture) -> None:
    """A training loop sets the loss on its bar every batch: in a log file that is no line per batch (tqdm's
    set_postfix refreshes by default), and the lines that are written carry the current count and postfix."""
    setup_logging(0)
    bar = progress(range(40), desc="epoch 1/3", unit="batch", mininterval=3600)
    for i, _ in enumerate(bar):
        bar.set_postfix(loss=f"{1 / (i + 1):.4f}")
    bar.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if "progress:" in line]
    assert len(lines) == 1 and "epoch 1/3: 40/40 batch" in lines[0] and "loss=0.0250" in lines[0]


def test_no_progress_means_no_output_and_a_terminal_gets_tqdm(capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    setup_logging(0)
    for _ in progress(range(3), desc="quiet", enabled=False):
        pass
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = progress(range(3), desc="terminal")
    assert type(bar) is tqdm and not bar.disable
    bar.close()
