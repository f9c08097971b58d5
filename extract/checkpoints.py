"""Local weights files in any common layout, loaded into a timm backbone — or refused, with a report.

Users bring weights from timm, torchvision, a Lightning ``.ckpt``, a DDP run
(``module.``), their own training code, or another port of the same architecture.
A file is turned into the timm model's state dict in four documented steps:

1. **Unwrap** the container: a Lightning/trainer checkpoint keeps the weights under
   ``state_dict``, ``model``, ``model_state_dict`` or ``module``; non-tensor entries go.
2. **Strip the prefix** the training code added (``module.``, ``model.``,
   ``model.backbone.``, ``encoder.`` ...): the prefix under which most keys name a
   parameter of the model; keys outside it (a Lightning module's own head, loss buffers)
   are reported as ignored.
3. **timm's own checkpoint filter** for the architecture (``checkpoint_filter_fn`` of the
   model's module: position-embedding resampling, converted layouts), as timm applies it.
4. **Positional mapping** when the names still do not match but the file holds the
   same tensors in the same order with the same shapes as the model — another port of
   the same architecture (for example the TF-Lite EfficientNet-Lite ports, whose keys
   are ``_conv_stem``, ``_blocks.0._depthwise_conv`` ...). It is logged as a warning.

Then the classifier is dropped (the backbone has none) and every remaining backbone
parameter must have been found: a partial load is refused with the list of missing and
unexpected keys unless the backbone entry says ``allow_partial: true`` (the weights
tag then records it, so a cache of a partial load is never mistaken for a full one).
"""

from __future__ import annotations

import logging
import pickle
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runtime.errors import UserError

log = logging.getLogger(__name__)

CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")


class CheckpointError(UserError, RuntimeError):
    """A weights file cannot be loaded into the model; the message says which keys and what to do."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (safetensors or a weights-only torch pickle), unwrapped (step 1)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable weights file ({first[:200]}). Weights must be a safetensors "
                              "file or a torch state dict that loads with weights_only=True (no pickled code).") from None
    return unwrap(raw, where=str(path))


def unwrap(raw: Any, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint (step 1)."""
    for _ in range(3):
        if not isinstance(raw, dict):
            break
        tensors = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(raw) // 2:
            return tensors
        inner = next((raw[k] for k in CONTAINER_KEYS if isinstance(raw.get(k), dict)), None)
        if inner is None:
            break
        raw = inner
    raise CheckpointError(f"{where}: holds no state dict of tensors (looked at the top level and under "
                          f"{', '.join(CONTAINER_KEYS)})")


def strip_prefix(state: dict[str, torch.Tensor], model_keys: set[str]) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Step 2: the prefix under which most keys name a model parameter; returns (state, prefix, ignored keys)."""
    votes: Counter[str] = Counter()
    for key in state:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in model_keys:
                votes[".".join(parts[:i]) + ("." if i else "")] += 1
                break
    if not votes:
        return state, "", []
    prefix, count = max(votes.items(), key=lambda kv: (kv[1], -len(kv[0])))
    if not prefix or count <= votes.get("", 0):
        return state, "", []
    kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    ignored = [k for k in state if not k.startswith(prefix)]
    return kept, prefix, ignored


def _timm_filter(model: nn.Module) -> Any:
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def _skip(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def positional_map(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Step 4: the file's tensors renamed by position, if they match the reference one-to-one in shape."""
    src = [(k, v) for k, v in state.items() if not _skip(k)]
    dst = [(k, v) for k, v in reference.items() if not _skip(k)]
    if len(src) != len(dst) or any(tuple(a.shape) != tuple(b.shape) for (_, a), (_, b) in zip(src, dst)):
        return None
    return {kd: vs for (_, vs), (kd, _) in zip(src, dst)}


def _classifier_keys(model: nn.Module, keys: set[str]) -> set[str]:
    names = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    names = (names,) if isinstance(names, str) else tuple(names or ())
    return {k for k in keys if any(k.startswith(n + ".") for n in names)}


def _brief(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


_POSITIONAL_REPORTED: set[Path] = set()


def load_into(model: nn.Module, path: Path, *, allow_partial: bool = False) -> dict[str, Any]:
    """Load the weights file at ``path`` into the timm ``model`` (built with ``num_classes=0``).

    ``model`` must be a timm model with its classifier reset; returns a small report
    (prefix stripped, ignored keys, positional mapping, missing keys).
    """
    path = Path(path)
    full = _reference_with_classifier(model)
    state = read_state_dict(path)
    state, prefix, ignored = strip_prefix(state, set(full))
    report: dict[str, Any] = {"prefix": prefix, "ignored": ignored, "positional": False, "missing": []}
    if prefix:
        log.info("%s: stripped the key prefix '%s'%s", path.name, prefix,
                 f"; ignored {len(ignored)} key(s) outside it: {_brief(ignored)}" if ignored else "")
    filter_fn = _timm_filter(model)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as exc:  # a filter written for another layout: the checks below decide
            log.debug("timm's checkpoint filter for %s failed (%s); using the file's keys as they are",
                      type(model).__name__, exc)
    matched = len(set(state) & set(full))
    if matched < len([k for k in full if not _skip(k)]) // 2:
        mapped = positional_map(state, full)
        if mapped is not None:
            # stage two loads the same file several times (trial, test, export, Grad-CAM): say it once
            level = logging.DEBUG if path in _POSITIONAL_REPORTED else logging.WARNING
            _POSITIONAL_REPORTED.add(path)
            log.log(level, "%s: its key names do not match %s, but its %d tensors match the model's one-to-one in "
                    "order and shape (another port of the same architecture); loaded by position",
                    path.name, type(model).__name__, len(mapped))
            state, report["positional"] = mapped, True
    own = model.state_dict()
    classifier = _classifier_keys(model, set(state) | set(full))
    state = {k: v for k, v in state.items() if k not in classifier}
    unexpected = sorted(k for k in state if k not in own)
    wrong_shape = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    missing = sorted(k for k in own if k not in state and not _skip(k))
    report["missing"] = missing
    if wrong_shape:
        raise CheckpointError(f"{path}: {len(wrong_shape)} tensor(s) have other shapes than {type(model).__name__}'s: "
                              + "; ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_shape[:4])
                              + ". Is it the weights of another model (or another size of it)?")
    if (missing or unexpected) and not allow_partial:
        raise CheckpointError(
            f"{path}: does not fit {type(model).__name__}: {len(missing)} of its {len(own)} tensors are missing "
            f"from the file ({_brief(missing) or 'none'}), {len(unexpected)} in the file are unexpected "
            f"({_brief(unexpected) or 'none'}). Point at the weights of this architecture, or set "
            "'allow_partial: true' for this backbone in the backbones file to keep the missing ones random.")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if missing:
        log.warning("%s: partial load allowed; %d tensor(s) stay random: %s", path.name, len(missing), _brief(missing))
    return report


def _reference_with_classifier(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with its original classifier (shapes only matter): the order a file follows."""
    import timm

    name = getattr(model, "pretrained_cfg", {}).get("architecture")
    if not name:
        return model.state_dict()
    try:
        with torch.device("meta"):
            ref = timm.create_model(name, pretrained=False, **_size_kwargs(model))
        return ref.state_dict()
    except Exception:
        return model.state_dict()


def _size_kwargs(model: nn.Module) -> dict[str, Any]:
    grid = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return {"img_size": grid} if grid is not None else {}
