"""The configuration mechanism every command shares.

Typed defaults (a dataclass), then a YAML file (``--config``), then command-line
flags. An unknown key or a badly typed value is a :class:`ConfigError` that names
the key. The resolved settings are written into the workdir's ``config.yaml``,
one section per command, next to the results they produced.

A config file has one section per command; ``workdir`` may also stand at the top
level, where it applies to every command::

    workdir: runs/digits
    extract:
      data: demo
      backbones: [demo]
    probe:
      metric: macro_f1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

COMMANDS = ("extract", "probe", "profiling", "finetune")
SHARED_TOP_LEVEL = ("workdir",)

S = TypeVar("S")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, *, key: str) -> Any:
    """Convert ``value`` (from YAML or a flag) to the annotated type ``tp``, or raise naming ``key``."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key=key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            # Flags and YAML alike may give a comma-separated string.
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(v, inner, key=f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise bad
    raise TypeError(f"unsupported settings type {tp!r} for {key}")


def _hints(settings_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(settings_cls)


def read_config_file(path: Path, section: str, settings_cls: type) -> dict[str, Any]:
    """The values that ``path`` sets for ``section``, checked against ``settings_cls``."""
    if not path.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {', '.join(COMMANDS)}")
    for key in data:
        if key not in COMMANDS and key not in SHARED_TOP_LEVEL:
            raise ConfigError(
                f"{path}: unknown top-level key '{key}'. Allowed: sections "
                f"{', '.join(COMMANDS)} and {', '.join(SHARED_TOP_LEVEL)}."
            )
    hints = _hints(settings_cls)
    values: dict[str, Any] = {}
    for key in SHARED_TOP_LEVEL:
        if key in data and key in hints:
            values[key] = coerce(data[key], hints[key], key=key)
    body = data.get(section) or {}
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: section '{section}' must be a mapping")
    for key, value in body.items():
        if key not in hints:
            raise ConfigError(
                f"{path}: unknown key '{section}.{key}'. Known keys: {', '.join(sorted(hints))}"
            )
        values[key] = coerce(value, hints[key], key=f"{section}.{key}")
    return values


def resolve(
    settings_cls: type[S],
    *,
    section: str,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> S:
    """Defaults, then ``config_file``'s section, then ``overrides`` (the flags that were given)."""
    hints = _hints(settings_cls)
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(read_config_file(Path(config_file), section, settings_cls))
    for key, value in (overrides or {}).items():
        if key not in hints:
            raise ConfigError(f"unknown option '{key}'")
        values[key] = coerce(value, hints[key], key="--" + key.replace("_", "-"))
    return settings_cls(**values)


def to_plain(settings: Any) -> dict[str, Any]:
    """Settings as YAML-friendly plain data (paths become strings)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {f.name: plain(getattr(settings, f.name)) for f in dataclasses.fields(settings)}


def write_resolved(workdir: Path, section: str, settings: Any) -> Path:
    """Record ``settings`` as ``section`` of ``workdir/config.yaml``, keeping the other sections."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    existing: dict[str, Any] = {}
    if path.is_file():
        try:
            existing = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            existing = {}
    existing[section] = to_plain(settings)
    atomic_write_text(path, yaml.safe_dump(existing, sort_keys=False))
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` so that a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def document_defaults(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """Append each setting's typed default to its flag's help text."""
    names = {f.name for f in dataclasses.fields(defaults)}
    for action in parser._actions:  # argparse has no public accessor for this
        if action.nargs == 0:  # on/off switches: the flag itself says what it changes
            continue
        if action.dest in names and action.help and action.help is not argparse.SUPPRESS:
            value = getattr(defaults, action.dest)
            if isinstance(value, list):
                value = " ".join(str(v) for v in value) or "none"
            action.help = f"{action.help} (default: {value})".replace("%", "%%")


def given_flags(namespace: argparse.Namespace, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The flags the user actually gave (parsers use ``argument_default=SUPPRESS``)."""
    return {k: v for k, v in vars(namespace).items() if k not in exclude}


_COMMON = ("config", "verbose", "quiet")


def add_common_flags(parser: argparse.ArgumentParser, section: str) -> None:
    """--config, -v and -q, the same for every command."""
    parser.add_argument("--config", type=Path, help=f"YAML file with a '{section}:' section; flags override it")
    parser.add_argument("-v", "--verbose", action="count", help="more log output")
    parser.add_argument("-q", "--quiet", action="count", help="less log output")


def verbosity(namespace: argparse.Namespace) -> int:
    return getattr(namespace, "verbose", 0) - getattr(namespace, "quiet", 0)


def settings_from_args(namespace: argparse.Namespace, settings_cls: type[S], section: str) -> S:
    """Defaults, then ``--config``'s section, then the given flags; recorded in the workdir."""
    settings = resolve(settings_cls, section=section, config_file=getattr(namespace, "config", None),
                       overrides=given_flags(namespace, exclude=_COMMON))
    write_resolved(settings.workdir, section, settings)
    return settings
