"""The settings of ``python -m finetune`` and the fine-tuning file (``configs/finetune.yaml``).

The fine-tuning file holds the fixed training options (``train``), the default trial (``defaults``),
the search space (``space``), the augmentation and the Grad-CAM options. A user's file (``--space``)
and an experiment's inline ``search:`` mapping overlay the shipped one: sections merge key by key,
except ``space``, which is replaced whole. ``finetune/space.py`` turns the space into Nevergrad's
parametrization.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from configs import config_file
from configs.executor import JobCommandSettings
from configs.extract import Device
from configs.probe import Metric
from configs.profiling import Provider
from configs.settings import ConfigError, Settings, read_yaml, validate


class FinetuneSettings(JobCommandSettings):
    top: int = Field(3, ge=1, description="fine-tune the K best backbones (x resolution) of the probe leaderboard")
    backbones: tuple[str, ...] = Field((), description="names or patterns instead of --top",
                                       json_schema_extra={"default_text": "the --top best"})
    optimizer: Literal["nevergrad", "random", "none"] = Field(
        "nevergrad", description="the search: Nevergrad, random search (same budget and space), or the default "
        "configuration only")
    ng_optimizer: str = Field("NGOpt", description="Nevergrad optimizer name (NGOpt picks one from the space and "
                              "budget)")
    budget: int = Field(20, ge=1, description="trials per backbone, the default configuration included")
    workers: int = Field(1, ge=1, description="trials run at once: threads here, or jobs with --executor "
                         "slurm/gpus (Nevergrad is told: never more open asks)")
    attempts: int = Field(3, ge=1, description="with --executor slurm/gpus: submissions of a trial whose job is "
                          "killed (time limit, preemption, scancel) before it counts as failed; each resumes from "
                          "the trial's last.pt")
    metric: Metric | None = Field(None, description="selection metric on validation",
                                  json_schema_extra={"default_text": "the probe's"})
    head: Literal["probe", "random"] = Field("probe", description="start from the probe's chosen head, or a random "
                                             "linear one")
    space: Path | None = Field(None, description="a fine-tuning file overlaying the shipped configs/finetune.yaml",
                               json_schema_extra={"default_text": "none"})
    search: dict[str, Any] = Field({}, description="the fine-tuning file's sections inline (experiment files)",
                                   json_schema_extra={"flag": False})
    epochs: int | None = Field(None, ge=1, description="override train.epochs of the fine-tuning file",
                               json_schema_extra={"default_text": "train.epochs of the fine-tuning file"})
    gradcam_images: int | None = Field(None, ge=0, description="validation images per Grad-CAM grid (0: none)",
                                       json_schema_extra={"default_text": "gradcam.images of the fine-tuning file"})
    seed: int = Field(0, description="seed of the search, head initialisation, batch order and bootstrap")
    device: Device = Field("auto", description="where trials train")
    data_workers: int = Field(2, ge=0, description="image decoding workers of each trial")
    bootstrap: int = Field(1000, ge=10, description="bootstrap resamples of the test set for the confidence "
                           "intervals")
    latency: bool = Field(True, description="export the best model to ONNX and time it")
    provider: Provider = Field("auto", description="ONNX Runtime provider for the latency")
    restart: bool = Field(False, description="move existing studies aside and start over")
    progress: bool = Field(True, description="progress bars")

    def overlay(self) -> dict[str, Any]:
        """``search`` plus the shortcut flags, in the fine-tuning file's sections."""
        out = copy.deepcopy(self.search)
        if self.epochs is not None:
            out["train"] = {**out.get("train", {}), "epochs": self.epochs}
        if self.gradcam_images is not None:
            out["gradcam"] = {**out.get("gradcam", {}), "images": self.gradcam_images}
        return out


# ---- the fine-tuning file --------------------------------------------------------------------------------------

SECTIONS = ("train", "defaults", "space", "augment", "gradcam")


class TrainOptions(Settings):
    """Fixed for every trial (the fine-tuning file's ``train:``)."""

    epochs: int = Field(10, ge=1)
    warmup_epochs: float = Field(1.0, ge=0)  # per unfreezing stage (at most half of it)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    patience: int = Field(3, ge=1, description="epochs without a better validation metric before stopping, "
                          "counted in the last (whole-model) stage")
    clip_grad: float = Field(1.0, ge=0)
    accum_steps: int = Field(1, ge=1)
    class_weighted: bool = False
    max_blocks: int = Field(4, ge=1)
    freeze_bn_stats: bool = True
    frozen_from_cache: bool = True
    amp: bool = True
    channels_last: bool = True
    eval_batch_size: int = Field(128, ge=1)
    keep_last: bool = False


class TrialParams(Settings):
    """What one trial trains with; every field may be searched."""

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    layer_decay: float = Field(0.75, gt=0, le=1)
    drop_rate: float = Field(0.0, ge=0, lt=1)
    drop_path_rate: float = Field(0.05, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    frozen_epochs: int = Field(2, ge=0)
    last_block_epochs: int = Field(2, ge=0)
    final_lr_scale: float = Field(0.1, gt=0)
    batch_size: int = Field(32, ge=1)

    def to_dict(self) -> dict[str, Any]:
        return self.plain()


class Augment(Settings):
    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.0, ge=0, le=1)
    color_jitter: float = Field(0.4, ge=0)
    auto_augment: str | None = None
    re_prob: float = Field(0.0, ge=0, le=1)
    scale: tuple[float, float] = Field((0.08, 1.0), description="random-resized-crop area range [low, high], "
                                       "relative to the region the evaluation view shows")
    ratio: tuple[float, float] = (0.75, 4 / 3)

    @field_validator("scale", "ratio")
    @classmethod
    def _range(cls, value: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high:
            raise ValueError(f"needs 0 < low <= high, got [{low}, {high}]")
        if info.field_name == "scale" and high > 1:
            raise ValueError(f"is a fraction of the evaluation view's area: at most 1, got {high}")
        return value


class GradcamOptions(Settings):
    images: int = Field(20, ge=0)
    target_layers: dict[str, str] = {}


Kind = Literal["log", "float", "int", "ordered", "choice"]


class Dimension(Settings):
    """One searched hyperparameter: a range (log, float, int) or a list of values (ordered, choice)."""

    name: str
    kind: Kind
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: list(self.values) if self.values else [self.low, self.high]}


def _typed(name: str, value: Any, defaults: TrialParams, key: str) -> Any:
    """``value`` as hyperparameter ``name`` takes it (type and range checked)."""
    try:
        return getattr(TrialParams.model_validate({**defaults.plain(), name: value}), name)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc.errors()[0]['msg']} (got {value!r})") from None


def _dimension(name: str, raw: Any, defaults: TrialParams) -> Dimension:
    """``{log: [low, high]}`` (etc.) for ``name``, checked against the hyperparameter's type and default."""
    fields = TrialParams.model_fields
    if name not in fields:
        raise ValueError(f"space.{name}: not a searchable hyperparameter; one of {', '.join(fields)}")
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in Kind.__args__:
        raise ValueError(f"space.{name}: expected one of {{{', '.join(f'{k}: ...' for k in Kind.__args__)}}}, got {raw!r}")
    kind, arg = next(iter(raw.items()))
    tp = fields[name].annotation
    default = getattr(defaults, name)
    if kind in ("ordered", "choice"):
        if not isinstance(arg, list) or len(arg) < 2:
            raise ValueError(f"space.{name}: {kind} needs a list of at least two values, got {arg!r}")
        values = tuple(_typed(name, v, defaults, f"space.{name}.{kind}[{i}]") for i, v in enumerate(arg))
        if default not in values:
            raise ValueError(f"space.{name}: the default {default!r} (defaults.{name}) is not among {list(values)}")
        return Dimension(name=name, kind=kind, values=values)
    try:  # YAML reads 1e-5 (no dot) as a string: numbers are taken as float() takes them
        low, high = (float(v) for v in arg) if isinstance(arg, list) and len(arg) == 2 else (None, None)
    except (TypeError, ValueError):
        low = high = None
    if low is None or high is None:
        raise ValueError(f"space.{name}: {kind} needs [low, high], got {arg!r}")
    if kind == "int" and tp is not int:
        raise ValueError(f"space.{name}: int range for a {tp.__name__} hyperparameter; use float or log")
    if kind != "int" and tp is int:
        raise ValueError(f"space.{name}: {name} is an integer; use int: [low, high] or ordered: [...]")
    if not low < high or (kind == "log" and low <= 0):
        raise ValueError(f"space.{name}: need low < high{' and low > 0' if kind == 'log' else ''}, got [{low}, {high}]")
    if not low <= default <= high:
        raise ValueError(f"space.{name}: the default {default!r} (defaults.{name}) lies outside [{low}, {high}]")
    return Dimension(name=name, kind=kind, low=low, high=high)


class TuningConfig(Settings):
    """The whole fine-tuning file, checked: what every trial of a study shares."""

    train: TrainOptions = TrainOptions()
    defaults: TrialParams = TrialParams()
    space: tuple[Dimension, ...] = ()
    augment: Augment = Augment()
    gradcam: GradcamOptions = GradcamOptions()
    source: str = Field("", exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        unknown = [k for k in raw if k not in (*SECTIONS, "source")]
        if unknown:
            raise ValueError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
        space = raw.get("space") or {}
        if isinstance(space, (tuple, list)):
            return raw
        if not isinstance(space, dict):
            raise ValueError(f"space: expected a mapping name -> {{kind: [...]}}, got {space!r}")
        try:
            defaults = TrialParams.model_validate(raw.get("defaults") or {})
        except ValueError:  # reported where the defaults section is validated
            return {**raw, "space": ()}
        return {**raw, "space": tuple(_dimension(name, value, defaults) for name, value in space.items())}

    def default_point(self) -> dict[str, Any]:
        """The defaults restricted to the searched names: the first suggestion of every search."""
        return {d.name: getattr(self.defaults, d.name) for d in self.space}

    def params(self, point: dict[str, Any]) -> TrialParams:
        """The defaults with a searched ``point`` applied."""
        return TrialParams.model_validate({**self.defaults.plain(), **point})

    def to_dict(self) -> dict[str, Any]:
        return {"train": self.train.plain(), "defaults": self.defaults.plain(),
                "space": {d.name: d.to_dict() for d in self.space}, "augment": self.augment.plain(),
                "gradcam": self.gradcam.plain()}

    def fingerprint(self) -> str:
        """What a study's trials depend on: a resumed study must have the same."""
        keep = {k: v for k, v in self.to_dict().items() if k != "gradcam"}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def merge(base: dict[str, Any], overlay: dict[str, Any], origin: str) -> dict[str, Any]:
    """``overlay`` on ``base``: sections merge key by key, except ``space``, which is replaced whole."""
    out = copy.deepcopy(base)
    for section, value in overlay.items():
        if section not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section '{section}'; known: {', '.join(SECTIONS)}")
        if section == "space" or not isinstance(value, dict) or not isinstance(out.get(section), dict):
            out[section] = copy.deepcopy(value)
        else:
            out[section] = {**out[section], **value}
    return out


def load_tuning(path: Path | None = None, overlay: dict[str, Any] | None = None) -> TuningConfig:
    """The shipped ``configs/finetune.yaml``, then ``path``, then ``overlay``; each layer checked as it is added,
    so an error names the file (or ``finetune.search``) that caused it."""
    shipped = config_file("finetune.yaml")
    raw = read_yaml(shipped, "fine-tuning file")
    layers = [(str(shipped), {})]
    if path is not None:
        layers.append((str(path), read_yaml(Path(path), "fine-tuning file")))
    if overlay:
        layers.append(("finetune.search", overlay))
    tuning = None
    for origin, layer in layers:
        raw = merge(raw, layer, origin)
        tuning = validate(TuningConfig, {**raw, "source": " + ".join(o for o, _ in layers)}, f"{origin}:")
    assert tuning is not None
    return tuning
