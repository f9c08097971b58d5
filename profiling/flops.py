"""FLOPs with PyTorch's own counter, attention included.

``torch.utils.flop_counter.FlopCounterMode`` counts FLOPs (2 x multiply-accumulates).
The fused CPU attention kernel has no FLOP formula and would be counted as zero,
making a ViT look cheap; counting under the math SDPA backend decomposes attention
into matrix multiplies, which are counted.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """FLOPs of one forward pass of one image of ``input_size`` (C, H, W)."""
    x = torch.zeros(1, *input_size)
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x.to(device))
    return int(counter.get_total_flops())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
