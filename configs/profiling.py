"""The settings of ``python -m profiling``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from configs.executor import JobCommandSettings
from configs.extract import Device

Provider = Literal["auto", "cpu", "cuda", "tensorrt"]


class ProfilingSettings(JobCommandSettings):
    backbones: tuple[str, ...] = Field((), description="set names, timm names or patterns, as for extract",
                                       json_schema_extra={"default_text": "the backbones `extract` cached in the "
                                                          "workdir"})
    backbones_file: Path | None = Field(None, description="YAML with named backbone sets (with --backbones)",
                                        json_schema_extra={"default_text": "the shipped configs/backbones.yaml"})
    pretrained: bool | None = Field(None, description="with --backbones: pretrained or (--no-pretrained) random "
                                    "weights", json_schema_extra={"default_text": "as the caches were extracted; "
                                                                  "pretrained with --backbones"})
    weights_dir: Path | None = Field(None, description="folder of local weights (with --backbones)",
                                     json_schema_extra={"default_text": "the hub"})
    image_size: tuple[Annotated[int, Field(ge=16, le=4096)], ...] = Field(
        (), description="input size(s) (with --backbones)", json_schema_extra={"default_text": "each backbone's own"})
    data: str | None = Field(None, description="images for the ONNX-vs-PyTorch check",
                             json_schema_extra={"default_text": "the workdir's dataset, else demo"})
    batch_sizes: tuple[Annotated[int, Field(ge=1)], ...] = Field((1, 8, 32), min_length=1,
                                                                 description="batch sizes to time")
    provider: Provider = Field("auto", description="ONNX Runtime provider (auto: TensorRT, then CUDA, then CPU)")
    threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads",
                                json_schema_extra={"default_text": "ONNX Runtime's choice, one per core"})
    device: Device = Field("auto", description="device of the PyTorch eager reference")
    warmup: int = Field(10, ge=1, description="untimed runs before timing")
    min_runs: int = Field(100, ge=1, description="timed runs at least")
    min_seconds: float = Field(3.0, ge=0, description="seconds of timed runs at least")
    tolerance: float = Field(1e-3, gt=0, description="largest accepted max relative error of ONNX against PyTorch")
    progress: bool = Field(True, description="progress bars")
