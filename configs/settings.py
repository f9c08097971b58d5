"""The base of every settings model: pydantic v2, frozen, unknown keys forbidden, errors that name the key.

A command's settings are one :class:`Settings` subclass (``configs/extract.py`` ...): typed fields with
their one default and their range (``Field(ge=1)``), and a description that becomes the flag's help.
:func:`validate` turns pydantic's ``ValidationError`` into a :class:`ConfigError` of one line per
problem, each naming the key where the user wrote it (``probe.bootstrap``, ``--batch-size``,
``configs/my-grid.yaml: heads.linear.lr[2]``).
"""

from __future__ import annotations

import os
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from runtime.errors import UserError

M = TypeVar("M", bound=BaseModel)


class ConfigError(UserError, ValueError):
    """A configuration key or value is wrong; the message names it."""


def is_sequence(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return True
    return any(is_sequence(a) for a in typing.get_args(annotation) if a is not type(None))


class Settings(BaseModel):
    """Frozen (a job can carry it; nothing changes it on the way down), picklable, strict about keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, use_attribute_docstrings=True)

    @field_validator("*", mode="before")
    @classmethod
    def _split_commas(cls, value: Any, info: Any) -> Any:
        # Flags and YAML alike may give a list as "a,b,c" (or several such words after one flag).
        field = cls.model_fields.get(info.field_name)
        if field is None or not is_sequence(field.annotation):
            return value
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and any(isinstance(v, str) and "," in v for v in value):
            value = [part.strip() for v in value for part in (v.split(",") if isinstance(v, str) else [v])
                     if not isinstance(part, str) or part.strip()]
        return value

    @field_validator("workdir", mode="after", check_fields=False)
    @classmethod
    def _workdir_is_a_folder(cls, path: Path) -> Path:
        if path.exists() and not path.is_dir():
            raise ValueError("is a file, not a folder; give a folder (it is created if missing)")
        return path

    def plain(self) -> dict[str, Any]:
        """As YAML/JSON-friendly data (paths as strings, tuples as lists)."""
        return self.model_dump(mode="json")


class CommandSettings(Settings):
    """What every command's settings have: the workdir, and how HDF5 may lock files there."""

    workdir: Path = Field(Path("runs/default"), description="where every stage reads and writes")
    hdf5_locking: bool = Field(True, description="HDF5's own file locking; --no-hdf5-locking on file systems "
                               "where it fails (Lustre, some NFS): the project's own locks still keep two "
                               "processes apart")
    mlflow: str | None = Field(None, description="also log the settings, metrics and artifacts to this MLflow "
                               "tracking URI (file:///path/mlruns, http://host:5000, sqlite:///mlflow.db); config "
                               "file: this key or the top-level 'tracking: {mlflow_uri: ...}'",
                               json_schema_extra={"default_text": "off"})

    def apply_environment(self) -> None:
        """Set what the libraries read from the environment (HDF5 reads HDF5_USE_FILE_LOCKING at each open)."""
        if not self.hdf5_locking:
            os.environ["HDF5_USE_FILE_LOCKING"] = "FALSE"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds, directly or as the items of a list or mapping (``list[Entry] | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for arg in typing.get_args(annotation) if (m := _model_in(arg)) is not None), None)


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that a location's last key belongs to; list indices and mapping keys on the way are skipped."""
    at: type[BaseModel] | None = model
    for part in loc:
        if at is not None and isinstance(part, str) and part in at.model_fields:
            at = _model_in(at.model_fields[part].annotation)
    return at


def error_lines(exc: ValidationError, name: Callable[[tuple[Any, ...]], str], known: Any = None) -> str:
    """pydantic's errors as ``KEY: message (got VALUE)``, one per line; ``name`` spells a location.

    ``known`` (the model) lets an unknown key list the known ones of the mapping it was found in.
    """
    lines = []
    for err in exc.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ")
        got = "" if err["type"] in ("missing", "extra_forbidden") or not err["loc"] else f" (got {err['input']!r})"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            if known is not None and (where := _model_at(known, tuple(err["loc"][:-1]))) is not None:
                msg += f"; known: {', '.join(f.alias or n for n, f in where.model_fields.items())}"
        elif err["type"] == "missing":
            msg = "required"
        key = name(tuple(err["loc"]))
        lines.append(f"{key}{' ' if key.endswith(':') else ': '}{msg}{got}")
    return "\n".join(lines)


def dotted(prefix: str) -> Callable[[tuple[Any, ...]], str]:
    """Locations as ``prefix.a.b[2]``."""

    def name(loc: tuple[Any, ...]) -> str:
        out = prefix
        for part in loc:
            if part == "[key]":  # pydantic's mark of a mapping's key (not its value): the key itself names it
                continue
            if isinstance(part, int):
                out += f"[{part}]"
            else:
                out += str(part) if not out else f" {part}" if out.endswith(":") else f".{part}"
        return out

    return name


def validate(model: type[M], data: Mapping[str, Any], where: str = "") -> M:
    """``model`` from ``data``, or a :class:`ConfigError` whose lines name each bad key under ``where``."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(error_lines(exc, dotted(where), known=model)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (not last-one-wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key '{key}' given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    """A YAML mapping from ``path``; a missing, unreadable, non-UTF-8 or non-mapping file, or a key given twice,
    is a :class:`ConfigError`."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the {what} as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the {what} must be a mapping of keys, got {type(data).__name__}")
    return data
