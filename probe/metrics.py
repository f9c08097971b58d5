"""Classification metrics (scikit-learn) and bootstrap confidence intervals.

Point estimates come straight from scikit-learn. The bootstrap resamples the test
images many times, so it computes the same metrics from per-resample confusion
matrices with numpy (checked against scikit-learn in the tests) instead of
calling scikit-learn a thousand times.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn import metrics as skm

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
    """Every metric of the probe from true labels and class probabilities (N, C)."""
    y_true = np.asarray(y_true)
    n_classes = proba.shape[1]
    labels = np.arange(n_classes)
    y_pred = proba.argmax(1)
    k = top_k or default_top_k(n_classes)
    out: dict[str, Any] = {
        "accuracy": skm.accuracy_score(y_true, y_pred),
        "balanced_accuracy": _quiet(skm.balanced_accuracy_score, y_true, y_pred),
        "macro_f1": skm.f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0),
        "qwk": _qwk(y_true, y_pred, labels),
        "top_k_accuracy": skm.top_k_accuracy_score(y_true, proba, k=k, labels=labels) if n_classes > 2 else skm.accuracy_score(y_true, y_pred),
        "roc_auc": _roc_auc(y_true, proba, labels),
        "log_loss": skm.log_loss(y_true, np.clip(proba, 1e-15, 1), labels=labels),
        "top_k": k,
    }
    if per_class:
        p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
        out["per_class"] = {"precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist(), "support": s.tolist()}
        out["confusion"] = skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return {k_: (float(v) if isinstance(v, (np.floating, float)) else v) for k_, v in out.items()}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _qwk(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray) -> float:
    value = _quiet(skm.cohen_kappa_score, y_true, y_pred, labels=labels, weights="quadratic")
    return 0.0 if np.isnan(value) else float(value)  # nan when only one class is present


def _roc_auc(y_true: np.ndarray, proba: np.ndarray, labels: np.ndarray) -> float:
    if len(np.unique(y_true)) < len(labels):
        return float("nan")  # undefined when a class is absent
    if len(labels) == 2:
        return float(skm.roc_auc_score(y_true, proba[:, 1]))
    p = proba / proba.sum(1, keepdims=True)
    return float(skm.roc_auc_score(y_true, p, multi_class="ovr", average="macro", labels=labels))


# ----------------------------------------------------------------------------- fast versions


def _from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy, balanced accuracy, macro F1 and QWK from confusion matrices (..., C, C)."""
    cm = cm.astype(np.float64)
    n = cm.sum((-2, -1))
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(-1)  # true counts per class
    predicted = cm.sum(-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        present = support > 0
        balanced = (recall * present).sum(-1) / np.maximum(present.sum(-1), 1)
        c = cm.shape[-1]
        i, j = np.meshgrid(np.arange(c), np.arange(c), indexing="ij")
        w = (i - j) ** 2 / max((c - 1) ** 2, 1)
        expected = support[..., :, None] * predicted[..., None, :] / np.maximum(n, 1)[..., None, None]
        num = (w * cm).sum((-2, -1))
        den = (w * expected).sum((-2, -1))
        qwk = np.where(den > 0, 1 - num / den, 0.0)
    return {"accuracy": tp.sum(-1) / np.maximum(n, 1), "balanced_accuracy": balanced,
            "macro_f1": f1.mean(-1), "qwk": qwk}


def confusion_batch(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrices for rows of (R, N) label arrays: (R, C, C)."""
    y_true = np.atleast_2d(y_true)
    y_pred = np.atleast_2d(y_pred)
    r = y_true.shape[0]
    flat = (np.arange(r)[:, None] * num_classes * num_classes + y_true * num_classes + y_pred).ravel()
    return np.bincount(flat, minlength=r * num_classes * num_classes).reshape(r, num_classes, num_classes)


def fast_metric(name: str, y_true: np.ndarray, proba: np.ndarray, *, top_k: int | None = None) -> float:
    """One metric, computed with numpy; used inside training loops for early stopping."""
    if name in ("accuracy", "balanced_accuracy", "macro_f1", "qwk"):
        cm = confusion_batch(y_true, proba.argmax(1), proba.shape[1])[0]
        return float(_from_confusion(cm)[name])
    return float(compute_metrics(y_true, proba, top_k=top_k)[name])


def bootstrap_ci(y_true: np.ndarray, proba: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                 top_k: int | None = None, alpha: float = 0.05) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap (resampling test images) 1-alpha intervals of each metric."""
    y_true = np.asarray(y_true)
    n, c = proba.shape
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    yt = y_true[idx]
    pred = proba.argmax(1)[idx]
    samples = _from_confusion(confusion_batch(yt, pred, c))
    k = top_k or default_top_k(c)
    topk = np.argsort(-proba, axis=1)[:, :k]
    hit = (topk == y_true[:, None]).any(1)
    samples["top_k_accuracy"] = hit[idx].mean(1)
    p_true = np.clip(proba[np.arange(n), y_true], 1e-15, 1)
    samples["log_loss"] = -np.log(p_true)[idx].mean(1)
    # ROC-AUC has no confusion-matrix form; fewer resamples through scikit-learn keep it affordable.
    aucs = []
    for row in idx[: min(n_boot, 200)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                aucs.append(_roc_auc(y_true[row], proba[row], np.arange(c)))
            except ValueError:
                continue
    samples["roc_auc"] = np.asarray([a for a in aucs if not np.isnan(a)])
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    return {name: ((float(np.percentile(v, lo)), float(np.percentile(v, hi))) if len(v) else (float("nan"),) * 2)
            for name, v in samples.items()}
