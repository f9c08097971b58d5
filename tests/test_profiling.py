from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from configs.probe import ProbeSettings
from configs.profiling import ProfilingSettings
from extract.backbones import BackboneSpec
from extract.models import Weights, create_backbone, preprocessing
from profiling.cli import main as profiling_main
from profiling.export import export_onnx, max_relative_error
from profiling.flops import count_flops
from profiling.latency import summarise
from profiling.pareto import ParetoPoint, latency_tie, pareto_figure, pareto_front
from profiling.pipeline import run_profiling

RANDOM = Weights("random", None, "random")
FAST = dict(warmup=2, min_runs=5, min_seconds=0.0, progress=False)


@pytest.mark.parametrize("name", ["test_resnet.r160_in1k", "test_vit.r160_in1k", "test_efficientnet.r160_in1k"])
def test_onnx_matches_pytorch_at_several_batch_sizes(name: str, tmp_path: Path) -> None:
    spec = BackboneSpec(model=name)
    cfg, size_kwargs = preprocessing(spec, 64)
    model, _ = create_backbone(spec, RANDOM, exportable=True, **size_kwargs)
    exported = export_onnx(model, (3, 64, 64), tmp_path / "m.onnx", key={"m": name})
    onnx.checker.check_model(str(exported.path))
    assert not (tmp_path / "m.onnx.data").exists()  # weights inside the file
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 5):  # the example had 2: the batch dimension is dynamic
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            ref = model(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == ref.shape
        assert max_relative_error(ref, got) < 1e-4


def test_attention_flops_counted() -> None:
    """A small attention layer: the counter agrees with a hand count, attention matmuls included."""

    class Attention(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, 1, c).permute(2, 0, 3, 1, 4)
            return self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))

    class Wrap(nn.Module):  # count_flops feeds images; reshape one into 16 tokens of 12 dims
        def __init__(self) -> None:
            super().__init__()
            self.attn = Attention(12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x.reshape(1, 16, 12))

    n, d = 16, 12
    linear = 2 * n * d * 3 * d + 2 * n * d * d
    attention = 2 * n * n * d + 2 * n * n * d  # QK^T and AV
    assert count_flops(Wrap(), (3, 8, 8)) == linear + attention


def test_vit_flops_include_attention() -> None:
    spec = BackboneSpec(model="test_vit.r160_in1k")
    model, _ = create_backbone(spec, RANDOM)
    flops = count_flops(model, (3, 160, 160))
    tokens = (160 // 16) ** 2 + model.num_prefix_tokens
    dim, depth = model.embed_dim, len(model.blocks)
    attention = depth * 2 * (2 * tokens * tokens * dim)
    linear_only = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)) * tokens
    assert flops >= linear_only + attention * 0.99


def test_percentiles_and_stats() -> None:
    times = np.arange(1, 101) / 1000.0  # 1..100 ms
    s = summarise(times, batch_size=4, first_s=0.5)
    assert s.p50_ms == pytest.approx(np.percentile(np.arange(1, 101), 50))
    assert s.p90_ms == pytest.approx(90.1) and s.p99_ms == pytest.approx(99.01)
    assert s.mean_ms == pytest.approx(50.5) and s.std_ms == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert s.throughput == pytest.approx(4 / 0.0505) and s.first_ms == 500 and s.runs == 100
    assert s.noisy and summarise(np.full(50, 0.01), 1, 0.01).cv == 0.0


def test_pareto_front() -> None:
    pts = [(10, 0.9), (5, 0.8), (20, 0.85), (1, 0.5), (5, 0.7)]
    assert pareto_front(pts) == [3, 1, 0]


def _point(name: str, score: float, p50: float, cv: float = 0.02, arch: str = "a", gflops: float = 1.0,
           noisy: bool = False) -> ParetoPoint:
    return ParetoPoint(name, score, (score - 0.05, score + 0.04), p50, p50 * 1.5, cv, noisy, gflops, arch)


def test_front_membership_does_not_hinge_on_timing_noise() -> None:
    # The same architecture with random weights timed faster by noise (6.4 ms against 8.9, cv 0.36): it used to
    # sit on the front; now both cost the same and only the better score is on it.
    real, random_copy = _point("real", 0.8, 8.9, cv=0.36, noisy=True), _point("random", 0.3, 6.4, cv=0.36, noisy=True)
    other = _point("small", 0.6, 2.0, arch="b", gflops=0.2)
    points = [real, random_copy, other]
    front = pareto_front([(p.p50_ms, p.score) for p in points], lambda i, j: latency_tie(points[i], points[j]))
    assert front == [2, 0]
    # A clear timing difference still counts, between different architectures and within one.
    fast = _point("fast", 0.5, 1.0, arch="c", gflops=3.0)
    assert not latency_tie(fast, _point("slow", 0.9, 4.0, arch="d", gflops=3.0))
    assert not latency_tie(fast, _point("same arch, really slower", 0.9, 1.6, arch="c", gflops=3.0))
    assert latency_tie(fast, _point("same arch, inside p99", 0.9, 1.4, arch="c", gflops=3.0))


def test_pareto_plot_shows_intervals_spread_noise_decades_metric_and_random_weights() -> None:
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    points = [_point("a@64", 0.8, 0.7, noisy=True), _point("b@64", 0.7, 3.0, arch="b"), _point("c@64", 0.9, 40.0, arch="c")]
    fig = pareto_figure(points, metric="qwk", latency_label="latency, ms", random_weights=True)
    latency, compute = fig.axes[:2]
    assert "test qwk" in latency.get_title() and latency.get_ylabel() == "test qwk"
    assert "RANDOM WEIGHTS" in fig._suptitle.get_text()
    bars = [c for c in latency.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1 and bars[0].has_yerr and bars[0].has_xerr  # test CI and latency p50-p99
    lo, hi = latency.get_xlim()
    labels = {t.get_text() for t in latency.get_xticklabels() if lo <= t.get_position()[0] <= hi}
    assert {"1", "10"} <= labels and ("2" in labels or "5" in labels)  # every decade, and values between
    hollow = [c for c in latency.collections if c.get_label().startswith("noisy")]
    assert len(hollow) == 1 and len(hollow[0].get_offsets()) == 1
    assert not any(c.get_label().startswith("noisy") for c in compute.collections)  # FLOPs are exact
    plt.close(fig)


def test_profiling_end_to_end_with_a_failure(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import profiling.pipeline as pipeline

    original = pipeline.export_onnx

    def failing_for_vit(model, input_size, path, *, key):
        if "test_vit" in str(path):
            raise pipeline.ExportError("simulated export failure")
        return original(model, input_size, path, key=key)

    monkeypatch.setattr(pipeline, "export_onnx", failing_for_vit)
    caplog.set_level("INFO", logger="profiling.pipeline")
    result = run_profiling(ProfilingSettings(workdir=tmp_path, backbones=["test_resnet.r160_in1k", "test_vit.r160_in1k"],
                                             pretrained=False, image_size=[64], batch_sizes=(1, 2), provider="cpu",
                                             **FAST))
    assert [f["backbone"] for f in result["failures"]] == ["test_vit.r160_in1k"]
    records = result["records"]
    assert [(r["backbone"], r["batch_size"]) for r in records] == [("test_resnet.r160_in1k", 1), ("test_resnet.r160_in1k", 2)]
    r = records[0]
    assert r["p50_ms"] > 0 and r["p50_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"]
    assert r["gflops"] > 0 and r["gmacs"] == pytest.approx(r["gflops"] / 2) and r["max_rel_error"] < 1e-3
    assert r["provider"] == "CPUExecutionProvider" and r["torch_p50_ms"] > 0 and r["onnx_mb"] > 0
    # The roofline floor is FLOPs over the machine's measured matmul peak. Whether p50 lands above it depends on
    # the load during calibration and timing (a busy machine calibrates low), so check the arithmetic exactly and
    # the magnitudes loosely: a FLOP count off by an order of magnitude would still fail.
    peak = json.loads((tmp_path / "profiling" / "performance.json").read_text())["machine"]["peak_matmul_gflops"]
    assert r["roofline_floor_ms"] == pytest.approx(r["gflops"] * r["batch_size"] / peak * 1e3)
    assert r["below_floor"] == (r["p50_ms"] < pipeline.FLOOR_TOLERANCE * r["roofline_floor_ms"])
    assert r["floor_fraction"] < 3
    report = json.loads((tmp_path / "profiling" / "performance.json").read_text())
    assert report["failures"][0]["error"].startswith("ExportError") and report["machine"]["peak_matmul_gflops"] > 0
    assert (tmp_path / "profiling" / "performance.csv").is_file()
    assert not (tmp_path / "profiling" / "pareto.png").exists() and "No pareto.png" in caplog.text  # no probe yet
    assert "simulated export failure" in caplog.text


def test_an_onnx_model_that_disagrees_with_pytorch_is_a_failure_not_a_latency(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """README: above --tolerance the backbone fails loudly instead of reporting a latency for a wrong model."""
    import profiling.pipeline as pipeline

    monkeypatch.setattr(pipeline, "max_relative_error", lambda reference, got: 0.25)  # an exporter bug
    result = run_profiling(ProfilingSettings(workdir=tmp_path, backbones=["test_resnet.r160_in1k"], pretrained=False,
                                             image_size=[64], batch_sizes=(1,), provider="cpu", **FAST))
    assert result["records"] == []
    (failure,) = result["failures"]
    assert failure["error"] == ("ExportError: ONNX and PyTorch outputs differ: max relative error 2.50e-01 > "
                                "tolerance 1e-03")


def test_cli_from_cached_workdir_with_probe_head(tmp_path: Path, demo_caches: Path, capsys: pytest.CaptureFixture,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """extract -> probe -> profiling: the exported model is backbone + chosen head, images to class logits."""
    from probe.classifier import load_classifier
    from probe.pipeline import run_probe

    work = tmp_path / "w"  # one of the shared demo caches
    (work / "features").mkdir(parents=True)
    shutil.copy(demo_caches / "features" / "test_resnet.r160_in1k@48.h5", work / "features")
    shutil.copy(demo_caches / "dataset.json", work)
    run_probe(ProbeSettings(workdir=work, bootstrap=20, progress=False))
    assert (work / "probe" / "heads" / "test_resnet.r160_in1k@48.onnx").is_file()
    argv = ["--workdir", str(work), "--batch-sizes", "1", "3", "--min-runs", "3", "--min-seconds", "0", "--warmup", "1",
            "--provider", "cpu", "--no-progress"]
    assert profiling_main(argv) == 0
    out = capsys.readouterr().out
    assert "test_resnet.r160_in1k" in out and "p50 ms" in out
    record = json.loads((work / "profiling" / "performance.json").read_text())["records"][0]
    assert record["with_probe_head"] and record["max_rel_error"] < 1e-3
    # Independent reference: the probe's PyTorch classifier (backbone + head) on the same input.
    classifier, _ = load_classifier(work / "probe" / "heads" / "test_resnet.r160_in1k@48.pt")
    session = ort.InferenceSession(str(work / "profiling" / "test_resnet.r160_in1k@48.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        expected = classifier(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == (3, 10)
    assert max_relative_error(expected, got) < 1e-4
    # The log says whether the export was made or reused (it said "reused" for a new one too).
    assert "test_resnet.r160_in1k@48: ONNX export (new)" in caplog.text
    caplog.clear()
    assert profiling_main(argv) == 0
    assert "test_resnet.r160_in1k@48: ONNX export (reused: the model is unchanged)" in caplog.text


@pytest.mark.parametrize("name, published_gmacs", [("resnet50", 4.1), ("vit_base_patch16_224", 17.6)])
def test_flops_agree_with_published_figures(name: str, published_gmacs: float) -> None:
    """timm's tables give GMACs at 224 px; the counter gives FLOPs = 2 x MACs."""
    import timm

    model = timm.create_model(name, num_classes=0).eval()
    assert count_flops(model, (3, 224, 224)) / 2e9 == pytest.approx(published_gmacs, rel=0.02)


def test_onnx_is_reused_for_the_same_key_and_exported_again_when_changed_or_truncated(tmp_path: Path) -> None:
    # What decides reuse is the key and the file, whatever the model: one cheap model checks it for all.
    spec = BackboneSpec(name="test_resnet.r160_in1k", model="test_resnet.r160_in1k")
    model, _ = create_backbone(spec, RANDOM, exportable=True)
    path = tmp_path / "m.onnx"
    key = {"model": spec.model}
    first = export_onnx(model, (3, 32, 32), path, key=key)
    assert not first.reused and export_onnx(model, (3, 32, 32), path, key=key).reused
    key = {**key, "changed": 1}
    assert not export_onnx(model, (3, 32, 32), path, key=key).reused
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short; the sidecar still matches
    again = export_onnx(model, (3, 32, 32), path, key=key)
    assert not again.reused
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"images": np.zeros((2, 3, 32, 32), np.float32)})[0].shape[0] == 2


def test_profiling_with_other_data_leaves_the_workdir_dataset_alone(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    (work / "dataset.json").write_text('{"root": "/elsewhere", "note": "extract wrote this"}')
    result = run_profiling(ProfilingSettings(workdir=work, backbones=["test_resnet.r160_in1k"], pretrained=False,
                                             image_size=[32], data="demo", batch_sizes=(1,), provider="cpu", **FAST))
    assert result["records"] and not result["failures"]
    assert (work / "dataset.json").read_text() == '{"root": "/elsewhere", "note": "extract wrote this"}'
    assert not (work / "data").exists()  # the demo images were not written into the workdir


def test_an_interrupted_profiling_run_says_what_is_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C: a one-line message and status 130, not a traceback."""
    import profiling.pipeline as pipeline

    def interrupted(settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_profiling", interrupted)
    assert profiling_main(["--workdir", str(tmp_path), "--backbones", "test_resnet.r160_in1k", "--no-progress"]) == 130
    assert "Interrupted; the last complete run's performance files are unchanged" in caplog.text
