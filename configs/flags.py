"""A command's flags generated from its settings model: every option once, with its one default and range.

Each field of the model becomes ``--field-name`` (booleans ``--x/--no-x``; lists take several words
or a comma-separated one). Values are passed to the model as given, so a bad value gets pydantic's
message naming the flag. A field's help is its description, then its range and default, taken from
the model, so the help and the model cannot disagree. A mistyped flag gets the closest real one.
"""

from __future__ import annotations

import argparse
import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
from pydantic.fields import FieldInfo

from configs.layers import flag_name
from configs.settings import Settings, is_sequence

COMMON = ("config", "verbose", "quiet")


class SuggestingParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that answers an unknown flag with the closest known one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.flags: list[str] = []  # before super(): it adds --help
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.flags += [s for s in action.option_strings if s.startswith("--")]
        return action

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        namespace, extra = self.parse_known_args(args, namespace)
        if extra:
            unknown = next((e for e in extra if e.startswith("-")), extra[0])
            close = difflib.get_close_matches(unknown.split("=")[0], self.flags, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f"; see {self.prog} --help"
            self.error(f"unrecognized argument {unknown}{hint}")
        return namespace


def _plain(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return " ".join(_show(v) for v in value)
    return str(value)


def _range(field: FieldInfo) -> str:
    bounds = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
    parts = [f"{sign} {getattr(m, attr)}" for m in field.metadata for attr, sign in bounds
             if isinstance(m, annotated_types.BaseMetadata) and hasattr(m, attr)]
    return ", ".join(parts)


def default_text(field: FieldInfo) -> str | None:
    """The default as the help shows it; ``None`` when the description already says what unset means."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "default_text" in extra:
        return str(extra["default_text"])
    if field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    if value is None or value == [] or value == ():
        return None
    return _show(value)


def help_text(field: FieldInfo) -> str:
    text = (field.description or "").strip()
    notes = []
    if field.is_required():
        notes.append("required")
    if rng := _range(field):
        notes.append(rng)
    if (shown := default_text(field)) is not None:
        notes.append(f"default: {shown}")
    return f"{text} ({'; '.join(notes)})".replace("%", "%%") if notes else text.replace("%", "%%")


def has_flag(field: FieldInfo) -> bool:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return extra.get("flag", True) is not False


def build_parser(model: type[Settings], prog: str, description: str) -> SuggestingParser:
    """Flags for every field of ``model`` (given flags only: unset ones stay out of the namespace)."""
    parser = SuggestingParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    for name, field in model.model_fields.items():
        if not has_flag(field):
            continue
        tp = _plain(field.annotation)
        kwargs: dict[str, Any] = {"dest": name, "help": help_text(field)}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if is_sequence(tp):
                kwargs["nargs"] = "+"
                (tp, *_) = typing.get_args(tp) or (str,)
            if typing.get_origin(tp) is Annotated:
                tp = typing.get_args(tp)[0]
            if typing.get_origin(tp) is Literal:
                kwargs["choices"] = [str(c) for c in typing.get_args(tp)]
            kwargs["metavar"] = {int: "N", float: "X", Path: "PATH"}.get(tp, kwargs.get("metavar"))
            if "choices" in kwargs:
                kwargs.pop("metavar")
        parser.add_argument(flag_name(name), **kwargs)
    section = prog.split()[-1]
    parser.add_argument("--config", type=Path, metavar="FILE", default=None, help=f"YAML file whose '{section}:' section (and "
                        "top-level 'workdir') sets any of these options; flags override it")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    return parser


def given(namespace: argparse.Namespace) -> dict[str, Any]:
    """The settings the user gave as flags (without --config, -v, -q)."""
    return {k: v for k, v in vars(namespace).items() if k not in COMMON}


def verbosity(namespace: argparse.Namespace) -> int:
    return namespace.verbose - namespace.quiet
