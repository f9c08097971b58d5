"""A saved probe head on top of its backbone: a full image classifier (stage two starts from it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from extract.backbones import BackboneSpec
from extract.models import Weights, create_backbone
from probe.heads import head_from_checkpoint


class ProbeClassifier(nn.Module):
    """backbone (pooled pre-logits) -> head -> logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def load_head(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A saved head and its checkpoint dict; nothing in the file can run code (``weights_only``)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return head_from_checkpoint(ckpt), ckpt


def load_classifier(path: str | Path, *, weights: Weights | None = None) -> tuple[ProbeClassifier, dict[str, Any]]:
    """Backbone (as recorded in the head file) plus head. ``weights`` overrides where the backbone's weights come from."""
    head, ckpt = load_head(path)
    spec = BackboneSpec(model=ckpt["model"], name=ckpt["backbone"], kwargs=dict(ckpt.get("model_kwargs") or {}))
    if weights is None:
        tag = ckpt["weights"]
        if tag == "random":
            weights = Weights("random", None, "random")
        elif tag.startswith("file:") and ckpt.get("weights_location"):
            weights = Weights("file", ckpt["weights_location"], tag)
        else:
            weights = Weights("hub", ckpt["model"], tag)
    size_kwargs = {k: v for k, v in (ckpt.get("model_kwargs") or {}).items() if k == "img_size"}
    spec = BackboneSpec(model=spec.model, name=spec.name,
                        kwargs={k: v for k, v in spec.kwargs.items() if k != "img_size"})
    backbone, _ = create_backbone(spec, weights, **size_kwargs)
    return ProbeClassifier(backbone, head).eval(), ckpt
