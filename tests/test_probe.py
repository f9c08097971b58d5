from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from cache import CacheError, open_cache
from configs.extract import ExtractSettings
from configs.probe import GridTraining, HeadConfig, ProbeSettings, load_grid
from configs.settings import ConfigError
from extract.pipeline import extract_features
from probe.baseline import DEFAULT_CS, fit_path, logreg_baseline, scaler_statistics
from probe.classifier import load_classifier, load_head
from probe.cli import main as probe_main
from probe.head_onnx import head_model, write_head_onnx
from probe.leaderboard import mark_ties, ranked_by
from probe.metrics import (
    METRICS,
    _bootstrap_roc_auc,
    _from_confusion,
    bootstrap_ci,
    compute_metrics,
    confusion_batch,
    draw_counts,
    fast_metric_of_heads,
    metrics_of_heads,
)
from probe.pipeline import choose, probe_cache, run_probe
from probe.train import Examples, Fit, HeadStack, products_dtype, train_grid
from runtime.device import dtype_name, native_bfloat16

SMALL_GRID = """
train: {batch_size: 64, warmup_epochs: 1, standardize: true}
heads:
  linear: {lr: [0.003, 0.03], weight_decay: [0.0001, 0.1], class_weighted: [false, true], epochs: [6], patience: [3]}
  mlp: {hidden: [[32]], lr: [0.003], weight_decay: [0.01], dropout: [0.3], epochs: [6], patience: [3]}
  knn: {k: [1, 10], temperature: [0.07]}
default: {type: linear, lr: 0.01, weight_decay: 0.001, epochs: 6, patience: 3}
"""


@pytest.fixture(scope="module")
def workdir(demo_caches: Path) -> Path:
    """The demo digits through two tiny random-weight backbones at 48 px (read or copied only)."""
    return demo_caches


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grid") / "grid.yaml"
    path.write_text(SMALL_GRID)
    return path


def fresh_copy(workdir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(workdir / "features", target / "features")
    shutil.copy(workdir / "dataset.json", target / "dataset.json")
    return target


# ----------------------------------------------------------------------------- metrics


def random_predictions(seed: int, n: int = 300, c: int = 5, missing: bool = False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c - 1 if missing else c, n)
    logits = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[y] * rng.random((n, 1))
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, proba


def sklearn_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """The reference: compute_metrics' seven metrics, each by scikit-learn (nan ROC-AUC and 0 QWK where
    scikit-learn has none, as compute_metrics documents)."""
    c = proba.shape[1]
    labels, pred = np.arange(c), proba.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's about absent classes and float32 sums
        qwk = skm.cohen_kappa_score(y, pred, labels=labels, weights="quadratic")
        if len(np.unique(y)) < c:
            auc = float("nan")
        elif c == 2:
            auc = skm.roc_auc_score(y, proba[:, 1])
        else:
            auc = skm.roc_auc_score(y, proba / proba.sum(1, keepdims=True), multi_class="ovr", labels=labels)
        return {"accuracy": skm.accuracy_score(y, pred),
                "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
                "macro_f1": skm.f1_score(y, pred, average="macro", labels=labels, zero_division=0),
                "qwk": 0.0 if np.isnan(qwk) else qwk,
                "top_k_accuracy": (skm.top_k_accuracy_score(y, proba, k=3 if c > 3 else 1, labels=labels)
                                   if c > 2 else skm.accuracy_score(y, pred)),
                "roc_auc": auc,
                "log_loss": skm.log_loss(y, np.clip(proba, 1e-15, 1), labels=labels)}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("missing", [False, True], ids=["all-classes", "class-absent"])
def test_metrics_equal_scikit_learn(seed: int, missing: bool) -> None:
    y, proba = random_predictions(seed, missing=missing)
    pred = proba.argmax(1)
    labels = np.arange(5)
    m = compute_metrics(y, proba, per_class=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's about the absent class
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
        assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", labels=labels, zero_division=0))
        assert m["qwk"] == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic"))
        assert m["top_k_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, proba, k=3, labels=labels))
        if missing:
            assert np.isnan(m["roc_auc"])  # undefined: scikit-learn refuses
        else:
            assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"))
        assert m["log_loss"] == pytest.approx(skm.log_loss(y, proba, labels=labels))
        assert m["top_k"] == 3
        assert m["confusion"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
        p, r, f, support = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    np.testing.assert_allclose(m["per_class"]["precision"], p)
    np.testing.assert_allclose(m["per_class"]["recall"], r)
    np.testing.assert_allclose(m["per_class"]["f1"], f)
    assert m["per_class"]["support"] == support.tolist()
    assert all(type(v) is float for name, v in m.items() if name in METRICS)  # JSON-ready, not numpy scalars


def test_binary_metrics_equal_scikit_learn() -> None:
    """Two classes: ROC-AUC of the positive class's probability, top-k accuracy is accuracy."""
    y, proba = random_predictions(5, n=150, c=2)
    m = compute_metrics(y, proba)
    want = sklearn_metrics(y, proba)
    assert want["roc_auc"] == pytest.approx(skm.roc_auc_score(y, proba[:, 1]))
    for name in METRICS:
        assert m[name] == pytest.approx(want[name]), name


@pytest.mark.parametrize("missing", [False, True])
def test_fast_confusion_metrics_equal_scikit_learn(missing: bool) -> None:
    """The bootstrap's numpy metrics agree with scikit-learn, also when a class never occurs."""
    for seed in range(5):
        y, proba = random_predictions(seed, n=120, c=5, missing=missing)
        pred = proba.argmax(1)
        fast = _from_confusion(confusion_batch(y, pred, 5)[0])
        labels = np.arange(5)
        assert fast["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
        assert fast["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", labels=labels, zero_division=0))
        assert fast["qwk"] == pytest.approx(skm.cohen_kappa_score(y, pred, labels=labels, weights="quadratic"))
        with pytest.warns(UserWarning) if missing else _nullcontext():
            expected = skm.balanced_accuracy_score(y, pred)
        assert fast["balanced_accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize("name", list(METRICS))
def test_fast_metric_of_heads_equals_scikit_learn(name: str) -> None:
    """The grid's per-epoch validation scores, every head at once from (N, heads, C), are each head's
    scikit-learn value: with a class never predicted, ties in vote shares, and a class absent."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 4, 150)
    y[y == 3] = 2  # class 3 absent from the split
    soft = torch.randn(150, 5, 4).mul(3).softmax(-1).numpy()
    soft[:, 0, 1] = 0.0  # one head never predicts class 1
    soft[:, 0] /= soft[:, 0].sum(-1, keepdims=True)
    votes = np.stack([np.bincount(rng.integers(0, 4, 5), minlength=4) for _ in range(150)]) / 5.0
    proba = np.concatenate([soft, votes[:, None]], 1)  # (150, 6 heads, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's about the absent class and float32 sums
        got = fast_metric_of_heads(name, y, proba)
    want = [sklearn_metrics(y, proba[:, h])[name] for h in range(proba.shape[1])]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("c", [2, 3, 10])
def test_metrics_of_heads_equal_scikit_learn(c: int) -> None:
    """The results table's metrics for many heads at once are scikit-learn's: float32 softmax outputs, kNN-like
    vote shares full of ties, and a class missing from the split."""
    rng = np.random.default_rng(c)
    y = rng.integers(0, c, 90)
    soft = torch.randn(90, c).mul(3).softmax(1).numpy()  # float32, as heads give
    votes = np.stack([np.bincount(rng.integers(0, c, 5), minlength=c) for _ in range(90)]) / 5.0  # ties
    missing = np.where(y == c - 1, 0, y)  # last class absent
    for labels, probas in ((y, [soft, votes]), (missing, [soft, votes])):
        fast = metrics_of_heads(labels, probas)
        for got, p in zip(fast, probas):
            want = sklearn_metrics(labels, p)
            for name in METRICS:
                if np.isnan(want[name]):
                    assert np.isnan(got[name]), name
                else:
                    assert got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-12), name  # float32 sums


def test_bootstrap_ci() -> None:
    y, proba = random_predictions(3, n=400)
    ci = bootstrap_ci(y, proba, n_boot=500, seed=0)
    point = compute_metrics(y, proba)
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "qwk", "top_k_accuracy", "log_loss", "roc_auc"):
        lo, hi = ci[name]
        assert lo < point[name] < hi, name
        assert hi - lo < 0.25
    # Deterministic for a seed, and narrower with more data.
    assert bootstrap_ci(y, proba, n_boot=500, seed=0) == ci
    y4, p4 = np.tile(y, 4), np.tile(proba, (4, 1))
    lo4, hi4 = bootstrap_ci(y4, p4, n_boot=500, seed=0)["accuracy"]
    assert hi4 - lo4 < ci["accuracy"][1] - ci["accuracy"][0]


@pytest.mark.parametrize("c", [2, 4])
def test_bootstrap_roc_auc_equals_scikit_learn_per_resample(c: int) -> None:
    """Each resample's ROC-AUC, computed all at once from draw counts, is scikit-learn's on that resample —
    with tied scores (rounded probabilities), and with resamples that miss a class left out."""
    y, proba = random_predictions(7, n=60, c=c)
    proba = np.round(proba, 1) + 1e-3  # ties; no row of zeros
    idx = np.random.default_rng(1).integers(0, 60, (300, 60))
    if c == 4:
        other = int(np.flatnonzero(y != 3)[0])
        idx[:5] = np.where(y[idx[:5]] == 3, other, idx[:5])  # class 3 never drawn: undefined, left out
    expected = []
    for row in idx:
        if len(np.unique(y[row])) < c:
            continue
        if c == 2:
            expected.append(skm.roc_auc_score(y[row], proba[row, 1]))
        else:
            p = proba[row] / proba[row].sum(1, keepdims=True)
            expected.append(skm.roc_auc_score(y[row], p, multi_class="ovr", average="macro"))
    np.testing.assert_allclose(_bootstrap_roc_auc(y, proba, draw_counts(idx, 60)), expected, rtol=1e-9)
    assert len(expected) < 300 if c == 4 else len(expected) == 300


def test_ties() -> None:
    def entry(name, val, lo, hi, metric="macro_f1"):
        return {"backbone": name, "image_size": 224, "val": {metric: val}, "test_ci": {metric: (lo, hi)}}

    ranked = mark_ties([entry("b", 0.80, 0.70, 0.82), entry("a", 0.90, 0.80, 0.95), entry("c", 0.70, 0.60, 0.79)], "macro_f1")
    assert [e["backbone"] for e in ranked] == ["a", "b", "c"]  # by validation
    assert [e["tied_with_best"] for e in ranked] == [False, True, False]
    ranked = mark_ties([entry("x", 2.0, 1.0, 1.5, "log_loss"), entry("y", 1.0, 1.4, 1.8, "log_loss")], "log_loss")  # lower is better
    assert [e["backbone"] for e in ranked] == ["y", "x"] and ranked[1]["tied_with_best"]
    # With --folds the head was chosen by its cross-validated mean, and so is the backbone's rank.
    cv = [{**entry("a", 0.90, 0.80, 0.95), "cv": {"mean": 0.70, "std": 0.02, "folds": 5}},
          {**entry("b", 0.80, 0.70, 0.82), "cv": {"mean": 0.85, "std": 0.02, "folds": 5}}]
    assert [e["backbone"] for e in mark_ties(cv, "macro_f1")] == ["b", "a"]
    assert ranked_by(cv, "macro_f1") == "5-fold cross-validated macro_f1 (over train + val)"
    assert ranked_by(ranked, "log_loss") == "validation log_loss"


@pytest.mark.parametrize(("text", "message"), [
    ("heads: {linear: {lr: [0.01], decay: [l1]}}", r"heads\.linear\.decay\[0\]: Input should be 'decoupled' or 'l2'"),
    ("heads: {linear: {lr: [0.01], momentum: [0.9]}}", r"heads\.linear\.momentum: unknown key"),
    ("heads: {linear: {lr: [-1.0]}}", r"heads\.linear\.lr: Input should be greater than 0"),
    ("heads: {linear: {weight_decay: [fast]}}", r"heads\.linear\.weight_decay"),
    ("heads: {svm: {lr: [0.01]}}", r"heads\.svm: unknown key"),
    ("train: {batch_sise: 64}", r"train\.batch_sise: unknown key"),
    ("train: {precision: half}", r"train\.precision: Input should be 'auto', 'float32' or 'bfloat16'"),
    ("heads: {linear: {lr: [0.01, 0.01]}}", r"repeats head"),
])
def test_bad_grid_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_grid(path)


def test_shipped_grid() -> None:
    grid = load_grid()
    linear = [h for h in grid.heads if h.type == "linear"]
    assert len(grid.heads) >= 48 and len({h.name for h in grid.heads}) == len(grid.heads)
    wds = sorted({h.weight_decay for h in linear})
    assert wds[-1] / wds[0] >= 1e3 and all(h.decay == "l2" for h in linear)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("decay", ["decoupled", "l2", "mixed"])
@pytest.mark.parametrize("alike", [True, False], ids=["same-lr", "own-lr"])
def test_stacked_heads_step_like_torch_optimizers(decay: str, alike: bool) -> None:
    """Each head's step is torch's AdamW (decoupled decay) or Adam with an L2 penalty, weights only: through torch's
    fused kernel when every head steps alike, through the vectorised step when each has its own lr and decay."""
    from probe.heads import build_head

    torch.manual_seed(0)
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    decays = ["decoupled", "l2"] if decay == "mixed" else [decay, decay]
    lrs, wds = ([0.05, 0.05], [0.3, 0.3]) if alike else ([0.05, 0.01], [0.3, 0.02])
    cfgs = [HeadConfig(type="linear", lr=lr, weight_decay=wd, decay=d, class_weighted=bool(i))
            for i, (lr, wd, d) in enumerate(zip(lrs, wds, decays))]
    refs = [build_head(c, 12, 3, torch.zeros(12), torch.ones(12)) for c in cfgs]
    mine = {i: build_head(c, 12, 3, torch.zeros(12), torch.ones(12)) for i, c in enumerate(cfgs)}
    opts = []
    for ref, own, c in zip(refs, mine.values(), cfgs):
        own.load_state_dict(ref.state_dict())
        optimizer = torch.optim.AdamW if c.decay == "decoupled" else torch.optim.Adam
        opts.append(optimizer([{"params": [ref.fc.weight], "weight_decay": c.weight_decay},
                               {"params": [ref.fc.bias], "weight_decay": 0.0}], lr=c.lr))
    fam = HeadStack(mine, cfgs, [0, 1], seed=0, device=torch.device("cpu"))
    for _step in range(1, 8):
        for ref, opt in zip(refs, opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(x), y).backward()
            opt.step()
        logits = fam.logits(x, train=False)
        sum(torch.nn.functional.cross_entropy(logits[:, h], y) for h in range(2)).backward()
        fam.optimizer_step(torch.tensor(lrs), torch.tensor(wds))
    for h, ref in enumerate(refs):
        w, b = fam.export(h)[0]
        torch.testing.assert_close(w, ref.fc.weight.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, ref.fc.bias.detach(), rtol=1e-5, atol=1e-6)


def test_l2_decay_optimum_is_logistic_regression() -> None:
    """Run to convergence, an "l2" head's update minimises scikit-learn's L2 logistic regression objective with
    C = 1 / (weight_decay * n): the mean cross-entropy plus (weight_decay / 2) * ||W||^2, bias not penalised."""
    from probe.heads import build_head

    rng = np.random.default_rng(0)
    n, wd, steps = 120, 0.05, 1500
    x, y = rng.normal(size=(n, 6)) * [1, 2, 3, 1, 1, 5], rng.integers(0, 3, n)
    x[:, :3] += np.eye(3)[y] * 1.5
    xs = StandardScaler().fit_transform(x)
    cfg = HeadConfig(type="linear", lr=0.05, weight_decay=wd, decay="l2")
    fam = HeadStack({0: build_head(cfg, 6, 3, torch.zeros(6), torch.ones(6))}, [cfg], [0], seed=0, device=torch.device("cpu"))
    xt, yt = torch.tensor(xs, dtype=torch.float32), torch.tensor(y)
    for step in range(steps):
        torch.nn.functional.cross_entropy(fam.logits(xt, train=True)[:, 0], yt).backward()
        fam.optimizer_step(torch.tensor([0.05 * 0.5 * (1 + np.cos(np.pi * step / steps))]), torch.tensor([wd]))
    (w, b), = fam.export(0)
    ref = LogisticRegression(C=1 / (wd * n), tol=1e-10, max_iter=10_000).fit(xs, y)
    np.testing.assert_allclose(w.numpy(), ref.coef_, atol=1e-3)
    # Softmax is unchanged by a shift of all intercepts, and the (unpenalised) bias is fixed only up to it.
    np.testing.assert_allclose(b.numpy() - b.numpy().mean(), ref.intercept_ - ref.intercept_.mean(), atol=1e-3)
    np.testing.assert_allclose((xt @ w.T + b).softmax(1).numpy(), ref.predict_proba(xs), atol=1e-4)


def test_heads_that_stop_leave_the_stack_and_the_rest_train_on_as_alone(workdir: Path) -> None:
    """A head that has run its epochs or lost patience leaves its stack (weights, Adam state, dropout generator);
    the heads still training must go on exactly as each would alone — in float32, to the last bit of rounding."""
    heads = [HeadConfig(type="linear", lr=lr, weight_decay=1e-3, decay="l2", epochs=e, patience=p, class_weighted=cw)
             for lr, e, p, cw in [(0.03, 2, 10, False), (0.003, 6, 10, True), (0.01, 6, 1, False), (0.1, 4, 10, False)]]
    heads += [HeadConfig(type="mlp", hidden=(16,), lr=0.003, dropout=d, epochs=e, patience=10)
              for d, e in [(0.3, 2), (0.0, 5), (0.5, 5)]]
    with open_cache(workdir / "features" / "test_resnet.r160_in1k@48.h5") as fc:
        tr, va = fc.load("train"), fc.load("val")
    fit = Fit(options=GridTraining(batch_size=64, precision="float32"), seed=3)
    together = train_grid(heads, tr, va, 10, fit)
    # The stacks did shrink: heads ran different numbers of epochs (epochs 2 and 4, and patience 1 stopping one).
    assert len({len(t.history) for t in together[:4]}) >= 3 and len({len(t.history) for t in together[4:]}) == 2
    for config, grid_head in zip(heads, together):
        alone = train_grid([config], tr, va, 10, fit)[0]
        assert [h["epoch"] for h in alone.history] == [h["epoch"] for h in grid_head.history]
        assert alone.best_epoch == grid_head.best_epoch
        np.testing.assert_allclose(alone.val_proba, grid_head.val_proba, rtol=0, atol=1e-5)


def test_a_diverged_head_ends_last_in_the_ranking_instead_of_failing_the_grid(workdir: Path) -> None:
    """A head whose every epoch scores NaN (here log loss of an exploded head) never has a best epoch; it ends
    as it is, ranked below every other head (it used to end the whole probe with a KeyError)."""
    heads = [HeadConfig(type="linear", lr=1e38, weight_decay=0.0, epochs=3, patience=1),
             HeadConfig(type="linear", lr=0.01, epochs=3, patience=1)]
    with open_cache(workdir / "features" / "test_resnet.r160_in1k@48.h5") as fc:
        tr, va = fc.load("train"), fc.load("val")
    fit = Fit(metric="log_loss", options=GridTraining(batch_size=64, precision="float32"))
    exploded, fine = train_grid(heads, tr, va, 10, fit)
    assert all(np.isnan(h["val_log_loss"]) for h in exploded.history) and exploded.score == np.inf
    assert np.isfinite(fine.score) and choose([exploded, fine], "log_loss") == 1


@pytest.mark.parametrize(("precision", "atol"), [("float32", 1e-5), ("bfloat16", 2e-3)])
def test_grid_equals_heads_trained_alone(workdir: Path, grid_file: Path, precision: str, atol: float) -> None:
    """Exactly in float32; in bfloat16 within its rounding, which depends on how wide the stacked product is."""
    grid = load_grid(grid_file)
    with open_cache(workdir / "features" / "test_resnet.r160_in1k@48.h5") as fc:
        tr, va = fc.load("train"), fc.load("val")
    fit = Fit(options=grid.train.model_copy(update={"precision": precision}), seed=5)
    together = train_grid(grid.heads, tr, va, 10, fit)
    for i in (0, 5, 8, 9, 10):  # linear, class-weighted linear, MLP with dropout, both kNN
        alone = train_grid([grid.heads[i]], tr, va, 10, fit)[0]
        assert alone.best_epoch == together[i].best_epoch
        np.testing.assert_allclose(alone.val_proba, together[i].val_proba, atol=atol)
        assert alone.val_metric == pytest.approx(together[i].val_metric)
    assert len(together) == len(grid.heads) == 11


def test_bfloat16_products_train_the_grid_as_well_as_float32(workdir: Path, grid_file: Path) -> None:
    """Mixed precision rounds the heads' products, not what the grid finds: the best validation metric within half a
    point of float32's, each head close, and the heads float32 as before."""
    grid = load_grid(grid_file)
    with open_cache(workdir / "features" / "test_efficientnet.r160_in1k@48.h5") as fc:
        tr, va = fc.load("train"), fc.load("val")
    runs = {p: train_grid(grid.heads, tr, va, 10, Fit(options=grid.train.model_copy(update={"precision": p})))
            for p in ("float32", "bfloat16")}
    low, full = runs["bfloat16"], runs["float32"]
    assert max(t.score for t in low) == pytest.approx(max(t.score for t in full), abs=0.005)
    trained = [i for i, h in enumerate(grid.heads) if h.trainable]
    assert np.mean([abs(low[i].val_metric - full[i].val_metric) for i in trained]) < 0.01
    assert any(not np.array_equal(low[i].val_proba, full[i].val_proba) for i in trained)  # it was rounded
    assert all(p.dtype == torch.float32 for i in trained for p in low[i].head.parameters())


def test_auto_precision_is_bfloat16_where_the_cpu_multiplies_it_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else None
    if flags is not None:  # the CPU's own word on it
        assert native_bfloat16(cpu) == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert products_dtype(GridTraining(), cpu) == (torch.bfloat16 if native_bfloat16(cpu) else torch.float32)
    assert products_dtype(GridTraining(precision="float32"), cpu) == torch.float32
    assert products_dtype(GridTraining(precision="bfloat16"), cpu) == torch.bfloat16
    import probe.train

    monkeypatch.setattr(probe.train, "native_bfloat16", lambda device: False)
    assert products_dtype(GridTraining(), cpu) == torch.float32


@pytest.mark.parametrize("hidden", [(), (16,)], ids=["linear", "mlp"])
def test_a_head_classifies_standardised_features_as_its_forward_does_raw_ones(hidden: tuple[int, ...]) -> None:
    from probe.heads import build_head

    torch.manual_seed(0)
    x = torch.randn(20, 6) * 3 + 1
    mean, std = x.mean(0), x.std(0)
    head = build_head(HeadConfig(type="mlp" if hidden else "linear", hidden=hidden), 6, 4, mean, std).eval()
    with torch.no_grad():
        assert torch.equal(head.classify((x - mean) / std), head(x))


def test_knn_heads_of_a_grid_share_one_similarity_matrix() -> None:
    """The grid's vote shares from one top-k equal each head's own forward (chunked, k beyond the bank too)."""
    from probe.heads import build_head, knn_grid_probabilities

    rng = np.random.default_rng(3)
    bank, labels = torch.tensor(rng.normal(size=(40, 6)), dtype=torch.float32), torch.tensor(rng.integers(0, 4, 40))
    configs = [HeadConfig(type="knn", k=k, temperature=t) for k, t in ((1, 0.07), (5, 0.07), (5, 1.0), (60, 0.5))]
    heads = [build_head(c, 6, 4, None, None, bank, labels) for c in configs]
    x = torch.tensor(rng.normal(size=(25, 6)), dtype=torch.float32)
    for head, shares in zip(heads, knn_grid_probabilities(heads, x, chunk=7)):
        with torch.no_grad():
            torch.testing.assert_close(shares, head(x).softmax(1))


def test_knn_matches_scikit_learn_nearest_neighbour() -> None:
    rng = np.random.default_rng(0)
    xt, yt = rng.normal(size=(200, 16)).astype(np.float32), rng.integers(0, 4, 200)
    xv, yv = rng.normal(size=(50, 16)).astype(np.float32), rng.integers(0, 4, 50)
    (res,) = train_grid([HeadConfig(type="knn", k=1)], Examples(xt, yt), Examples(xv, yv), 4)
    ref = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(xt, yt).predict(xv)
    np.testing.assert_array_equal(res.val_proba.argmax(1), ref)


@pytest.mark.parametrize(("config", "dim"), [
    (HeadConfig(type="linear"), 8), (HeadConfig(type="mlp", hidden=(16,), dropout=0.5), 12),
    (HeadConfig(type="mlp", hidden=(16, 7)), 5), (HeadConfig(type="knn", k=5), 8),
    (HeadConfig(type="knn", k=100), 6),  # k above the bank's 60 images: all of them vote, as in PyTorch
], ids=lambda c: c.name if isinstance(c, HeadConfig) else str(c))
def test_every_head_type_is_written_as_onnx_equal_to_its_pytorch_head(config: HeadConfig, dim: int,
                                                                      tmp_path: Path) -> None:
    """profiling appends the saved head's ONNX graph to the backbone's and runs it at several batch sizes: each
    file's only input is ``features`` and its only output ``logits``, with a dynamic batch."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    xt, yt = rng.normal(size=(60, dim)).astype(np.float32) * 3 + 1, rng.integers(0, 3, 60)
    xv = rng.normal(size=(20, dim)).astype(np.float32) * 3 + 1
    (res,) = train_grid([config.model_copy(update={"epochs": 2})], Examples(xt, yt),
                        Examples(xv, rng.integers(0, 3, 20)), 3)
    path = tmp_path / "head.onnx"
    write_head_onnx(res.head, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("features", ["batch", dim])]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("logits", ["batch", 3])]
    for batch in (1, 3, 8):
        x = rng.normal(size=(batch, dim)).astype(np.float32) * 3 + 1
        (got,) = session.run(None, {"features": x})
        with torch.no_grad():
            want = res.head(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_head_type_without_an_onnx_graph_is_an_error_that_says_where_to_add_it() -> None:
    with pytest.raises(NotImplementedError, match=r"no ONNX graph for Identity: add one to probe/head_onnx\.py"):
        head_model(torch.nn.Identity())


def test_logreg_baseline_chooses_on_validation() -> None:
    rng = np.random.default_rng(1)
    xt, yt = rng.normal(size=(150, 8)), rng.integers(0, 3, 150)
    xt[:, 0] += yt
    xv, yv = rng.normal(size=(60, 8)), rng.integers(0, 3, 60)
    xv[:, 0] += yv
    res = logreg_baseline(Examples(xt, yt), Examples(xv, yv), metric="accuracy", cs=(0.001, 0.1, 10.0))
    assert res.val_metric == max(res.val_by_C.values()) and res.val_by_C[res.C] == res.val_metric
    assert set(res.val_by_C) == {0.001, 0.1, 10.0}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_the_baselines_standardisation_is_scikit_learns_standard_scaler(dtype: type) -> None:
    """The baseline's training statistics are StandardScaler's (rounded to float32, the dtype it solves in), with
    large offsets, and constant features (zero, or far from zero) left unscaled."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(400, 30)) * rng.uniform(0.01, 50, 30) + rng.normal(size=30) * 1000).astype(dtype)
    x[:, 3], x[:, 5], x[:, 7] = 7.25, 0.0, 3e4
    mean, scale = scaler_statistics(x)
    ref = StandardScaler().fit(x)
    assert mean.dtype == scale.dtype == np.float32
    np.testing.assert_array_equal(mean, ref.mean_.astype(np.float32))
    np.testing.assert_array_equal(scale, ref.scale_.astype(np.float32))
    assert (scale[[3, 5, 7]] == 1).all()


@pytest.mark.parametrize("absent", [False, True], ids=["all-classes", "class-absent-from-train"])
def test_logreg_baseline_is_scikit_learns_logistic_regression(absent: bool) -> None:
    """At the chosen C, the baseline is scikit-learn's LogisticRegression: as close to the exact optimum as
    scikit-learn's own solver at the same tolerance, the same predictions, and at a tight tolerance the same
    probabilities. A class never seen in training gets probability 0, as scikit-learn's classes_ imply."""
    rng = np.random.default_rng(2)
    n, d, c = 300, 20, 4
    y = rng.integers(0, 3 if absent else c, n)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, d) + np.eye(c)[y] @ rng.normal(size=(c, d)) * 2
    xv, yv = x[200:], np.where(np.arange(100) % 10 == 0, c - 1, y[200:])  # validation has every class
    s = StandardScaler().fit(x[:200])
    train, val = Examples(x[:200], y[:200]), Examples(xv, yv)
    ours = logreg_baseline(train, val, metric="accuracy", num_classes=c)
    exact = LogisticRegression(C=ours.C, tol=1e-10, max_iter=10_000).fit(s.transform(x[:200]), y[:200])
    default = LogisticRegression(C=ours.C).fit(s.transform(x[:200]), y[:200])
    p_ours = ours.predict_proba(xv)
    p_exact, p_default = (np.zeros((100, c)), np.zeros((100, c)))
    p_exact[:, exact.classes_] = exact.predict_proba(s.transform(xv))
    p_default[:, default.classes_] = default.predict_proba(s.transform(xv))
    assert p_ours.shape == (100, c) and np.allclose(p_ours.sum(1), 1)
    if absent:
        assert (p_ours[:, c - 1] == 0).all()
    assert np.abs(p_ours - p_exact).max() <= 1.5 * np.abs(p_default - p_exact).max() + 1e-4
    np.testing.assert_array_equal(p_ours.argmax(1), p_default.argmax(1))
    tight = logreg_baseline(train, val, metric="accuracy", num_classes=c, cs=(ours.C,), tol=1e-7)
    np.testing.assert_allclose(tight.predict_proba(xv), p_exact, atol=2e-4)


def test_logreg_with_fewer_images_than_dimensions_is_scikit_learns_optimum(monkeypatch: pytest.MonkeyPatch) -> None:
    """With N well below D the baseline solves in the training images' span (a QR of the features). In float64 at
    a tight tolerance its coefficients, in the original D dimensions, are scikit-learn's exact optimum's along the
    path; the float32 baseline's probabilities are within float32's reach of them."""
    factored = []
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda a: factored.append(a.shape) or qr(a))
    rng = np.random.default_rng(4)
    n, d, c = 90, 300, 3
    y = rng.integers(0, c, n + 60)
    x = rng.normal(size=(n + 60, d)) * rng.uniform(0.5, 3, d) + np.eye(c)[y] @ rng.normal(size=(c, d)) * 0.3
    s = StandardScaler().fit(x[:n])
    cs = [0.01, 0.1, 1.0]
    path = fit_path(torch.as_tensor(s.transform(x[:n])), torch.as_tensor(y[:n]), cs, tol=1e-9, max_iter=10_000)
    for cee, w, b, its in path:
        exact = LogisticRegression(C=cee, tol=1e-10, max_iter=10_000).fit(s.transform(x[:n]), y[:n])
        assert w.shape == (c, d) and its > 0
        np.testing.assert_allclose(w.numpy(), exact.coef_, atol=1e-5 * np.abs(exact.coef_).max())
        np.testing.assert_allclose(b.numpy(), exact.intercept_, atol=1e-5)
        ours = logreg_baseline(Examples(x[:n], y[:n]), Examples(x[n:], y[n:]), cs=(cee,), tol=1e-7)
        np.testing.assert_allclose(ours.predict_proba(x[n:]), exact.predict_proba(s.transform(x[n:])), atol=5e-4)
    assert factored == [(d, n)] * 4  # the path's solve and each baseline's: all in the span


@pytest.mark.parametrize("c", [5, 10, 15])
def test_logreg_path_is_scikit_learns_optimum_for_any_number_of_classes(c: int) -> None:
    """In float64 at a tight tolerance, the path's models are scikit-learn's exact optimum's, whether the products
    run on the K columns (5 classes) or on K padded to 16 (10 and 15)."""
    rng = np.random.default_rng(c)
    n, d = 240, 12
    y = np.arange(n) % c
    x = rng.normal(size=(n, d)) + np.eye(c)[y] @ rng.normal(size=(c, d))
    xs = StandardScaler().fit_transform(x)
    for cee, w, b, _ in fit_path(torch.as_tensor(xs), torch.as_tensor(y), [0.1, 1.0], tol=1e-9, max_iter=10_000):
        exact = LogisticRegression(C=cee, tol=1e-10, max_iter=10_000).fit(xs, y)
        assert w.shape == (c, d) and b.shape == (c,)
        np.testing.assert_allclose(w.numpy(), exact.coef_, atol=1e-5 * np.abs(exact.coef_).max())
        # The unpenalised intercepts are fixed only up to a common shift, which the softmax ignores.
        np.testing.assert_allclose((b - b.mean()).numpy(), exact.intercept_ - exact.intercept_.mean(), atol=1e-4)
        np.testing.assert_allclose(torch.addmm(b, torch.as_tensor(xs), w.T).softmax(1).numpy(), exact.predict_proba(xs),
                                   atol=1e-5)


def test_logreg_path_solutions_are_near_the_optimum() -> None:
    """Along the C path (each C started from the last ones' solutions), the baseline's model at C = 10 gives
    validation probabilities within 0.02 of the exact optimum's, on nearly separable features. scikit-learn's
    tolerance (1e-4) left them 0.06-0.07 away here, and on the demo's ResNet-10t features where the path
    started decided which C won."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 4, 250)
        x = rng.normal(size=(250, 64)) + np.eye(4)[y] @ rng.normal(size=(4, 64)) * 0.3
        xs = torch.as_tensor(StandardScaler().fit(x[:150]).transform(x), dtype=torch.float32)
        *_, (_, w, b, _) = fit_path(xs[:150], torch.as_tensor(y[:150]), [c for c in DEFAULT_CS if c <= 10])
        *_, (_, w_exact, b_exact, _) = fit_path(xs[:150], torch.as_tensor(y[:150]), [10.0], tol=1e-7, max_iter=20_000)
        gap = (torch.addmm(b, xs[150:], w.T).softmax(1) - torch.addmm(b_exact, xs[150:], w_exact.T).softmax(1)).abs()
        assert float(gap.max()) <= 0.02, seed


def test_the_baseline_solves_as_torchs_lbfgs_without_importing_its_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """The baseline's optimizer is torch's L-BFGS with ``add_param_group`` unwrapped (issue #12: the wrapper
    imports torch._dynamo, 1.0-1.6 s, on first use): the same solutions, bit for bit, as ``torch.optim.LBFGS``'s,
    and a fresh process that fits a baseline never imports torch._dynamo."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 120)
    x = torch.as_tensor(rng.normal(size=(120, 16)) + np.eye(3)[y] @ rng.normal(size=(3, 16)), dtype=torch.float32)
    ours = list(fit_path(x, torch.as_tensor(y), [0.01, 0.1, 1.0, 10.0]))
    monkeypatch.setattr("probe.baseline._LBFGS", torch.optim.LBFGS)
    torchs = list(fit_path(x, torch.as_tensor(y), [0.01, 0.1, 1.0, 10.0]))
    assert sum(its for *_, its in ours) > 10
    for (c, w, b, its), (c2, w2, b2, its2) in zip(ours, torchs, strict=True):
        assert (c, its) == (c2, its2) and torch.equal(w, w2) and torch.equal(b, b2)
    code = ("import sys, numpy as np; from probe.baseline import logreg_baseline; from probe.train import Examples; "
            "r = np.random.default_rng(0); x, y = r.normal(size=(60, 5)), np.arange(60) % 3; "
            "fit = logreg_baseline(Examples(x, y), Examples(x, y), cs=(0.1, 1.0)); "
            "print(fit.iterations[1.0] > 0, 'torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.stdout.split() == ["True", "False"], done.stderr


def test_a_whole_probe_run_imports_no_scikit_learn(workdir: Path, grid_file: Path, tmp_path: Path) -> None:
    """Issue #12: importing scikit-learn (scipy.stats and pandas with it) costs ~0.8 s, more than the demo's
    three baselines take to solve. A fresh process runs the grid, the logreg baseline, the bootstrap and the
    report without it; the metrics are held to scikit-learn's by the tests above."""
    work = fresh_copy(workdir, tmp_path)
    argv = ["--workdir", str(work), "--grid", "--grid-file", str(grid_file), "--baseline", "logreg",
            "--bootstrap", "20", "--no-progress", "-q"]
    code = (f"import sys, json; from probe.cli import main; rc = main({json.dumps(argv)}); "
            "print(json.dumps([rc, sorted(m for m in ('sklearn', 'scipy.stats', 'pandas') if m in sys.modules)]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [0, []], done.stderr
    entries = json.loads((work / "probe" / "results.json").read_text())["leaderboard"]
    assert len(entries) == 2 and all(e["logreg"]["val"]["macro_f1"] > 0 for e in entries)


# ----------------------------------------------------------------------------- pipeline


def test_selection_never_looks_at_test(workdir: Path, grid_file: Path, tmp_path: Path) -> None:
    grid = load_grid(grid_file)
    path = workdir / "features" / "test_resnet.r160_in1k@48.h5"
    shuffled = tmp_path / "shuffled" / path.name
    shuffled.parent.mkdir()
    shutil.copy(path, shuffled)
    with h5py.File(shuffled, "r+") as f:
        split = f["split"][...].astype(str)
        labels = f["labels"][...]
        test_rows = np.flatnonzero(split == "test")
        labels[test_rows] = np.random.default_rng(0).permutation(labels[test_rows])
        f["labels"][...] = labels
    settings = {"grid": True, "bootstrap": 50, "progress": False}
    a, _ = probe_cache(path, grid, ProbeSettings(workdir=tmp_path / "a", **settings), torch.device("cpu"),
                       tmp_path / "a" / "out")
    b, _ = probe_cache(shuffled, grid, ProbeSettings(workdir=tmp_path / "b", **settings), torch.device("cpu"),
                       tmp_path / "b" / "out")
    assert a["head"] == b["head"] and a["val"] == b["val"]  # same choice, same validation numbers
    assert a["test"]["accuracy"] != b["test"]["accuracy"]  # while the test labels did change


def test_probe_outputs_and_reload(workdir: Path, grid_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    work = fresh_copy(workdir, tmp_path)
    argv = ["--workdir", str(work), "--grid", "--grid-file", str(grid_file), "--baseline", "logreg",
            "--bootstrap", "100", "--no-progress"]
    assert probe_main(argv) == 0
    printed = capsys.readouterr().out
    assert "test_resnet.r160_in1k" in printed and "RANDOM" in printed
    record = yaml.safe_load((work / "config.yaml").read_text())["probe"]
    assert record["metric"] == "macro_f1" and record["grid"] is True  # what was used, the metric resolved
    out = work / "probe"
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == 2 * (11 + 1)  # 11 heads + logreg per backbone
    assert {e["grid_precision"] for e in results["leaderboard"]} == {
        dtype_name(products_dtype(GridTraining(), torch.device("cpu")))}
    chosen = [r for r in results["rows"] if r["chosen"]]
    assert len(chosen) == 2 and all("test_macro_f1" in r and "test_macro_f1_ci_low" in r for r in chosen)
    assert all("test_macro_f1" not in r for r in results["rows"] if not r["chosen"] and r["cfg_type"] != "logreg")
    assert (out / "results.csv").read_text().count("\n") == 1 + 24
    import csv

    by_type = {}
    for row in csv.DictReader((out / "results.csv").open()):
        by_type.setdefault(row["cfg_type"], row)
    # a field that does not apply to a head type is left empty, not filled with its default
    assert by_type["linear"]["cfg_k"] == by_type["linear"]["cfg_temperature"] == by_type["linear"]["cfg_hidden"] == ""
    assert by_type["linear"]["cfg_lr"] != "" and by_type["mlp"]["cfg_hidden"] == "[32]"
    assert by_type["knn"]["cfg_lr"] == by_type["knn"]["cfg_epochs"] == "" and by_type["knn"]["cfg_k"] in ("1", "10")
    board = (out / "leaderboard.md").read_text()
    assert "| 1    |" in board and "logreg" in board
    assert f"head(s) per backbone, trained with {results['leaderboard'][0]['grid_precision']} products" in board
    for entry in results["leaderboard"]:  # the baseline's test metric has its interval, as the chosen head's has
        low, high = entry["logreg"]["test_ci"]["macro_f1"]
        assert low <= entry["logreg"]["test"]["macro_f1"] <= high and f"[{low:.3f}, {high:.3f}]" in board
    for name in ("test_resnet.r160_in1k@48", "test_efficientnet.r160_in1k@48"):
        assert (out / "confusion" / f"{name}.png").stat().st_size > 1000
        history = (out / "history" / f"{name}.csv").read_text().splitlines()
        assert history[0].startswith("epoch") or "epoch" in history[0]
    assert (out / "confusion" / "top.png").is_file()
    # A saved head loads without pickle and, on its backbone, reproduces the logits from the cache.
    head_path = out / "heads" / "test_resnet.r160_in1k@48.pt"
    head, ckpt = load_head(head_path)
    classifier, _ = load_classifier(head_path)
    with open_cache(work / "features" / "test_resnet.r160_in1k@48.h5") as fc:
        test = fc.load("test")
        ids = test.ids[:6]
    import timm

    from runtime.images import load_rgb

    tf = timm.data.create_transform(**ckpt["data_config"], is_training=False)
    root = workdir / "data" / "demo"
    x = torch.stack([tf(load_rgb(root / i)) for i in ids])
    with torch.no_grad():
        from_images = classifier(x)
        from_cache = head(torch.as_tensor(test.features[:6]))
    torch.testing.assert_close(from_images, from_cache, rtol=0.02, atol=0.02)  # float16 cache
    assert (from_images.argmax(1) == from_cache.argmax(1)).all()
    # Same seed, same numbers.
    first = (out / "results.csv").read_text()
    assert probe_main(argv) == 0
    assert (out / "results.csv").read_text() == first


def test_default_head_and_folds(workdir: Path, grid_file: Path, tmp_path: Path) -> None:
    work = fresh_copy(workdir, tmp_path)
    result = run_probe(ProbeSettings(workdir=work, grid_file=grid_file, folds=3, bootstrap=50, progress=False,
                                     backbones=["test_resnet*"]))
    (entry,) = result.entries
    assert entry["n_heads"] == 1 and entry["head"] == load_grid(grid_file).default.name
    # One backbone: the top figure is its own confusion matrix.
    figures = work / "probe" / "confusion"
    assert (figures / "top.png").read_bytes() == (figures / "test_resnet.r160_in1k@48.png").read_bytes()
    assert entry["cv"]["folds"] == 3 and 0 <= entry["cv"]["std"] < 0.2 and 0 < entry["cv"]["mean"] <= 1
    assert "Sorted by 3-fold cross-validated macro_f1 (over train + val) (the selection metric)" in result.leaderboard


def test_missing_and_incomplete_caches(tmp_path: Path, workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert probe_main(["--workdir", str(tmp_path / "empty"), "--no-progress"]) == 2
    assert "python -m extract" in caplog.text
    work = fresh_copy(workdir, tmp_path)
    cache = work / "features" / "test_resnet.r160_in1k@48.h5"
    cache.rename(cache.with_name(cache.name + ".partial"))
    with pytest.raises(CacheError, match="python -m extract"):
        run_probe(ProbeSettings(workdir=work, progress=False))
    with pytest.raises(CacheError, match="matches no cache"):
        run_probe(ProbeSettings(workdir=work, backbones=["vit_*"], progress=False))


@pytest.mark.parametrize("item, of_resnet50, of_resnet50_cbam", [
    ("resnet50.a1_in1k", True, False), ("resnet50", True, False), ("resnet50@224", True, False),
    ("resnet50.a1_in1k@224", True, False), ("resnet50@288", False, False), ("resnet5", False, False),
    ("resnet50.tv_in1k", False, False), ("resnet50_cbam", False, True), ("resnet*", True, True),
    ("*.a1_in1k", True, True), ("*@224", True, True),
])
def test_a_backbones_item_names_caches_as_extract_takes_names(item: str, of_resnet50: bool,
                                                              of_resnet50_cbam: bool) -> None:
    """probe, profiling's caches and finetune select what extract cached by the names extract was given: with or
    without the pretrained tag (README's `finetune --backbones convnext_tiny` matched nothing), with the size, or
    a pattern."""
    from cache import names_backbone

    assert names_backbone(item, "resnet50.a1_in1k", 224) is of_resnet50
    assert names_backbone(item, "resnet50_cbam.a1_in1k", 224) is of_resnet50_cbam


def test_an_untagged_name_selects_its_cache(workdir: Path) -> None:
    from cache import select_caches

    assert [p.name for p in select_caches(workdir, ["test_resnet"])] == ["test_resnet.r160_in1k@48.h5"]
    with pytest.raises(CacheError, match="matches no cache"):
        select_caches(workdir, ["test_res"])


def test_head_file_of_another_format_is_refused() -> None:
    from probe.heads import HEAD_FORMAT, HeadFormatError, build_head, head_checkpoint, head_from_checkpoint

    config = HeadConfig(type="linear")
    head = build_head(config, 4, 3, torch.zeros(4), torch.ones(4))
    ckpt = head_checkpoint(head, config, dim=4, num_classes=3, info={})
    assert head_from_checkpoint(ckpt).in_features == 4
    with pytest.raises(HeadFormatError, match=f"head format 99, this version reads format {HEAD_FORMAT}; run"):
        head_from_checkpoint({**ckpt, "format": 99})


def test_caches_of_another_dataset_are_refused(workdir: Path, grid_file: Path, tmp_path: Path,
                                               image_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Probe, profiling and finetune rank only caches of the workdir's dataset (dataset.json)."""
    from finetune.pipeline import select_targets
    from profiling.pipeline import targets_from_caches

    work = fresh_copy(workdir, tmp_path)
    argv = ["--workdir", str(work), "--grid-file", str(grid_file), "--bootstrap", "20", "--no-progress"]
    assert probe_main(argv) == 0
    # A cache extracted from other images, dropped into features/ by hand.
    other = tmp_path / "other"
    extract_features(ExtractSettings(data=str(image_folder), backbones=["test_vit.r160_in1k"], workdir=other,
                                     pretrained=False, image_size=[48], workers=0, device="cpu", progress=False))
    (foreign,) = (other / "features").glob("*.h5")
    shutil.copy(foreign, work / "features" / foreign.name)
    assert probe_main(argv) == 2
    assert f"{foreign.name}: extracted from other images" in caplog.text and "Traceback" not in caplog.text
    (work / "features" / foreign.name).unlink()
    # The workdir's dataset re-split (another --seed rewrote dataset.json): every cache is now stale.
    record = json.loads((work / "dataset.json").read_text())
    (work / "dataset.json").write_text(json.dumps({**record, "annotation_fingerprint": "0" * 32}))
    for check in (lambda: run_probe(ProbeSettings(workdir=work, progress=False)),
                  lambda: targets_from_caches(work),
                  lambda: select_targets(work, top=1, backbones=None, metric=None)):
        with pytest.raises(CacheError, match=r"r160_in1k@48\.h5: labels or split differ"):
            check()


def test_killed_probe_leaves_the_previous_complete_set(workdir: Path, grid_file: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """results.json, the heads and the leaderboard are published together: a run killed half-way through
    writing them leaves readers the previous set, whose head files are the heads results.json names."""
    import probe.pipeline as pipeline

    work = fresh_copy(workdir, tmp_path)
    base = ["--workdir", str(work), "--grid-file", str(grid_file), "--bootstrap", "20", "--no-progress"]
    assert probe_main(base) == 0  # the default head only
    before = json.loads((work / "probe" / "results.json").read_text())

    def killed_after_the_first(head, path):
        write_head_onnx(head, path)
        raise KeyboardInterrupt  # as a kill would, after the first backbone's new ONNX head was written

    monkeypatch.setattr(pipeline, "write_head_onnx", killed_after_the_first)
    assert probe_main([*base, "--grid"]) == 130  # Ctrl-C: one line, not a traceback
    after = json.loads((work / "probe" / "results.json").read_text())
    assert after == before
    for entry in after["leaderboard"]:
        head = torch.load(entry["head_file"], weights_only=True)
        assert HeadConfig.model_validate(head["config"]).name == entry["head"]
    assert [p.name for p in (work / ".probe.versions").iterdir()] == [Path(os.readlink(work / "probe")).name]
    monkeypatch.undo()
    assert probe_main([*base, "--grid"]) == 0  # and the next run publishes its own complete set
    grid_run = json.loads((work / "probe" / "results.json").read_text())
    assert grid_run["n_heads"] == 11
    for entry in grid_run["leaderboard"]:
        head = torch.load(entry["head_file"], weights_only=True)
        assert HeadConfig.model_validate(head["config"]).name == entry["head"]


def test_a_head_onnx_file_that_cannot_be_written_stops_the_probe_and_publishes_nothing(
        workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A full disk while writing a head's ONNX file is the same one-line error as any other write, and the
    previous complete results stay published: no results.json whose heads lack their files."""
    import errno

    import probe.head_onnx as head_onnx

    work = fresh_copy(workdir, tmp_path)
    base = ["--workdir", str(work), "--bootstrap", "20", "--no-progress"]
    assert probe_main(base) == 0
    before = (work / "probe" / "results.json").read_text()

    def full(model, path: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(head_onnx.onnx, "save", full)
    assert probe_main(base) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "no space left" in errors[0].getMessage().lower() and errors[0].exc_info is None
    assert (work / "probe" / "results.json").read_text() == before
    assert [p.name for p in (work / ".probe.versions").iterdir()] == [Path(os.readlink(work / "probe")).name]


def test_second_probe_on_a_workdir_is_refused_naming_the_first(workdir: Path, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from runtime.locks import exclusive

    work = fresh_copy(workdir, tmp_path)
    with exclusive(work, "probe"):  # as a running `python -m probe` holds it
        assert probe_main(["--workdir", str(work), "--no-progress"]) == 2
    assert f"probe in {work} is in use by pid {os.getpid()} on " in caplog.text
    assert not (work / "probe").exists()


def test_an_interrupted_probe_keeps_the_last_complete_results(workdir: Path, grid_file: Path, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the middle of the second backbone: a one-line message and status 130, not a traceback; the last
    complete results stay as they were, and the next run is not locked out."""
    import probe.pipeline as pipeline

    work = fresh_copy(workdir, tmp_path)
    argv = ["--workdir", str(work), "--grid", "--grid-file", str(grid_file), "--no-progress", "--bootstrap", "20"]
    assert probe_main(argv) == 0
    before = (work / "probe" / "results.csv").read_bytes()
    calls, real = [], pipeline.train_grid

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train_grid", interrupted)
    assert probe_main([*argv, "--seed", "1"]) == 130
    assert "Interrupted; the probe results of the last complete run are unchanged" in caplog.text
    assert (work / "probe" / "results.csv").read_bytes() == before
    monkeypatch.setattr(pipeline, "train_grid", real)
    assert probe_main([*argv, "--seed", "1"]) == 0 and (work / "probe" / "results.csv").read_bytes() != before


def test_confusion_matrix_shows_every_count_zeros_included() -> None:
    import matplotlib.pyplot as plt

    from probe.plots import _draw

    fig, ax = plt.subplots()
    _draw(ax, np.array([[0, 3, 0], [2, 5, 0], [0, 0, 0]]), ["a", "b", "c"], "t")
    texts = sorted((t.get_position(), t.get_text()) for t in ax.texts)
    assert len(texts) == 9 and [t for _, t in texts].count("0") == 6  # an empty diagonal cell shows its 0
    plt.close(fig)


def test_confusion_png_of_random_weights_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.figure

    from probe.plots import plot_confusion

    titles = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: titles.append(
        self._suptitle.get_text() if self._suptitle else ""))
    plot_confusion(np.eye(2, dtype=int), ["a", "b"], "t", tmp_path / "r.png", random_weights=True)
    plot_confusion(np.eye(2, dtype=int), ["a", "b"], "t", tmp_path / "p.png")
    assert titles[0].startswith("RANDOM WEIGHTS") and titles[1] == ""
