from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from extract.cli import build_parser, main
from extract.config import ConfigError, given_flags, resolve, write_resolved
from extract.settings import ExtractSettings


def test_defaults_then_file_then_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("workdir: runs/exp\nextract:\n  batch_size: 16\n  backbones: [tiny]\n  image_size: [96, 128]\n")
    args = build_parser().parse_args(["--config", str(cfg), "--batch-size", "4"])
    s = resolve(ExtractSettings, section="extract", config_file=cfg, overrides=given_flags(args, exclude=("config",)))
    assert s.batch_size == 4  # flag beats file
    assert s.backbones == ["tiny"]  # file beats default
    assert s.image_size == [96, 128]
    assert s.workdir == Path("runs/exp")  # top-level shared key
    assert s.dtype == "float16"  # default


def test_comma_separated_backbones_flag() -> None:
    args = build_parser().parse_args(["--backbones", "demo,resnet18.a1_in1k"])
    s = resolve(ExtractSettings, section="extract", overrides=given_flags(args))
    assert s.backbones == ["demo", "resnet18.a1_in1k"]


def test_unknown_key_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("extract:\n  batch_sise: 16\n")
    with pytest.raises(ConfigError, match=r"extract\.batch_sise"):
        resolve(ExtractSettings, section="extract", config_file=cfg)


def test_unknown_section_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("extrakt:\n  batch_size: 16\n")
    with pytest.raises(ConfigError, match="extrakt"):
        resolve(ExtractSettings, section="extract", config_file=cfg)


@pytest.mark.parametrize("text, key", [
    ("extract:\n  batch_size: many\n", "extract.batch_size"),
    ("extract:\n  dtype: float8\n", "extract.dtype"),
    ("extract:\n  store_maps: perhaps\n", "extract.store_maps"),
    ("extract:\n  batch_size: 0\n", "batch_size"),
    ("extract:\n  split_ratios: [0.5, 0.5, 0.5]\n", "split_ratios"),
])
def test_bad_values_are_named(tmp_path: Path, text: str, key: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve(ExtractSettings, section="extract", config_file=cfg)


def test_resolved_config_written_and_other_sections_kept(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("probe:\n  metric: accuracy\n")
    write_resolved(tmp_path, "extract", ExtractSettings(data="demo", batch_size=7))
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["probe"] == {"metric": "accuracy"}
    assert written["extract"]["batch_size"] == 7 and written["extract"]["data"] == "demo"


def test_help_documents_every_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--data", "--backbones", "--no-pretrained", "--weights-dir", "--image-size", "--store-maps",
                 "--views", "--fold", "--force", "--device", "--dtype", "--batch-size", "--workers", "--config"):
        assert flag in out
    assert "(default: 64)" in out  # typed defaults shown


def test_cli_config_error_exit_code(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("extract:\n  nope: 1\n")
    assert main(["--config", str(cfg), "--workdir", str(tmp_path / "w")]) == 2
    assert "extract.nope" in caplog.text


def test_cli_requires_data(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["--workdir", str(tmp_path / "w"), "--backbones", "tiny"]) == 2
    assert "--data" in caplog.text
