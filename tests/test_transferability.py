"""LogME and kNN leave-one-out accuracy against independent references on synthetic data (issue #14)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import multivariate_normal
from sklearn.model_selection import LeaveOneOut, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from probe.transferability import _maximise, evidence, knn_loo_accuracy, logme, spectrum


def _z(f: np.ndarray, y: np.ndarray):
    """(U^T y, s) from numpy's SVD: the reference for what ``spectrum`` computes from a Gram matrix."""
    u, sv, _ = np.linalg.svd(f, full_matrices=False)
    keep = sv > sv.max() * 1e-8
    return u[:, keep].T @ y, sv[keep] ** 2


@pytest.mark.parametrize("n,d", [(40, 8), (12, 30)])  # more samples than features, and fewer
def test_evidence_is_the_gaussian_marginal_likelihood(n: int, d: int) -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(n, d))
    y = rng.normal(size=n)
    z, s = _z(f, y)
    for alpha, beta in [(0.5, 2.0), (3.0, 0.7)]:
        # y ~ N(0, I / beta + F F^T / alpha): Bayesian linear regression with the weights integrated out.
        reference = multivariate_normal(np.zeros(n), np.eye(n) / beta + f @ f.T / alpha).logpdf(y)
        assert evidence(y, z, s, d, alpha, beta) == pytest.approx(reference, rel=1e-9)
    # The Gram-matrix route gives the same spectrum and projections.
    s2, z2 = spectrum(f, y[:, None])
    assert np.allclose(np.sort(s2), np.sort(s)) and np.allclose(np.sort(np.abs(z2[:, 0])), np.sort(np.abs(z)))


@pytest.mark.parametrize("n,d", [(50, 12), (9, 20), (30, 1), (1, 5)])
def test_spectrum_matches_the_svd_for_every_column(n: int, d: int) -> None:
    """Eigenvalues and projections of several targets at once, eigenvalue by eigenvalue, also for rank-deficient
    features (a repeated column) and the one-dimensional ends."""
    rng = np.random.default_rng(4)
    f = rng.normal(size=(n, d))
    if d > 2:
        f[:, 1] = f[:, 0]  # rank d - 1: the zero eigenvalue is dropped
    ys = rng.normal(size=(n, 3))
    u, sv, _ = np.linalg.svd(f, full_matrices=False)
    keep = sv > sv.max() * 1e-8
    s, z = spectrum(f, ys)
    order = np.argsort(s)[::-1]  # the SVD's order: descending
    assert np.allclose(s[order], sv[keep] ** 2, rtol=1e-9)
    assert np.allclose(np.abs(z[order]), np.abs(u[:, keep].T @ ys), rtol=1e-7, atol=1e-9)  # signs are arbitrary


def test_fixed_point_maximises_the_evidence() -> None:
    rng = np.random.default_rng(1)
    f = rng.normal(size=(60, 10))
    y = f @ rng.normal(size=10) + 0.3 * rng.normal(size=60)
    z, s = _z(f, y)
    alpha, beta = _maximise(y, z, s)
    best = evidence(y, z, s, 10, alpha, beta)
    for da, db in [(1.1, 1), (0.9, 1), (1, 1.1), (1, 0.9), (1.3, 0.8)]:
        assert evidence(y, z, s, 10, alpha * da, beta * db) < best
    assert beta == pytest.approx(1 / 0.3 ** 2, rel=0.5)  # the noise precision it was made with


def test_logme_prefers_features_that_carry_the_labels() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    informative = rng.normal(size=(300, 32)) * 0.5
    informative[:, :3] += np.eye(3)[y] * 3  # three features encode the class
    noise = rng.normal(size=(300, 32))
    assert logme(informative, y) > logme(noise, y)
    assert np.isfinite(logme(noise, y))


def test_logme_of_features_that_carry_nothing_is_the_noise_only_evidence() -> None:
    """All-zero features (a dead backbone) leave the prior precision undetermined — the evidence does not depend
    on it — and used to end in a math domain error. LogME is then each class column's likelihood under noise
    alone, N(0, I / beta) at the best beta = n / ||y||^2, averaged over classes, per sample."""
    y = np.repeat([0, 1, 2], [5, 7, 8])
    n = len(y)
    per_class = [0.5 * np.log(n / count) - 0.5 - 0.5 * np.log(2 * np.pi) for count in (5, 7, 8)]
    assert logme(np.zeros((n, 6)), y) == pytest.approx(np.mean(per_class), rel=1e-12)
    assert logme(np.zeros((4, 9)), np.array([0, 1, 1, 0])) == pytest.approx(0.5 * np.log(2) - 0.5 - 0.5 * np.log(2 * np.pi))


def test_knn_loo_equals_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 90)
    x = rng.normal(size=(90, 6)) + np.eye(3)[y] @ rng.normal(size=(3, 6))
    for k in (1, 5):
        ours = knn_loo_accuracy(x, y, k=k, chunk=32)
        reference = cross_val_score(KNeighborsClassifier(n_neighbors=k, metric="cosine"), x, y, cv=LeaveOneOut()).mean()
        assert ours == pytest.approx(reference)


def test_knn_loo_votes_among_fewer_neighbours_than_the_smallest_class_has() -> None:
    """Twelve images per class, three well-separated classes: at k = 20 a vote holds at most 11 of the image's own
    class, so some images lost to another class (0.92 here; 0.0 on a 36-image folder of random-weight features).
    k is capped at the smallest class's size less one."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 12)
    x = 5 * np.eye(3)[y] + rng.normal(scale=0.3, size=(36, 3))
    reference = cross_val_score(KNeighborsClassifier(n_neighbors=11, metric="cosine"), x, y, cv=LeaveOneOut()).mean()
    assert knn_loo_accuracy(x, y, k=20) == pytest.approx(reference) == 1.0
    assert knn_loo_accuracy(x[:-10], y[:-10], k=20) == pytest.approx(  # the smallest class now has 2 images
        cross_val_score(KNeighborsClassifier(n_neighbors=1, metric="cosine"), x[:-10], y[:-10], cv=LeaveOneOut()).mean())
