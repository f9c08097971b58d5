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
from dataclasses import dataclass
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
    top: int = Field(3, ge=1, description="fine-tune the N best backbones (x resolution) of the probe leaderboard")
    backbones: tuple[str, ...] = Field((), description="names (with or without the pretrained tag, with @size) "
                                       "or patterns instead of --top",
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


KINDS = ("log", "float", "int", "ordered", "choice")


class SearchRange(Settings):
    """One searched hyperparameter as the fine-tuning file writes it: exactly one of ``log``, ``float`` or ``int``
    with ``[low, high]``, or ``ordered`` or ``choice`` with two values or more."""

    log: tuple[float, float] | None = None
    float_: tuple[float, float] | None = Field(None, alias="float")
    int_: tuple[int, int] | None = Field(None, alias="int")
    ordered: tuple[Any, ...] | None = Field(None, min_length=2)
    choice: tuple[Any, ...] | None = Field(None, min_length=2)

    @model_validator(mode="after")
    def _one_kind(self) -> SearchRange:
        given = [kind for kind in KINDS if self._given(kind) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)}; got {', '.join(given) or 'none'}")
        if self.kind in ("log", "float", "int"):
            low, high = self.argument
            if not low < high or (self.kind == "log" and low <= 0):
                raise ValueError(f"need low < high{' and low > 0' if self.kind == 'log' else ''}")
        return self

    def _given(self, kind: str) -> Any:
        return getattr(self, kind + "_" if kind in ("float", "int") else kind)

    @property
    def kind(self) -> str:
        return next(kind for kind in KINDS if self._given(kind) is not None)

    @property
    def argument(self) -> tuple[Any, ...]:
        """``(low, high)`` of a range, the values of a list."""
        return self._given(self.kind)


# What a search may change: any hyperparameter of a trial (a space's key is one of these names).
Searchable = Literal[tuple(TrialParams.model_fields)]  # type: ignore[valid-type]


@dataclass(frozen=True)
class Dimension:
    """One searched hyperparameter, checked against its type and default: a range (log, float, int) or a list of
    values (ordered, choice) typed as the hyperparameter takes them."""

    name: str
    kind: str
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


def _dimension(name: str, searched: SearchRange, defaults: TrialParams) -> Dimension:
    """``searched`` checked against what hyperparameter ``name`` is: its type, its range, its default."""
    kind, default = searched.kind, getattr(defaults, name)
    if kind in ("ordered", "choice"):
        values = tuple(_typed(name, v, defaults, f"space.{name}.{kind}[{i}]") for i, v in enumerate(searched.argument))
        if default not in values:
            raise ValueError(f"space.{name}: the default {default!r} (defaults.{name}) is not among {list(values)}")
        return Dimension(name, kind, values=values)
    integer = TrialParams.model_fields[name].annotation is int
    if integer != (kind == "int"):
        raise ValueError(f"space.{name}: {name} is an integer; use int: [low, high] or ordered: [...]" if integer
                         else f"space.{name}: int range for a float hyperparameter; use float or log")
    low, high = searched.argument
    if not low <= default <= high:
        raise ValueError(f"space.{name}: the default {default!r} (defaults.{name}) lies outside [{low}, {high}]")
    return Dimension(name, kind, low=float(low), high=float(high))


class TuningConfig(Settings):
    """The whole fine-tuning file, checked: what every trial of a study shares."""

    train: TrainOptions = TrainOptions()
    defaults: TrialParams = TrialParams()
    space: dict[Searchable, SearchRange] = {}  # in the file's order
    augment: Augment = Augment()
    gradcam: GradcamOptions = GradcamOptions()
    source: str = Field("", exclude=True)

    @field_validator("space", mode="before")
    @classmethod
    def _empty_space(cls, value: Any) -> Any:
        return {} if value is None else value  # `space:` with nothing under it: search nothing

    @model_validator(mode="after")
    def _space_fits_the_defaults(self) -> TuningConfig:
        self.dimensions  # noqa: B018 (each searched range checked against its hyperparameter's type and default)
        return self

    @property
    def dimensions(self) -> tuple[Dimension, ...]:
        """The searched hyperparameters, in the file's order."""
        return tuple(_dimension(name, searched, self.defaults) for name, searched in self.space.items())

    def default_point(self) -> dict[str, Any]:
        """The defaults restricted to the searched names: the first suggestion of every search."""
        return {d.name: getattr(self.defaults, d.name) for d in self.dimensions}

    def params(self, point: dict[str, Any]) -> TrialParams:
        """The defaults with a searched ``point`` applied."""
        return TrialParams.model_validate({**self.defaults.plain(), **point})

    def to_dict(self) -> dict[str, Any]:
        return {"train": self.train.plain(), "defaults": self.defaults.plain(),
                "space": {d.name: d.to_dict() for d in self.dimensions}, "augment": self.augment.plain(),
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
