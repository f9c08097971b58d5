"""The typed options of `python -m extract` (defaults; a YAML file and flags override them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from extract.config import ConfigError


@dataclass
class ExtractSettings:
    workdir: Path = Path("runs/default")
    data: str | None = None
    backbones: list[str] = field(default_factory=lambda: ["all"])
    backbones_file: Path | None = None
    pretrained: bool = True
    weights_dir: Path | None = None
    image_size: list[int] = field(default_factory=list)
    batch_size: int = 64
    workers: int | None = None
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["float16", "float32"] = "float16"
    store_maps: bool = False
    views: int = 0
    seed: int = 0
    split_ratios: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    fold: int | None = None
    max_unreadable: float = 0.01
    force: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers: must be 0 or more, got {self.workers}")
        if self.views < 0:
            raise ConfigError(f"views: must be 0 or more, got {self.views}")
        if any(s < 16 for s in self.image_size):
            raise ConfigError(f"image_size: sizes must be at least 16 pixels, got {self.image_size}")
        if len(self.split_ratios) != 3 or any(r <= 0 for r in self.split_ratios) or abs(sum(self.split_ratios) - 1) > 1e-6:
            raise ConfigError(f"split_ratios: need three positive train/val/test fractions summing to 1, got {self.split_ratios}")
        if not 0 <= self.max_unreadable <= 1:
            raise ConfigError(f"max_unreadable: a fraction between 0 and 1, got {self.max_unreadable}")
