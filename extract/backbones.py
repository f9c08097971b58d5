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
from configs.settings import ConfigError, read_yaml
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


ENTRY_KEYS = {"model", "name", "kwargs", "weights", "preprocess", "allow_partial"}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash", "border")


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise BackboneError(f"{where}: expected true or false, got {value!r}")
    return value


def _triple(value: Any, where: str, positive: bool) -> list[float]:
    values = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if (not isinstance(values, list) or len(values) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            or (positive and min(values) <= 0)):
        raise BackboneError(f"{where}: expected a number or a list of three{' positive' if positive else ''} numbers "
                            f"(R, G, B), got {value!r}")
    return [float(v) for v in values]


def _preprocess(raw: Any, where: str) -> dict[str, Any]:
    """Validated overrides of timm's data config for one backbone's weights."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BackboneError(f"{where}: expected a mapping with mean, std, interpolation, crop_pct, crop_mode")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("mean", "std"):
            out[key] = _triple(value, f"{where}.{key}", positive=key == "std")
        elif key == "interpolation" and value in INTERPOLATIONS:
            out[key] = value
        elif key == "crop_mode" and value in CROP_MODES:
            out[key] = value
        elif key == "crop_pct" and isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1:
            out[key] = float(value)
        elif key in ("interpolation", "crop_mode", "crop_pct"):
            allowed = {"interpolation": f"one of {', '.join(INTERPOLATIONS)}", "crop_mode": f"one of {', '.join(CROP_MODES)}",
                       "crop_pct": "a number in (0, 1]"}[key]
            raise BackboneError(f"{where}.{key}: must be {allowed}, got {value!r}")
        else:
            raise BackboneError(f"{where}: unknown key '{key}'; known: mean, std, interpolation, crop_pct, crop_mode")
    return out


def _spec_from_entry(entry: Any, where: str, base: Path) -> BackboneSpec:
    if isinstance(entry, str):
        return BackboneSpec(model=entry)
    if isinstance(entry, dict):
        unknown = set(entry) - ENTRY_KEYS
        if unknown or "model" not in entry:
            raise BackboneError(f"{where}: an entry needs 'model' and may have {', '.join(sorted(ENTRY_KEYS - {'model'}))}; "
                                f"got {sorted(entry)}")
        weights = entry.get("weights")
        return BackboneSpec(
            model=str(entry["model"]),
            name=str(entry.get("name") or entry["model"]),
            kwargs=dict(entry.get("kwargs") or {}),
            weights=(base / Path(weights).expanduser()) if weights else None,
            preprocess=_preprocess(entry.get("preprocess"), f"{where}.preprocess"),
            allow_partial=_flag(entry.get("allow_partial", False), f"{where}.allow_partial"),
        )
    raise BackboneError(f"{where}: entry {entry!r} is neither a timm name nor a mapping")


def load_sets(path: Path | None = None) -> dict[str, list[BackboneSpec]]:
    """The named sets of a backbones YAML file (the shipped one by default)."""
    path = Path(path) if path else config_file("backbones.yaml")
    try:
        data = read_yaml(path, "backbones file")
    except ConfigError as exc:
        raise BackboneError(str(exc)) from None
    sets = data.get("sets")
    if not isinstance(sets, dict):
        raise BackboneError(f"{path}: expected a top-level 'sets:' mapping of name -> list of backbones")
    return {
        name: [_spec_from_entry(e, f"{path}: sets.{name}[{i}]", path.parent) for i, e in enumerate(entries or [])]
        for name, entries in sets.items()
    }


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
