"""The grid of heads: ``configs/probe.yaml`` expanded into one :class:`HeadConfig` per head."""

from __future__ import annotations

import itertools
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from configs import config_file
from extract.config import ConfigError, coerce

HEAD_TYPES = ("linear", "mlp", "knn")
# How weight decay acts: "decoupled" is AdamW's; "l2" adds (weight_decay / 2) * ||W||^2 to the loss (Adam with L2),
# whose optimum is exactly L2-regularised logistic regression's for a linear head.
DECAY_MODES = ("decoupled", "l2")


@dataclass(frozen=True)
class HeadConfig:
    type: str = "linear"
    lr: float = 1e-3
    weight_decay: float = 1e-2
    decay: str = "decoupled"
    dropout: float = 0.0
    class_weighted: bool = False
    epochs: int = 20
    patience: int = 5
    hidden: tuple[int, ...] = ()
    k: int = 20
    temperature: float = 0.07

    def __post_init__(self) -> None:
        if self.type not in HEAD_TYPES:
            raise ConfigError(f"head type: one of {', '.join(HEAD_TYPES)}, got {self.type!r}")
        if self.decay not in DECAY_MODES:
            raise ConfigError(f"decay: one of {', '.join(DECAY_MODES)}, got {self.decay!r}")
        if self.type == "mlp" and not self.hidden:
            raise ConfigError("mlp heads need 'hidden' sizes, e.g. [1024]")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.dropout < 1 or self.epochs < 1 or self.patience < 1:
            raise ConfigError(f"head {self.name}: lr > 0, weight_decay >= 0, 0 <= dropout < 1, epochs and patience >= 1")
        if self.k < 1 or self.temperature <= 0:
            raise ConfigError(f"head {self.name}: k >= 1 and temperature > 0")

    @property
    def trainable(self) -> bool:
        return self.type != "knn"

    @property
    def name(self) -> str:
        """A short, unique, human-readable identifier."""
        if self.type == "knn":
            return f"knn-k{self.k}-t{self.temperature:g}"
        parts = [self.type]
        if self.type == "mlp":
            parts.append("h" + "x".join(str(h) for h in self.hidden))
            parts.append(f"do{self.dropout:g}")
        parts += [f"lr{self.lr:g}", f"{'l2_' if self.decay == 'l2' else 'wd'}{self.weight_decay:g}", f"e{self.epochs}"]
        if self.class_weighted:
            parts.append("cw")
        return "-".join(parts)

    def seed_for(self, seed: int) -> int:
        """Per-head seed: the same head trains identically alone or inside a grid."""
        return zlib.crc32(f"{seed}:{self.name}".encode()) & 0x7FFFFFFF

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


@dataclass(frozen=True)
class TrainOptions:
    batch_size: int = 256
    warmup_epochs: int = 1
    standardize: bool = True
    # A head's epoch (and the grid's head) is chosen by its validation metric averaged over this many
    # consecutive epochs, past warm-up: one lucky epoch of a noisy small validation split is not chosen.
    smooth_epochs: int = 3


@dataclass(frozen=True)
class Grid:
    heads: list[HeadConfig]
    default: HeadConfig
    train: TrainOptions = field(default_factory=TrainOptions)


_FIELDS = {f: t for f, t in HeadConfig.__annotations__.items()}
_TYPES = {"lr": float, "weight_decay": float, "decay": str, "dropout": float, "class_weighted": bool, "epochs": int,
          "patience": int, "k": int, "temperature": float}


def _head(values: dict[str, Any], where: str) -> HeadConfig:
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key == "type":
            kwargs[key] = str(value)
        elif key == "hidden":
            kwargs[key] = tuple(coerce(value, list[int], key=f"{where}.hidden"))
        elif key in _TYPES:
            kwargs[key] = coerce(value, _TYPES[key], key=f"{where}.{key}")
        else:
            raise ConfigError(f"{where}: unknown key '{key}'. Known: {', '.join(['type', 'hidden', *_TYPES])}")
    try:
        return HeadConfig(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_grid(path: Path | None = None) -> Grid:
    """Read and expand a grid file (the shipped ``configs/probe.yaml`` by default)."""
    path = Path(path) if path else config_file("probe.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the probe grid ({exc})") from None
    unknown = set(data) - {"train", "heads", "default"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected train, heads, default")
    train_raw = data.get("train") or {}
    bad = set(train_raw) - {"batch_size", "warmup_epochs", "standardize", "smooth_epochs"}
    if bad:
        raise ConfigError(f"{path}: unknown key(s) train.{sorted(bad)}")
    train = TrainOptions(
        batch_size=coerce(train_raw.get("batch_size", 256), int, key="train.batch_size"),
        warmup_epochs=coerce(train_raw.get("warmup_epochs", 1), int, key="train.warmup_epochs"),
        standardize=coerce(train_raw.get("standardize", True), bool, key="train.standardize"),
        smooth_epochs=coerce(train_raw.get("smooth_epochs", 3), int, key="train.smooth_epochs"),
    )
    if train.smooth_epochs < 1:
        raise ConfigError(f"{path}: train.smooth_epochs: must be at least 1 (1: the single best epoch), "
                          f"got {train.smooth_epochs}")
    heads: list[HeadConfig] = []
    for head_type, axes in (data.get("heads") or {}).items():
        if head_type not in HEAD_TYPES:
            raise ConfigError(f"{path}: heads.{head_type}: unknown head type; use {', '.join(HEAD_TYPES)}")
        axes = axes or {}
        names = list(axes)
        values = [v if isinstance(v, list) else [v] for v in axes.values()]
        if head_type == "mlp" and "hidden" in axes:
            # hidden is a list of layer-size lists: [[1024], [512, 512]]
            values[names.index("hidden")] = [h if isinstance(h, list) else [h] for h in axes["hidden"]]
        for combo in itertools.product(*values):
            heads.append(_head({"type": head_type, **dict(zip(names, combo))}, f"{path}: heads.{head_type}"))
    names_seen = [h.name for h in heads]
    dupes = {n for n in names_seen if names_seen.count(n) > 1}
    if dupes:
        raise ConfigError(f"{path}: the grid repeats head(s) {sorted(dupes)}")
    default = _head(data.get("default") or {"type": "linear"}, f"{path}: default")
    return Grid(heads=heads, default=default, train=train)
