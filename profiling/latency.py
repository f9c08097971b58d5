"""Latency as a deployment engineer would trust it: warmed-up, repeated, with percentiles and spread.

ONNX Runtime sessions use full graph optimisation; the provider is TensorRT, then CUDA,
then CPU (``auto``), or as asked. Warm-up runs are not timed (on a GPU they include
engine builds and cuDNN's algorithm search); then at least ``min_runs`` timed runs or
``min_seconds``, whichever is longer. On CUDA the input is bound to the device with
I/O binding, so host copies are not timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from runtime.device import DeviceError, uses_channels_last

NOISY_CV = 0.10

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


@dataclass
class LatencyStats:
    runs: int
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    cv: float
    throughput: float  # images / second at this batch size, from the mean
    first_ms: float  # the very first inference (cold)
    noisy: bool

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def summarise(times_s: np.ndarray, batch_size: int, first_s: float) -> LatencyStats:
    """Percentiles (linear interpolation, as numpy), mean, std, CV and throughput of per-run times."""
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    mean = float(ms.mean())
    std = float(ms.std(ddof=1)) if len(ms) > 1 else 0.0
    cv = std / mean if mean > 0 else 0.0
    p50, p90, p95, p99 = (float(v) for v in np.percentile(ms, [50, 90, 95, 99]))
    return LatencyStats(runs=len(ms), p50_ms=p50, p90_ms=p90, p95_ms=p95, p99_ms=p99, mean_ms=mean, std_ms=std, cv=cv,
                        throughput=batch_size / (mean / 1e3) if mean > 0 else 0.0, first_ms=first_s * 1e3,
                        noisy=cv > NOISY_CV)


def time_runs(run: Callable[[], Any], *, batch_size: int, warmup: int, min_runs: int, min_seconds: float,
              max_runs: int = 100_000, sync: Callable[[], None] = lambda: None) -> LatencyStats:
    """Time ``run`` after ``warmup`` untimed calls; the first call is timed separately as cold start."""
    t0 = time.perf_counter()
    run()
    sync()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        run()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < min_seconds):
        t = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t)
    return summarise(np.asarray(times), batch_size, first)


def available_providers() -> list[str]:
    return ort.get_available_providers()


def choose_providers(provider: str) -> list[str]:
    """The provider chain for ``auto|cpu|cuda|tensorrt``; an explicit one that is unavailable is an error."""
    available = available_providers()
    usable_gpu = torch.cuda.is_available()
    if provider == "auto":
        chain = [p for key, p in PROVIDERS.items() if p in available and (key == "cpu" or usable_gpu)]
        return chain[:1] + (["CPUExecutionProvider"] if chain[:1] != ["CPUExecutionProvider"] else [])
    name = PROVIDERS[provider]
    if name not in available or (provider != "cpu" and not usable_gpu):
        raise DeviceError(f"--provider {provider}: {name} is not usable here (available: {', '.join(available)}; "
                           f"CUDA device: {usable_gpu}). Use --provider auto or cpu.")
    return [name] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else [])


def make_session(path: Path, providers: list[str], threads: int | None, cache_dir: Path | None = None
                 ) -> tuple[ort.InferenceSession, dict[str, Any], float]:
    """A session with full graph optimisation; returns it, the options used, and its creation time."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    # Spinning threads burn CPU between runs and disturb neighbouring measurements.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    provider_options = []
    for p in providers:
        if p == "TensorrtExecutionProvider" and cache_dir is not None:
            provider_options.append({"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir)})
        else:
            provider_options.append({})
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers, provider_options=provider_options)
    created = time.perf_counter() - t0
    info = {"providers": session.get_providers(), "graph_optimization": "ORT_ENABLE_ALL",
            "intra_op_num_threads": threads or 0, "allow_spinning": False}
    return session, info, created


def measure_onnxruntime(session: ort.InferenceSession, batch: np.ndarray, **timing: Any) -> LatencyStats:
    input_name = session.get_inputs()[0].name
    if session.get_providers()[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        binding = session.io_binding()
        x = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0)
        binding.bind_ortvalue_input(input_name, x)
        binding.bind_output(session.get_outputs()[0].name, "cuda")

        def run() -> None:
            session.run_with_iobinding(binding)
    else:
        def run() -> None:
            session.run(None, {input_name: batch})
    return time_runs(run, batch_size=len(batch), **timing)


def measure_eager(model: nn.Module, batch: torch.Tensor, device: torch.device, **timing: Any) -> LatencyStats:
    """PyTorch eager latency of the same model and batch, for reference: run as extraction runs it (channels-last
    where that is faster; ``model`` is converted in place)."""
    x = batch.to(device)
    if uses_channels_last(device) and x.ndim == 4:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run() -> None:
        with torch.inference_mode():
            model(x)
    return time_runs(run, batch_size=len(batch), sync=sync, **timing)


def peak_matmul_gflops(device: torch.device, *, providers: list[str] | None = None, threads: int | None = None,
                       sizes: tuple[int, ...] = (1024, 2048), seconds: float = 0.4) -> float:
    """The best fp32 matrix-multiply rate seen, by PyTorch and by ONNX Runtime: the roofline's compute ceiling.

    The best of several sizes and of both engines, since a ceiling measured too low would flag honest
    latencies as impossibly fast (ORT's MLAS kernels beat PyTorch's on some CPUs).
    """
    best = 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for size in sizes:
        a = torch.randn(size, size, device=device)
        b = torch.randn(size, size, device=device)
        best = max(best, _rate(lambda: a @ b, size, seconds, sync))
    if providers:
        from onnx import TensorProto, helper

        for size in sizes:
            graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
                                      [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in "ab"],
                                      [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            session = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=providers)
            feeds = {n: np.random.rand(size, size).astype(np.float32) for n in "ab"}
            best = max(best, _rate(lambda: session.run(None, feeds), size, seconds, lambda: None))
    return best


def _rate(run: Callable[[], Any], size: int, seconds: float, sync: Callable[[], None]) -> float:
    """Best single-run GFLOPS of a size x size matrix multiply over ``seconds``."""
    for _ in range(2):
        run()
    sync()
    fastest, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        run()
        sync()
        fastest = min(fastest, time.perf_counter() - t)
    return 2 * size**3 / fastest / 1e9
