"""The model a fine-tune trains: the cached backbone plus the head stage one chose, and its checkpoints.

A checkpoint is a dict of tensors and plain values (``torch.load(..., weights_only=True)``):
the backbone's state, the head in the probe's own head format, and the backbone's
record (model, weights, kwargs, preprocessing, classes), so it reloads anywhere.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cache.schema import safe_name
from configs.probe import HeadConfig, load_grid
from extract.models import WeightsError, backbone_from_record, create_backbone
from finetune.data import FinetuneData
from probe.classifier import ProbeClassifier, load_head
from probe.heads import build_head, head_checkpoint, head_from_checkpoint
from probe.train import Examples, Fit, feature_stats, train_grid
from runtime.errors import UserError
from runtime.files import save_torch

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
RECORD_KEYS = ("backbone", "model", "model_kwargs", "weights", "weights_location", "image_size", "data_config", "classes")
# timm's create_model and nn.Linear's init draw from the global RNG; trials running in threads take turns.
_BUILD_LOCK = threading.Lock()


@dataclass
class Target:
    """One backbone x resolution chosen for stage two, as stage one recorded it."""

    record: dict[str, Any]  # RECORD_KEYS
    cache: Path
    head_file: Path | None
    probe: dict[str, Any] = field(default_factory=dict)  # the probe's leaderboard entry

    @property
    def name(self) -> str:
        return f"{self.record['backbone']}@{self.record['image_size']}"

    @property
    def slug(self) -> str:
        """``name`` safe for a file name (hub names have slashes); the ``@`` stays, as in the cache files."""
        return f"{safe_name(self.record['backbone'])}@{self.record['image_size']}"

    @property
    def data_config(self) -> dict[str, Any]:
        return self.record["data_config"]


class ProbeHeadError(UserError, FileNotFoundError):
    """The probe head a fine-tune starts from is missing or unreadable: the workdir's problem, not a trial's."""


def probe_head(target: Target) -> tuple[nn.Module, dict[str, Any]]:
    """The head stage one chose for ``target``, and its checkpoint."""
    if target.head_file is None or not Path(target.head_file).is_file():
        raise ProbeHeadError(f"{target.name}: the probe head {target.head_file} is missing; run `python -m probe` "
                             "again, or use --head random")
    return load_head(target.head_file)


def _backbone(record: dict[str, Any], **extra: Any) -> nn.Module:
    tuning, weights, size_kwargs = backbone_from_record(
        model=record["model"], name=record["backbone"], model_kwargs=record.get("model_kwargs"),
        weights_tag=record["weights"], weights_location=record.get("weights_location"))
    try:
        model, _ = create_backbone(tuning, weights, **size_kwargs, **extra)
    except TypeError as exc:  # e.g. VGG has no drop_path_rate
        if "drop_path_rate" not in str(exc):
            raise
        extra.pop("drop_path_rate", None)
        log.info("%s has no stochastic depth; drop_path_rate ignored", record["backbone"])
        model, _ = create_backbone(tuning, weights, **size_kwargs, **extra)
    return model


def random_linear_head(features: np.ndarray, num_classes: int, seed: int) -> tuple[nn.Module, HeadConfig]:
    """A freshly initialised linear head with the probe's standardisation (train statistics)."""
    config = HeadConfig(type="linear")
    mean, std = feature_stats(torch.as_tensor(features, dtype=torch.float32), standardize=True)
    torch.manual_seed(seed)
    return build_head(config, features.shape[1], num_classes, mean, std), config


def linear_probe_head(data: FinetuneData, metric: str, seed: int) -> tuple[nn.Module, HeadConfig]:
    """The probe's default linear head, trained on the cached features (about a second): the start when
    the probe chose a head without weights (kNN)."""
    grid = load_grid()
    config = grid.default if grid.default.type == "linear" else HeadConfig(type="linear")
    # float32 whatever the grid file's precision: bfloat16 would save nothing on one head, and the fine-tune's
    # start — to which its result is sensitive — would depend on whether the CPU has bfloat16.
    options = grid.train.model_copy(update={"precision": "float32"})
    (trained,) = train_grid([config], Examples(data.train_features, data.train_labels),
                            Examples(data.val_features, data.val_labels), len(data.classes),
                            Fit(metric=metric, options=options, seed=seed))
    return trained.head, config


def build_classifier(target: Target, *, head_init: str, data: FinetuneData, metric: str = "macro_f1",
                     drop_rate: float = 0.0, drop_path_rate: float = 0.0, seed: int = 0
                     ) -> tuple[ProbeClassifier, HeadConfig, str]:
    """Backbone (frozen, eval) + head: the probe's chosen head, or a random linear one.

    Returns the classifier, the head's config and where the head came from.
    """
    num_classes = len(target.record["classes"])
    with _BUILD_LOCK:
        backbone = _backbone(target.record, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        source = "random"
        head = config = None
        if head_init == "probe":
            head, ckpt = probe_head(target)
            config = HeadConfig.model_validate(ckpt["config"])
            if config.trainable:
                source = f"probe ({config.name})"
            else:
                log.info("%s: the probe chose %s, which has no weights to fine-tune; starting from the probe's "
                         "default linear head, trained on the cache", target.name, config.name)
                head, config = linear_probe_head(data, metric, seed)
                source = f"linear probe ({config.name}; the probe chose {ckpt['config']['type']})"
        if head is None:
            head, config = random_linear_head(data.train_features, num_classes, seed)
    return ProbeClassifier(backbone, head.train()), config, source


def save_checkpoint(path: Path, model: ProbeClassifier, head_config: HeadConfig, *, record: dict[str, Any],
                    info: dict[str, Any]) -> Path:
    """Atomically write a weights-only checkpoint of backbone + head."""
    head = model.head
    dim = head.in_features
    ckpt = {"format": CHECKPOINT_FORMAT, "record": dict(record),
            "backbone_state": {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()},
            "head": head_checkpoint(head, head_config, dim=dim, num_classes=len(record["classes"]), info={}),
            **info}
    return save_torch(ckpt, path)


def load_checkpoint(path: Path, *, exportable: bool = False) -> tuple[ProbeClassifier, dict[str, Any]]:
    """A fine-tuned classifier (eval mode) from :func:`save_checkpoint`'s file."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path}: checkpoint format {ckpt.get('format')!r}, this version reads format "
                           f"{CHECKPOINT_FORMAT}; run `python -m finetune --restart` to train it again")
    extra = {"exportable": True} if exportable else {}
    with _BUILD_LOCK:
        backbone = _backbone(ckpt["record"], **extra)
    backbone.load_state_dict(ckpt["backbone_state"])
    head = head_from_checkpoint(ckpt["head"], f"{path} (its head)")
    return ProbeClassifier(backbone, head).eval(), ckpt
