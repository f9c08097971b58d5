"""Classification metrics and bootstrap confidence intervals, in numpy.

Every metric is scikit-learn's definition, and the tests hold each value to scikit-learn's (ties, a class never
predicted, a class absent from the split). The values are computed here, not by calling scikit-learn, for two
reasons: the results table scores every head of a grid and the bootstrap a thousand resamples, all from one
``bincount`` of confusion matrices, where scikit-learn costs ~30 ms per call; and importing scikit-learn
(scipy.stats and pandas come with it) would add ~0.8 s to every probe command.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import sparse

# name -> whether larger is better
METRICS: dict[str, bool] = {
    "accuracy": True,
    "balanced_accuracy": True,
    "macro_f1": True,
    "qwk": True,
    "top_k_accuracy": True,
    "roc_auc": True,
    "log_loss": False,
}


def default_top_k(num_classes: int) -> int:
    return 3 if num_classes > 3 else 1


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, *, top_k: int | None = None,
                    per_class: bool = False) -> dict[str, Any]:
    """Every metric of the probe from true labels and class probabilities (N, C); with ``per_class``, also each
    class's precision, recall, F1 and support and the confusion matrix (rows: true class)."""
    y_true = np.asarray(y_true)
    out: dict[str, Any] = metrics_of_heads(y_true, [proba], top_k=top_k)[0]
    out["top_k"] = top_k or default_top_k(proba.shape[1])
    if per_class:
        cm = confusion_batch(y_true, proba.argmax(1), proba.shape[1])[0]
        rates = _class_rates(cm)
        out["per_class"] = {"precision": rates["precision"].tolist(), "recall": rates["recall"].tolist(),
                            "f1": rates["f1"].tolist(), "support": cm.sum(1).tolist()}
        out["confusion"] = cm.tolist()
    return out


def _class_rates(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per class of confusion matrices (..., C, C): support, predicted count, hits, and precision, recall and F1
    (0 where undefined, as scikit-learn's ``zero_division=0``)."""
    cm = cm.astype(np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(-1)  # true counts per class
    predicted = cm.sum(-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {"tp": tp, "support": support, "predicted": predicted, "precision": precision, "recall": recall, "f1": f1}


def _from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy, balanced accuracy, macro F1 and QWK from confusion matrices (..., C, C)."""
    rates = _class_rates(cm)
    tp, support, predicted, recall = rates["tp"], rates["support"], rates["predicted"], rates["recall"]
    n = support.sum(-1)
    present = support > 0
    balanced = (recall * present).sum(-1) / np.maximum(present.sum(-1), 1)
    c = cm.shape[-1]
    i, j = np.meshgrid(np.arange(c), np.arange(c), indexing="ij")
    w = (i - j) ** 2 / max((c - 1) ** 2, 1)
    expected = support[..., :, None] * predicted[..., None, :] / np.maximum(n, 1)[..., None, None]
    num = (w * cm).sum((-2, -1))
    den = (w * expected).sum((-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        qwk = np.where(den > 0, 1 - num / den, 0.0)  # 0 where scikit-learn's is nan: one class only
    return {"accuracy": tp.sum(-1) / np.maximum(n, 1), "balanced_accuracy": balanced,
            "macro_f1": rates["f1"].mean(-1), "qwk": qwk}


def confusion_batch(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrices for rows of (R, N) label arrays: (R, C, C)."""
    y_true = np.atleast_2d(y_true)
    y_pred = np.atleast_2d(y_pred)
    r = y_true.shape[0]
    flat = (np.arange(r)[:, None] * num_classes * num_classes + y_true * num_classes + y_pred).ravel()
    return np.bincount(flat, minlength=r * num_classes * num_classes).reshape(r, num_classes, num_classes)


FROM_CONFUSION = ("accuracy", "balanced_accuracy", "macro_f1", "qwk")


def fast_metric(name: str, y_true: np.ndarray, proba: np.ndarray, *, top_k: int | None = None) -> float:
    """One metric, computing only what it needs (the confusion metrics need no more than the confusion matrix):
    training loops call it every epoch for early stopping."""
    if name in FROM_CONFUSION:
        return float(fast_metric_of_heads(name, y_true, proba[:, None])[0])
    return float(compute_metrics(y_true, proba, top_k=top_k)[name])


def fast_metric_of_heads(name: str, y_true: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """:func:`fast_metric` of every head at once, from probabilities (N, heads, C): (heads,). A grid scores each
    of its heads on validation every epoch, so its confusion matrices come from one ``bincount``."""
    if name not in FROM_CONFUSION:
        return np.array([fast_metric(name, y_true, proba[:, h]) for h in range(proba.shape[1])])
    return _from_confusion(_head_confusions(y_true, proba.argmax(-1).T, proba.shape[-1]))[name]


def _head_confusions(y_true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(heads, C, C) confusion matrices of every head's predictions ``pred`` (heads, N) against one ``y_true``."""
    return confusion_batch(np.broadcast_to(np.asarray(y_true), pred.shape), pred, num_classes)


def draw_counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(n, R) float32: how often each of ``n`` images was drawn in each resample of ``idx`` (R, draws).

    A resample is the original images with integer weights: every metric of it is a weighted sum over the
    images, so all resamples come from one product with this matrix, with no resampled copy of the data."""
    counts = np.empty((n, len(idx)), np.float32)
    for j, draws in enumerate(idx):
        counts[:, j] = np.bincount(draws, minlength=n)
    return counts


def metrics_of_heads(y_true: np.ndarray, probas: list[np.ndarray], *, top_k: int | None = None
                     ) -> list[dict[str, float]]:
    """The seven metrics of :func:`compute_metrics` (no per-class ones) for many heads' probabilities on one
    split, every head's confusion matrix from one ``bincount``: the results table scores every head of the grid."""
    y_true = np.asarray(y_true)
    if not probas:
        return []
    c = probas[0].shape[1]
    k = top_k or default_top_k(c)
    confusion = _head_confusions(y_true, np.stack([p.argmax(1) for p in probas]), c)
    table = _from_confusion(confusion)
    every_class = len(np.unique(y_true)) == c  # ROC-AUC is undefined when a class is absent
    out = []
    for h, p in enumerate(probas):
        out.append({name: float(v[h]) for name, v in table.items()} | {
            "top_k_accuracy": float(_top_k_hits(y_true, p, k).mean()),
            "roc_auc": _roc_auc_of(y_true, p) if every_class else float("nan"),
            "log_loss": float(_image_log_losses(y_true, p).mean())})
    return out


def _top_k_hits(y_true: np.ndarray, proba: np.ndarray, k: int) -> np.ndarray:
    """Per image, whether its class is among the k highest scores — in scikit-learn's order among tied scores
    (kNN vote shares tie often: the later class first); with two classes, the prediction (``compute_metrics``
    reports accuracy there)."""
    if proba.shape[1] <= 2:
        return proba.argmax(1) == y_true
    return (np.argsort(proba, axis=1, kind="mergesort")[:, ::-1][:, :k] == y_true[:, None]).any(1)


def _image_log_losses(y_true: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Per image, :func:`compute_metrics`' log loss: scikit-learn's, which clips to its dtype's [eps, 1 - eps]."""
    eps = np.finfo(proba.dtype).eps
    p = np.clip(np.clip(proba, 1e-15, 1), eps, 1 - eps)[np.arange(len(y_true)), y_true]
    return -np.log(p.astype(np.float64))


def _auc_scores(proba: np.ndarray) -> tuple[np.ndarray, list[int] | range]:
    """The scores ROC-AUC ranks, as :func:`compute_metrics`: the positive class's column with two classes, else
    every class's normalised probability (one-vs-rest), and the classes they belong to."""
    if proba.shape[1] == 2:
        return proba[:, 1:2], [1]
    return proba / proba.sum(1, keepdims=True), range(proba.shape[1])


def _tie_bounds(negatives: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each positive's score falls among the sorted negatives' scores: below it [0, lo), tied [lo, hi)."""
    return (np.searchsorted(negatives, positives, side="left"), np.searchsorted(negatives, positives, side="right"))


def _roc_auc_of(y_true: np.ndarray, proba: np.ndarray) -> float:
    """:func:`compute_metrics`' ROC-AUC (every class present) as a Mann-Whitney count: for every positive, the
    negatives scored below it, plus half of those tied. One sort per class: the results table scores every head
    of the grid this way, where the bootstrap's weighted version costs ~2 ms per head in sparse products."""
    scores, classes = _auc_scores(proba)
    aucs = []
    for k, column in zip(classes, scores.T):
        positive = y_true == k
        negatives = np.sort(column[~positive])
        lo, hi = _tie_bounds(negatives, column[positive])
        aucs.append((lo + 0.5 * (hi - lo)).sum() / (positive.sum() * len(negatives)))
    return float(np.mean(aucs))


def _bootstrap_roc_auc(y_true: np.ndarray, proba: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """ROC-AUC (binary, or one-vs-rest macro as :func:`compute_metrics`) of every resample, from the resamples'
    :func:`draw_counts` (N, R).

    Each class's AUC is a weighted Mann-Whitney count: for every positive, the weight of the negatives scored below it, plus
    half of those tied. The scores' order does not depend on the resample: one sort per class serves them
    all. Resamples that miss a class are left out (the AUC is undefined there), as scikit-learn would refuse.
    """
    n = proba.shape[0]
    r = counts.shape[1]
    scores, classes = _auc_scores(proba)
    aucs = []
    for k, column in zip(classes, scores.T):
        pos, neg = np.flatnonzero(y_true == k), np.flatnonzero(y_true != k)
        order = np.argsort(column[neg], kind="stable")
        lo, hi = _tie_bounds(column[neg][order], column[pos])
        cuts = np.unique(np.concatenate([[0, len(neg)], lo, hi]))
        # Each negative's segment between cuts; the segments' draw counts by one sparse product, summed up.
        segment = np.searchsorted(cuts, np.arange(len(neg)), side="right") - 1
        members = sparse.csr_matrix((np.ones(len(neg), np.float32), (segment, neg[order])), shape=(len(cuts), n))
        below = np.zeros((len(cuts), r))
        np.cumsum((members @ counts)[:-1], axis=0, out=below[1:])  # below[j]: weight of negatives before cuts[j]
        at_lo, at_hi = below[np.searchsorted(cuts, lo)], below[np.searchsorted(cuts, hi)]
        pos_w = counts[pos]
        wins = (pos_w * (at_lo + 0.5 * (at_hi - at_lo))).sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            aucs.append(wins / (pos_w.sum(0, dtype=np.float64) * below[-1]))
    auc = np.mean(aucs, axis=0)
    return auc[np.isfinite(auc)]


def bootstrap_ci(y_true: np.ndarray, proba: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                 top_k: int | None = None, alpha: float = 0.05) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap (resampling test images) 1-alpha intervals of each metric, every metric from the
    same ``n_boot`` resamples, all computed at once."""
    y_true = np.asarray(y_true)
    n, c = proba.shape
    rng = np.random.default_rng(seed)
    counts = draw_counts(rng.integers(0, n, size=(n_boot, n)), n)
    # Each resample's confusion matrix: the draw counts summed per (true, predicted) cell, one sparse product.
    cell = sparse.csr_matrix((np.ones(n, np.float32), (y_true * c + proba.argmax(1), np.arange(n))), shape=(c * c, n))
    samples = _from_confusion(np.asarray(cell @ counts).T.reshape(n_boot, c, c))
    k = top_k or default_top_k(c)
    # The same per-image quantities as the point estimates, weighted by each resample's draws.
    samples["top_k_accuracy"] = _top_k_hits(y_true, proba, k).astype(np.float64) @ counts / n
    samples["log_loss"] = _image_log_losses(y_true, proba) @ counts / n
    samples["roc_auc"] = _bootstrap_roc_auc(y_true, proba, counts)
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    return {name: ((float(np.percentile(v, lo)), float(np.percentile(v, hi))) if len(v) else (float("nan"),) * 2)
            for name, v in samples.items()}
