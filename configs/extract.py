"""The settings of ``python -m extract`` (the ``extract:`` section of a config file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from configs.executor import JobCommandSettings

Device = Literal["auto", "cpu", "cuda", "mps"]


class ExtractSettings(JobCommandSettings):
    data: str = Field(description="an image folder (root/<class>/* or root/{train,val,test}/<class>/*), a CSV "
                      "(path,label[,split|fold]), or 'demo' (scikit-learn's digits)")
    backbones: tuple[str, ...] = Field(("all",), min_length=1, description="set names from the backbones file (all, "
                                       "demo, tiny, ...), timm names (resnet50.a1_in1k) or patterns ('convnext_*')")
    backbones_file: Path | None = Field(None, description="YAML with named backbone sets",
                                        json_schema_extra={"default_text": "the shipped configs/backbones.yaml"})
    pretrained: bool = Field(True, description="pretrained weights; --no-pretrained: seeded random weights "
                             "(said in every output)")
    weights_dir: Path | None = Field(None, description="folder of local weights: <name>.safetensors|.pth|.bin or "
                                     "<name>/model.safetensors", json_schema_extra={"default_text": "the hub"})
    image_size: tuple[Annotated[int, Field(ge=16, le=4096)], ...] = Field(
        (), description="input size(s) overriding each backbone's own; several give a resolution sweep",
        json_schema_extra={"default_text": "each backbone's own"})
    batch_size: int | None = Field(None, ge=1, description="images per forward pass (halved automatically on "
                                   "out-of-memory)", json_schema_extra={
                                       "default_text": "on a CPU the fastest of 1/4/16/64 with the best torch thread "
                                                       "count, measured once per machine and backbone; 64 on a GPU"})
    workers: int | None = Field(None, ge=0, description="DataLoader decoding workers",
                                json_schema_extra={"default_text": "one per spare core, at most 8"})
    device: Device = Field("auto", description="compute device (auto: CUDA, then MPS, then the CPU)")
    dtype: Literal["float16", "float32"] = Field("float16", description="storage type of the pooled features "
                                                       "(float32 for a backbone whose features exceed float16's "
                                                       "±65504: extraction stops and says so)")
    amp: bool | None = Field(None, description="mixed precision: bfloat16 (float16 without it) on CUDA, bfloat16 on a "
                             "CPU with AVX512-BF16 or AMX (2-2.4x for convolutional backbones; features within ~1% "
                             "of the float32 forward that fine-tuning and profiling run)",
                             json_schema_extra={"default_text": "on CUDA; off on a CPU"})
    store_maps: bool = Field(False, description="also store the last feature map (float16)")
    views: int = Field(0, ge=0, description="augmented views of each training image to store (timm's training "
                       "transform)")
    seed: int = Field(0, description="seed of the train/val/test split and of the augmented views")
    split_ratios: tuple[float, float, float] = Field((0.7, 0.15, 0.15), description="train, val and test "
                                                     "fractions for a dataset without a given split")
    fold: int | None = Field(None, description="with a CSV 'fold' column: the fold used for validation",
                             json_schema_extra={"default_text": "the CSV's split column"})
    max_unreadable: float = Field(0.01, ge=0, le=1, description="fraction of unreadable images tolerated "
                                  "(skipped) before stopping")
    force: bool = Field(False, description="rebuild caches even when a matching one exists")
    progress: bool = Field(True, description="progress bars")

    @field_validator("split_ratios")
    @classmethod
    def _ratios(cls, ratios: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r <= 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
            raise ValueError("need three positive fractions summing to 1")
        return ratios
