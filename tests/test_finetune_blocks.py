from __future__ import annotations

import pytest
import timm
import torch

from finetune.blocks import backbone_blocks

FAMILIES = [
    "resnet18",  # CNN
    "vit_base_patch16_224",  # ViT: one timm group per transformer block, bucketed
    "swin_tiny_patch4_window7_224",
    "convnext_tiny",
    "efficientnet_b0",
    "regnety_016",
    "vgg11",
    "poolformer_s12",  # metaformer: no group_matcher, falls back to top-level modules
]


@pytest.mark.parametrize("name", FAMILIES)
def test_tail_first_blocks_cover_every_parameter_once(name: str) -> None:
    with torch.device("meta"):  # the structure is all that matters: no memory, no init cost
        model = timm.create_model(name, num_classes=0)
    blocks = backbone_blocks(model, max_blocks=4)
    names = [n for b in blocks for n in b.params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))  # exactly once
    assert 2 <= len(blocks) <= 4
    order = [n for n, _ in model.named_parameters()]
    # Tail first: the first block's parameters come after the last block's in the forward order.
    assert min(order.index(n) for n in blocks[0].params) > max(order.index(n) for n in blocks[-1].params)
    stem = order[0]
    assert stem in blocks[-1].params


def test_vit_blocks_are_contiguous_buckets() -> None:
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=0)
    blocks = backbone_blocks(model, max_blocks=3)
    assert len(blocks) == 3
    last_block_params = [n for n in blocks[0].params if n.startswith("blocks.")]
    assert {int(n.split(".")[1]) for n in last_block_params} >= {11}
    assert any(n.startswith("norm.") for n in blocks[0].params)  # final norm goes with the tail
    assert "patch_embed.proj.weight" in blocks[-1].params


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_unfreeze_schedule_learning_rates_and_frozen_batchnorm(optimizer: str) -> None:
    from configs.finetune import TrainOptions, TrialParams
    from finetune.unfreeze import ALL, ProgressiveUnfreezer, Stage

    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet.r160_in1k", num_classes=0, drop_path_rate=0.2)
    head = torch.nn.Linear(backbone.num_features, 3)
    blocks = backbone_blocks(backbone, max_blocks=3)
    owner = {n: i for i, b in enumerate(blocks) for n in b.params}
    batchnorms = [(m, owner[f"{name}.weight"]) for name, m in backbone.named_modules()
                  if isinstance(m, torch.nn.BatchNorm2d)]
    drop_paths = [(m, owner[next(n for n in owner if n.startswith(name.rsplit(".", 1)[0] + "."))])
                  for name, m in backbone.named_modules() if type(m).__name__ == "DropPath"]
    assert drop_paths
    schedule = [Stage(0, 0, 1.0), Stage(2, 1, 1.0), Stage(4, ALL, 0.1)]
    u = ProgressiveUnfreezer(backbone, head, blocks, schedule, TrialParams(lr=1e-3, layer_decay=0.5, weight_decay=0.05),
                             TrainOptions(freeze_bn_stats=False, optimizer=optimizer))
    kind = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer]
    assert type(u.optimizer) is kind
    all_params = {id(p): n for n, p in backbone.named_parameters()}
    expected_blocks = {0: 0, 1: 0, 2: 1, 3: 1, 4: 3, 5: 3}
    for epoch, n_blocks in expected_blocks.items():
        u.apply(epoch)
        stage_scale = 0.1 if epoch >= 4 else 1.0
        in_optimizer = [id(p) for g in u.optimizer.param_groups for p in g["params"]]
        assert len(in_optimizer) == len(set(in_optimizer))  # each parameter in one group
        trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
        assert trainable == {n for b in blocks[:n_blocks] for n in b.params}
        assert {all_params[i] for i in in_optimizer if i in all_params} == trainable  # joined exactly when unfrozen
        for g in u.optimizer.param_groups:
            assert g["lr"] == pytest.approx(1e-3 * stage_scale * 0.5 ** g["depth"]), (epoch, g["unit"])
            if g["depth"]:
                assert all(all_params[id(p)] in blocks[g["depth"] - 1].params for p in g["params"])
        assert all(g["weight_decay"] == 0.0 for g in u.optimizer.param_groups if all(p.ndim == 1 for p in g["params"]))
        if optimizer == "sgd":  # every group, the joined blocks' too: Nesterov momentum 0.9 (configs/finetune.yaml)
            assert all(g["momentum"] == 0.9 and g["nesterov"] for g in u.optimizer.param_groups)
        # One training step: frozen blocks' BatchNorm statistics and weights must not move.
        frozen_bn = [m for m, b in batchnorms if b >= u.unfrozen]
        before = [m.running_mean.clone() for m in frozen_bn]
        frozen_w = {n: p.detach().clone() for n, p in backbone.named_parameters() if not p.requires_grad}
        u.train()
        # Frozen blocks run as when the cache was made: BatchNorm statistics, no stochastic depth.
        assert all(m.training == (b < u.unfrozen) for m, b in batchnorms + drop_paths)
        loss = torch.nn.functional.cross_entropy(head(backbone(torch.randn(4, 3, 64, 64))), torch.tensor([0, 1, 2, 0]))
        u.optimizer.zero_grad()
        loss.backward()
        u.optimizer.step()
        for m, b in zip(frozen_bn, before):
            assert torch.equal(m.running_mean, b)
        for n, p in backbone.named_parameters():
            if n in frozen_w:
                assert torch.equal(p, frozen_w[n])
    assert u.unfrozen == len(blocks)


def test_a_backbone_without_stochastic_depth_is_built_without_it(caplog: pytest.LogCaptureFixture) -> None:
    """The search space has drop_path_rate, but timm's VGG (three of the `all` set) refuses the argument: it is
    built without it, and the log says the hyperparameter is ignored."""
    from finetune.model import _backbone

    with pytest.raises(TypeError, match="drop_path_rate"):
        timm.create_model("vgg11", pretrained=False, drop_path_rate=0.1)
    with caplog.at_level("INFO", logger="finetune.model"):
        model = _backbone({"model": "vgg11", "backbone": "vgg11", "weights": "random"}, drop_rate=0.2,
                          drop_path_rate=0.1)
    assert type(model).__name__ == "VGG" and "vgg11 has no stochastic depth; drop_path_rate ignored" in caplog.text
    assert model.drop_rate == 0.2  # the other hyperparameter still applies
