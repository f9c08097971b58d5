"""A saved probe head on top of its backbone: a full image classifier (stage two starts from it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from extract.backbones import BackboneSpec
from extract.models import Weights, WeightsError, create_backbone, file_tag
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
    # The cache key's model_kwargs hold the YAML kwargs plus img_size for a resized fixed-size model.
    kwargs = dict(ckpt.get("model_kwargs") or {})
    size_kwargs = {"img_size": kwargs.pop("img_size")} if "img_size" in kwargs else {}
    spec = BackboneSpec(model=ckpt["model"], name=ckpt["backbone"], kwargs=kwargs)
    if weights is None:
        tag = ckpt["weights"]
        if tag == "random":
            weights = Weights("random", None, "random")
        elif tag.startswith("file:") and ckpt.get("weights_location"):
            location = Path(ckpt["weights_location"])
            if not location.is_file() or file_tag(location) != tag:
                raise WeightsError(f"{path}: its backbone used weights {tag} from {location}, which is missing or has "
                                   "changed; pass weights=Weights('file', PATH, tag) for the file it was trained with")
            weights = Weights("file", str(location), tag)
        else:
            weights = Weights("hub", ckpt["model"], tag)
    backbone, _ = create_backbone(spec, weights, **size_kwargs)
    return ProbeClassifier(backbone, head).eval(), ckpt
