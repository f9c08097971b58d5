"""How long the whole `python -m probe --grid --baseline logreg` takes, and where the time goes (issue #12).

Every figure comes from this one run, side by side:

  1. 10,000 x 2,048 float16 features, 10 classes (synthetic, with class structure, written as a real cache
     into a real workdir): the whole command as a user runs it (a fresh process: start-up, grid, baseline,
     bootstrap CIs, kNN, head exports, plots, report), its per-phase breakdown from results.json, and the
     rest (start-up, report) as wall time minus the phases.         goal <= 15 s
  2. On those features: the linear heads of the grid alone (goal <= 5 s; and in float32 beside them where the
     grid's products default to bfloat16 on this CPU); the logistic-regression baseline
     against scikit-learn's LogisticRegression over the same C grid (warm-started, what the baseline used
     to be) and against the grid (goal: baseline <= grid); 1,000 bootstrap resamples of 10,000 test
     images (goal: well under a second).
  3. The demo experiment (configs/demo.yaml, random weights): extraction, then the whole probe command;
     probe / extraction (goal <= 25%).
  4. ResNet-50 @ 224 px on the demo digits (random weights): extraction, then the whole probe command;
     probe / extraction (goal <= 5%).
  In 3 and 4 also the baseline's phase against the grid's.

The whole probe command runs ``--repeats`` times (default 3) on the same workdir: this machine is shared and one
run can be 20% off another. Its figure is the median run, with the range beside it; the phases are the median
run's.

    python benchmarks/probe_speed.py [--skip-resnet50] [--skip-demo] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache import open_cache, schema  # noqa: E402
from cache.reader import read_key  # noqa: E402
from cache.writer import CacheWriter, Rows  # noqa: E402

N, D, C = 10_000, 2048, 10


def command(module: str, *args: str) -> float:
    """Wall seconds of ``python -m module args`` in a fresh process (start-up included); raises on failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module, *args, "--no-progress", "-q"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"python -m {module} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds


def synthetic_features(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class means plus isotropic noise: a linear probe reaches ~45% accuracy, so heads differ and train."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(C, D)).astype(np.float32) * 0.04
    y = np.sort(rng.integers(0, C, N))
    x = (centers[y] + rng.normal(size=(N, D)).astype(np.float32)).astype(np.float16)
    return x, y


def synthetic_workdir(work: Path) -> Path:
    """A workdir whose one cache holds the 10,000 x 2,048 features: a 10,000-image folder (4x4 px) is extracted
    by a tiny backbone for the dataset record and the rows, then a cache with the same rows and key but the
    synthetic features replaces it."""
    x, y = synthetic_features()
    data = work / "images"
    for i, label in enumerate(y):
        folder = data / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), i % 251, np.uint8)).save(folder / f"{i:05d}.png")
    command("extract", "--data", str(data), "--workdir", str(work), "--backbones", "test_resnet.r160_in1k",
            "--image-size", "32", "--no-pretrained")
    (tiny,) = (work / "features").glob("*.h5")
    key, _, annotations = read_key(tiny)
    with h5py.File(tiny, "r") as f:
        ids = [i.decode() if isinstance(i, bytes) else i for i in f[schema.IDS][...]]
        labels, splits = f[schema.LABELS][...], [s.decode() for s in f[schema.SPLIT][...]]
        classes, meta = json.loads(f.attrs[schema.ATTR_CLASSES]), json.loads(f.attrs[schema.ATTR_META])
    # Each row gets the synthetic features of an image of its class.
    by_class = {c: iter(np.flatnonzero(y == c)) for c in range(C)}
    pooled = np.stack([x[next(by_class[label])] for label in labels])
    key = {**key, "backbone": "synthetic-2048", "model": "synthetic-2048"}
    rows = Rows(classes, ids, labels, splits, np.zeros(len(ids), np.int16), annotations)
    writer = CacheWriter(tiny.with_name("synthetic-2048@32.h5"), key=key, rows=rows, feature_dim=D, map_shape=None,
                         dtype="float16", meta=meta, start_row=0)
    writer.write(0, pooled)
    writer.finish()
    tiny.unlink()
    return work


def phases(work: Path) -> dict[str, float]:
    """Seconds per phase, summed over backbones; the training-free scores' phase as its two parts."""
    data = json.loads((work / "probe" / "results.json").read_text())
    total: dict[str, float] = {}
    for entry in data["leaderboard"]:
        parts = dict(entry["phase_seconds"])
        transfer = entry.get("transfer") or {}
        if "LogME and kNN" in parts and "logme_seconds" in transfer:
            del parts["LogME and kNN"]
            parts |= {"LogME": transfer["logme_seconds"], "kNN leave-one-out": transfer["knn_seconds"]}
        for name, seconds in parts.items():
            total[name] = total.get(name, 0.0) + seconds
    return total


def print_phases(wall: float, parts: dict[str, float]) -> None:
    for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"      {name:<22} {seconds:6.2f} s  {seconds / wall:5.1%}")
    rest = wall - sum(parts.values())
    print(f"      {'start-up, report, rest':<22} {rest:6.2f} s  {rest / wall:5.1%}")


def probe_command(work: Path, repeats: int) -> tuple[float, dict[str, float], str]:
    """The whole probe command, ``repeats`` times: the median run's wall seconds and phases, and the runs' range."""
    runs = []
    for _ in range(max(1, repeats)):
        wall = command("probe", "--workdir", str(work), "--grid", "--baseline", "logreg")
        runs.append((wall, phases(work)))
    runs.sort(key=lambda run: run[0])
    wall, parts = runs[len(runs) // 2]
    spread = f" (median of {len(runs)}: {runs[0][0]:.1f}-{runs[-1][0]:.1f} s)" if len(runs) > 1 else ""
    return wall, parts, spread


def sklearn_path(xt: np.ndarray, yt: np.ndarray, cs: tuple[float, ...]) -> float:
    """Seconds of scikit-learn's LogisticRegression warm-started along ``cs`` (what the baseline used to run)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    xs = StandardScaler().fit_transform(xt)
    model = LogisticRegression(max_iter=1000, warm_start=True)
    for c in sorted(cs):
        model.set_params(C=c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(xs, yt)
    return time.perf_counter() - t0


def part_10k(repeats: int) -> None:
    import torch

    from configs.probe import load_grid
    from probe.baseline import DEFAULT_CS, logreg_baseline
    from probe.metrics import bootstrap_ci
    from probe.train import Fit, products_dtype, train_grid
    from runtime.device import dtype_name

    print(f"== 1. the whole probe command on {N:,} x {D:,} float16 features, {C} classes "
          f"({torch.get_num_threads()} torch threads) ==")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        work = synthetic_workdir(Path(tmp))
        print(f"   (workdir built in {time.perf_counter() - t0:.0f} s)")
        wall, parts, spread = probe_command(work, repeats)
        print(f"   python -m probe --grid --baseline logreg: {wall:.1f} s{spread}   (goal <= 15 s)")
        print_phases(wall, parts)
        (path,) = (work / "features").glob("*.h5")
        with open_cache(path) as fc:
            tr, va = fc.load("train"), fc.load("val")
    print(f"\n== 2. its parts, on the same {len(tr.labels):,} train / {len(va.labels):,} val features ==")
    grid = load_grid()
    linear = [h for h in grid.heads if h.type == "linear"]
    precision = dtype_name(products_dtype(grid.train, torch.device("cpu")))
    t0 = time.perf_counter()
    train_grid(linear, tr, va, C, Fit(options=grid.train))
    lin_s = time.perf_counter() - t0
    print(f"   linear heads of the grid ({len(linear)}, {precision} products): {lin_s:.1f} s   (goal <= 5 s)")
    if precision != "float32":  # what the default precision saves here, side by side
        t0 = time.perf_counter()
        train_grid(linear, tr, va, C, Fit(options=grid.train.model_copy(update={"precision": "float32"})))
        print(f"   the same in float32: {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    train_grid(grid.heads, tr, va, C, Fit(options=grid.train))
    grid_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = logreg_baseline(tr, va, num_classes=C)
    ours_s = time.perf_counter() - t0
    sk_s = sklearn_path(tr.features, tr.labels, DEFAULT_CS)
    print(f"   whole grid ({len(grid.heads)} heads): {grid_s:.1f} s")
    print(f"   logreg baseline, {len(DEFAULT_CS)} C values: {ours_s:.1f} s (chose C={ours.C:g}); scikit-learn's "
          f"LogisticRegression over the same C path: {sk_s:.1f} s ({sk_s / ours_s:.1f}x); baseline / grid = "
          f"{ours_s / grid_s:.2f}   (goal <= 1)")
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, N)
    proba = rng.dirichlet(np.ones(C), N)
    proba[np.arange(N), y] += 0.5
    proba /= proba.sum(1, keepdims=True)
    t0 = time.perf_counter()
    bootstrap_ci(y, proba, n_boot=1000)
    print(f"   bootstrap CIs of all 7 metrics, 1,000 resamples of {N:,} test images: {time.perf_counter() - t0:.2f} s"
          "   (goal: well under 1 s)")


def extract_then_probe(extract_args: list[str], goal: float, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ext = command("extract", "--workdir", str(work), *extract_args)
        wall, parts, spread = probe_command(work, repeats)
        n = len(list((work / "features").glob("*.h5")))
        print(f"   extraction ({n} backbone(s)): {ext:.1f} s; whole probe command: {wall:.1f} s{spread}; "
              f"probe / extraction = {wall / ext:.1%}   (goal <= {goal:.0%})")
        print_phases(wall, parts)
        base, grid = parts["logreg baseline"], parts["grid"]
        print(f"   baseline / grid = {base / grid:.2f}   (goal <= 1)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-resnet50", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each whole probe command (median)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPU core(s)\n")
    part_10k(args.repeats)
    if not args.skip_demo:
        print("\n== 3. the demo experiment (configs/demo.yaml, random weights) ==")
        extract_then_probe(["--config", "configs/demo.yaml", "--no-pretrained"], 0.25, args.repeats)
    if not args.skip_resnet50:
        print("\n== 4. ResNet-50 @ 224 px on the demo digits (random weights) ==")
        extract_then_probe(["--data", "demo", "--backbones", "resnet50.a1_in1k", "--no-pretrained"], 0.05,
                           args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
