"""Training a whole grid of heads together, in one pass over features held in memory.

Heads of one family (linear, or MLP with the same hidden sizes) are stacked: their
weights live in one tensor with a head axis, so one matrix multiply per mini-batch
serves them all. Per-head losses are summed; heads share no parameters, so each
head's gradient is exactly that of its own loss. One vectorised step updates every
head as torch's AdamW would — or Adam with an L2 penalty, for heads whose ``decay``
is "l2" — with that head's learning rate and weight decay, following its own warm-up
+ cosine schedule over its own number of epochs.

Where the hardware multiplies bfloat16 natively, the training products are bfloat16 (autocast); weights,
optimiser state, loss and validation stay float32.

Initialisation, dropout masks and batch order are seeded per head (and per epoch),
so a head trains the same alone as inside a grid (in bfloat16, up to its rounding). Heads that early-stop are
removed from the stack, so they cost nothing afterwards.

kNN heads train nothing: their validation votes come from one similarity matrix
shared by all of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.adam import adam

from configs.probe import GridTraining, HeadConfig
from probe.heads import build_head, knn_grid_probabilities
from probe.metrics import METRICS, fast_metric, fast_metric_of_heads
from runtime.console import progress as progress_bar
from runtime.device import native_bfloat16

BETAS = (0.9, 0.999)
EPS = 1e-8


class Labelled(Protocol):
    """Features (N, D) and their labels (N,): a split of a cache, or any pair of arrays with these names."""

    features: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Examples:
    features: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Fit:
    """How a grid is fitted and its epochs chosen: by which validation metric, with the grid file's training
    options, from which seed, on which device."""

    metric: str = "macro_f1"
    options: GridTraining = GridTraining()
    seed: int = 0
    device: torch.device = torch.device("cpu")


@dataclass
class TrainedHead:
    config: HeadConfig
    head: nn.Module  # standalone, best-epoch weights, eval mode, on the CPU
    val_metric: float
    val_proba: np.ndarray
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    # What selection compares: the validation metric averaged over the epochs around the chosen one.
    selection_score: float | None = None

    @property
    def score(self) -> float:
        return self.val_metric if self.selection_score is None else self.selection_score


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """scikit-learn's 'balanced' weights, n / (C * n_c), from the training labels."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return torch.tensor(len(labels) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


STD_FLOOR = 0.1  # of the median feature std; see feature_stats


def feature_stats(x: torch.Tensor, standardize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not standardize:
        return torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    x = x.double()
    # Constant features get std 1, so they stay constant instead of dividing by zero.
    std = x.std(0, unbiased=False)
    alive = std > 1e-6
    std = torch.where(alive, std, torch.ones_like(std))
    # A nearly dead feature (a ReLU channel almost never on) is not blown up to unit scale: its std is
    # floored at STD_FLOOR x the median feature's. Unfloored, a head fitted on the cache weighs such
    # features by up to 1/std ~ 1e4, and the smallest change of the backbone in stage two turns them
    # into logits in the hundreds (issue #14: the first image epoch of a fine-tune collapsed).
    if alive.any():
        std = torch.maximum(std, STD_FLOOR * std[alive].median())
    return x.mean(0).float(), std.float()


def products_dtype(options: GridTraining, device: torch.device) -> torch.dtype:
    """The dtype of the heads' matrix products in training: the grid file's ``precision``, "auto" resolved for
    ``device`` (bfloat16 where it multiplies bfloat16 natively)."""
    if options.precision == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    return getattr(torch, options.precision)


def lr_factors(step: int | torch.Tensor, epochs: torch.Tensor, warmup_epochs: int, steps_per_epoch: int
               ) -> torch.Tensor:
    """Per-head linear warm-up, then cosine decay to 0 at the end of each head's own ``epochs``; ``step`` a
    number or a column of them (steps, 1) for the whole schedule at once."""
    total = (epochs * steps_per_epoch).clamp_min(1).double()
    warm = torch.minimum(total - 1, torch.full_like(total, warmup_epochs * steps_per_epoch))
    warmup = (step + 1) / warm.clamp_min(1)
    progress = ((step - warm) / (total - warm).clamp_min(1)).clamp(0, 1)
    cosine = 0.5 * (1 + torch.cos(math.pi * progress))
    return torch.where(step < warm, warmup, cosine).float()


class HeadStack:
    """Heads of one architecture stacked along a head axis, with their Adam(W) state.

    Layer l of head h is ``weights[l][:, h]`` (in, out) and ``biases[l][h]`` (out,). The head axis is the
    weights' middle one, so the first layer of every head is one (in, heads * out) matrix — one matrix
    multiply per mini-batch, with no copy — and one vectorised Adam(W) step updates every head at once
    with that head's own learning rate and weight decay.
    """

    def __init__(self, heads: dict[int, nn.Module], configs: list[HeadConfig], members: list[int], seed: int,
                 device: torch.device) -> None:
        self.members = list(members)  # indices into the grid
        self.index = torch.tensor(self.members, device=device)
        linears = [[m for m in heads[i].modules() if isinstance(m, nn.Linear)] for i in members]
        self.weights = [torch.stack([ls[layer].weight.detach().T for ls in linears], 1).contiguous().to(device).requires_grad_()
                        for layer in range(len(linears[0]))]
        self.biases = [torch.stack([ls[layer].bias.detach() for ls in linears]).to(device).requires_grad_()
                       for layer in range(len(linears[0]))]
        self.dropout = torch.tensor([configs[i].dropout for i in members], device=device)
        self.weight_decay = torch.tensor([configs[i].weight_decay for i in members], device=device)
        self.class_weighted = torch.tensor([configs[i].class_weighted for i in members], device=device)
        self.configs = configs  # the whole grid, indexed by self.members
        self.decoupled = torch.tensor([configs[i].decay == "decoupled" for i in members], device=device)
        self.generators = [torch.Generator().manual_seed(configs[i].seed_for(seed) + 1) for i in members]
        # Per parameter: exp_avg and exp_avg_sq, stacked like the parameter. Every head of a stack steps together.
        self.state = {id(p): (torch.zeros_like(p), torch.zeros_like(p)) for p in self.params()}
        self.steps = 0
        self.fused = device.type in ("cpu", "cuda", "mps")

    def params(self) -> list[torch.Tensor]:
        return [*self.weights, *self.biases]

    def logits(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """(B, heads, C) for standardised features ``x`` (B, D)."""
        w0 = self.weights[0]  # (D, H, out)
        out = (x @ w0.view(w0.shape[0], -1)).view(len(x), w0.shape[1], -1) + self.biases[0]
        for w, b in zip(self.weights[1:], self.biases[1:]):
            out = F.gelu(out)
            if train and bool((self.dropout > 0).any()):
                # Only heads with dropout draw a mask (each from its own generator): the others keep everything.
                ones = torch.ones(len(x), out.shape[2])
                keep = torch.stack([torch.rand(len(x), out.shape[2], generator=g) if rate > 0 else ones
                                    for g, rate in zip(self.generators, self.dropout.tolist())], 1)
                p = self.dropout.view(1, -1, 1)
                out = out * (keep.to(out.device) >= p) / (1 - p)
            out = torch.einsum("bhi,iho->bho", out, w) + b
        return out

    def optimizer_step(self, lr: torch.Tensor, weight_decay: torch.Tensor) -> None:
        """One step of ``torch.optim.AdamW`` for every head, with its own ``lr`` and ``weight_decay`` (none on
        biases); ``torch.optim.Adam``'s L2 form (the penalty's gradient added to the loss's) for heads whose
        ``decay`` is "l2". The same arithmetic as torch's single-tensor implementation, over the head axis."""
        self.steps += 1
        uniform = (bool((lr == lr[0]).all()) and bool((weight_decay == weight_decay[0]).all())
                   and len({self.configs[i].decay for i in self.members}) == 1)
        if uniform and self.fused:  # every head steps alike (e.g. the MLP family): torch's own fused kernel
            decoupled = self.configs[self.members[0]].decay == "decoupled"
            for params, wd in ((self.weights, float(weight_decay[0])), (self.biases, 0.0)):
                states = [self.state[id(p)] for p in params]
                adam([p.detach() for p in params], [p.grad for p in params], [s[0] for s in states],
                     [s[1] for s in states], [], [torch.tensor(float(self.steps - 1)) for _ in params], fused=True,
                     foreach=False, decoupled_weight_decay=decoupled, amsgrad=False, beta1=BETAS[0],
                     beta2=BETAS[1], lr=float(lr[0]), weight_decay=wd, eps=EPS, maximize=False)
            for p in self.params():
                p.grad = None
            return
        bias1 = 1 - BETAS[0] ** self.steps
        bias2_sqrt = math.sqrt(1 - BETAS[1] ** self.steps)
        any_decoupled, all_decoupled = bool(self.decoupled.any()), bool(self.decoupled.all())
        with torch.no_grad():
            for p in self.params():
                shape = (1, -1, 1) if p.ndim == 3 else (-1, 1)  # where the head axis is
                h_lr = lr.view(shape)
                grad, (m, v) = p.grad, self.state[id(p)]
                if p.ndim == 3:  # weights: biases are not decayed
                    h_wd = weight_decay.view(shape)
                    if not all_decoupled:
                        grad.addcmul_(p, torch.where(self.decoupled.view(shape), 0.0, h_wd))
                    if any_decoupled:
                        p.mul_(1 - torch.where(self.decoupled.view(shape), h_lr * h_wd, 0.0))
                m.lerp_(grad, 1 - BETAS[0])
                v.mul_(BETAS[1]).addcmul_(grad, grad, value=1 - BETAS[1])
                p.addcdiv_(m * (h_lr / bias1), v.sqrt().div_(bias2_sqrt).add_(EPS), value=-1.0)
                p.grad = None

    def keep(self, positions: list[int]) -> None:
        """Drop every head not at ``positions`` (early-stopped ones) from the stack and its optimiser state."""
        idx = torch.tensor(positions, device=self.weights[0].device)
        new_state = {}
        for group, axis in ((self.weights, 1), (self.biases, 0)):
            for j, p in enumerate(group):
                m, v = self.state[id(p)]
                group[j] = p.detach().index_select(axis, idx).requires_grad_()
                new_state[id(group[j])] = (m.index_select(axis, idx), v.index_select(axis, idx))
        self.state = new_state
        self.members = [self.members[i] for i in positions]
        self.index = self.index[idx]
        self.dropout = self.dropout[idx]
        self.weight_decay = self.weight_decay[idx]
        self.class_weighted = self.class_weighted[idx]
        self.decoupled = self.decoupled[idx]
        self.generators = [self.generators[i] for i in positions]

    def export(self, position: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight, bias) per layer of one head, in nn.Linear's (out, in) layout."""
        return [(w[:, position].detach().T.cpu().clone(), b[position].detach().cpu().clone())
                for w, b in zip(self.weights, self.biases)]


@dataclass
class _Watch:
    """One trainable head's early stopping and epoch choice, on its validation metric smoothed over the last
    ``window`` epochs. Only epochs past warm-up are eligible (unless the head has none after it), and patience
    counts from there: counted during warm-up, patience 1 stopped a head before its first eligible epoch, with
    nothing kept."""

    config: HeadConfig
    higher: bool
    window: int
    warmup_epochs: int
    best: float = field(init=False)  # the best smoothed score so far: -inf or inf until one is eligible
    best_epoch: int = 0
    waited: int = 0
    recent: list[float] = field(default_factory=list)
    layers: list | None = None  # the best epoch's weights, per layer
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.best = -math.inf if self.higher else math.inf

    def observe(self, epoch: int, score: float, export: Callable[[], list]) -> bool:
        """Take the end of ``epoch`` (its metric ``score``; ``export`` gives the head's weights now); whether the
        head trains on."""
        self.recent = (self.recent + [score])[-self.window:]
        smoothed = float(np.mean(self.recent))
        eligible = epoch > min(self.warmup_epochs, self.config.epochs - 1)
        if eligible and ((smoothed > self.best) if self.higher else (smoothed < self.best)):
            self.best, self.best_epoch, self.waited, self.layers = smoothed, epoch, 0, export()
        elif eligible:
            self.waited += 1
        if epoch < self.config.epochs and self.waited < self.config.patience:
            return True
        if self.layers is None:  # no epoch ever scored (a diverged head's NaN): it ends as it is
            self.layers, self.best_epoch = export(), epoch
        return False


def _load_layers(head: nn.Module, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for lin, (w, b) in zip(linears, layers):
            lin.weight.copy_(w)
            lin.bias.copy_(b)


def train_grid(
    configs: list[HeadConfig] | tuple[HeadConfig, ...],
    train: Labelled,
    val: Labelled,
    num_classes: int,
    fit: Fit = Fit(),
    progress: bool = False,
    desc: str = "grid",
) -> list[TrainedHead]:
    """Train every head of ``configs`` on ``train``; keep each one's best epoch on ``val``."""
    metric, options, seed, device = fit.metric, fit.options, fit.seed, torch.device(fit.device)
    higher = METRICS[metric]
    xt = torch.as_tensor(np.asarray(train.features), dtype=torch.float32)
    xv = torch.as_tensor(np.asarray(val.features), dtype=torch.float32)
    y_train, y_val = np.asarray(train.labels), np.asarray(val.labels)
    mean, std = feature_stats(xt, options.standardize)
    results: dict[int, TrainedHead] = {}

    knn = [i for i, c in enumerate(configs) if c.type == "knn"]
    if knn:
        bank = F.normalize(xt, dim=1)
        heads_knn = [build_head(configs[i], xt.shape[1], num_classes, mean, std, bank=bank,
                                bank_labels=torch.as_tensor(y_train), normalized_bank=True).eval() for i in knn]
        for i, head, proba in zip(knn, heads_knn, knn_grid_probabilities(heads_knn, xv)):
            proba = proba.numpy()
            score = fast_metric(metric, y_val, proba)
            results[i] = TrainedHead(configs[i], head, score, proba, 0, [{"epoch": 0, f"val_{metric}": score}])

    trainable = [i for i, c in enumerate(configs) if c.trainable]
    if trainable:
        heads: dict[int, nn.Module] = {}
        for i in trainable:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(configs[i].seed_for(seed))
                heads[i] = build_head(configs[i], xt.shape[1], num_classes, mean, std)
        by_arch: dict[tuple, list[int]] = {}
        for i in trainable:
            by_arch.setdefault((configs[i].type, configs[i].hidden), []).append(i)
        families = [HeadStack(heads, configs, members, seed, device) for members in by_arch.values()]

        low = products_dtype(options, device) == torch.bfloat16
        xs_train = ((xt - mean) / std).to(device)
        if low:  # autocast would round each batch to bfloat16 anyway: do it once, and gather half the bytes
            xs_train = xs_train.bfloat16()
        zv = (xv - mean) / std  # what each head's own standardisation makes of the validation features
        xs_val = zv.to(device)
        yt = torch.as_tensor(np.asarray(y_train), dtype=torch.long, device=device)
        yv = torch.as_tensor(y_val, dtype=torch.long, device=device)
        cw = class_weights(np.asarray(y_train), num_classes).to(device)
        n = len(xs_train)
        # Small datasets get smaller batches: at least ~16 optimiser steps per epoch.
        bs = min(options.batch_size, max(32, n // 16), n)
        steps = math.ceil(n / bs)
        max_epochs = max(configs[i].epochs for i in trainable)
        lr0, epochs_of = torch.tensor([c.lr for c in configs]), torch.tensor([c.epochs for c in configs])

        watch = {i: _Watch(configs[i], higher, options.smooth_epochs, options.warmup_epochs) for i in trainable}
        bar = progress_bar(total=max_epochs, desc=desc, unit="epoch", leave=False, enabled=progress)
        for epoch in range(1, max_epochs + 1):
            t0 = time.perf_counter()
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).to(device)
            loss_sum = {id(f): torch.zeros(len(f.members), device=device) for f in families}
            # This epoch's learning rate of every head at every step (steps, heads): one computation, not one per step.
            epoch_lr = (lr0 * lr_factors(torch.arange((epoch - 1) * steps, epoch * steps)[:, None], epochs_of,
                                         options.warmup_epochs, steps)).to(device)
            for k, start in enumerate(range(0, n, bs)):
                idx = order[start:start + bs]
                xb, yb = xs_train[idx], yt[idx]
                for fam in families:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low):
                        logits = fam.logits(xb, train=True)  # (B, H, C)
                    # Log-softmax over classes on a (B, C, H) view: on a CPU ~4x faster than over the last axis
                    # of (B, H, C), where a handful of classes is too short a row to vectorise.
                    logp = logits.float().transpose(1, 2).log_softmax(1)
                    nll = -logp.gather(1, yb[:, None, None].expand(-1, 1, len(fam.members))).squeeze(1)
                    w = torch.where(fam.class_weighted[None, :], cw[yb][:, None], torch.ones_like(nll))
                    per_head = (w * nll).sum(0) / w.sum(0)
                    per_head.sum().backward()
                    lr = epoch_lr[k, fam.index]
                    fam.optimizer_step(lr, fam.weight_decay)
                    loss_sum[id(fam)] += per_head.detach() * len(idx)
            for fam in families:
                with torch.no_grad():
                    val_logits = torch.cat([fam.logits(xs_val[s:s + 8192], train=False) for s in range(0, len(xs_val), 8192)])
                    val_proba = val_logits.softmax(-1).cpu().numpy()
                    val_loss = F.cross_entropy(val_logits.transpose(1, 2), yv[:, None].expand(-1, len(fam.members)),
                                               reduction="none").mean(0).cpu()
                keep = []
                scores = fast_metric_of_heads(metric, y_val, val_proba).tolist()
                train_losses, val_losses = (loss_sum[id(fam)] / n).tolist(), val_loss.tolist()
                lr_last = epoch_lr[-1, fam.index].tolist()  # the epoch's last step (members change only between epochs)
                for j, i in enumerate(fam.members):
                    watch[i].history.append({"epoch": epoch, "train_loss": train_losses[j], "val_loss": val_losses[j],
                                             f"val_{metric}": scores[j], "lr": lr_last[j],
                                             "seconds": time.perf_counter() - t0})
                    if watch[i].observe(epoch, scores[j], lambda: fam.export(j)):
                        keep.append(j)
                if not keep:
                    fam.members = []
                elif len(keep) < len(fam.members):
                    fam.keep(keep)
            families = [f for f in families if f.members]
            bar.update(1)
            if not families:
                break
        bar.close()
        for i, w in watch.items():
            _load_layers(heads[i], w.layers)
            head = heads[i].eval()
            with torch.no_grad():  # = head(xv), without standardising the same features once per head
                proba = head.classify(zv).softmax(1).numpy()
            results[i] = TrainedHead(configs[i], head, fast_metric(metric, y_val, proba), proba, w.best_epoch, w.history,
                                     selection_score=w.best)
    return [results[i] for i in range(len(configs))]


def predict_proba(head: nn.Module, x: np.ndarray | torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return head(torch.as_tensor(x, dtype=torch.float32)).softmax(1).numpy()
