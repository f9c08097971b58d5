"""The fine-tuning configuration: fixed training options, the default trial, the search space.

``configs/finetune.yaml`` holds all of it; a user's file (or an experiment's
``search:`` mapping) overlays it. The space becomes a Nevergrad parametrization:
``log`` → ``ng.p.Log``, ``float`` → ``ng.p.Scalar``, ``int`` → an integer-cast
scalar, ``ordered`` → ``ng.p.TransitionChoice`` (neighbours are related, e.g.
batch sizes), ``choice`` → a deterministic ``ng.p.Choice``. A plain random
``Choice`` would make NGOpt treat the problem as noisy.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nevergrad as ng
import numpy as np
import yaml

from configs import config_file
from extract.config import ConfigError, coerce

SECTIONS = ("train", "defaults", "space", "augment", "gradcam")
KINDS = ("log", "float", "int", "ordered", "choice")


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 10
    warmup_epochs: float = 1.0  # per unfreezing stage (at most half of it)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    patience: int = 3
    clip_grad: float = 1.0
    accum_steps: int = 1
    class_weighted: bool = False
    max_blocks: int = 4
    freeze_bn_stats: bool = True
    frozen_from_cache: bool = True
    amp: bool = True
    channels_last: bool = True
    eval_batch_size: int = 128
    keep_last: bool = False

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "at least 1", self.epochs)
        _check(self.warmup_epochs >= 0, "train.warmup_epochs", "at least 0", self.warmup_epochs)
        _check(self.patience >= 1, "train.patience", "at least 1", self.patience)
        _check(self.clip_grad >= 0, "train.clip_grad", "at least 0 (0: off)", self.clip_grad)
        _check(self.accum_steps >= 1, "train.accum_steps", "at least 1", self.accum_steps)
        _check(self.max_blocks >= 1, "train.max_blocks", "at least 1", self.max_blocks)
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", "at least 1", self.eval_batch_size)


@dataclass(frozen=True)
class TrialParams:
    """What one trial trains with; every field may be searched."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    drop_rate: float = 0.0
    drop_path_rate: float = 0.05
    label_smoothing: float = 0.1
    frozen_epochs: int = 2
    last_block_epochs: int = 2
    final_lr_scale: float = 0.1
    batch_size: int = 32

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", "> 0", self.lr)
        _check(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        _check(0 < self.layer_decay <= 1, "layer_decay", "in (0, 1]", self.layer_decay)
        _check(0 <= self.drop_rate < 1, "drop_rate", "in [0, 1)", self.drop_rate)
        _check(0 <= self.drop_path_rate < 1, "drop_path_rate", "in [0, 1)", self.drop_path_rate)
        _check(0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)", self.label_smoothing)
        _check(self.frozen_epochs >= 0, "frozen_epochs", ">= 0", self.frozen_epochs)
        _check(self.last_block_epochs >= 0, "last_block_epochs", ">= 0", self.last_block_epochs)
        _check(self.final_lr_scale > 0, "final_lr_scale", "> 0", self.final_lr_scale)
        _check(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Augment:
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.4
    auto_augment: str | None = None
    re_prob: float = 0.0
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])


@dataclass(frozen=True)
class GradcamOptions:
    images: int = 20
    target_layers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Dimension:
    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()

    def parameter(self) -> ng.p.Parameter:
        if self.kind == "log":
            return ng.p.Log(lower=self.low, upper=self.high)
        if self.kind == "float":
            return ng.p.Scalar(lower=self.low, upper=self.high)
        if self.kind == "int":
            return ng.p.Scalar(lower=self.low, upper=self.high).set_integer_casting()
        if self.kind == "ordered":
            return ng.p.TransitionChoice(list(self.values))
        return ng.p.Choice(list(self.values), deterministic=True)

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: list(self.values) if self.values else [self.low, self.high]}


@dataclass(frozen=True)
class FinetuneSpec:
    train: TrainOptions
    defaults: TrialParams
    space: tuple[Dimension, ...]
    augment: Augment
    gradcam: GradcamOptions
    source: str = ""

    def parametrization(self, seed: int) -> ng.p.Dict:
        """The space as a Nevergrad parameter with its own seeded random state (replays ask the same points)."""
        param = ng.p.Dict(**{d.name: d.parameter() for d in self.space})
        param.random_state = np.random.RandomState(seed)
        return param

    def default_point(self) -> dict[str, Any]:
        """The defaults restricted to the searched names: the first suggestion of every search."""
        return {d.name: getattr(self.defaults, d.name) for d in self.space}

    def params(self, point: dict[str, Any]) -> TrialParams:
        """Defaults with a searched ``point`` applied (numpy scalars made plain)."""
        return dataclasses.replace(self.defaults, **{k: plain_value(v) for k, v in point.items()})

    def to_dict(self) -> dict[str, Any]:
        return {"train": dataclasses.asdict(self.train), "defaults": self.defaults.to_dict(),
                "space": {d.name: d.to_dict() for d in self.space}, "augment": dataclasses.asdict(self.augment),
                "gradcam": dataclasses.asdict(self.gradcam)}

    def fingerprint(self) -> str:
        """What a study's trials depend on: a resumed study must have the same."""
        keep = {k: v for k, v in self.to_dict().items() if k != "gradcam"}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _check(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: must be {what}, got {value!r}")


def plain_value(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


def _typed(cls: type, raw: Any, section: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {', '.join(unknown)}; known: {', '.join(hints)}")
    return cls(**{k: coerce(v, hints[k], key=f"{section}.{k}") for k, v in raw.items()})


def _dimension(name: str, raw: Any, defaults: TrialParams) -> Dimension:
    hints = typing.get_type_hints(TrialParams)
    key = f"space.{name}"
    if name not in hints:
        raise ConfigError(f"{key}: not a searchable hyperparameter; one of {', '.join(hints)}")
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in KINDS:
        raise ConfigError(f"{key}: expected one of {{{', '.join(f'{k}: ...' for k in KINDS)}}}, got {raw!r}")
    kind, arg = next(iter(raw.items()))
    tp = hints[name]
    default = getattr(defaults, name)
    if kind in ("ordered", "choice"):
        if not isinstance(arg, list) or len(arg) < 2:
            raise ConfigError(f"{key}: {kind} needs a list of at least two values, got {arg!r}")
        values = tuple(coerce(v, tp, key=f"{key}[{i}]") for i, v in enumerate(arg))
        if default not in values:
            raise ConfigError(f"{key}: the default {default!r} (defaults.{name}) is not among {list(values)}")
        return Dimension(name, kind, values=values)
    if not isinstance(arg, list) or len(arg) != 2:
        raise ConfigError(f"{key}: {kind} needs [low, high], got {arg!r}")
    low, high = (coerce(v, float, key=key) for v in arg)
    if kind == "int" and tp is not int:
        raise ConfigError(f"{key}: int range for a {tp.__name__} hyperparameter; use float or log")
    if kind != "int" and tp is int:
        raise ConfigError(f"{key}: {name} is an integer; use int: [low, high] or ordered: [...]")
    if not low < high or (kind == "log" and low <= 0):
        raise ConfigError(f"{key}: need low < high{' and low > 0' if kind == 'log' else ''}, got [{low}, {high}]")
    if not low <= default <= high:
        raise ConfigError(f"{key}: the default {default!r} (defaults.{name}) lies outside [{low}, {high}]")
    return Dimension(name, kind, low, high)


def merge(base: dict[str, Any], overlay: dict[str, Any] | None, origin: str) -> dict[str, Any]:
    """``overlay`` on ``base``: sections merge key by key, except ``space``, which is replaced whole."""
    out = copy.deepcopy(base)
    for section, value in (overlay or {}).items():
        if section not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section '{section}'; known: {', '.join(SECTIONS)}")
        if section == "space" or not isinstance(value, dict) or not isinstance(out.get(section), dict):
            out[section] = copy.deepcopy(value)
        else:
            out[section] = {**out[section], **value}
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the finetune config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}")
    return data


def load_spec(path: Path | None = None, overlay: dict[str, Any] | None = None) -> FinetuneSpec:
    """The shipped ``configs/finetune.yaml``, then ``path``, then ``overlay``; every key checked."""
    shipped = config_file("finetune.yaml")
    raw = _read_yaml(shipped)
    origins = [str(shipped)]
    if path is not None:
        raw = merge(raw, _read_yaml(path), str(path))
        origins.append(str(path))
    if overlay:
        raw = merge(raw, overlay, "finetune.search")
        origins.append("finetune.search")
    defaults = _typed(TrialParams, raw.get("defaults"), "defaults")
    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, dict):
        raise ConfigError(f"space: expected a mapping name -> {{kind: ...}}, got {space_raw!r}")
    space = tuple(_dimension(name, v, defaults) for name, v in space_raw.items())
    return FinetuneSpec(
        train=_typed(TrainOptions, raw.get("train"), "train"), defaults=defaults, space=space,
        augment=_typed(Augment, raw.get("augment"), "augment"), gradcam=_typed(GradcamOptions, raw.get("gradcam"), "gradcam"),
        source=" + ".join(origins))
