"""ONNX export with a dynamic batch dimension, checked and reused while the model is unchanged.

Known pitfalls handled here: the dynamo exporter (torch >= 2.9's default) is used
with ``dynamic_shapes`` rather than the deprecated ``dynamic_axes``; the example
batch has 2 images, since a batch of 1 can freeze the batch size; weights are
stored inside the .onnx file (no external ``.onnx.data``) unless the model is too
large for a single protobuf.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from runtime.files import atomic_write_text

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 1_800_000_000  # bytes of parameters above which weights go to external data


class ExportError(RuntimeError):
    """A model could not be exported or its ONNX outputs disagree with PyTorch's."""


@dataclass
class Exported:
    path: Path
    reused: bool
    seconds: float
    size_bytes: int


def _fingerprint(key: dict[str, Any]) -> str:
    return json.dumps({**key, "torch": torch.__version__, "onnx": onnx.__version__}, sort_keys=True, default=str)


def export_onnx(model: nn.Module, input_size: tuple[int, int, int], path: Path, *, key: dict[str, Any],
                opset: int | None = None) -> Exported:
    """Export ``model`` (eval) for inputs (N, *input_size) with N dynamic; reuse ``path`` if ``key`` is unchanged."""
    path = Path(path)
    sidecar = path.with_suffix(".onnx.json")
    fingerprint = _fingerprint(key)
    if path.is_file() and sidecar.is_file() and sidecar.read_text() == fingerprint:
        try:  # a file cut short (a kill, a full disk) would otherwise be reused forever
            onnx.checker.check_model(str(path), full_check=False)
            return Exported(path, True, 0.0, _size(path))
        except Exception as exc:
            log.warning("%s: unreadable (%s); exporting it again", path.name, str(exc).splitlines()[0][:120])
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.randn(2, *input_size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > PROTOBUF_LIMIT
    t0 = time.perf_counter()
    tmp = path.with_name(path.name + ".tmp")
    try:
        with torch.no_grad():
            program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes={"x": {0: batch}},
                                        input_names=["images"], output_names=["output"], opset_version=opset,
                                        external_data=external, optimize=True, verbose=False)
        program.save(str(tmp), external_data=external)
        onnx.checker.check_model(str(tmp), full_check=False)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    tmp.replace(path)
    if external:
        data = tmp.with_name(tmp.name + ".data")
        if data.exists():
            data.replace(path.with_name(path.name + ".data"))
    atomic_write_text(sidecar, fingerprint)
    return Exported(path, False, time.perf_counter() - t0, _size(path))


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def max_relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |candidate - reference| / max |reference|: scale-free, so tiny random-weight logits compare fairly."""
    scale = float(np.abs(reference).max())
    return float(np.abs(candidate - reference).max() / scale) if scale > 0 else float(np.abs(candidate).max())


def append_head(backbone_path: Path, head_path: Path, path: Path) -> Path:
    """One ONNX graph: images -> backbone -> probe head -> logits (``onnx.compose``)."""
    import onnx.compose
    import onnx.version_converter

    backbone = onnx.load(str(backbone_path))
    head = onnx.load(str(head_path))
    opset = {o.domain: o.version for o in backbone.opset_import}.get("", None)
    head_opset = {o.domain: o.version for o in head.opset_import}.get("", None)
    if opset is not None and head_opset != opset:
        head = onnx.version_converter.convert_version(head, opset)
    head.ir_version = backbone.ir_version
    merged = onnx.compose.merge_models(backbone, head, io_map=[(backbone.graph.output[0].name, head.graph.input[0].name)],
                                       prefix2="head/")
    onnx.checker.check_model(merged)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(merged, str(tmp))
    tmp.replace(path)
    return path


def matmul_flops(path: Path) -> int:
    """FLOPs per input row of the MatMul/Gemm nodes whose weight is an initializer (a head's linear layers)."""
    model = onnx.load(str(path))
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            for name in node.input[1:2]:
                dims = shapes.get(name)
                if dims and len(dims) == 2:
                    total += 2 * dims[0] * dims[1]
    return total
