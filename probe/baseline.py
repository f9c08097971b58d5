"""The classic linear-probe reference: scikit-learn's L2-regularised logistic regression (L-BFGS).

Features are standardised with training statistics; the inverse regularisation
strength C is chosen on the validation split among log-spaced values.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from probe.metrics import METRICS, fast_metric

DEFAULT_CS = tuple(np.logspace(-4, 4, 17))


@dataclass
class LogRegResult:
    C: float
    val_metric: float
    val_by_C: dict[float, float]
    model: LogisticRegression
    scaler: StandardScaler

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(self.scaler.transform(x))


def logreg_baseline(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
                    metric: str = "macro_f1", cs: tuple[float, ...] = DEFAULT_CS, max_iter: int = 1000,
                    num_classes: int | None = None) -> LogRegResult:
    """Fit one model per C (warm-started from strong to weak regularisation); keep the best on validation."""
    higher = METRICS[metric]
    scaler = StandardScaler().fit(x_train)
    xt, xv = scaler.transform(x_train), scaler.transform(x_val)
    model = LogisticRegression(C=cs[0], max_iter=max_iter, warm_start=True)
    best: tuple[float, float, LogisticRegression] | None = None
    scores: dict[float, float] = {}
    for c in sorted(cs):
        model.set_params(C=c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(xt, y_train)
        proba = _full_proba(model, xv, num_classes)
        score = fast_metric(metric, y_val, proba)
        scores[float(c)] = score
        if best is None or (score > best[1] if higher else score < best[1]):
            import copy

            best = (float(c), score, copy.deepcopy(model))
    assert best is not None
    return LogRegResult(C=best[0], val_metric=best[1], val_by_C=scores, model=best[2], scaler=scaler)


def _full_proba(model: LogisticRegression, x: np.ndarray, num_classes: int | None) -> np.ndarray:
    """Probabilities over all classes, even those absent from training."""
    proba = model.predict_proba(x)
    if num_classes is None or proba.shape[1] == num_classes:
        return proba
    full = np.zeros((len(x), num_classes))
    full[:, model.classes_] = proba
    return full
