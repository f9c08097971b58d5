"""The typed options of `python -m profiling`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from extract.config import ConfigError


@dataclass
class ProfilingSettings:
    workdir: Path = Path("runs/default")
    backbones: list[str] = field(default_factory=list)  # empty: what `extract` cached in the workdir
    backbones_file: Path | None = None
    pretrained: bool = True
    weights_dir: Path | None = None
    image_size: list[int] = field(default_factory=list)
    data: str | None = None
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    provider: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"
    threads: int | None = None
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    warmup: int = 10
    min_runs: int = 100
    min_seconds: float = 3.0
    tolerance: float = 1e-3
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"batch_sizes: positive integers, got {self.batch_sizes}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads: at least 1, got {self.threads}")
        if self.min_runs < 1 or self.min_seconds < 0 or self.warmup < 1:
            raise ConfigError("min_runs and warmup: at least 1; min_seconds: not negative")
        if self.tolerance <= 0:
            raise ConfigError(f"tolerance: positive, got {self.tolerance}")
