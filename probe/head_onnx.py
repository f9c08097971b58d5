"""The chosen heads as ONNX files (features -> logits, dynamic batch), so `profiling` can append each one to its
exported backbone: the stages share these files, not code.

Each head type of ``probe/heads.py`` is a handful of ONNX operators, written here with ``onnx.helper``, not traced
by ``torch.onnx.export``: for these three fixed graphs the exporter cost ~4 s per probe command on two cores
(torch._dynamo and onnxscript's operator registry, set up per process and per call) where the graphs below take
milliseconds. A new head type needs its graph here; tests/test_probe.py holds every type's file to its PyTorch
module in ONNX Runtime, at several batch sizes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from probe.heads import KNNHead, LinearHead, MLPHead, Standardize

OPSET = 20  # what torch's exporter writes for the backbones, so `profiling` joins the two without conversion
IR_VERSION = 10  # ONNX Runtime 1.31 refuses IR 14, the default of onnx 1.23's helper (FIELD-NOTES)
NORM_EPS = 1e-12  # F.normalize's
SHARE_FLOOR = 1e-12  # probe.heads._as_logits'


class _Graph:
    """Nodes and constants of one graph, with names generated in order."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []

    def const(self, value: np.ndarray | float | list[int], dtype: type = np.float32) -> str:
        name = f"c{len(self.constants)}"
        self.constants.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs: object) -> str | list[str]:
        names = [f"t{len(self.nodes)}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def _standardize(g: _Graph, x: str, norm: Standardize) -> str:
    return g.op("Div", g.op("Sub", x, g.const(_array(norm.mean))), g.const(_array(norm.std)))


def _linear(g: _Graph, x: str, layer: nn.Linear) -> str:
    return g.op("Gemm", x, g.const(_array(layer.weight)), g.const(_array(layer.bias)), transB=1)


def _gelu(g: _Graph, x: str) -> str:
    """nn.GELU()'s exact form, x * (1 + erf(x / sqrt 2)) / 2: plain operators, valid at any opset ≥ 13."""
    erf = g.op("Erf", g.op("Div", x, g.const(math.sqrt(2.0))))
    return g.op("Mul", g.op("Mul", x, g.op("Add", erf, g.const(1.0))), g.const(0.5))


def _knn(g: _Graph, x: str, head: KNNHead) -> str:
    """KNNHead.forward: cosine top-k, exp(similarity / T) votes summed per class, log of each class's share."""
    axis1 = g.const([1], np.int64)
    norm = g.op("Max", g.op("ReduceL2", x, axis1, keepdims=1), g.const(NORM_EPS))
    sims = g.op("MatMul", g.op("Div", x, norm), g.const(_array(head.bank).T.copy()))
    k = min(head.k, len(head.bank))
    top, idx = g.op("TopK", sims, g.const([k], np.int64), axis=1, largest=1, sorted=1, outputs=2)
    labels = g.op("Gather", g.const(head.bank_labels.cpu().numpy(), np.int64), idx)  # (B, k)
    onehot = g.op("OneHot", labels, g.const(head.num_classes, np.int64), g.const([0.0, 1.0]), axis=-1)  # (B, k, C)
    weight = g.op("Unsqueeze", g.op("Exp", g.op("Div", top, g.const(float(head.temperature)))),
                  g.const([2], np.int64))
    mass = g.op("ReduceSum", g.op("Mul", onehot, weight), axis1, keepdims=0)  # (B, C)
    shares = g.op("Div", mass, g.op("ReduceSum", mass, axis1, keepdims=1))
    return g.op("Log", g.op("Max", shares, g.const(SHARE_FLOOR)))


def head_model(head: nn.Module) -> onnx.ModelProto:
    """``head`` (a module of probe/heads.py, in eval mode) as an ONNX model: input ``features`` (batch, D),
    output ``logits`` (batch, C), float32."""
    g = _Graph()
    if isinstance(head, LinearHead):
        out, classes = _linear(g, _standardize(g, "features", head.norm), head.fc), head.fc.out_features
    elif isinstance(head, MLPHead):
        out = _standardize(g, "features", head.norm)
        *hidden, last = [m for m in head.mlp if isinstance(m, nn.Linear)]
        for layer in hidden:
            out = _gelu(g, _linear(g, out, layer))  # dropout: identity at inference
        out, classes = _linear(g, out, last), last.out_features
    elif isinstance(head, KNNHead):
        out, classes = _knn(g, "features", head), head.num_classes
    else:
        raise NotImplementedError(f"no ONNX graph for {type(head).__name__}: add one to probe/head_onnx.py")
    g.nodes.append(helper.make_node("Identity", [out], ["logits"]))  # ONNX Runtime removes it
    graph = helper.make_graph(
        g.nodes, type(head).__name__, [helper.make_tensor_value_info("features", TensorProto.FLOAT,
                                                                     ["batch", head.in_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], initializer=g.constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="backbone-bench")
    onnx.checker.check_model(model, full_check=True)
    return model


def write_head_onnx(head: nn.Module, path: Path) -> None:
    """``head`` as ONNX at ``path``. A failed write raises (the caller publishes nothing)."""
    onnx.save(head_model(head), str(path))
