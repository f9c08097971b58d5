"""Local weights in other layouts (issue #14): prefixes, containers, another port, partial files, bad files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch

from extract.backbones import BackboneError, BackboneSpec, load_sets
from extract.checkpoints import CheckpointError, load_into
from extract.models import WeightsError, choose_weights, create_backbone, preprocessing

MODEL = "test_resnet.r160_in1k"


@pytest.fixture(scope="module")
def trained() -> dict[str, torch.Tensor]:
    """A full state dict (classifier included) of the tiny ResNet with distinctive values."""
    torch.manual_seed(123)
    model = timm.create_model(MODEL, pretrained=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.state_dict()


def _loaded(path: Path, **kw) -> torch.nn.Module:
    model = timm.create_model(MODEL, pretrained=False, num_classes=0)
    load_into(model, path, **kw)
    return model


def _same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return all(torch.equal(own[k], state[k]) for k in own)


@pytest.mark.parametrize("wrap", ["plain", "lightning", "ddp", "model_key"])
def test_common_layouts_load_exactly(trained, tmp_path: Path, wrap: str) -> None:
    if wrap == "plain":
        obj = trained
    elif wrap == "lightning":  # a LightningModule holding the network as self.model.backbone, plus its own head
        obj = {"epoch": 3, "global_step": 10, "state_dict": {**{f"model.backbone.{k}": v for k, v in trained.items()},
                                                             "model.head.weight": torch.zeros(2, 2)}}
    elif wrap == "ddp":
        obj = {f"module.{k}": v for k, v in trained.items()}
    else:
        obj = {"model": trained, "optimizer": {"lr": 0.1}}
    torch.save(obj, tmp_path / "w.pth")
    assert _same(_loaded(tmp_path / "w.pth"), trained)


def test_another_port_with_other_names_loads_by_position(trained, tmp_path: Path, caplog) -> None:
    renamed = {f"_other_{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(trained.items())}
    torch.save(renamed, tmp_path / "port.pth")
    with caplog.at_level(logging.WARNING):
        assert _same(_loaded(tmp_path / "port.pth"), trained)
    assert "loaded by position" in caplog.text
    caplog.clear()  # stage two loads the same file several times: one warning is enough
    with caplog.at_level(logging.WARNING):
        assert _same(_loaded(tmp_path / "port.pth"), trained)
    assert "loaded by position" not in caplog.text


def test_partial_file_is_refused_with_the_missing_keys_unless_allowed(trained, tmp_path: Path) -> None:
    partial = {k: v for k, v in trained.items() if not k.startswith("layer4")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing.*layer4.*allow_partial"):
        _loaded(tmp_path / "partial.pth")
    model = _loaded(tmp_path / "partial.pth", allow_partial=True)
    assert torch.equal(model.state_dict()["conv1.0.weight"], trained["conv1.0.weight"])


def test_wrong_shapes_and_foreign_files_give_one_line_errors(trained, tmp_path: Path) -> None:
    bad = dict(trained)
    bad["conv1.0.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="other shapes"):
        _loaded(tmp_path / "shape.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(CheckpointError, match="not a loadable weights file") as info:
        _loaded(tmp_path / "junk.pth")
    assert "\n" not in str(info.value)

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        _loaded(tmp_path / "evil.pth")


def test_backbone_entry_allow_partial_changes_the_weights_tag(trained, tmp_path: Path) -> None:
    torch.save({k: v for k, v in trained.items() if not k.startswith("layer4")}, tmp_path / "p.pth")
    (tmp_path / "b.yaml").write_text(f"sets:\n  s:\n    - {{model: {MODEL}, weights: p.pth}}\n"
                                     f"    - {{model: {MODEL}, name: part, weights: p.pth, allow_partial: true}}\n")
    strict, partial = load_sets(tmp_path / "b.yaml")["s"]
    with pytest.raises(WeightsError, match="allow_partial"):
        create_backbone(strict, choose_weights(strict, pretrained=True, weights_dir=None))
    weights = choose_weights(partial, pretrained=True, weights_dir=None)
    assert weights.tag.endswith(":partial")  # another model than a full load: another cache key
    model, _ = create_backbone(partial, weights)
    assert torch.equal(model.state_dict()["conv1.0.weight"], trained["conv1.0.weight"])


def test_preprocessing_set_per_backbone(tmp_path: Path) -> None:
    spec = BackboneSpec(model=MODEL, preprocess={"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5], "crop_pct": 1.0,
                                                 "interpolation": "bilinear"})
    cfg, _ = preprocessing(spec, 64)
    assert cfg["mean"] == [0.1, 0.2, 0.3] and cfg["std"] == [0.5] * 3 and cfg["crop_pct"] == 1.0
    assert cfg["interpolation"] == "bilinear" and cfg["input_size"] == [3, 64, 64]
    assert preprocessing(BackboneSpec(model=MODEL), 64)[0]["mean"] != [0.1, 0.2, 0.3]
    for bad, match in [("{mean: [0.5, 0.5]}", "preprocess.mean"), ("{std: 0}", "preprocess.std"),
                       ("{interpolation: cubic}", "preprocess.interpolation"), ("{crop_pct: 2}", "preprocess.crop_pct"),
                       ("{mean: true}", "preprocess.mean: expected a number or a list of three"),
                       ("{scale: 1}", r"preprocess\.scale: unknown key; known: mean, std, interpolation, crop_pct")]:
        (tmp_path / "b.yaml").write_text(f"sets:\n  s:\n    - {{model: {MODEL}, preprocess: {bad}}}\n")
        with pytest.raises(BackboneError, match=match):
            load_sets(tmp_path / "b.yaml")
    # One number is the same for R, G and B; what is not given is left to timm's data config.
    (tmp_path / "b.yaml").write_text(f"sets:\n  s:\n    - {{model: {MODEL}, preprocess: {{std: 0.5, crop_mode: squash}}}}\n")
    spec, = load_sets(tmp_path / "b.yaml")["s"]
    assert spec.preprocess == {"std": [0.5, 0.5, 0.5], "crop_mode": "squash"}
    assert preprocessing(spec, 64)[0]["std"] == [0.5] * 3
