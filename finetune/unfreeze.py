"""Progressive unfreezing: which blocks train when, at which learning rate.

A schedule is a list of stages; each names the epoch it starts, how many backbone
blocks (tail first, see :mod:`finetune.blocks`) are trainable, and a learning-rate
scale for everything. The default follows the users' plan: the head alone, then the
last block too, then the whole model at a 10x lower learning rate.

Blocks join the optimizer as parameter groups when they unfreeze, each with an
``lr_scale`` — the stage's scale times ``layer_decay ** depth`` (depth 1 for the
last block, growing towards the stem) — so deeper, more generic layers move less.
The learning rate of a group is always ``base_lr(step) * lr_scale``, the convention
timm's schedulers follow. BatchNorm layers in frozen blocks keep their running
statistics: they stay in eval mode while the rest of the model trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from configs.finetune import TrainOptions, TrialParams
from finetune.blocks import Block

SGD_MOMENTUM = 0.9  # with Nesterov, as configs/finetune.yaml documents

ALL = -1


@dataclass(frozen=True)
class Stage:
    epoch: int  # first epoch of this stage
    blocks: int  # trainable backbone blocks counted from the tail; ALL for every block
    lr_scale: float = 1.0


def default_schedule(frozen_epochs: int = 2, last_block_epochs: int = 2, final_lr_scale: float = 0.1) -> list[Stage]:
    """Head only for ``frozen_epochs``; then the last block too for ``last_block_epochs``; then the whole
    model at ``final_lr_scale``. A stage of zero epochs is skipped."""
    if frozen_epochs < 0 or last_block_epochs < 0:
        raise ValueError(f"stage lengths must be >= 0, got {frozen_epochs} and {last_block_epochs}")
    stages = [Stage(0, 0, 1.0), Stage(frozen_epochs, 1, 1.0), Stage(frozen_epochs + last_block_epochs, ALL, final_lr_scale)]
    # A later stage starting at the same epoch replaces the earlier one.
    return [s for i, s in enumerate(stages) if all(t.epoch != s.epoch for t in stages[i + 1:])]


def stage_at(schedule: list[Stage], epoch: int) -> Stage:
    current = schedule[0]
    for stage in schedule:
        if stage.epoch <= epoch:
            current = stage
    return current


def stage_span(schedule: list[Stage], epoch: int, total_epochs: int) -> tuple[int, int]:
    """First epoch of the stage ``epoch`` is in, and the first epoch after it (``total_epochs`` for the last)."""
    current = stage_at(schedule, epoch)
    later = [s.epoch for s in schedule if s.epoch > current.epoch]
    return current.epoch, min(later[0], total_epochs) if later else total_epochs


def _decay_split(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weights decay; biases and norm parameters (1-d) do not, as in timm."""
    decay = [p for n, p in params if p.ndim > 1]
    no_decay = [p for n, p in params if p.ndim <= 1]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


class ProgressiveUnfreezer:
    """Owns requires_grad, BatchNorm modes and the optimizer's parameter groups of backbone + head."""

    def __init__(self, backbone: nn.Module, head: nn.Module, blocks: list[Block], schedule: list[Stage],
                 params: TrialParams, options: TrainOptions) -> None:
        """``params`` gives the learning rate, layer decay and weight decay; ``options`` the optimizer and
        whether BatchNorm keeps its running statistics."""
        if schedule[0].epoch != 0:
            raise ValueError("the first stage must start at epoch 0")
        self.backbone, self.head, self.blocks, self.schedule = backbone, head, blocks, schedule
        base_lr, optimizer = params.lr, options.optimizer
        self.layer_decay, self.weight_decay = params.layer_decay, params.weight_decay
        weight_decay = params.weight_decay
        self.freeze_bn_stats = options.freeze_bn_stats  # every block's, not only the frozen ones'
        self.named = dict(backbone.named_parameters())
        self.unfrozen = 0  # blocks trainable so far (tail first)
        self.stage = schedule[0]
        backbone.requires_grad_(False)
        head.requires_grad_(True)
        groups = [dict(g, lr=base_lr * self.stage.lr_scale, lr_scale=self.stage.lr_scale, unit="head", depth=0)
                  for g in _decay_split(list(head.named_parameters()), weight_decay)]
        if optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=base_lr)
        elif optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=base_lr, momentum=SGD_MOMENTUM, nesterov=True)
        else:
            raise ValueError(f"optimizer: adamw or sgd, got {optimizer!r}")
        self.base_lr = base_lr
        self._module_block = self._module_blocks()
        self.apply(0)

    def _module_blocks(self) -> list[tuple[nn.Module, int]]:
        """Each module whose parameters all lie in one block (or in blocks nearer the stem), with the block
        nearest the output among them: the module is frozen while that block is."""
        owner = {name: i for i, block in enumerate(self.blocks) for name in block.params}
        out = []
        for name, module in self.backbone.named_modules():
            prefix = f"{name}." if name else ""
            blocks = [owner[prefix + n] for n, _ in module.named_parameters() if prefix + n in owner]
            if blocks:
                out.append((module, min(blocks)))
        return out

    def group_scale(self, depth: int) -> float:
        """lr_scale of the block at ``depth`` (1 = last block) under the current stage; depth 0 is the head."""
        return self.stage.lr_scale * (self.layer_decay ** depth)

    def apply(self, epoch: int) -> bool:
        """Enter the stage of ``epoch``; returns whether anything changed."""
        stage = stage_at(self.schedule, epoch)
        target = len(self.blocks) if stage.blocks == ALL else min(stage.blocks, len(self.blocks))
        changed = stage != self.stage or target > self.unfrozen
        self.stage = stage
        for i in range(self.unfrozen, target):
            params = [(n, self.named[n]) for n in self.blocks[i].params]
            for _, p in params:
                p.requires_grad_(True)
            for g in _decay_split(params, self.weight_decay):
                self.optimizer.add_param_group(dict(g, lr=0.0, lr_scale=0.0, unit=self.blocks[i].name, depth=i + 1))
        self.unfrozen = max(self.unfrozen, target)
        for group in self.optimizer.param_groups:
            group["lr_scale"] = self.group_scale(group["depth"])
        self.set_lr(self.base_lr)
        return changed

    def set_lr(self, base_lr: float) -> None:
        """``base_lr`` from the caller's schedule (warm-up, cosine ...), scaled per group."""
        for group in self.optimizer.param_groups:
            group["lr"] = base_lr * group["lr_scale"]

    def train(self) -> None:
        """Train mode for what trains. Frozen blocks stay in eval mode, as when the cache was extracted:
        BatchNorm keeps its running statistics, dropout and stochastic depth are off. With
        ``freeze_bn_stats``, BatchNorm keeps its statistics in unfrozen blocks too."""
        self.backbone.train()
        self.head.train()
        for module, block in self._module_block:
            if block >= self.unfrozen:
                module.train(False)  # all its parameters are frozen, so its whole subtree is
            elif self.freeze_bn_stats and isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train(False)

    def trainable_blocks(self) -> list[str]:
        return [b.name for b in self.blocks[: self.unfrozen]]
