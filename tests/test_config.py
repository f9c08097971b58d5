"""Settings: defaults, then a config file, then flags; errors that name the key; help generated from the models."""

from __future__ import annotations

import ast
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from configs import config_file
from configs.extract import ExtractSettings
from configs.finetune import FinetuneSettings, load_tuning
from configs.flags import default_text, has_flag
from configs.layers import resolve, write_resolved
from configs.probe import ProbeSettings, load_grid
from configs.profiling import ProfilingSettings
from configs.settings import ConfigError
from extract.cli import build_parser, main
from finetune.cli import build_parser as finetune_parser
from probe.cli import build_parser as probe_parser
from profiling.cli import build_parser as profiling_parser

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "extract": (ExtractSettings, build_parser),
    "probe": (ProbeSettings, probe_parser),
    "profiling": (ProfilingSettings, profiling_parser),
    "finetune": (FinetuneSettings, finetune_parser),
}


def flags(parser, argv: list[str]) -> dict:
    args = parser.parse_args(argv)
    return {k: v for k, v in vars(args).items() if k not in ("config", "verbose", "quiet")}


def test_defaults_then_file_then_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("workdir: runs/exp\nextract:\n  data: demo\n  batch_size: 16\n  backbones: [tiny]\n"
                   "  image_size: [96, 128]\n")
    s = resolve(ExtractSettings, "extract", cfg, flags(build_parser(), ["--batch-size", "4"]))
    assert s.batch_size == 4  # flag beats file
    assert s.backbones == ("tiny",)  # file beats default
    assert s.image_size == (96, 128)
    assert s.workdir == Path("runs/exp")  # top-level shared key
    assert s.dtype == "float16"  # default


def test_comma_separated_and_repeated_list_flags() -> None:
    s = resolve(ExtractSettings, "extract", None,
                flags(build_parser(), ["--data", "demo", "--backbones", "demo,resnet18.a1_in1k", "convnext_*"]))
    assert s.backbones == ("demo", "resnet18.a1_in1k", "convnext_*")


def test_shipped_experiment_loads_for_every_command() -> None:
    """Configs written for the previous version still load (configs/demo.yaml is one)."""
    demo = config_file("demo.yaml")
    for section, (model, _) in COMMANDS.items():
        s = resolve(model, section, demo)
        assert s.workdir == Path("runs/demo")
    tuning = load_tuning(None, resolve(FinetuneSettings, "finetune", demo).overlay())
    assert tuning.train.epochs == 3 and tuning.augment.hflip == 0.0


# ----------------------------------------------------------------------------- errors name the key


@pytest.mark.parametrize("section, body, key", [
    ("extract", "extract: {data: demo, batch_sise: 16}", "extract.batch_sise: unknown key"),
    ("extract", "extract: {data: demo, batch_size: many}", "extract.batch_size: Input should be a valid integer"),
    ("extract", "extract: {data: demo, batch_size: 0}", "extract.batch_size: Input should be greater than or equal to 1"),
    ("extract", "extract: {data: demo, dtype: float8}", "extract.dtype: Input should be 'float16' or 'float32'"),
    ("extract", "extract: {data: demo, split_ratios: [0.5, 0.5, 0.5]}", "extract.split_ratios: need three positive"),
    ("extract", "extract: {batch_size: 8}", "extract.data: required"),
    ("probe", "probe: {metrik: qwk}", "probe.metrik: unknown key"),
    ("probe", "probe: {folds: many}", "probe.folds: Input should be a valid integer"),
    ("probe", "probe: {bootstrap: 5}", "probe.bootstrap: Input should be greater than or equal to 10"),
    ("probe", "probe: {metric: f1}", "probe.metric: Input should be 'accuracy'"),
    ("profiling", "profiling: {treads: 2}", "profiling.treads: unknown key"),
    ("profiling", "profiling: {min_seconds: soon}", "profiling.min_seconds: Input should be a valid number"),
    ("profiling", "profiling: {batch_sizes: [1, 0]}", "profiling.batch_sizes[1]: Input should be greater than or equal"),
    ("finetune", "finetune: {budjet: 3}", "finetune.budjet: unknown key"),
    ("finetune", "finetune: {restart: sometimes}", "finetune.restart: Input should be a valid boolean"),
    ("finetune", "finetune: {top: 0}", "finetune.top: Input should be greater than or equal to 1"),
])
def test_bad_settings_give_one_line_naming_the_key(tmp_path: Path, section: str, body: str, key: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(body + "\n")
    with pytest.raises(ConfigError) as err:
        resolve(COMMANDS[section][0], section, cfg)
    message = str(err.value)
    where = "" if key.endswith("required") else f"{cfg}: "  # a missing key is in no file
    assert len(message.splitlines()) == 1 and f"{where}{key}" in message


def test_bad_flag_value_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--batch-size: Input should be greater than or equal to 1 \(got '0'\)$"):
        resolve(ExtractSettings, "extract", None, flags(build_parser(), ["--data", "demo", "--batch-size", "0"]))


def test_unknown_section_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("extrakt:\n  batch_size: 16\n")
    with pytest.raises(ConfigError, match="unknown top-level key 'extrakt'"):
        resolve(ExtractSettings, "extract", cfg)


@pytest.mark.parametrize("body, key", [
    ("heads: {linear: {lr: [0.1, -1]}}", "heads.linear.lr: Input should be greater than 0"),
    ("heads: {linear: {l_r: [0.1]}}", "heads.linear.l_r: unknown key"),
    ("heads: {conv: {lr: [0.1]}}", "heads.conv: unknown key"),
    ("heads: {knn: {k: [3, many]}}", "heads.knn.k[1]: Input should be a valid integer"),
    ("train: {smooth_epochs: 0}", "train.smooth_epochs: Input should be greater than or equal to 1"),
    ("default: {type: mlp}", "default: mlp heads need 'hidden' sizes"),
    ("trian: {}", "trian: unknown key"),
])
def test_bad_grid_file_gives_one_line_naming_the_key(tmp_path: Path, body: str, key: str) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(body + "\n")
    with pytest.raises(ConfigError) as err:
        load_grid(path)
    assert len(str(err.value).splitlines()) == 1 and f"{path}: {key}" in str(err.value)


@pytest.mark.parametrize("overlay, key", [
    ({"train": {"epochs": 0}}, "train.epochs: Input should be greater than or equal to 1"),
    ({"train": {"epoks": 3}}, "train.epoks: unknown key"),
    ({"defaults": {"lr": "fast"}}, "defaults.lr: Input should be a valid number"),
    ({"augment": {"hflip": 2}}, "augment.hflip: Input should be less than or equal to 1"),
    ({"space": {"lr": {"log": [1e-3, 1e-2]}}}, "space.lr: the default 0.0001 (defaults.lr) lies outside"),
    ({"space": {"batch_size": {"ordered": [32, "big"]}}}, "space.batch_size.ordered[1]: Input should be a valid integer"),
    ({"space": {"momentum": {"float": [0, 1]}}}, "space.momentum: Input should be 'lr', 'weight_decay'"),
    ({"space": {"lr": {"uniform": [0, 1]}}}, "space.lr.uniform: unknown key; known: log, float, int, ordered, choice"),
    ({"sapce": {}}, "unknown section 'sapce'"),
])
def test_bad_tuning_file_gives_one_line_naming_the_key(tmp_path: Path, overlay: dict, key: str) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(overlay))
    with pytest.raises(ConfigError) as err:
        load_tuning(path)
    assert len(str(err.value).splitlines()) == 1 and f"{path}: {key}" in str(err.value)
    with pytest.raises(ConfigError, match=re.escape(f"finetune.search: {key}")):
        load_tuning(None, overlay)  # the same mistake inline in an experiment file


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_shows_each_default_once_as_the_model_has_it(command: str, capsys: pytest.CaptureFixture) -> None:
    model, parser = COMMANDS[command]
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text
    entries: dict[str, str] = {}  # an option's help starts on a line "  --flag ..."; argparse wraps the rest
    for line in text[text.index("options:"):].splitlines()[1:]:
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        else:
            entries[current] += " " + line.strip()
    for name, field in model.model_fields.items():
        if not has_flag(field):
            continue
        entry = " ".join(entries["--" + name.replace("_", "-")].split())
        shown = default_text(field)
        if field.is_required():
            assert "(required" in entry and "default:" not in entry, entry
        else:  # every optional setting says what it defaults to, exactly once
            assert shown is not None and entry.count("default:") == 1 and f"default: {shown}" in entry, entry


def test_help_of_a_required_setting_says_so(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "digits) (required)" in out


@pytest.mark.parametrize("command, wrong, right", [
    ("finetune", "--optimzer", "--optimizer"), ("extract", "--batchsize", "--batch-size"),
    ("probe", "--bootsrap", "--bootstrap"), ("profiling", "--provder", "--provider")])
def test_mistyped_flag_gets_a_suggestion(command: str, wrong: str, right: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        COMMANDS[command][1]().parse_args([wrong, "3"])
    assert exit_.value.code == 2
    assert f"unrecognized argument {wrong}; did you mean {right}?" in capsys.readouterr().err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_settings_are_frozen_and_pickle_to_equal_objects(command: str) -> None:
    model = COMMANDS[command][0]
    s = resolve(model, command, config_file("demo.yaml"))
    again = pickle.loads(pickle.dumps(s))
    assert again == s and type(again) is model
    with pytest.raises(ValueError):
        s.workdir = Path("elsewhere")  # type: ignore[misc]


def test_cli_config_error_exits_2_with_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("extract:\n  nope: 1\n")
    assert main(["--config", str(cfg), "--workdir", str(tmp_path / "w")]) == 2
    assert f"{cfg}: extract.nope: unknown key" in caplog.text
    assert "Traceback" not in caplog.text


def test_cli_requires_data(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["--workdir", str(tmp_path / "w"), "--backbones", "tiny"]) == 2
    assert "extract.data: required (give --data or set it in the --config file)" in caplog.text


def test_resolved_config_written_only_after_success(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "config.yaml").write_text("probe:\n  metric: accuracy\nextract:\n  data: before\n")
    # A run that fails (no such data) leaves the record of the last successful one.
    assert main(["--workdir", str(tmp_path), "--data", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["extract"] == {"data": "before"}
    write_resolved(tmp_path, "extract", ExtractSettings(data="demo", batch_size=7))
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["probe"] == {"metric": "accuracy"}
    assert written["extract"]["batch_size"] == 7 and written["extract"]["data"] == "demo"
    assert resolve(ExtractSettings, "extract", tmp_path / "config.yaml").batch_size == 7  # the record loads again


@pytest.mark.parametrize("text", [b"extract: [data\n", b"- extract\n", b"extract:\n  data: caf\xe9\n"])
def test_a_record_edited_into_something_else_is_rewritten_with_a_warning(tmp_path: Path, text: bytes,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A config.yaml that is no longer a mapping (broken YAML, a list, not UTF-8) used to crash the command after
    its results were written (or was silently dropped); now it is rewritten with this run's section and a
    warning says so."""
    (tmp_path / "config.yaml").write_bytes(text)
    write_resolved(tmp_path, "extract", ExtractSettings(data="demo", batch_size=7))
    assert resolve(ExtractSettings, "extract", tmp_path / "config.yaml").batch_size == 7
    assert "was not a YAML mapping of command sections; rewritten with the extract section only" in caplog.text


# ----------------------------------------------------------------------------- the code's shape

PACKAGES = ("cache", "configs", "runtime", "report", "extract", "probe", "profiling", "finetune")
MAX_PARAMETERS = 8


def _functions():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield path.relative_to(ROOT), node


def test_no_function_takes_more_than_eight_parameters() -> None:
    too_many = []
    for path, fn in _functions():
        a = fn.args
        names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)] + \
            [x.arg for x in (a.vararg, a.kwarg) if x is not None]
        names = [n for n in names if n not in ("self", "cls")]
        if len(names) > MAX_PARAMETERS:
            too_many.append(f"{path}:{fn.lineno} {fn.name}({len(names)})")
    assert not too_many, too_many


def test_imports_flow_one_way() -> None:
    """configs, runtime and report import no stage; cache <- extract <- probe <- finetune, profiling <- extract."""
    allowed = {"runtime": set(), "configs": {"runtime"}, "cache": {"runtime"}, "report": {"runtime"},
               "extract": {"runtime", "configs", "cache", "report"},
               "probe": {"runtime", "configs", "cache", "extract", "report"},
               "profiling": {"runtime", "configs", "cache", "extract", "report"},
               "finetune": {"runtime", "configs", "cache", "extract", "probe", "profiling", "report"}}
    wrong = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    top = node.module.split(".")[0]
                    if top in PACKAGES and top != package and top not in allowed[package]:
                        wrong.append(f"{path.relative_to(ROOT)} imports {node.module}")
    assert not wrong, wrong


@pytest.mark.parametrize(("command", "args", "message"), [
    ("probe", [], "no feature caches in"),
    ("probe", ["--report-only"], "no probe results yet. Run `python -m probe"),
    ("probe", ["--grid-file", "{bad_grid}"], "heads.linear.lr[0]"),
    ("profiling", [], "dataset.json: missing"),
    ("finetune", [], "no probe results yet. Run `python -m probe --grid"),
])
def test_a_missing_workdir_or_bad_grid_file_is_answered_before_torch_loads(
        tmp_path: Path, command: str, args: list[str], message: str) -> None:
    """Issue #12: such answers come at once (torch, timm, scikit-learn take seconds to import), with exit code 2."""
    bad_grid = tmp_path / "grid.yaml"
    bad_grid.write_text("heads:\n  linear: {lr: [x]}\n")
    argv = ["--workdir", str(tmp_path / "missing"), *[a.format(bad_grid=bad_grid) for a in args]]
    code = (f"import sys, json; from {command}.cli import main; rc = main({json.dumps(argv)}); "
            "print(json.dumps([rc, sorted(m for m in ('torch', 'timm', 'sklearn') if m in sys.modules)]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    rc, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert (rc, heavy) == (2, []), done.stderr
    assert message in done.stderr
