"""How a command's process ends (runtime/exit.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_a_command_exits_with_mains_code_after_atexit_handlers_and_flushed_files(tmp_path: Path) -> None:
    """``python -m <stage>`` ends with runtime.exit.exit_with: the last collection at shutdown is skipped (a second
    with torch loaded), nothing else — the exit code, atexit handlers and buffered writes are as with sys.exit."""
    out = tmp_path / "buffered.txt"
    code = ("import atexit, gc; from runtime.exit import exit_with; "
            f"handle = open({str(out)!r}, 'w'); handle.write('written'); "  # left open, its buffer unflushed
            "atexit.register(lambda: print('atexit ran', gc.get_freeze_count() > 0)); exit_with(3)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 3 and done.stdout.strip() == "atexit ran True", done.stderr
    assert out.read_text() == "written"
