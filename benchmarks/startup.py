"""How fast a command answers when there is no work to do (issue #9: within 2 seconds).

Each case runs as a fresh process, interleaved with the others, ``--repeats`` times; printed: the
median wall time of each, and each as a multiple of a bare ``python -c pass`` and of importing
torch and timm (what every command paid before they were imported lazily).

    python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    bad = tmp / "bad.yaml"
    bad.write_text("extract:\n  data: demo\n  batch_sise: 16\n")
    py = sys.executable
    cases = {
        "python -c pass": [py, "-c", "pass"],
        "import torch, timm": [py, "-c", "import torch, timm"],
        **{f"{c} --help": [py, "-m", c, "--help"] for c in ("extract", "probe", "profiling", "finetune")},
        "extract: config error": [py, "-m", "extract", "--config", str(bad), "--workdir", str(tmp / "w")],
        "extract: bad --data": [py, "-m", "extract", "--data", str(tmp / "missing"), "--workdir", str(tmp / "w"),
                                "--no-pretrained", "--backbones", "tiny"],
        "finetune: mistyped flag": [py, "-m", "finetune", "--optimzer", "random"],
        **{f"{c}: missing workdir": [py, "-m", c, "--workdir", str(tmp / "missing")]
           for c in ("probe", "profiling", "finetune")},
        "probe: bad grid file": [py, "-m", "probe", "--workdir", str(tmp / "missing"), "--grid-file", str(bad)],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, cmd in cases.items():  # interleaved: drift hits every case alike
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            times[name].append(time.perf_counter() - t0)
    bare = statistics.median(times["python -c pass"])
    heavy = statistics.median(times["import torch, timm"])
    print(f"{'case':28s} {'median s':>9s} {'x bare python':>14s} {'x torch+timm':>13s}   runs")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:28s} {m:9.2f} {m / bare:14.1f} {m / heavy:13.2f}   {[round(t, 2) for t in ts]}")
    worst = max(statistics.median(times[n]) for n in cases if n not in ("python -c pass", "import torch, timm"))
    print(f"\nslowest answer: {worst:.2f} s (goal: within 2 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
