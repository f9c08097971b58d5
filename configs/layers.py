"""Settings from three layers: the model's typed defaults, then a ``--config`` file, then flags.

A config file has one section per command; ``workdir`` may also stand at the top level, where it
applies to every command, and so may ``executor:``, the Slurm parameters of every command that runs
jobs (``configs/executor.py``; a command's own ``slurm:`` overrides its keys), and ``tracking:
{mlflow_uri: ...}``, every command's ``mlflow``::

    workdir: runs/digits
    executor: {partition: cpu, time: 60}
    extract:
      data: demo
      backbones: [demo]
      executor: slurm
    probe:
      metric: macro_f1

The resolved settings are recorded in the workdir's ``config.yaml`` (one section per command) only
after the command succeeded, so the record always describes results that exist.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from configs.settings import ConfigError, Settings, error_lines, read_yaml
from runtime.files import atomic_write_text
from runtime.locks import exclusive

log = logging.getLogger(__name__)

COMMANDS = ("extract", "probe", "profiling", "finetune")
SHARED_TOP_LEVEL = ("workdir", "executor", "tracking")

S = TypeVar("S", bound=Settings)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def file_section(path: Path, section: str, runs_jobs: bool = False) -> dict[str, Any]:
    """What ``path`` sets for ``section`` (with a top-level ``workdir``, and for a command that ``runs_jobs`` the
    top-level ``executor`` as its ``slurm``); unknown top-level keys are errors."""
    data = read_yaml(path, "config file")
    for key in data:
        if key not in COMMANDS and key not in SHARED_TOP_LEVEL:
            raise ConfigError(f"{path}: unknown top-level key '{key}'; allowed: the sections "
                              f"{', '.join(COMMANDS)} and {', '.join(SHARED_TOP_LEVEL)}")
    body = data.get(section) or {}
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: section '{section}' must be a mapping of keys")
    shared = {"workdir": data["workdir"]} if "workdir" in data else {}
    if "tracking" in data:
        tracking = data["tracking"]
        if not isinstance(tracking, dict) or set(tracking) - {"mlflow_uri"}:
            raise ConfigError(f"{path}: tracking: a mapping with one key, mlflow_uri (e.g. "
                              "{mlflow_uri: file:///data/mlruns}); got " + repr(tracking))
        shared["mlflow"] = tracking.get("mlflow_uri")
    if "executor" in data and runs_jobs:
        top = data["executor"] or {}
        if not isinstance(top, dict):
            raise ConfigError(f"{path}: the top-level 'executor' is a mapping of Slurm parameters (partition, time, "
                              "...); choose where a command runs with its own 'executor: slurm'")
        own = body.get("slurm") or {}
        body = {**body, "slurm": {**top, **own} if isinstance(own, dict) else own}
    return {**shared, **body}


def resolve(model: type[S], section: str, config_file: Path | None = None,
            flags: Mapping[str, Any] | None = None) -> S:
    """Defaults, then ``config_file``'s ``section``, then ``flags`` (only those given); errors name their source."""
    from_file = (file_section(Path(config_file), section, runs_jobs="slurm" in model.model_fields)
                 if config_file is not None else {})
    flags = dict(flags or {})
    try:
        return model.model_validate({**from_file, **flags})
    except ValidationError as exc:

        def name(loc: tuple[Any, ...]) -> str:
            if not loc:
                return f"{config_file}: {section}" if config_file else section
            head = str(loc[0])
            rest = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
            if head in flags:
                return flag_name(head) + rest
            where = f"{config_file}: " if head in from_file else ""
            return f"{where}{section}.{head}{rest}"

        text = error_lines(exc, name, known=model)
        # A required setting can come from either layer: say both.
        text = "\n".join(line + (f" (give {flag_name(line.split('.', 1)[1].split(':')[0])} or set it in the "
                                 f"--config file)" if line.endswith(": required") else "")
                         for line in text.splitlines())
        raise ConfigError(text) from None


def write_resolved(workdir: Path, section: str, settings: Settings) -> Path:
    """Record ``settings`` as ``section`` of ``workdir/config.yaml``, keeping the other commands' sections."""
    path = Path(workdir) / "config.yaml"
    with exclusive(workdir, "config", wait=True):  # read-modify-write: another command may record its section
        existing: Any = {}
        if path.is_file():
            try:
                existing = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (yaml.YAMLError, UnicodeDecodeError):
                existing = None
            if not isinstance(existing, dict):  # a record edited by hand: this run's section is still recorded
                log.warning("%s was not a YAML mapping of command sections; rewritten with the %s section only",
                            path, section)
                existing = {}
        existing[section] = settings.plain()
        atomic_write_text(path, yaml.safe_dump(existing, sort_keys=False))
    return path
