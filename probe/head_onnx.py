"""The chosen heads as ONNX files (features -> logits, dynamic batch), so `profiling` can append each one to its
exported backbone: the stages share these files, not code.

All heads of a probe run go through one export call. Most of a call's cost is the exporter's own set-up, paid per
call whatever the model (~1 s on two cores: onnxscript rebuilds its operator registry), so one call for three heads
took 1.9 s where three calls took 4.8 s. The heads are then cut apart again (``onnx.utils.Extractor``), each into
its own file with the graph's inputs and outputs named ``features`` and ``logits``. Heads that do not export
together are exported one by one; one that does not export at all is logged, and the probe results stand without
its file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import torch
from torch import nn

log = logging.getLogger(__name__)

MAX_BATCH = 1024


class _Heads(nn.Module):
    """Several heads side by side: the i-th input goes through the i-th head only."""

    def __init__(self, heads: list[nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(head(x) for head, x in zip(self.heads, features))


def export_head_onnx(head: nn.Module, dim: int, path: Path) -> Path | None:
    """One head as ONNX at ``path``; None (logged) if it does not export."""
    try:
        with torch.no_grad():
            program = torch.onnx.export(head.eval(), (torch.randn(2, dim),), dynamo=True, verbose=False,
                                        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}},
                                        input_names=["features"], output_names=["logits"], external_data=False)
        program.save(str(path))
        return path
    except Exception as exc:  # the probe results stand without it
        _not_exported(path, exc)
        return None


def export_heads_onnx(heads: list[tuple[nn.Module, int, Path]]) -> list[Path | None]:
    """Each (head, feature dim, path) as ONNX at its path, in one export call; returns the paths written (None for
    a head that did not export, logged)."""
    if len(heads) < 2:
        return [export_head_onnx(*item) for item in heads]
    try:
        graph = _export_together(heads)
    except Exception as exc:  # e.g. one head the exporter cannot take: the others still get their files
        log.info("the %d heads did not export together (%s: %s); exporting them one by one", len(heads),
                 type(exc).__name__, _first_line(exc))
        return [export_head_onnx(*item) for item in heads]
    written: list[Path | None] = []
    extractor = onnx.utils.Extractor(graph)
    for i, (_, _, path) in enumerate(heads):
        try:
            one = extractor.extract_model([f"features{i}"], [f"logits{i}"])
            _rename(one.graph, {f"features{i}": "features", f"logits{i}": "logits"})
            onnx.save(one, str(path))
            written.append(path)
        except Exception as exc:
            _not_exported(path, exc)
            written.append(None)
    return written


def _export_together(heads: list[tuple[nn.Module, int, Path]]) -> onnx.ModelProto:
    n = len(heads)
    with torch.no_grad():
        program = torch.onnx.export(
            _Heads([head for head, _, _ in heads]).eval(), tuple(torch.randn(2, dim) for _, dim, _ in heads),
            dynamo=True, verbose=False,
            # each head its own batch dimension: the files are used one at a time
            dynamic_shapes=(tuple({0: torch.export.Dim(f"batch{i}", min=1, max=MAX_BATCH)} for i in range(n)),),
            input_names=[f"features{i}" for i in range(n)], output_names=[f"logits{i}" for i in range(n)],
            external_data=False)
    return program.model_proto


def _rename(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    """Rename graph inputs/outputs (and every use of them) per ``names``."""
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(name, name) for name in node.input]
        node.output[:] = [names.get(name, name) for name in node.output]


def _not_exported(path: Path, exc: Exception) -> None:
    log.warning("%s: head not exported to ONNX (%s: %s); profiling will time the backbone alone", path.name,
                type(exc).__name__, _first_line(exc))
    path.unlink(missing_ok=True)


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""
