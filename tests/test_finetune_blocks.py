from __future__ import annotations

import pytest
import timm
import torch

from finetune.blocks import backbone_blocks

FAMILIES = [
    "resnet18",  # CNN
    "vit_base_patch16_224",  # ViT: one timm group per transformer block, bucketed
    "swin_tiny_patch4_window7_224",
    "convnext_tiny",
    "efficientnet_b0",
    "regnety_016",
    "vgg11",
    "poolformer_s12",  # metaformer: no group_matcher, falls back to top-level modules
]


@pytest.mark.parametrize("name", FAMILIES)
def test_tail_first_blocks_cover_every_parameter_once(name: str) -> None:
    with torch.device("meta"):  # the structure is all that matters: no memory, no init cost
        model = timm.create_model(name, num_classes=0)
    blocks = backbone_blocks(model, max_blocks=4)
    names = [n for b in blocks for n in b.params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))  # exactly once
    assert 2 <= len(blocks) <= 4
    order = [n for n, _ in model.named_parameters()]
    # Tail first: the first block's parameters come after the last block's in the forward order.
    assert min(order.index(n) for n in blocks[0].params) > max(order.index(n) for n in blocks[-1].params)
    stem = order[0]
    assert stem in blocks[-1].params


def test_vit_blocks_are_contiguous_buckets() -> None:
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=0)
    blocks = backbone_blocks(model, max_blocks=3)
    assert len(blocks) == 3
    last_block_params = [n for n in blocks[0].params if n.startswith("blocks.")]
    assert {int(n.split(".")[1]) for n in last_block_params} >= {11}
    assert any(n.startswith("norm.") for n in blocks[0].params)  # final norm goes with the tail
    assert "patch_embed.proj.weight" in blocks[-1].params
