"""Creating a frozen timm backbone with the right weights and preprocessing.

Weights come, in this order, from the backbone's own ``weights:`` entry, a file or
folder for it in ``--weights-dir``, or the Hugging Face hub through timm; with
``--no-pretrained`` they are random and every output says so. With no network and
no local copy, creation fails within seconds with a message that says what to do —
never a silent fallback to random weights.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from extract.backbones import BackboneSpec
from extract.checkpoints import CheckpointError, load_into
from runtime.errors import UserError

log = logging.getLogger(__name__)

# Random weights are timm's init under this torch seed: the same every run, so a resumed
# or repeated --no-pretrained extraction gives the same features.
RANDOM_INIT_SEED = 0

PARTIAL = ":partial"  # weights-tag suffix of a file loaded with allow_partial
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HF_DIR_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class WeightsError(UserError, RuntimeError):
    """Pretrained weights cannot be had; the message says how to point at local ones."""


@dataclass(frozen=True)
class Weights:
    kind: str  # "hub", "file" or "random"
    location: str | None  # hub id or file path
    tag: str  # what the cache key records

    @property
    def is_random(self) -> bool:
        return self.kind == "random"


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_tag(path: Path) -> str:
    st = path.stat()
    return f"file:{_file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)[:16]}"


def _weights_file(location: Path) -> Path:
    """A weights file given as itself or as a Hugging Face style folder."""
    if location.is_dir():
        for name in HF_DIR_FILES:
            if (location / name).is_file():
                return location / name
        raise WeightsError(f"{location}: a weights folder must hold one of {', '.join(HF_DIR_FILES)}")
    if not location.is_file():
        raise WeightsError(f"{location}: no such weights file")
    return location


def find_in_weights_dir(spec: BackboneSpec, weights_dir: Path) -> Path | None:
    """``DIR/<name|model|architecture>{.safetensors,.pth,.pt,.bin}`` or ``DIR/<...>/`` (HF layout)."""
    for stem in dict.fromkeys((spec.name, spec.model, spec.architecture)):
        for suffix in WEIGHT_SUFFIXES:
            if (weights_dir / f"{stem}{suffix}").is_file():
                return weights_dir / f"{stem}{suffix}"
        if (weights_dir / stem).is_dir():
            return _weights_file(weights_dir / stem)
    return None


def choose_weights(spec: BackboneSpec, *, pretrained: bool, weights_dir: Path | None) -> Weights:
    """Where this backbone's weights come from (no download happens here)."""
    if not pretrained:
        return Weights("random", None, "random")
    location = None
    if spec.weights is not None:
        location = _weights_file(spec.weights)
    elif weights_dir is not None:
        if not weights_dir.is_dir():
            raise WeightsError(f"--weights-dir {weights_dir}: no such folder")
        location = find_in_weights_dir(spec, weights_dir)
        if location is None:
            log.info("%s: no local weights in %s; using the hub", spec.name, weights_dir)
    if location is not None:
        # A partial load is another model than the full one: the tag (and so the cache key) says so.
        return Weights("file", str(location), file_tag(location) + (PARTIAL if spec.allow_partial else ""))
    cfg = timm.models.get_pretrained_cfg(spec.model)
    hub_id = (cfg.hf_hub_id if cfg and cfg.hf_hub_id else spec.model) if cfg else spec.model
    tag = spec.model if "." in spec.model else f"{spec.model}.{cfg.tag}" if cfg and cfg.tag else spec.model
    return Weights("hub", hub_id, f"hub:{tag}")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers within ``timeout`` seconds (DNS and TCP only)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_message(spec: BackboneSpec, weights: Weights, cause: BaseException) -> str:
    return (
        f"Cannot load pretrained weights for {spec.name} ({weights.tag}) from the Hugging Face hub: "
        f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}\n"
        "The hub is unreachable (or HF_HUB_OFFLINE=1) and the weights are not in the local cache. Either:\n"
        f"  * put the weights file in a folder and pass --weights-dir DIR (named {spec.name}.safetensors, "
        f"{spec.architecture}.pth, ... or a folder {spec.name}/ with model.safetensors), or\n"
        f"  * set 'weights: /path/to/file' for this backbone in the backbones YAML, or\n"
        "  * run with --no-pretrained to use random weights (every output will say so)."
    )


def _create(spec: BackboneSpec, weights: Weights, kwargs: dict[str, Any]) -> nn.Module:
    kwargs = dict(kwargs, num_classes=0)
    if weights.kind == "random":
        torch.manual_seed(RANDOM_INIT_SEED)
        return timm.create_model(spec.model, pretrained=False, **kwargs)
    if weights.kind == "file":
        # Any common layout (timm, Lightning, DDP, another port), checked key by key: see extract.checkpoints.
        torch.manual_seed(RANDOM_INIT_SEED)  # what a partial load leaves random is the same every run
        model = timm.create_model(spec.model, pretrained=False, **kwargs)
        try:
            load_into(model, Path(weights.location), allow_partial=weights.tag.endswith(PARTIAL))
        except CheckpointError as exc:
            raise WeightsError(f"{spec.name}: {exc}") from None
        return model
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        # Without this, the hub client retries for about a minute per file before failing.
        log.info("Hugging Face hub unreachable; using only locally cached weights")
        constants.HF_HUB_OFFLINE = True
    try:
        return timm.create_model(spec.model, pretrained=True, **kwargs)
    except (OSError, ConnectionError) as exc:
        raise WeightsError(_offline_message(spec, weights, exc)) from exc


def create_backbone(spec: BackboneSpec, weights: Weights, **extra: Any) -> tuple[nn.Module, list[str]]:
    """The frozen backbone (eval mode, no grad, pooled pre-logits output) and its untrained modules.

    With ``kwargs`` that add modules (CBAM attention, ...), the checkpoint cannot be
    loaded strictly. timm loads it into the plain architecture, then it is copied
    across; whatever that copy misses is untrained, and is reported, never hidden.
    """
    size_kwargs = dict(extra)
    untrained: list[str] = []
    if not spec.kwargs or weights.is_random:
        model = _create(spec, weights, {**spec.kwargs, **size_kwargs})
    else:
        donor = _create(spec, weights, size_kwargs)
        model = _create(spec, Weights("random", None, "random"), {**spec.kwargs, **size_kwargs})
        target = model.state_dict()
        state = {k: v for k, v in donor.state_dict().items() if k in target and target[k].shape == v.shape}
        result = model.load_state_dict(state, strict=False)
        # Report modules, not every weight and bias.
        untrained = sorted({k.rsplit(".", 1)[0] for k in result.missing_keys})
        del donor
    if untrained:
        log.warning("%s: %d module(s) not covered by the pretrained weights are untrained (random): %s",
                    spec.name, len(untrained), ", ".join(untrained[:6]) + (" ..." if len(untrained) > 6 else ""))
    model.eval().requires_grad_(False)
    return model, untrained


def backbone_from_record(*, model: str, name: str, model_kwargs: dict[str, Any] | None, weights_tag: str,
                         weights_location: str | None) -> tuple[BackboneSpec, Weights, dict[str, Any]]:
    """The backbone a cache key or saved head describes: (spec, weights, size kwargs).

    Recorded ``model_kwargs`` are the YAML kwargs plus ``img_size`` for a resized fixed-size
    model; a local weights file must still be the one whose hash the tag records.
    """
    kwargs = dict(model_kwargs or {})
    size_kwargs = {"img_size": kwargs.pop("img_size")} if "img_size" in kwargs else {}
    spec = BackboneSpec(model=model, name=name, kwargs=kwargs)
    if weights_tag == "random":
        weights = Weights("random", None, weights_tag)
    elif weights_tag.startswith("file:"):
        location = Path(weights_location) if weights_location else None
        if location is None or not location.is_file() or file_tag(location) != weights_tag.removesuffix(PARTIAL):
            raise WeightsError(f"{name}: recorded weights {weights_tag} from {location} are missing or have changed; "
                               "point at the file it was made with")
        weights = Weights("file", str(location), weights_tag)
    else:
        weights = Weights("hub", model, weights_tag)
    return spec, weights, size_kwargs


def preprocessing(spec: BackboneSpec, image_size: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """timm's resolved preprocessing for ``spec`` at ``image_size`` as plain data, and the extra
    ``create_model`` kwargs that size needs (``img_size`` for fixed-size models such as ViT and Swin).

    The model is built on the meta device, so this costs milliseconds and no weights.
    """

    def build(**kw: Any) -> nn.Module:
        try:
            with torch.device("meta"):
                return timm.create_model(spec.model, pretrained=False, num_classes=0, **spec.kwargs, **kw)
        except Exception:  # some inits do real arithmetic; fall back to a CPU build
            return timm.create_model(spec.model, pretrained=False, num_classes=0, **spec.kwargs, **kw)

    model = build()
    extra: dict[str, Any] = {}
    default_size = int(timm.data.resolve_model_data_config(model)["input_size"][-1])
    if image_size is not None and image_size != default_size and model.pretrained_cfg.get("fixed_input_size"):
        # Position embeddings / windows are sized at construction; timm resamples pretrained ones.
        extra = {"img_size": int(image_size)}
        model = build(**extra)
    cfg = timm.data.resolve_model_data_config(model)
    if image_size is not None:
        cfg["input_size"] = (3, int(image_size), int(image_size))
    # The backbones file's preprocessing for weights timm's name does not describe (a TF-Lite port: mean = std = 0.5).
    cfg.update(spec.preprocess)
    data_cfg = {
        "input_size": [int(v) for v in cfg["input_size"]],
        "interpolation": str(cfg["interpolation"]),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": str(cfg.get("crop_mode", "center")),
    }
    return data_cfg, extra


def library_versions() -> dict[str, str]:
    import h5py
    import numpy

    return {"torch": torch.__version__, "timm": timm.__version__, "h5py": h5py.__version__,
            "numpy": numpy.__version__, "python": os.sys.version.split()[0]}
