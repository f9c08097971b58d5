"""A command's process (runtime/process.py): its imports kept out of the collector's walks, and its exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_a_command_exits_with_mains_code_after_atexit_handlers_and_flushed_files(tmp_path: Path) -> None:
    """``python -m <stage>`` ends with runtime.process.exit_with: the last collection at shutdown is skipped (a
    second with torch loaded), nothing else — the exit code, atexit handlers and buffered writes are as with
    sys.exit."""
    out = tmp_path / "buffered.txt"
    code = ("import atexit, gc; from runtime.process import exit_with; "
            f"handle = open({str(out)!r}, 'w'); handle.write('written'); "  # left open, its buffer unflushed
            "atexit.register(lambda: print('atexit ran', gc.get_freeze_count() > 0)); exit_with(3)")
    done = _run(code)
    assert done.returncode == 3 and done.stdout.strip() == "atexit ran True", done.stderr
    assert out.read_text() == "written"


def test_a_commands_heavy_imports_are_never_walked_by_the_collector() -> None:
    """Between start_command and imports_done nothing is collected (torch, scikit-learn and matplotlib cost five full
    collections otherwise); after it, what they loaded is frozen and the collector runs again, and frees new cyclic
    garbage."""
    code = ("import gc; from runtime.process import start_command, imports_done; runs = []; "
            "gc.callbacks.append(lambda phase, info: phase == 'stop' and runs.append(info['generation'])); "
            "start_command(); import torch, sklearn.metrics, matplotlib.pyplot; imports_done(); "
            "during = list(runs); frozen = gc.get_freeze_count(); "
            "cycle = []; cycle.append(cycle); del cycle; freed = gc.collect(); "
            "print(during, frozen > 100_000, gc.isenabled(), freed >= 1)")
    done = _run(code)
    assert done.stdout.split(maxsplit=1) == ["[]", "True True True\n"], done.stderr
    unguarded = _run("import gc; runs = []; "
                     "gc.callbacks.append(lambda phase, info: phase == 'stop' and runs.append(info['generation'])); "
                     "import torch, sklearn.metrics, matplotlib.pyplot; print(runs.count(2))")
    assert int(unguarded.stdout) >= 1, unguarded.stderr  # what start_command saves: full collections during imports


def test_main_called_as_a_library_leaves_the_collector_alone() -> None:
    """imports_done without start_command (a test or a notebook calling main()) freezes nothing: that process's
    pending garbage stays collectable."""
    done = _run("import gc; from runtime.process import imports_done; gc.disable(); imports_done(); "
                "print(gc.get_freeze_count(), gc.isenabled())")
    assert done.stdout.split() == ["0", "False"], done.stderr


@pytest.mark.parametrize("stage", ["extract", "probe", "profiling", "finetune"])
def test_every_stage_starts_as_a_command(stage: str, tmp_path: Path) -> None:
    """``python -m <stage>`` turns the collector off before its CLI loads: a missing workdir (extract: missing data)
    is answered before the heavy imports, so the collector is still off when the process exits."""
    argv = [stage, "--workdir", str(tmp_path / "missing")] + (["--data", str(tmp_path / "none")] if stage == "extract"
                                                               else [])
    code = textwrap.dedent(f"""
        import gc, runpy, sys
        import runtime.process as p
        sys.argv = {argv!r}
        try:
            runpy.run_module({stage!r}, run_name="__main__")
        except SystemExit as done:
            print(done.code, p._importing, gc.isenabled())
        """)
    done = _run(code)
    assert done.stdout.split() == ["2", "True", "False"], done.stdout + done.stderr
