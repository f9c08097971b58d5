"""Cache-then-grid against the naive way, side by side in one run (issue #3).

  (a) naive: train ONE linear head for E epochs with the frozen backbone running forward on every
      batch of every epoch (training and validation images decoded each time);
  (b) this way: one extraction into the cache + the WHOLE default grid (48 heads) on the cache.

Prints both times, the speed-up, and the grid's time as a fraction of the extraction's (goal <= 5%).
Then: the best head's validation accuracy
against scikit-learn's logistic-regression baseline (goal: >= baseline - 1 point), both chosen by
validation accuracy: on the cache's own split, and — because one point is under 3 images of the
demo's validation split — averaged over K stratified folds of train+val as well. (The grid on 10,000 x 2,048
features, and the whole probe command: benchmarks/probe_speed.py.)

    python benchmarks/probe_vs_naive.py [--backbone resnet50.a1_in1k] [--image-size 224] [--epochs 2]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm.data
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import open_cache  # noqa: E402
from configs.extract import ExtractSettings  # noqa: E402
from configs.probe import load_grid  # noqa: E402
from extract.backbones import BackboneSpec  # noqa: E402
from extract.dataset import default_workers, load_dataset  # noqa: E402
from extract.extractor import ImageRows, RowPlan, extract_one  # noqa: E402
from extract.models import Weights, create_backbone, preprocessing  # noqa: E402
from probe.baseline import logreg_baseline  # noqa: E402
from probe.train import Examples, Fit, train_grid  # noqa: E402
from runtime.device import pick_device  # noqa: E402


def naive(model, dataset, data_cfg, *, epochs: int, batch_size: int, workers: int, lr: float, device) -> tuple[float, float]:
    """One linear head trained through the frozen backbone; returns (seconds, best val accuracy)."""
    plan = RowPlan.build(dataset, 0)
    tf = timm.data.create_transform(**data_cfg, is_training=False)
    rows = ImageRows(plan, 0, tf, None, 0)
    train_idx = [i for i, s in enumerate(plan.splits) if s == "train"]
    val_idx = [i for i, s in enumerate(plan.splits) if s == "val"]
    labels = torch.as_tensor(plan.labels)
    n_classes = len(dataset.classes)
    head: torch.nn.Module | None = None
    opt = None
    best = 0.0
    t0 = time.perf_counter()
    steps = epochs * math.ceil(len(train_idx) / batch_size)
    step = 0
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(epoch)
        order = [train_idx[i] for i in torch.randperm(len(train_idx), generator=g)]
        loader = DataLoader(torch.utils.data.Subset(rows, order), batch_size=batch_size, num_workers=workers)
        lab = labels[order]
        for b, x in enumerate(loader):
            with torch.inference_mode():
                feats = model(x.to(device)).float()
            if opt is None:  # lazily, once the feature width is known
                head = torch.nn.Linear(feats.shape[1], n_classes).to(device)
                opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(head(feats.clone()), lab[b * batch_size:(b + 1) * batch_size].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        preds = []
        for x in DataLoader(torch.utils.data.Subset(rows, val_idx), batch_size=batch_size, num_workers=workers):
            with torch.inference_mode():
                preds.append(head(model(x.to(device)).float()).argmax(1).cpu())
        best = max(best, float((torch.cat(preds) == labels[val_idx]).float().mean()))
    return time.perf_counter() - t0, best


def head_vs_logreg(x_train, y_train, x_val, y_val, *, grid, num_classes: int, device) -> dict:
    """The whole grid (timed) and logreg, the best of each chosen by validation accuracy."""
    t0 = time.perf_counter()
    trained = train_grid(grid.heads, Examples(x_train, y_train), Examples(x_val, y_val), num_classes,
                         Fit(metric="accuracy", options=grid.train, device=device))
    seconds = time.perf_counter() - t0
    best = max(trained, key=lambda t: t.val_metric)
    lr = logreg_baseline(Examples(x_train, y_train), Examples(x_val, y_val), metric="accuracy", num_classes=num_classes)
    # Paired bootstrap over validation images: how much of the difference one split's sampling explains.
    head_right = best.val_proba.argmax(1) == y_val
    lr_right = lr.predict_proba(x_val).argmax(1) == y_val
    draws = np.random.default_rng(0).integers(0, len(y_val), (2000, len(y_val)))
    diffs = (head_right[draws].mean(1) - lr_right[draws].mean(1)) * 100
    return {"seconds": seconds, "head": best.val_metric, "name": best.config.name, "logreg": lr.val_metric, "C": lr.C,
            "ci": np.percentile(diffs, [2.5, 97.5])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet50.a1_in1k")
    p.add_argument("--image-size", type=int, default=None, help="default: the backbone's own")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the naive single head")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--folds", type=int, default=5, help="folds of train+val for the head-vs-logreg comparison (0: skip)")
    args = p.parse_args()
    device = pick_device(args.device)
    workers = default_workers()
    spec = BackboneSpec(model=args.backbone)
    weights = Weights("random", None, "random")  # no network here; timing does not depend on the weights
    data_cfg, size_kwargs = preprocessing(spec, args.image_size)
    model, _ = create_backbone(spec, weights, **size_kwargs)
    model.to(device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dataset = load_dataset("demo", workdir=work)
        size = data_cfg["input_size"][-1]
        print(f"{args.backbone} @ {size}px (random weights), demo digits: {len(dataset.samples)} images, "
              f"{torch.get_num_threads()} torch threads, {workers} decoding worker(s), device {device}\n")

        naive_s, _ = naive(model, dataset, data_cfg, epochs=args.epochs, batch_size=args.batch_size,
                                   workers=workers, lr=1e-3, device=device)
        t0 = time.perf_counter()
        settings = ExtractSettings(data="demo", workdir=work, batch_size=args.batch_size, workers=workers,
                                   progress=False)
        result = extract_one(spec, lambda: (model, []), weights, data_cfg, size_kwargs, dataset, device, settings)
        extract_s = time.perf_counter() - t0
        grid = load_grid()
        with open_cache(result.path) as fc:
            tr, va = fc.load("train"), fc.load("val")
        n_classes = len(dataset.classes)
        split = head_vs_logreg(tr.features, tr.labels, va.features, va.labels, grid=grid, num_classes=n_classes,
                               device=device)
        grid_s = split["seconds"]
        fold_rows = []
        if args.folds > 1:
            x = np.concatenate([tr.features, va.features])
            y = np.concatenate([tr.labels, va.labels])
            for a, b in StratifiedKFold(args.folds, shuffle=True, random_state=0).split(x, y):
                fold_rows.append(head_vs_logreg(x[a], y[a], x[b], y[b], grid=grid, num_classes=n_classes, device=device))

    per_epoch = naive_s / args.epochs
    head_epochs = grid.default.epochs
    print(f"(a) naive, 1 head x {args.epochs} epoch(s) through the backbone: {naive_s:8.1f} s  ({per_epoch:.1f} s/epoch measured)")
    print(f"(b) extraction once                                  : {extract_s:8.1f} s")
    print(f"    + whole default grid ({len(grid.heads)} heads) on the cache      : {grid_s:8.1f} s")
    print(f"    = total                                          : {extract_s + grid_s:8.1f} s")
    print(f"speed-up (a)/(b) = {naive_s / (extract_s + grid_s):.2f}x as measured ({args.epochs} naive epoch(s) of ONE head "
          f"against {len(grid.heads)} heads); the default head's {head_epochs} epochs the naive way would take "
          f"{head_epochs} x {per_epoch:.1f} s = {head_epochs * per_epoch:.0f} s, "
          f"{head_epochs * per_epoch / (extract_s + grid_s):.1f}x (b)")
    print(f"grid / extraction = {grid_s / extract_s:.1%}   (goal <= 5%)")
    print(f"best grid head val acc {split['head']:.4f} ({split['name']}) vs logreg {split['logreg']:.4f} "
          f"(C={split['C']:g}) on the cache's split ({len(va.labels)} images): difference "
          f"{100 * (split['head'] - split['logreg']):+.1f} points, paired-bootstrap 95% interval "
          f"[{split['ci'][0]:+.1f}, {split['ci'][1]:+.1f}]   (goal >= -1.0)")
    if fold_rows:
        diffs = np.array([100 * (r["head"] - r["logreg"]) for r in fold_rows])
        print(f"  over {len(fold_rows)} folds of train+val: best head {np.mean([r['head'] for r in fold_rows]):.4f} vs "
              f"logreg {np.mean([r['logreg'] for r in fold_rows]):.4f}, difference {diffs.mean():+.2f} points "
              f"(folds: {', '.join(f'{d:+.1f}' for d in diffs)})   (goal >= -1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
