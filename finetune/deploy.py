"""The fine-tuned model as a deployable ONNX graph, checked against PyTorch and timed, with profiling's tools."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.data import Split, eval_transform
from finetune.model import load_checkpoint
from profiling.export import ExportError, export_onnx, max_relative_error
from profiling.flops import count_flops, count_parameters
from profiling.latency import choose_providers, make_session, measure_onnxruntime
from runtime.images import load_rgb

log = logging.getLogger(__name__)


TOLERANCE = 1e-3  # largest accepted max relative error of ONNX against PyTorch, as `profiling` checks
TIMED_SECONDS = 1.0  # at batch 1, with ONNX Runtime's own thread count: a first figure; `profiling` measures fully


def export_and_time(checkpoint: Path, data_cfg: dict[str, Any], images: Split, out: Path, provider: str = "auto"
                    ) -> dict[str, Any]:
    """``out/model.onnx`` (images -> logits) and its ONNX Runtime latency; raises ExportError on a mismatch."""
    model, _ = load_checkpoint(checkpoint, exportable=True)
    input_size = tuple(data_cfg["input_size"])
    onnx_path = out / "model.onnx"
    key = {"checkpoint": str(checkpoint), "mtime_ns": checkpoint.stat().st_mtime_ns, "input_size": input_size}
    exported = export_onnx(model, input_size, onnx_path, key=key)
    tf = eval_transform(data_cfg)
    x = torch.stack([tf(load_rgb(p)) for p in images.paths[:8]])
    with torch.no_grad():
        reference = model(x).numpy()
    session, info, created = make_session(onnx_path, choose_providers(provider), None)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    rel = max_relative_error(reference, got)
    if not rel <= TOLERANCE:
        raise ExportError(f"ONNX and PyTorch logits differ: max relative error {rel:.2e} > {TOLERANCE:.0e}")
    batch = np.random.default_rng(0).standard_normal((1, *input_size), dtype=np.float32)
    stats = measure_onnxruntime(session, batch, warmup=5, min_runs=50, min_seconds=TIMED_SECONDS)
    return {"onnx_file": str(onnx_path), "onnx_mb": onnx_path.stat().st_size / 1e6, "max_rel_error": rel,
            "provider": info["providers"][0], "batch_size": 1, "gflops": count_flops(model, input_size) / 1e9,
            "params": count_parameters(model), "session_create_ms": created * 1e3,
            "export_seconds": exported.seconds, **stats.as_dict()}
