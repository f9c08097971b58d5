"""The heads a probe trains, as standalone modules: what is saved, reloaded and put on a backbone.

Every head takes pooled features (B, D) and returns logits (B, C). Standardisation
with the training statistics is part of the head (buffers), so a saved head
applies to raw backbone features.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from configs.probe import HeadConfig
from runtime.errors import UserError

HEAD_FORMAT = 1


class Standardize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class LinearHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, norm: Standardize) -> None:
        super().__init__()
        self.in_features = dim
        self.norm = norm
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.norm(x))

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of features already standardised with this head's statistics."""
        return self.fc(z)


class MLPHead(nn.Module):
    """[features, hidden..., classes] with GELU and dropout after each hidden layer."""

    def __init__(self, dim: int, hidden: tuple[int, ...], num_classes: int, dropout: float, norm: Standardize) -> None:
        super().__init__()
        self.in_features = dim
        self.norm = norm
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(dim, h), nn.GELU(), nn.Dropout(dropout)]
            dim = h
        layers.append(nn.Linear(dim, num_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.norm(x))

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of features already standardised with this head's statistics."""
        return self.mlp(z)


class KNNHead(nn.Module):
    """k nearest neighbours by cosine similarity, votes weighted by exp(similarity / temperature).

    Returns log-probabilities as logits, so softmax gives the vote shares.
    """

    def __init__(self, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int, k: int, temperature: float,
                 normalized: bool = False) -> None:
        super().__init__()
        self.in_features = bank.shape[1]
        # Heads of one grid share one normalised bank (``normalized``): one copy of the training features, not one each.
        self.register_buffer("bank", bank if normalized else F.normalize(bank.float(), dim=1))
        self.register_buffer("bank_labels", bank_labels.long())
        self.num_classes, self.k, self.temperature = num_classes, k, temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _as_logits(knn_probabilities(F.normalize(x.float(), dim=1), self.bank, self.bank_labels,
                                            self.num_classes, self.k, self.temperature))

    def evidence(self, x: torch.Tensor) -> torch.Tensor:
        """log of each class's unnormalised vote mass, sum over its neighbours among the k of exp(sim / T).

        A differentiable function of the features with the same argmax as :meth:`forward`; unlike the vote
        share it still has a gradient when all k neighbours agree (a share of exactly 1). Grad-CAM uses it.
        """
        votes = vote_mass(F.normalize(x.float(), dim=1), self.bank, self.bank_labels, self.num_classes, self.k,
                          self.temperature)
        return torch.log(votes.clamp_min(1e-30))


def knn_probabilities(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                      k: int, temperature: float, chunk: int = 4096) -> torch.Tensor:
    """Vote shares (N, C) for L2-normalised ``queries`` against an L2-normalised ``bank``, ``chunk`` queries at a time."""
    # One pass when it fits; shape[0], not len(), keeps the batch size symbolic when the head is exported to ONNX.
    if queries.shape[0] <= chunk:
        return _votes(queries, bank, bank_labels, num_classes, k, temperature)
    return torch.cat([_votes(queries[start:start + chunk], bank, bank_labels, num_classes, k, temperature)
                      for start in range(0, len(queries), chunk)])


def vote_mass(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int, k: int,
              temperature: float) -> torch.Tensor:
    """(N, C): per class, the sum of exp(similarity / temperature) over its neighbours among the k nearest."""
    top, idx = (queries @ bank.T).topk(min(k, len(bank)), dim=1)
    return _mass(top, bank_labels[idx], num_classes, temperature)


def _mass(top: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    return top.new_zeros((top.shape[0], num_classes)).scatter_add(1, neighbour_labels, (top / temperature).exp())


def knn_grid_probabilities(heads: list[KNNHead], x: torch.Tensor, chunk: int = 4096) -> list[torch.Tensor]:
    """Each head's ``softmax(head(x))`` for kNN heads sharing one bank, from one similarity matrix and one top-k
    (the largest k) instead of one per head: the similarities are most of the cost. Only a tie between the k-th
    and the (k+1)-th neighbour could be broken otherwise than by the head's own forward."""
    bank, bank_labels = heads[0].bank, heads[0].bank_labels
    kmax = min(max(h.k for h in heads), len(bank))
    queries = F.normalize(x.float(), dim=1)
    parts: list[list[torch.Tensor]] = [[] for _ in heads]
    with torch.no_grad():
        for start in range(0, len(queries), chunk):
            top, idx = (queries[start:start + chunk] @ bank.T).topk(kmax, dim=1)
            neighbours = bank_labels[idx]
            for out, h in zip(parts, heads):
                k = min(h.k, len(bank))
                shares = _shares(_mass(top[:, :k], neighbours[:, :k], h.num_classes, h.temperature))
                out.append(_as_logits(shares).softmax(1))  # as forward() then softmax
    return [torch.cat(p) for p in parts]


def _shares(votes: torch.Tensor) -> torch.Tensor:
    return votes / votes.sum(1, keepdim=True)


def _as_logits(shares: torch.Tensor) -> torch.Tensor:
    return torch.log(shares.clamp_min(1e-12))


def _votes(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int, k: int,
           temperature: float) -> torch.Tensor:
    return _shares(vote_mass(queries, bank, bank_labels, num_classes, k, temperature))


def build_head(config: HeadConfig, dim: int, num_classes: int, mean: torch.Tensor, std: torch.Tensor,
               bank: torch.Tensor | None = None, bank_labels: torch.Tensor | None = None,
               normalized_bank: bool = False) -> nn.Module:
    if config.type == "linear":
        return LinearHead(dim, num_classes, Standardize(mean, std))
    if config.type == "mlp":
        return MLPHead(dim, config.hidden, num_classes, config.dropout, Standardize(mean, std))
    assert bank is not None and bank_labels is not None
    return KNNHead(bank, bank_labels, num_classes, config.k, config.temperature, normalized=normalized_bank)


def head_checkpoint(head: nn.Module, config: HeadConfig, *, dim: int, num_classes: int,
                    info: dict[str, Any]) -> dict[str, Any]:
    """A dict of tensors and plain values: loads with ``torch.load(..., weights_only=True)``."""
    return {"format": HEAD_FORMAT, "config": config.to_dict(), "dim": dim, "num_classes": num_classes,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, **info}


class HeadFormatError(UserError, ValueError):
    """A head file this version cannot read."""


def head_from_checkpoint(ckpt: dict[str, Any], where: str = "head") -> nn.Module:
    """Rebuild a head saved by :func:`head_checkpoint` (weights loaded, eval mode)."""
    if ckpt.get("format") != HEAD_FORMAT:
        raise HeadFormatError(f"{where}: head format {ckpt.get('format')!r}, this version reads format "
                              f"{HEAD_FORMAT}; run `python -m probe` again to rewrite the heads")
    config = HeadConfig.model_validate(ckpt["config"])
    state = ckpt["state_dict"]
    dim, classes = int(ckpt["dim"]), int(ckpt["num_classes"])
    if config.type == "knn":
        head = build_head(config, dim, classes, None, None, state["bank"], state["bank_labels"])
    else:
        head = build_head(config, dim, classes, state["norm.mean"], state["norm.std"])
    head.load_state_dict(state)
    return head.eval()
