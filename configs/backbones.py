"""The backbones file (``configs/backbones.yaml``, or ``--backbones-file``): named sets of backbones.

An entry is a timm name with its pretrained tag, or a mapping with ``model`` and what that backbone needs
besides: its name in caches and tables, ``create_model`` keyword arguments, local weights, preprocessing of
those weights. ``extract/backbones.py`` turns entries into the backbones a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, StrictBool, model_validator

from configs.settings import Settings


def _per_channel(value: Any) -> Any:
    """One number means the same for R, G and B. A YAML ``true`` is not a number (pydantic would read it as 1)."""
    if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value)):
        raise ValueError("expected a number or a list of three numbers (R, G, B)")
    return [value] * 3 if isinstance(value, (int, float)) else value


RGB = Annotated[tuple[float, float, float], BeforeValidator(_per_channel)]
PositiveRGB = Annotated[tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)],
                              Annotated[float, Field(gt=0)]], BeforeValidator(_per_channel)]


class Preprocess(Settings):
    """Overrides of timm's data config for one backbone's weights (what those weights were trained with)."""

    mean: RGB | None = None
    std: PositiveRGB | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"] | None = None
    crop_pct: float | None = Field(None, gt=0, le=1)
    crop_mode: Literal["center", "squash", "border"] | None = None


class BackboneEntry(Settings):
    """One backbone of a set."""

    model: str
    """the timm name with its pretrained tag, e.g. ``resnet50.a1_in1k``"""
    name: str | None = None
    """what the backbone is called in caches and tables (default: ``model``)"""
    kwargs: dict[str, Any] | None = None
    """keyword arguments for ``timm.create_model`` (e.g. attention blocks)"""
    weights: Path | None = None
    """a local weights file or folder, relative to the backbones file (overrides the hub)"""
    preprocess: Preprocess | None = None
    allow_partial: StrictBool = False
    """load a weights file that misses some tensors (they stay random, and are reported)"""

    @model_validator(mode="before")
    @classmethod
    def _a_bare_name(cls, value: Any) -> Any:
        return {"model": value} if isinstance(value, str) else value


class BackbonesFile(Settings):
    sets: dict[str, list[BackboneEntry] | None]
    """set name -> its backbones"""
