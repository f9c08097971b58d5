"""The typed options of `python -m finetune`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from extract.config import ConfigError
from probe.metrics import METRICS


@dataclass
class FinetuneSettings:
    workdir: Path = Path("runs/default")
    top: int = 3
    backbones: list[str] = field(default_factory=list)
    optimizer: Literal["nevergrad", "random", "none"] = "nevergrad"
    ng_optimizer: str = "NGOpt"
    budget: int = 20
    workers: int = 1
    metric: str | None = None  # default: the probe's selection metric
    head: Literal["probe", "random"] = "probe"
    space: Path | None = None  # overlays configs/finetune.yaml
    search: dict[str, Any] = field(default_factory=dict)  # the same sections, inline (experiment files)
    epochs: int | None = None  # overrides train.epochs
    gradcam_images: int | None = None  # overrides gradcam.images
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    data_workers: int = 2
    bootstrap: int = 1000
    latency: bool = True
    provider: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"
    restart: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.metric is not None and self.metric not in METRICS:
            raise ConfigError(f"metric: one of {', '.join(METRICS)}, got {self.metric!r}")
        for key in ("top", "budget", "workers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: at least 1, got {getattr(self, key)}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs: at least 1, got {self.epochs}")
        if self.gradcam_images is not None and self.gradcam_images < 0:
            raise ConfigError(f"gradcam_images: at least 0, got {self.gradcam_images}")
        if self.data_workers < 0 or self.bootstrap < 10:
            raise ConfigError("data_workers >= 0 and bootstrap >= 10")

    def overlay(self) -> dict[str, Any]:
        """``search`` plus the shortcut flags, in the finetune config's sections."""
        out = {k: dict(v) if isinstance(v, dict) else v for k, v in self.search.items()}
        if self.epochs is not None:
            out["train"] = {**out.get("train", {}), "epochs": self.epochs}
        if self.gradcam_images is not None:
            out["gradcam"] = {**out.get("gradcam", {}), "images": self.gradcam_images}
        return out
