"""A backbone's parameters as blocks, tail (nearest the output) first: the units of progressive unfreezing.

timm's own grouping (``model.group_matcher`` with ``timm.models.group_parameters``)
orders parameters from the stem to the head for almost every family. Fine groupings
(a ViT has one group per transformer block) are bucketed into a few contiguous
stages. Families without ``group_matcher`` fall back to their top-level child
modules in registration order, which follows the forward pass for timm models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from timm.models import group_parameters
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Block:
    name: str
    params: tuple[str, ...]  # parameter names, as in model.named_parameters()


def _timm_groups(model: nn.Module) -> list[list[str]] | None:
    try:
        matcher = model.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError, TypeError):
        return None
    groups = group_parameters(model, matcher)
    return [groups[k] for k in sorted(groups) if groups[k]]


def _child_groups(model: nn.Module) -> list[list[str]]:
    """Fallback: one group per top-level child that owns parameters, in registration order."""
    groups: list[list[str]] = []
    direct = [n for n, _ in model.named_parameters(recurse=False)]
    if direct:  # e.g. a ViT-style cls token or position embedding on the model itself
        groups.append(direct)
    for child_name, child in model.named_children():
        names = [f"{child_name}.{n}" for n, _ in child.named_parameters()]
        if names:
            groups.append(names)
    return groups


def _bucket(groups: list[list[str]], count: int) -> list[list[list[str]]]:
    """Split ordered groups into at most ``count`` contiguous buckets of near-equal size (in groups)."""
    count = max(1, min(count, len(groups)))
    bounds = [round(i * len(groups) / count) for i in range(count + 1)]
    return [groups[bounds[i]:bounds[i + 1]] for i in range(count)]


def backbone_blocks(model: nn.Module, *, max_blocks: int = 4) -> list[Block]:
    """The trainable parameters of ``model`` in at most ``max_blocks`` blocks, tail first.

    Every parameter appears in exactly one block. Block 0 is the one nearest the output
    (unfrozen first); the last block holds the stem.
    """
    groups = _timm_groups(model)
    source = "group_matcher"
    if groups is None:
        groups = _child_groups(model)
        source = "top-level modules"
        log.info("%s has no group_matcher; blocks follow its top-level modules", type(model).__name__)
    blocks = []
    for i, bucket in enumerate(_bucket(groups, max_blocks)):
        names = tuple(n for group in bucket for n in group)
        blocks.append(Block(name=f"stage {i + 1}/{min(max_blocks, len(groups))} ({source})", params=names))
    return blocks[::-1]
