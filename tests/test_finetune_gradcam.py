from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from finetune.gradcam import gradcam_figure, gradcam_maps, save_gradcam_grid, target_layer


def fit_briefly(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int = 25) -> None:
    """A few Adam steps so the class evidence depends on the image, as in a trained model."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
    model.eval()


def smooth_images(n: int, size: int) -> torch.Tensor:
    """Images with structure (blobs), so that maps have something to point at."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for i in range(n):
        cx, cy = (i % 3 - 1) * 0.5, (i // 3 - 1) * 0.5
        blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.1)
        out.append(torch.stack([blob, 1 - blob, blob * 0.5]) * 2 - 1)
    return torch.stack(out)


@pytest.mark.parametrize("name, kwargs, size", [
    ("test_resnet.r160_in1k", {}, 96),  # CNN
    ("test_vit.r160_in1k", {"img_size": 96}, 96),  # class-token ViT: prefix dropped, grid folded
    # channels-last stages; a narrow, shallow Swin (the layout is what matters, not its width): ~50x cheaper
    ("swin_tiny_patch4_window7_224", {"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}, 224),
    ("test_convnext.r160_in1k", {}, 96),
])
def test_gradcam_maps_are_not_flat_and_have_image_shape(name: str, kwargs: dict, size: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **kwargs)
    images, labels = smooth_images(3, size), torch.tensor([0, 1, 2])
    fit_briefly(model, images, labels)
    model.requires_grad_(False)  # frozen, as a probe backbone is: the input carries the gradient
    maps = gradcam_maps(model, images, classes=labels.tolist())
    assert maps.shape == (3, size, size)
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert all(m.std() > 1e-3 for m in maps), [float(m.std()) for m in maps]


def test_gradcam_on_a_probe_classifier(tmp_path: Path) -> None:
    from probe.classifier import ProbeClassifier

    torch.manual_seed(0)
    backbone = timm.create_model("test_vit.r160_in1k", num_classes=0, img_size=64)
    head = torch.nn.Linear(backbone.num_features, 3)
    model = ProbeClassifier(backbone, head)
    images = smooth_images(3, 64)
    fit_briefly(model, images, torch.tensor([0, 1, 2]))
    layer, reshape = target_layer(model)
    assert layer is backbone.blocks[-1].norm1 and reshape is not None
    images = images[:2]
    maps = gradcam_maps(model, images)  # predicted classes
    assert maps.shape == (2, 64, 64) and all(m.std() > 1e-3 for m in maps)
    with pytest.raises(ValueError, match="one target class per image"):
        gradcam_maps(model, images, classes=[1])
    rgb = [((img.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8) for img in images]
    out = save_gradcam_grid(rgb, maps, ["a", "b"], tmp_path / "grid.png", "vit (random weights)", [False, True])
    assert out.stat().st_size > 5000
    fig = gradcam_figure(rgb, maps, ["true a / pred a", "true b / pred c"], "vit (random weights)", [False, True])
    assert fig._suptitle.get_text() == "vit (random weights)"
    assert any(ax.get_ylabel().startswith("Grad-CAM") for ax in fig.axes)  # the colour bar
    titled = {ax.get_title(): ax for ax in fig.axes if ax.get_title().startswith("true")}
    assert titled["true b / pred c"].title.get_color() == "red" and titled["true a / pred a"].title.get_color() == "black"
    assert all(sp.get_edgecolor()[:3] == (1.0, 0.0, 0.0) and sp.get_visible()
               for sp in titled["true b / pred c"].spines.values())  # the wrong one is framed in red
    assert not titled["true a / pred a"].axison
    import matplotlib.pyplot as plt

    plt.close(fig)  # a figure left open fails the next test of this worker that counts them (test_full_disk's)


def test_gradcam_on_a_knn_probe_classifier() -> None:
    """A kNN vote is differentiable in the features: its Grad-CAM maps are not flat, even where all k agree."""
    from configs.probe import HeadConfig
    from finetune.gradcam import for_gradcam
    from probe.classifier import ProbeClassifier
    from probe.heads import build_head

    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet.r160_in1k", num_classes=0).eval()
    images = smooth_images(6, 64)
    with torch.no_grad():
        bank = backbone(images)
    head = build_head(HeadConfig(type="knn", k=3, temperature=0.07), bank.shape[1], 3, None, None,
                      bank=bank, bank_labels=torch.tensor([0, 0, 1, 1, 2, 2]))
    model = ProbeClassifier(backbone, head).eval()
    scored = for_gradcam(model)
    with torch.no_grad():
        assert torch.equal(scored(images).argmax(1), model(images).argmax(1))  # same decision
    maps = gradcam_maps(scored, images[:2])
    assert maps.shape == (2, 64, 64) and all(m.std() > 1e-3 for m in maps), [float(m.std()) for m in maps]
