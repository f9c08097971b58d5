"""Which backbones to run: named sets from ``configs/backbones.yaml``, timm names and patterns."""

from __future__ import annotations

import difflib
import fnmatch
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm

from configs import config_file
from configs.backbones import BackboneEntry, BackbonesFile
from configs.settings import ConfigError, read_yaml, validate
from runtime.errors import UserError

log = logging.getLogger(__name__)


class BackboneError(UserError, ValueError):
    """A backbone name or set cannot be resolved; the message suggests what to use."""


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: a timm model (with pretrained tag), optional create_model kwargs and weights."""

    model: str
    name: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    weights: Path | None = None
    # Overrides of timm's data config for these weights (mean, std, interpolation, crop_pct, crop_mode).
    preprocess: dict[str, Any] = field(default_factory=dict, hash=False)
    allow_partial: bool = False  # load a weights file that misses some tensors (they stay random)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.model)

    @property
    def architecture(self) -> str:
        return self.model.split(".", 1)[0]


def _spec(entry: BackboneEntry, base: Path) -> BackboneSpec:
    preprocess = entry.preprocess.model_dump(mode="json", exclude_none=True) if entry.preprocess else {}
    return BackboneSpec(model=entry.model, name=entry.name or entry.model, kwargs=dict(entry.kwargs or {}),
                        weights=base / entry.weights.expanduser() if entry.weights else None,
                        preprocess=preprocess, allow_partial=entry.allow_partial)


def load_sets(path: Path | None = None) -> dict[str, list[BackboneSpec]]:
    """The named sets of a backbones YAML file (the shipped one by default)."""
    path = Path(path) if path else config_file("backbones.yaml")
    try:
        sets = validate(BackbonesFile, read_yaml(path, "backbones file"), f"{path}:").sets
    except ConfigError as exc:
        raise BackboneError(str(exc)) from None
    return {name: [_spec(e, path.parent) for e in entries or []] for name, entries in sets.items()}


def _suggest(name: str) -> str:
    arch = name.split(".", 1)[0]
    pool = timm.list_models() if "." not in name else timm.list_pretrained()
    close = difflib.get_close_matches(name if "." in name else arch, pool, n=5, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models() for the names."


def _check_timm_name(name: str) -> None:
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise BackboneError(f"unknown backbone '{name}': not a timm model or a set in the backbones file.{_suggest(name)}")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")]
        raise BackboneError(f"unknown pretrained tag '{tag}' for {arch}. Known tags: {', '.join(tags) or 'none'}")


def resolve_backbones(selection: list[str], *, sets: dict[str, list[BackboneSpec]]) -> list[BackboneSpec]:
    """Expand set names, timm names (``resnet50.a1_in1k``) and patterns (``convnext_*``), in order."""
    if not selection:
        raise BackboneError("no backbones selected; pass --backbones (a set such as 'all' or 'demo', timm names, or patterns)")
    out: dict[str, BackboneSpec] = {}
    for item in selection:
        if item in sets:
            specs = sets[item]
        elif any(ch in item for ch in "*?["):
            known = [s for group in sets.values() for s in group if fnmatch.fnmatch(s.name, item)]
            names = timm.list_pretrained(item) if "." in item else timm.list_models(item)
            specs = known + [BackboneSpec(model=n) for n in names]
            if not specs:
                raise BackboneError(f"pattern '{item}' matches no timm model")
            if len(specs) > 20:
                log.warning("pattern '%s' matches %d models", item, len(specs))
        else:
            _check_timm_name(item)
            specs = [BackboneSpec(model=item)]
        for spec in specs:
            out.setdefault(spec.name, spec)
    return list(out.values())
