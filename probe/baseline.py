"""The classic linear-probe reference: L2-regularised multinomial logistic regression, C chosen on validation.

scikit-learn's ``LogisticRegression(C=C)`` objective — the mean cross-entropy plus ||W||^2 / (2 C n), the
intercept not penalised — minimised by full-batch L-BFGS in torch, one C after another from strong to weak
regularisation, and stopped like scikit-learn's solver: when no gradient entry exceeds ``tol``. scikit-learn's own
solver reaches the same optimum (tests compare them) but took 3.6-5.6x longer over the same C path on the demo's
and a ResNet-50's features; the baseline has to cost no more than the grid.

``tol`` is 1e-5, not scikit-learn's 1e-4: on the demo's and a ResNet-50's features (more dimensions than training
images, so nearly separable at large C) a solve stopped at 1e-4 left validation probabilities up to 0.17 from
the optimum's, and where it started decided which C won. At 1e-5 they are within 0.0002-0.0097 of a 1e-7 solve's.
Each C starts from whichever fits it best of the last C's solution and the line and the parabola through the last
two and three solutions: about half the iterations of a plain warm start, so the tighter tolerance costs about
what the looser one did.
Features are standardised with training statistics, as scikit-learn's ``StandardScaler`` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from probe.metrics import METRICS, fast_metric
from probe.train import Labelled

DEFAULT_CS = tuple(np.logspace(-4, 4, 17))


class _LBFGS(torch.optim.LBFGS):
    """torch's L-BFGS without the 1.0-1.6 s import of torch's compiler (``torch._dynamo``) that building any
    optimizer triggers: ``Optimizer.add_param_group`` is wrapped to import it on first call, only to mark the
    method as not to be compiled. Nothing here is compiled, so the method is used unwrapped. Where a torch
    version does not wrap it (no ``__wrapped__``), this is torch's own method and the import happens as usual."""

    add_param_group = getattr(torch.optim.Optimizer.add_param_group, "__wrapped__",
                              torch.optim.Optimizer.add_param_group)


@dataclass
class LogRegResult:
    C: float
    val_metric: float
    val_by_C: dict[float, float]
    coef: np.ndarray  # (classes, D) float64, on standardised features; zero rows for classes absent from training
    intercept: np.ndarray  # (classes,); -inf for classes absent from training
    mean: np.ndarray
    scale: np.ndarray
    iterations: dict[float, int]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.proba_of_standardized(standardized(x, self.mean, self.scale).double())

    def proba_of_standardized(self, z: torch.Tensor) -> np.ndarray:
        return (z @ torch.as_tensor(self.coef).T + torch.as_tensor(self.intercept)).softmax(1).numpy()


def scaler_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What scikit-learn's ``StandardScaler`` fitted on ``x`` keeps as ``mean_`` and ``scale_`` (here float32): the
    mean and the population standard deviation accumulated in float64, and scale 1 for a feature its rule finds
    constant (a variance within float64's rounding of the mean). Not the class itself: importing scikit-learn costs
    ~0.8 s of every probe command. The tests hold it to ``StandardScaler``."""
    x = np.asarray(x)
    mean, var = x.mean(0, dtype=np.float64), x.var(0, dtype=np.float64)
    n, eps = len(x), np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    return mean.astype(np.float32), np.where(constant, 1.0, np.sqrt(var)).astype(np.float32)


def standardized(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """``x`` as the model sees it: standardised with the training statistics (float32)."""
    return torch.as_tensor((np.asarray(x, np.float32) - mean) / scale)


TOL = 1e-5


def fit_path(x: torch.Tensor, y: torch.Tensor, cs: list[float], *, max_iter: int = 1000, tol: float = TOL
             ) -> Iterator[tuple[float, torch.Tensor, torch.Tensor, int]]:
    """Yield (C, coef (K, D), intercept (K,), iterations) along ``cs`` (ascending) for standardised ``x`` (N, D)
    and labels ``y`` in 0..K-1, in ``x``'s dtype, each C started from the last ones' solutions."""
    n, d = x.shape
    k = int(y.max()) + 1
    # With far fewer images than dimensions, solve in the images' span: the loss sees coef only through
    # x @ coef.T and the penalty is ||coef||^2, so the optimum is coef = B @ Q.T with x.T = Q R, and B solves the
    # same problem on the (N, N) features x @ Q = R.T. L-BFGS's steps are the same under this isometry, each
    # product N / D the size; only the stopping test, max |gradient entry|, sees other entries. On ResNet-50's
    # 1,257 x 2,048 features: 0.79x the time, QR included, and every C's validation probabilities as close to a
    # float64 solve's as before (float32's rounding decides how close, in either basis). The QR is in float64:
    # float32 factors left one C's true gradient 28x the tolerance. Near N = D it does not pay (0.9-1.0x at
    # N = 0.8 D, 1.07x at 0.9 D).
    basis = None
    if n <= 0.75 * d:
        basis, r = (m.to(x.dtype) for m in torch.linalg.qr(x.T.double()))  # (D, N), (N, N)
        x, d = r.T.contiguous(), n
    # The loss and its gradient written out, each product in the layout BLAS runs fastest for these thin
    # matrices (K columns): logits (N, K) = x @ coef.T, and the gradient as (D, N) @ (N, K) from a residual
    # held (K, N). Other layouts of the same products are 1.5-40x slower on a CPU (autograd's among them).
    xt = x.T.contiguous()
    onehot = F.one_hot(y, k).to(x.dtype)  # (N, K)
    coef, intercept = torch.zeros(k, d, dtype=x.dtype), torch.zeros(k, dtype=x.dtype)
    coef.grad, intercept.grad = torch.zeros_like(coef), torch.zeros_like(intercept)
    # For 9-15 classes both products run on K columns padded with zeros to 16, which the softmax never sees.
    # 16 float32 columns fill whole SIMD registers (one AVX-512, two AVX2); 9-15 leave a remainder, and here
    # (MKL on an AMD EPYC with AVX-512) 16 columns took 0.6-0.7x the time of 10, less than 8 did: 0.57 -> 0.36 ms
    # on 1,257 x 1,257, 7.4 -> 5.4 ms on 7,000 x 2,048. Not measured on other CPUs (benchmarks/HISTORY.md).
    padded = 16 if 8 < k < 16 else k
    padded_coef, padded_intercept = torch.zeros(padded, d, dtype=x.dtype), torch.zeros(padded, dtype=x.dtype)
    padded_residual = torch.zeros(padded, n, dtype=x.dtype)

    def logits(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (N, K) = x @ w.T + b
        padded_coef[:k], padded_intercept[:k] = w, b
        return torch.addmm(padded_intercept, x, padded_coef.T)[:, :k]

    def loss(logp: torch.Tensor, w: torch.Tensor, penalty: float) -> torch.Tensor:
        return -(logp * onehot).sum() / n + 0.5 * penalty * (w * w).sum()

    # The solutions before this C's, newest first, each as (coef, intercept, its training logits). A start is a
    # combination of them, and so are its logits: judging a start takes no pass over the features.
    earlier: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = [(coef.clone(), intercept.clone(),
                                                                       torch.zeros(n, k, dtype=x.dtype))]
    for c in cs:
        penalty = 1.0 / (c * n)
        with torch.no_grad():
            # Continue the path: start from whichever fits this C best of the last solution, the line through the
            # last two and the parabola through the last three (the Cs are log-spaced: equal steps).
            starts = [earlier[0]]
            if len(earlier) > 1:
                starts.append(tuple(2 * a - b for a, b in zip(*earlier[:2])))
            if len(earlier) > 2:
                starts.append(tuple(3 * a - 3 * b + z for a, b, z in zip(*earlier[:3])))
            start = min(starts, key=lambda wbl: float(loss(wbl[2].log_softmax(1), wbl[0], penalty)))
            coef.copy_(start[0])
            intercept.copy_(start[1])
        # torch's L-BFGS stops when max |gradient| <= tolerance_grad: scikit-learn's (scipy's) gtol.
        opt = _LBFGS([coef, intercept], lr=1, max_iter=max_iter, tolerance_grad=tol,
                     tolerance_change=1e-12, history_size=10, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            logp = logits(coef, intercept).log_softmax(1)  # (N, K)
            residual = padded_residual[:k]  # (K, N)
            torch.sub(logp.exp(), onehot, out=residual.T).div_(n)
            coef.grad.copy_((xt @ padded_residual.T)[:, :k].T).add_(coef, alpha=penalty)
            intercept.grad.copy_(residual.sum(1))
            return loss(logp, coef, penalty)

        opt.step(closure)
        with torch.no_grad():
            earlier = [(coef.clone(), intercept.clone(), logits(coef, intercept).clone()), *earlier[:2]]
        full = coef.clone() if basis is None else coef @ basis.T  # the caller's own copies
        yield c, full, intercept.clone(), int(opt.state[coef].get("n_iter", 0))


def logreg_baseline(train: Labelled, val: Labelled, *, metric: str = "macro_f1", cs: tuple[float, ...] = DEFAULT_CS,
                    max_iter: int = 1000, tol: float = TOL, num_classes: int | None = None) -> LogRegResult:
    """Fit one model per C on ``train`` (from strong to weak regularisation, each C started from the last ones'
    solutions); keep the best on ``val``."""
    x_train, y_train, x_val, y_val = train.features, train.labels, val.features, val.labels
    higher = METRICS[metric]
    y_train = np.asarray(y_train)
    num_classes = num_classes or int(max(y_train.max(), np.asarray(y_val).max())) + 1
    present = np.unique(y_train)  # like scikit-learn, a class never seen in training gets probability 0
    mean, scale = scaler_statistics(x_train)
    x = standardized(x_train, mean, scale)
    y = torch.as_tensor(np.searchsorted(present, y_train))
    y_val = np.asarray(y_val)

    def model(c: float, w: torch.Tensor, b: torch.Tensor) -> LogRegResult:
        coef = np.zeros((num_classes, x.shape[1]), np.float64)
        intercept = np.full(num_classes, -np.inf)
        coef[present], intercept[present] = w.double().numpy(), b.double().numpy()
        return LogRegResult(float(c), 0.0, scores, coef, intercept, mean, scale, iterations)

    # float32: half the memory traffic of float64, and at scikit-learn's tolerance as close to the optimum.
    best: LogRegResult | None = None
    scores: dict[float, float] = {}
    iterations: dict[float, int] = {}
    z_val = standardized(x_val, mean, scale).double()  # once for every C (~5 ms each on 1,500 x 2,048)
    for c, w, b, its in fit_path(x, y, sorted(cs), max_iter=max_iter, tol=tol):
        fitted = model(c, w, b)
        fitted.val_metric = scores[float(c)] = fast_metric(metric, y_val, fitted.proba_of_standardized(z_val))
        iterations[float(c)] = its
        if best is None or (fitted.val_metric > best.val_metric if higher else fitted.val_metric < best.val_metric):
            best = fitted
    assert best is not None
    return best
