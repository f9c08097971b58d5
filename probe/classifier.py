"""A saved probe head on top of its backbone: a full image classifier (stage two starts from it)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from extract.models import Weights, backbone_from_record, create_backbone
from probe.heads import HeadFormatError, head_from_checkpoint


class ProbeClassifier(nn.Module):
    """backbone (pooled pre-logits) -> head -> logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def load_head(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A saved head and its checkpoint dict; nothing in the file can run code (``weights_only``). A file that is
    not one (truncated, overwritten, another program's) is a :class:`HeadFormatError`, not a traceback."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HeadFormatError(f"{path}: not a readable head file ({first[:200]}); run `python -m probe` again") from None
    if not isinstance(ckpt, dict):
        raise HeadFormatError(f"{path}: not a head file (a {type(ckpt).__name__}); run `python -m probe` again")
    return head_from_checkpoint(ckpt, str(path)), ckpt


def load_classifier(path: str | Path, *, weights: Weights | None = None) -> tuple[ProbeClassifier, dict[str, Any]]:
    """Backbone (as recorded in the head file) plus head. ``weights`` overrides where the backbone's weights come from."""
    head, ckpt = load_head(path)
    # Weights the caller brings replace the recorded ones, which are then not looked up.
    tag = ckpt["weights"] if weights is None else "random"
    spec, recorded, size_kwargs = backbone_from_record(
        model=ckpt["model"], name=ckpt["backbone"], model_kwargs=ckpt.get("model_kwargs"), weights_tag=tag,
        weights_location=ckpt.get("weights_location"))
    backbone, _ = create_backbone(spec, weights or recorded, **size_kwargs)
    return ProbeClassifier(backbone, head).eval(), ckpt
