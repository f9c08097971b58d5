"""The typed options of `python -m probe`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from extract.config import ConfigError
from probe.metrics import METRICS


@dataclass
class ProbeSettings:
    workdir: Path = Path("runs/default")
    grid: bool = False
    grid_file: Path | None = None
    backbones: list[str] = field(default_factory=list)
    metric: str | None = None  # macro_f1, or qwk with --ordinal
    baseline: Literal["none", "logreg"] = "none"
    folds: int | None = None
    ordinal: bool = False
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    bootstrap: int = 1000
    top_k: int | None = None
    report_only: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.metric is not None and self.metric not in METRICS:
            raise ConfigError(f"metric: one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.folds is not None and self.folds < 2:
            raise ConfigError(f"folds: at least 2, got {self.folds}")
        if self.bootstrap < 10:
            raise ConfigError(f"bootstrap: at least 10 resamples, got {self.bootstrap}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k: at least 1, got {self.top_k}")

    @property
    def selection_metric(self) -> str:
        return self.metric or ("qwk" if self.ordinal else "macro_f1")
