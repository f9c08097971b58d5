"""`python -m extract`: run frozen backbones over a dataset once and cache their features in HDF5."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from extract.backbones import BackboneError
from extract.config import ConfigError, add_common_flags, document_defaults, settings_from_args, verbosity
from extract.console import format_table, setup_logging
from extract.dataset import DatasetError
from extract.models import WeightsError
from extract.pipeline import extract_features
from extract.settings import ExtractSettings

log = logging.getLogger("extract")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m extract",
        description="Stage one, part 1: run each frozen backbone over the dataset once and cache its features "
        "in WORKDIR/features/<backbone>@<size>.h5 (resumable; reused while its key matches).",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--workdir", type=Path, help="where every stage reads and writes")
    p.add_argument("--data", help="an image folder (root/<class>/* or root/{train,val,test}/<class>/*), "
                   "a CSV (path,label[,split|fold]), or 'demo' (scikit-learn's digits)")
    p.add_argument("--backbones", help="comma-separated set names from the backbones file (all, demo, tiny, ...), "
                   "timm names (resnet50.a1_in1k) or patterns ('convnext_*')")
    p.add_argument("--backbones-file", type=Path, help="YAML with named backbone sets (default: the shipped configs/backbones.yaml)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random weights (said in every output)")
    p.add_argument("--weights-dir", type=Path, help="folder of local weights: <name>.safetensors|.pth|.bin or <name>/model.safetensors")
    p.add_argument("--image-size", type=int, nargs="+", help="input size(s) overriding each backbone's own; several give a resolution sweep")
    p.add_argument("--batch-size", type=int, help="images per forward pass (halved automatically on out-of-memory)")
    p.add_argument("--workers", type=int, help="DataLoader decoding workers (default: one per spare core, at most 8)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="compute device")
    p.add_argument("--dtype", choices=["float16", "float32"], help="storage type of the pooled features")
    p.add_argument("--store-maps", action="store_true", help="also store the last feature map (float16)")
    p.add_argument("--views", type=int, help="augmented views of each training image to store (timm's training transform)")
    p.add_argument("--seed", type=int, help="seed of the train/val/test split and of the augmented views")
    p.add_argument("--split-ratios", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions for a dataset without a given split")
    p.add_argument("--fold", type=int, help="with a CSV 'fold' column: the fold used for validation")
    p.add_argument("--max-unreadable", type=float, help="fraction of unreadable images tolerated (skipped) before stopping")
    p.add_argument("--force", action="store_true", help="rebuild caches even when a matching one exists")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_common_flags(p, "extract")
    document_defaults(p, ExtractSettings())
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbosity(args))
    try:
        settings = settings_from_args(args, ExtractSettings, "extract")
        if not settings.data:
            raise ConfigError("data: required; pass --data PATH|demo or set extract.data in --config")
        results = extract_features(
            data=settings.data, backbones=settings.backbones, workdir=settings.workdir,
            backbones_file=settings.backbones_file, pretrained=settings.pretrained, weights_dir=settings.weights_dir,
            image_sizes=settings.image_size or None, batch_size=settings.batch_size, workers=settings.workers,
            device=settings.device, dtype=settings.dtype, store_maps=settings.store_maps, views=settings.views,
            seed=settings.seed, split_ratios=tuple(settings.split_ratios), fold=settings.fold,
            max_unreadable=settings.max_unreadable, force=settings.force, progress=settings.progress,
        )
    except (ConfigError, DatasetError, BackboneError, WeightsError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; run the same command again to resume")
        return 130
    columns = ["backbone", "size", "images", "dim", "seconds", "images/s", "status", "weights", "file"]
    print(format_table([r.as_row() for r in results], columns))
    print(f"\n{len(results)} cache(s) in {settings.workdir / 'features'}; dataset summary in {settings.workdir / 'dataset.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
