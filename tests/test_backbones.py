from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from extract.backbones import BackboneError, BackboneSpec, load_sets, resolve_backbones
from extract.models import WeightsError, choose_weights, create_backbone, file_tag, preprocessing


def test_shipped_sets() -> None:
    sets = load_sets()
    assert {"all", "demo", "tiny"} <= set(sets)
    names = [s.model for s in sets["all"]]
    assert len(names) >= 20
    for family in ("vgg11", "vgg13", "vgg16", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                   "densenet201", "mobilenetv2_100", "mobilenetv3_small_100", "mobilenetv3_large_100",
                   "efficientnet_b0", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4", "regnety",
                   "convnext_tiny", "swin_tiny", "vit_base_patch16_224"):
        assert any(n.startswith(family) for n in names), family
    assert all("." in n for n in names)  # every entry carries a pretrained tag
    cbam = next(s for s in sets["all"] if s.kwargs)
    assert cbam.kwargs == {"block_args": {"attn_layer": "cbam"}}
    # Every shipped name resolves in the installed timm.
    for group in sets.values():
        resolve_backbones([s.model for s in group], sets={})


def test_resolve_sets_names_patterns_in_order() -> None:
    sets = load_sets()
    specs = resolve_backbones(["tiny", "resnet18.a1_in1k", "test_vit*"], sets=sets)
    names = [s.name for s in specs]
    assert names[:3] == ["test_resnet.r160_in1k", "test_vit.r160_in1k", "test_efficientnet.r160_in1k"]
    assert "resnet18.a1_in1k" in names and "test_vit2" in names and "test_vit3" in names
    assert len(names) == len(set(names))  # no duplicates


def test_unknown_name_suggests_close_ones() -> None:
    with pytest.raises(BackboneError, match="resnet50"):
        resolve_backbones(["resnet5O"], sets={})
    with pytest.raises(BackboneError, match="Known tags"):
        resolve_backbones(["resnet18.nope"], sets={})
    with pytest.raises(BackboneError, match="matches no timm model"):
        resolve_backbones(["nosuchmodel_*"], sets={})


def test_custom_backbones_file(tmp_path: Path) -> None:
    f = tmp_path / "b.yaml"
    f.write_text("sets:\n  mine:\n    - test_resnet.r160_in1k\n    - {name: r2, model: test_resnet.r160_in1k, weights: w.pth}\n")
    specs = resolve_backbones(["mine"], sets=load_sets(f))
    assert [s.name for s in specs] == ["test_resnet.r160_in1k", "r2"]
    assert specs[1].weights == tmp_path / "w.pth"  # relative to the YAML file
    f.write_text("sets:\n  mine:\n    - {nam: x}\n")
    with pytest.raises(BackboneError, match="model"):
        load_sets(f)


def test_offline_without_weights_fails_fast_with_instructions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    spec = BackboneSpec(model="test_resnet.r160_in1k")
    weights = choose_weights(spec, pretrained=True, weights_dir=None)
    assert weights.kind == "hub" and weights.tag == "hub:test_resnet.r160_in1k"
    t0 = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        create_backbone(spec, weights)
    assert time.perf_counter() - t0 < 30
    msg = str(info.value)
    assert "--weights-dir" in msg and "--no-pretrained" in msg and "test_resnet.r160_in1k" in msg


@pytest.mark.parametrize("layout", ["file", "folder", "yaml"])
def test_local_weights(tmp_path: Path, layout: str) -> None:
    import timm

    torch.manual_seed(7)
    source = timm.create_model("test_resnet.r160_in1k", pretrained=False)
    wdir = tmp_path / "weights"
    if layout == "folder":
        target = wdir / "test_resnet.r160_in1k" / "model.safetensors"
    else:
        target = wdir / "test_resnet.safetensors"
    target.parent.mkdir(parents=True)
    save_file(source.state_dict(), str(target))
    spec = BackboneSpec(model="test_resnet.r160_in1k", weights=target if layout == "yaml" else None)
    weights = choose_weights(spec, pretrained=True, weights_dir=None if layout == "yaml" else wdir)
    assert weights.kind == "file" and weights.tag == file_tag(target) and weights.tag.startswith("file:")
    model, untrained = create_backbone(spec, weights)
    assert untrained == []
    for name, value in source.state_dict().items():
        if not name.startswith("fc."):
            torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    x = torch.randn(2, 3, 64, 64)
    source.eval()
    torch.testing.assert_close(model(x), source.forward_head(source.forward_features(x), pre_logits=True))


def test_weights_that_are_not_where_they_are_said_to_be_are_named(tmp_path: Path) -> None:
    """An entry's weights file, a weights folder without a weights file and a --weights-dir that does not exist:
    each one line naming the path, before anything is built."""
    spec = BackboneSpec(model="test_resnet.r160_in1k", weights=tmp_path / "gone.safetensors")
    with pytest.raises(WeightsError, match=r"gone.safetensors: no such weights file"):
        choose_weights(spec, pretrained=True, weights_dir=None)
    (tmp_path / "folder").mkdir()
    spec = BackboneSpec(model="test_resnet.r160_in1k", weights=tmp_path / "folder")
    with pytest.raises(WeightsError, match=r"folder: a weights folder must hold one of model.safetensors"):
        choose_weights(spec, pretrained=True, weights_dir=None)
    spec = BackboneSpec(model="test_resnet.r160_in1k")
    with pytest.raises(WeightsError, match=r"--weights-dir .*nowhere: no such folder"):
        choose_weights(spec, pretrained=True, weights_dir=tmp_path / "nowhere")
    # a folder named for the model but holding no weights file is refused too, not skipped for the hub
    (tmp_path / "wdir" / "test_resnet.r160_in1k").mkdir(parents=True)
    with pytest.raises(WeightsError, match="a weights folder must hold one of"):
        choose_weights(spec, pretrained=True, weights_dir=tmp_path / "wdir")
    assert choose_weights(spec, pretrained=False, weights_dir=tmp_path / "nowhere").kind == "random"


def test_stage_two_refuses_a_recorded_weights_file_that_moved_or_changed(tmp_path: Path) -> None:
    """profiling and finetune rebuild the backbone a cache records; its local weights file must be the one the
    cache was made with (by hash), or the later stages would measure and train another model."""
    import timm

    from extract.models import backbone_from_record

    weights = tmp_path / "w.safetensors"
    save_file(timm.create_model("test_resnet.r160_in1k", pretrained=False).state_dict(), str(weights))
    record = dict(model="test_resnet.r160_in1k", name="mine", model_kwargs=None, weights_tag=file_tag(weights))
    spec, found, _ = backbone_from_record(**record, weights_location=str(weights))
    assert (spec.name, found.kind, found.location) == ("mine", "file", str(weights))
    with pytest.raises(WeightsError, match=r"mine: recorded weights file:.* from .*gone.safetensors are missing or "
                                           r"have changed; point at the file it was made with"):
        backbone_from_record(**record, weights_location=str(tmp_path / "gone.safetensors"))
    torch.manual_seed(1)
    save_file(timm.create_model("test_resnet.r160_in1k", pretrained=False).state_dict(), str(weights))  # retrained
    with pytest.raises(WeightsError, match="are missing or have changed"):
        backbone_from_record(**record, weights_location=str(weights))


def test_extra_modules_reported_untrained(tmp_path: Path) -> None:
    import timm

    plain = timm.create_model("resnet10t", pretrained=False)
    target = tmp_path / "resnet10t.safetensors"
    save_file(plain.state_dict(), str(target))
    spec = BackboneSpec(model="resnet10t", name="resnet10t_cbam", kwargs={"block_args": {"attn_layer": "cbam"}}, weights=target)
    model, untrained = create_backbone(spec, choose_weights(spec, pretrained=True, weights_dir=None))
    assert untrained and all(".se." in m for m in untrained)  # timm puts the attention at `.se`
    loaded = model.state_dict()
    assert torch.equal(loaded["conv1.0.weight"], plain.state_dict()["conv1.0.weight"])  # the rest is pretrained


def test_preprocessing_follows_timm_and_image_size() -> None:
    cfg, extra = preprocessing(BackboneSpec(model="test_vit.r160_in1k"))
    assert cfg["input_size"] == [3, 160, 160] and extra == {}
    cfg, extra = preprocessing(BackboneSpec(model="test_vit.r160_in1k"), 96)
    assert cfg["input_size"] == [3, 96, 96] and extra == {"img_size": 96}  # fixed-size model rebuilt
    cfg, extra = preprocessing(BackboneSpec(model="test_resnet.r160_in1k"), 96)
    assert cfg["input_size"] == [3, 96, 96] and extra == {}
    vit = preprocessing(BackboneSpec(model="vit_base_patch16_224.augreg2_in21k_ft_in1k"))[0]
    assert vit["mean"] == [0.5, 0.5, 0.5]  # per-model normalisation, not ImageNet's
