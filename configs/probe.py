"""The settings of ``python -m probe`` and the probe grid file (``configs/probe.yaml``) they point to."""

from __future__ import annotations

import itertools
import zlib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from configs import config_file
from configs.extract import Device
from configs.settings import CommandSettings, ConfigError, Settings, read_yaml, validate

# The probe's metrics (probe/metrics.py computes them); the first five are what a head can be selected by.
Metric = Literal["accuracy", "balanced_accuracy", "macro_f1", "qwk", "top_k_accuracy", "roc_auc", "log_loss"]


class ProbeSettings(CommandSettings):
    grid: bool = Field(False, description="train the whole grid of the grid file (else its one default head)")
    grid_file: Path | None = Field(None, description="the grid definition",
                                   json_schema_extra={"default_text": "the shipped configs/probe.yaml"})
    backbones: tuple[str, ...] = Field((), description="cached backbones: names with or without the pretrained "
                                       "tag, with @size, or patterns",
                                   json_schema_extra={"default_text": "every cache"})
    metric: Metric | None = Field(None, description="selection metric on validation",
                                  json_schema_extra={"default_text": "macro_f1; qwk with --ordinal"})
    baseline: Literal["none", "logreg"] = Field("none", description="also fit the classic linear probe: L2 logistic "
                                                 "regression (scikit-learn's objective, solved by L-BFGS), C chosen "
                                                 "on validation")
    folds: int | None = Field(None, ge=2, description="K-fold cross-validation over train+val: heads chosen by the "
                              "mean, mean ± std reported",
                              json_schema_extra={"default_text": "off: the dataset's validation split"})
    ordinal: bool = Field(False, description="labels are ordered (grades): select by quadratic weighted kappa")
    seed: int = Field(0, description="seed of head initialisation, batch order and bootstrap")
    device: Device = Field("auto", description="where the heads train")
    bootstrap: int = Field(1000, ge=10, description="bootstrap resamples of the test set for the confidence intervals")
    top_k: int | None = Field(None, ge=1, description="k of top-k accuracy",
                              json_schema_extra={"default_text": "3 when there are more than 3 classes"})
    report_only: bool = Field(False, description="train nothing: re-render leaderboard.md and report.html from "
                              "results.json (e.g. after `profiling` ran)")
    progress: bool = Field(True, description="progress bars")

    @property
    def selection_metric(self) -> str:
        return self.metric or ("qwk" if self.ordinal else "macro_f1")


# ---- the grid file ---------------------------------------------------------------------------------------------

HeadType = Literal["linear", "mlp", "knn"]
# How weight decay acts: "decoupled" is AdamW's; "l2" adds (weight_decay / 2) * ||W||^2 to the loss (Adam with L2),
# whose optimum is exactly L2-regularised logistic regression's for a linear head.
Decay = Literal["decoupled", "l2"]


class HeadConfig(Settings):
    """One head of the grid; its :attr:`name` identifies it in every table and file."""

    type: HeadType = "linear"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    decay: Decay = "decoupled"
    dropout: float = Field(0.0, ge=0, lt=1)
    class_weighted: bool = False
    epochs: int = Field(20, ge=1)
    patience: int = Field(5, ge=1)
    hidden: tuple[int, ...] = ()
    k: int = Field(20, ge=1)
    temperature: float = Field(0.07, gt=0)

    @model_validator(mode="after")
    def _mlp_has_layers(self) -> HeadConfig:
        if self.type == "mlp" and not self.hidden:
            raise ValueError("mlp heads need 'hidden' sizes, e.g. [1024]")
        return self

    @property
    def trainable(self) -> bool:
        return self.type != "knn"

    def applicable(self) -> dict[str, Any]:
        """Every field, ``None`` where it does not apply to this head type (results.csv leaves those empty)."""
        used = {"knn": {"type", "k", "temperature"},
                "mlp": set(type(self).model_fields) - {"k", "temperature"}}.get(
            self.type, set(type(self).model_fields) - {"k", "temperature", "hidden"})
        return {key: value if key in used else None for key, value in self.to_dict().items()}

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
        return self.plain()


class GridTraining(Settings):
    """How every head of the grid trains (the grid file's ``train:``)."""

    batch_size: int = Field(256, ge=1)
    warmup_epochs: int = Field(1, ge=0)
    standardize: bool = True
    # A head's epoch (and the grid's head) is chosen by its validation metric averaged over this many
    # consecutive epochs, past warm-up: one lucky epoch of a noisy small validation split is not chosen.
    smooth_epochs: int = Field(3, ge=1)
    # The heads' matrix products while training. Weights, optimiser state, the loss and every validation pass stay
    # float32; "bfloat16" rounds the products' inputs (mixed precision, as in torch.autocast), which halves their
    # cost where the hardware multiplies bfloat16 natively. "auto": bfloat16 there, float32 elsewhere.
    precision: Literal["auto", "float32", "bfloat16"] = "auto"


def _listed(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


class LinearAxes(Settings):
    """The values each linear-head setting takes in the grid: every combination is one head."""

    lr: list[float] = [1e-3]
    weight_decay: list[float] = [1e-2]
    decay: list[Decay] = ["decoupled"]
    class_weighted: list[bool] = [False]
    epochs: list[int] = [20]
    patience: list[int] = [5]

    _as_list = field_validator("*", mode="before")(lambda v: _listed(v))


class MLPAxes(LinearAxes):
    hidden: list[list[int]] = [[512]]
    dropout: list[float] = [0.0]

    @field_validator("hidden", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        # hidden is a list of layer-size lists, [[1024], [512, 512]]; a bare [1024] means one head.
        value = _listed(value)
        return [h if isinstance(h, list) else [h] for h in value]


class KNNAxes(Settings):
    k: list[int] = [20]
    temperature: list[float] = [0.07]

    _as_list = field_validator("*", mode="before")(lambda v: _listed(v))


class GridHeads(Settings):
    linear: LinearAxes | None = None
    mlp: MLPAxes | None = None
    knn: KNNAxes | None = None


class GridFile(Settings):
    train: GridTraining = GridTraining()
    heads: GridHeads = GridHeads()
    default: HeadConfig = HeadConfig()


class Grid(Settings):
    """The expanded grid: one :class:`HeadConfig` per head."""

    heads: tuple[HeadConfig, ...]
    default: HeadConfig
    train: GridTraining = GridTraining()


def load_grid(path: Path | None = None) -> Grid:
    """Read, check and expand a grid file (the shipped ``configs/probe.yaml`` by default)."""
    path = Path(path) if path else config_file("probe.yaml")
    raw = read_yaml(path, "probe grid file")
    for section in ("train", "heads", "default"):
        raw[section] = raw.get(section) or {}
    for kind in ("linear", "mlp", "knn"):
        if kind in raw["heads"] and raw["heads"][kind] is None:
            raw["heads"][kind] = {}
    spec = validate(GridFile, raw, f"{path}:")
    heads: list[HeadConfig] = []
    for kind in ("linear", "mlp", "knn"):
        axes = getattr(spec.heads, kind)
        if axes is None:
            continue
        names = list(type(axes).model_fields)
        for combo in itertools.product(*(getattr(axes, n) for n in names)):
            heads.append(validate(HeadConfig, {"type": kind, **dict(zip(names, combo))}, f"{path}: heads.{kind}"))
    seen = [h.name for h in heads]
    repeated = sorted({n for n in seen if seen.count(n) > 1})
    if repeated:
        raise ConfigError(f"{path}: the grid repeats head(s) {repeated}")
    return Grid(heads=tuple(heads), default=spec.default, train=spec.train)
