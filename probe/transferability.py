"""Training-free scores of a backbone's cached features: rank backbones in seconds, no head trained.

- **LogME** (You, Liu, Wang, Long: "LogME: Practical Assessment of Pre-trained Models for
  Transfer Learning", ICML 2021): for each class, the log marginal likelihood (evidence)
  of a Bayesian linear regression of the class's one-hot column on the features, with
  the prior precision alpha and the noise precision beta set by maximising the evidence
  (MacKay's fixed-point updates); averaged over classes and divided by the number of
  samples. Higher is better; comparable across backbones on the same data.
- **kNN leave-one-out accuracy**: each labelled sample classified by the majority of
  its k nearest others by cosine similarity (itself excluded).

Both read only train + val features: test stays untouched until the chosen model is
tested.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.linalg import lapack

_LOG_2PI = math.log(2 * math.pi)


def evidence(y: np.ndarray, z: np.ndarray, s: np.ndarray, dim: int, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) of the model y = F m + noise, m ~ N(0, I / alpha), noise ~ N(0, I / beta).

    With ``F = U diag(sqrt(s)) V^T`` (thin SVD of the n x D features, ``s`` the nonzero eigenvalues
    of F^T F), ``z = U^T y`` is all that is needed of F besides ``s`` and ``dim`` = D.
    """
    n = len(y)
    # Posterior mean's fit: F m = U diag(beta s / (alpha + beta s)) z; its squared norm m^T m.
    shrink = beta * s / (alpha + beta * s)
    residual = float(y @ y - z @ z + ((1 - shrink) ** 2 * z ** 2).sum())
    m_norm = float((beta ** 2 * s / (alpha + beta * s) ** 2 * z ** 2).sum())
    log_det = float(np.log(alpha + beta * s).sum() + (dim - len(s)) * math.log(alpha))
    return (dim / 2 * math.log(alpha) + n / 2 * math.log(beta) - beta / 2 * residual - alpha / 2 * m_norm
            - log_det / 2 - n / 2 * _LOG_2PI)


def _maximise(y: np.ndarray, z: np.ndarray, s: np.ndarray, iters: int = 100) -> tuple[float, float]:
    """MacKay's fixed point for (alpha, beta): gamma = sum beta s / (alpha + beta s), alpha = gamma / m^T m,
    beta = (n - gamma) / ||y - F m||^2."""
    n = len(y)
    alpha, beta = 1.0, 1.0
    for _ in range(iters):
        shrink = beta * s / (alpha + beta * s)
        gamma = float(shrink.sum())
        m_norm = float((beta ** 2 * s / (alpha + beta * s) ** 2 * z ** 2).sum())
        residual = float(y @ y - z @ z + ((1 - shrink) ** 2 * z ** 2).sum())
        # All-zero features (no nonzero eigenvalue) give gamma = 0, and the evidence does not depend on alpha
        # there (its terms cancel): it is kept, where the update would set it to 0 and log(alpha) fail.
        new_alpha = gamma / max(m_norm, 1e-12) if gamma > 0 else alpha
        new_beta = max(n - gamma, 1e-12) / max(residual, 1e-12)
        done = abs(new_alpha - alpha) <= 1e-6 * alpha and abs(new_beta - beta) <= 1e-6 * beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return alpha, beta


def spectrum(features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s, z): the nonzero eigenvalues ``s`` of F^T F, and ``z = U^T Y`` (r x columns) for ``targets`` Y (n x
    columns), where ``F = U diag(sqrt(s)) V^T`` is the thin SVD of the n x D ``features``.

    From the smaller Gram matrix (D x D or n x n) in float64: a second for 10,000 x 2,048, where a full SVD of F
    takes far longer. Its eigenvectors are never formed: LAPACK's ``eigh`` (``syevd``) reduces the matrix to a
    tridiagonal ``Q T Q^T``, solves T, and back-transforms every eigenvector through Q — a third of its time,
    when only their products with Y's few columns are needed. Here Q^T is applied to those columns instead
    (``ormqr`` on ``sytrd``'s reflectors), and T is solved by ``stevd``, the divide-and-conquer ``syevd`` uses:
    the same eigenvalues, and the same projections up to rounding.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    n, d = f.shape
    if n >= d:  # U^T Y = V^T F^T Y / sqrt(s), V the eigenvectors of F^T F
        s, z = _eigen_projections(f.T @ f, f.T @ y)
    else:  # U: the eigenvectors of F F^T
        s, z = _eigen_projections(f @ f.T, y)
    keep = s > max(s.max(), 0.0) * 1e-10
    s, z = s[keep], z[keep]
    return (s, z / np.sqrt(s)[:, None]) if n >= d else (s, z)


def _eigen_projections(gram: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ascending eigenvalues of the symmetric ``gram`` (m x m) and ``W^T b``, W its eigenvectors (columns)."""
    m = gram.shape[0]
    if m == 1:
        return gram[0].copy(), b.copy()
    work, info = lapack.dsytrd_lwork(m, lower=1)
    _check(info, "dsytrd_lwork")
    reflectors, diag, offdiag, tau, info = lapack.dsytrd(gram, lower=1, lwork=int(work))
    _check(info, "dsytrd")
    # Q = H(1) ... H(m-1), reflector i stored below the subdiagonal of column i: Q = diag(1, Q') with Q' the
    # orthogonal factor whose reflectors sit in reflectors[1:, :m-1], as geqrf leaves them (LAPACK's ormtr).
    c = np.array(b, dtype=np.float64, order="F")
    args = ("L", "T", reflectors[1:, :m - 1], tau, c[1:])
    _, work, info = lapack.dormqr(*args, lwork=-1)  # the blocked routine's workspace (a small one runs unblocked)
    _check(info, "dormqr")
    c[1:], _, info = lapack.dormqr(*args, lwork=int(work[0]))
    _check(info, "dormqr")
    values, vectors, info = lapack.dstevd(diag, offdiag, compute_v=1)
    _check(info, "dstevd")
    return values, vectors.T @ c


def _check(info: int, routine: str) -> None:
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK {routine} failed (info {info}) on the features' Gram matrix")


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of ``features`` (n x D) for class ``labels`` (n,): the mean over classes of evidence / n."""
    y_all = np.asarray(labels)
    ys = (y_all[:, None] == np.unique(y_all)[None, :]).astype(np.float64)  # one column per class
    s, zs = spectrum(features, ys)
    scores = []
    for y, z in zip(np.ascontiguousarray(ys.T), zs.T):
        alpha, beta = _maximise(y, z, s)
        scores.append(evidence(y, z, s, np.shape(features)[1], alpha, beta) / len(y))
    return float(np.mean(scores))


def knn_loo_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 20, chunk: int = 2048) -> float:
    """Leave-one-out accuracy of a k-nearest-neighbour majority vote by cosine similarity (ties: the lowest
    class index, as scikit-learn's ``KNeighborsClassifier``); k at most the smallest class's size less one.

    The similarity matrix is symmetric: each block of it above the diagonal is computed once and serves both its
    rows and (transposed) its columns, each block row keeping a running top-k — 0.6x the multiply of whole rows.
    """
    x = torch.nn.functional.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float32), dim=1)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n = len(x)
    counts = torch.bincount(y)
    # Fewer neighbours than the smallest class has other images: a vote among more would count against that class
    # whatever the features (12 images per class at k = 20 scored three perfectly separated classes 0.0).
    k = max(1, min(k, n - 1, int(counts[counts > 0].min()) - 1))
    num_classes = int(y.max()) + 1
    starts = list(range(0, n, chunk))
    top = [torch.full((min(chunk, n - s), k), -float("inf")) for s in starts]
    idx = [torch.zeros((min(chunk, n - s), k), dtype=torch.long) for s in starts]

    def merge(block: int, sim: torch.Tensor, offset: int) -> None:
        values, where = sim.topk(min(k, sim.shape[1]), dim=1)
        values, pick = torch.cat([top[block], values], 1).topk(k, dim=1)
        idx[block] = torch.cat([idx[block], where + offset], 1).gather(1, pick)
        top[block] = values

    for a, sa in enumerate(starts):
        for b in range(a, len(starts)):
            sb = starts[b]
            sim = x[sa:sa + chunk] @ x[sb:sb + chunk].T
            if a == b:
                sim.fill_diagonal_(-float("inf"))  # not its own neighbour
            merge(a, sim, sb)
            if a != b:
                merge(b, sim.T, sa)
    votes = torch.zeros(n, num_classes).scatter_add_(1, y[torch.cat(idx)], torch.ones(n, k))
    return int((votes.argmax(1) == y).sum()) / n
