"""Kill each command with SIGKILL at random moments, run it again, and compare with an uninterrupted run.

For each of extract, probe, profiling and finetune: an uninterrupted reference run (timed), then N times: start
the command, SIGKILL it after a random fraction of the reference's duration, check what a reader sees right
after the kill, run the same command again to the end, and compare its outputs with the reference's:

- extract: every cache's features and maps bit-identical (a fresh cache each time, so the kill leaves a partial
  file to resume);
- probe: right after the kill, results.json and the head files agree (the previous complete set); after the
  rerun, the same chosen heads and the same validation and test metrics;
- profiling: the same backbones and batch sizes measured, every ONNX file loads (timings differ by nature);
- finetune: a fresh study each time; the same finished trials with the same hyperparameters and metrics.

Printed per command: kills tried, recovered (the rerun exited 0), outputs equal.

    python benchmarks/fault_injection.py [--kills 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import CLASSES, make_image  # noqa: E402

BACKBONES = "test_resnet.r160_in1k,test_efficientnet.r160_in1k"


def command(module: str, work: Path, data: Path) -> list[str]:
    args = {
        "extract": ["--data", str(data), "--backbones", BACKBONES, "--no-pretrained", "--image-size", "64",
                    "--batch-size", "8", "--workers", "0", "--store-maps"],
        "probe": ["--grid", "--bootstrap", "50"],
        "profiling": ["--batch-sizes", "1", "2", "--min-runs", "5", "--min-seconds", "0", "--warmup", "1",
                      "--provider", "cpu"],
        "finetune": ["--top", "1", "--budget", "3", "--epochs", "2", "--gradcam-images", "0", "--no-latency",
                     "--data-workers", "0", "--bootstrap", "20"],
    }[module]
    return [sys.executable, "-m", module, "--workdir", str(work), "--no-progress", "-q", *args]


def run(cmd: list[str], kill_after: float | None = None) -> tuple[int, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if kill_after is None:
        return proc.wait(), time.perf_counter() - t0
    try:
        return proc.wait(timeout=kill_after), time.perf_counter() - t0  # finished before the kill
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return -9, time.perf_counter() - t0


# ----------------------------------------------------------------------------- what "equal" means per command


def caches(work: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for path in sorted((work / "features").glob("*.h5")):
        with h5py.File(path) as f:
            out[path.name] = {k: f[k][...] for k in ("pooled", "maps", "labels", "row_crc") if k in f}
    return out


def same_caches(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[n].keys() == b[n].keys() and all(np.array_equal(a[n][k], b[n][k]) for k in a[n]) for n in a)


def probe_summary(work: Path) -> list[tuple]:
    data = json.loads((work / "probe" / "results.json").read_text())
    return [(e["backbone"], e["head"], json.dumps(e["val"], sort_keys=True), json.dumps(e["test"], sort_keys=True))
            for e in data["leaderboard"]]


def probe_consistent(work: Path) -> bool:
    """What a reader sees: each head file is the head results.json names (or no results yet)."""
    import torch

    if not (work / "probe" / "results.json").exists():
        return True
    for e in json.loads((work / "probe" / "results.json").read_text())["leaderboard"]:
        config = torch.load(e["head_file"], weights_only=True)["config"]
        from configs.probe import HeadConfig

        if HeadConfig.model_validate(config).name != e["head"]:
            return False
    return True


def profiling_summary(work: Path) -> list[tuple]:
    import onnx

    records = json.loads((work / "profiling" / "performance.json").read_text())["records"]
    for r in records:
        onnx.checker.check_model(r["onnx_file"])
    return sorted((r["backbone"], r["image_size"], r["batch_size"]) for r in records)


def study_summary(work: Path) -> list[tuple]:
    (log,) = (work / "finetune").glob("*/trials.jsonl")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    starts = {e["trial"]: e["params"] for e in events if e["event"] == "start"}
    return sorted((e["trial"], json.dumps(starts[e["trial"]], sort_keys=True), e["status"], e["metric"])
                  for e in events if e["event"] == "end")


# ----------------------------------------------------------------------------- the experiment


def prepare(module: str, reference: Path, work: Path) -> None:
    """The state ``module`` starts from: a copy of the reference workdir without the module's own work."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(reference, work, symlinks=True)
    if module == "extract":
        for f in (work / "features").glob("*"):
            f.unlink()
    elif module == "finetune":
        shutil.rmtree(work / "finetune")
    if module != "extract":  # the copied results name the reference's files
        target = (work / "probe").resolve() / "results.json"
        target.write_text(target.read_text().replace(str(reference), str(work)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commands", default="extract,probe,profiling,finetune")
    args = p.parse_args()
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    data = base / "images"
    for c, cls in enumerate(CLASSES):
        for i in range(40):
            make_image(data / cls / f"{i:02d}.png", seed=100 * c + i, size=32)
    reference = base / "reference"
    seconds = {}
    for module in ("extract", "probe", "profiling", "finetune"):
        rc, seconds[module] = run(command(module, reference, data))
        assert rc == 0, f"reference {module} failed"
    want = {"extract": caches(reference), "probe": probe_summary(reference),
            "profiling": profiling_summary(reference), "finetune": study_summary(reference)}
    print("reference run: " + ", ".join(f"{m} {s:.0f} s" for m, s in seconds.items()))
    print(f"\n{'command':10s} {'kills':>5s} {'killed':>6s} {'recovered':>9s} {'equal':>5s} {'readers ok':>10s}")
    for module in args.commands.split(","):
        tried = killed = recovered = equal = readers_ok = 0
        # Kill moments are drawn over the duration of an uninterrupted run from the same starting state (a rerun
        # of probe or profiling reuses what the reference left, so it is shorter than the reference).
        prepare(module, reference, base / f"{module}-run")
        _, duration = run(command(module, base / f"{module}-run", data))
        # Until N kills landed (a run that finishes first is not counted as a kill; this shared machine's speed
        # drifts, so the duration is updated from such runs), at most 3N tries.
        while killed < args.kills and tried < 3 * args.kills:
            work = base / f"{module}-run"
            prepare(module, reference, work)
            cmd = command(module, work, data)
            tried += 1
            rc, elapsed = run(cmd, kill_after=rng.uniform(0.05, 0.95) * duration)
            killed += rc == -9
            if rc != -9:
                duration = min(duration, elapsed)
            if module == "probe":
                readers_ok += probe_consistent(work)
            else:
                readers_ok += 1
            rc, _ = run(cmd)
            recovered += rc == 0
            if rc == 0:
                got = {"extract": caches, "probe": probe_summary, "profiling": profiling_summary,
                       "finetune": study_summary}[module](work)
                same = same_caches(got, want[module]) if module == "extract" else got == want[module]
                equal += bool(same)
        print(f"{module:10s} {tried:5d} {killed:6d} {recovered:9d} {equal:5d} {readers_ok:10d}", flush=True)
    print(f"\n(kills: runs started; killed: the kill landed before the command finished — only those count;"
          f" recovered / equal / readers ok: over all runs; workdirs under {base})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
