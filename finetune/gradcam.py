"""Grad-CAM explanations (pytorch-grad-cam) for any timm backbone, alone or under a probe head.

Target layers are chosen per architecture, as checked in practice:

- token models (ViT-style: ``num_prefix_tokens`` and ``patch_embed``): ``blocks[-1].norm1``,
  with the prefix tokens dropped and the tokens folded back to ``patch_embed.grid_size``
  (the last block itself, or the final norm, gives all-zero maps for class-token models);
- everything else: the module named by ``feature_info[-1]['module']`` (the last stage),
  converting channels-last outputs (Swin) to channels-first.

``override`` names a module explicitly (a per-architecture override from the config).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from extract.extractor import feature_map_nchw
from finetune.data import Split
from runtime.figures import save_png


class KNNEvidence(nn.Module):
    """A probe classifier with a kNN head, its output the head's log vote mass per class (see
    ``KNNHead.evidence``): the kNN vote is differentiable in the features, so Grad-CAM applies."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = classifier.backbone, classifier.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.evidence(self.backbone(x))


def for_gradcam(model: nn.Module) -> nn.Module:
    """``model`` itself, or for a kNN probe classifier the same classifier scored by its vote mass."""
    return KNNEvidence(model) if hasattr(getattr(model, "head", None), "evidence") else model


def _backbone_of(model: nn.Module) -> nn.Module:
    """The timm model inside a classifier wrapper (a probe classifier has ``.backbone``)."""
    return getattr(model, "backbone", model)


def target_layer(model: nn.Module, override: str | None = None) -> tuple[nn.Module, Callable | None]:
    """(module, reshape_transform) for Grad-CAM on ``model`` (a timm backbone or a probe classifier)."""
    backbone = _backbone_of(model)

    def to_map(x: torch.Tensor) -> torch.Tensor:
        # The same folding as the cache's feature maps: prefix tokens dropped, grid restored, NHWC permuted.
        return feature_map_nchw(backbone, x)

    is_token_model = hasattr(backbone, "num_prefix_tokens") and hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks")
    if override:
        return backbone.get_submodule(override), to_map
    if is_token_model:
        return backbone.blocks[-1].norm1, to_map
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise ValueError(f"{type(backbone).__name__}: no feature_info to pick a Grad-CAM layer; give an override")
    last = info[-1] if isinstance(info, (list, tuple)) else info.get_dicts()[-1]
    return backbone.get_submodule(last["module"]), to_map


def gradcam_maps(model: nn.Module, images: torch.Tensor, classes: Sequence[int] | None = None, *,
                 override: str | None = None) -> np.ndarray:
    """(B, H, W) maps in [0, 1] for the given (or predicted) class of each image."""
    layer, reshape = target_layer(model, override)
    images = images.detach().clone().requires_grad_(True)  # a frozen model still gets gradients
    targets = None if classes is None else [ClassifierOutputTarget(int(c)) for c in classes]
    if targets is not None and len(targets) != len(images):
        raise ValueError("one target class per image, or none")  # the library would silently zero the rest
    was_training = model.training
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        maps = cam(input_tensor=images, targets=targets)
    model.train(was_training)
    return maps


def save_gradcam_grid(images_rgb: Sequence[np.ndarray], maps: np.ndarray, titles: Sequence[str], path: Path,
                      heading: str, wrong: Sequence[bool]) -> Path:
    return save_png(gradcam_figure(images_rgb, maps, titles, heading, wrong), path, 110)


def gradcam_figure(images_rgb: Sequence[np.ndarray], maps: np.ndarray, titles: Sequence[str], heading: str,
                   wrong: Sequence[bool]) -> Any:
    """Original, heatmap and overlay of each image, four images to a row, under ``heading``; a wrong prediction
    is framed in red; one colour bar for the maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pytorch_grad_cam.utils.image import show_cam_on_image

    per_row = 4
    n = len(images_rgb)
    rows = (n + per_row - 1) // per_row
    fig, axes = plt.subplots(rows, 3 * per_row, figsize=(3 * per_row * 1.6, rows * 1.9 + 0.9), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    shown = None
    for i, (img, cam_map, title, bad) in enumerate(zip(images_rgb, maps, titles, wrong)):
        r, c = divmod(i, per_row)
        rgb = np.asarray(img, dtype=np.float32) / 255.0
        overlay = show_cam_on_image(rgb, cam_map, use_rgb=True)
        for j, (picture, label) in enumerate(((img, title), (cam_map, "Grad-CAM"), (overlay, "overlay"))):
            ax = axes[r, 3 * c + j]
            image = ax.imshow(picture, cmap="jet" if j == 1 else None, vmin=0 if j == 1 else None,
                              vmax=1 if j == 1 else None)
            shown = image if j == 1 else shown
            ax.set_title(label, fontsize=7, color="red" if bad and j == 0 else "black")
            if bad:  # axis("off") hides the spines: show them again, red, around a wrong prediction
                ax.axis("on")
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_edgecolor("red")
                    spine.set_linewidth(2.5)
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.97, 1))
    if shown is not None:
        bar = fig.colorbar(shown, ax=axes.ravel().tolist(), fraction=0.015, pad=0.01)
        bar.set_label("Grad-CAM (0: none, 1: most)", fontsize=7)
    return fig


def pick_images(labels: Sequence[int], n: int) -> list[int]:
    """``n`` indices taken round-robin over the classes (first images of each class first): every class shows."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    out: list[int] = []
    depth = 0
    while len(out) < n and any(depth < len(q) for q in queues):
        out += [q[depth] for q in queues if depth < len(q)][: n - len(out)]
        depth += 1
    return sorted(out)


def explain(model: nn.Module, images: Split, classes: Sequence[str], data_cfg: dict, path: Path, n: int = 20,
            override: str | None = None, heading: str = "") -> Path:
    """A Grad-CAM grid of ``n`` of ``images`` (what the model saw, its map, the overlay) for the predicted
    classes, on the device the model is on; ``heading`` says which model, weights and split."""
    paths, labels = images.paths, images.labels.tolist()
    import timm.data

    from runtime.images import load_rgb

    device = next(model.parameters()).device
    model = for_gradcam(model)
    chosen = pick_images(labels, n)
    tf = timm.data.create_transform(**data_cfg, is_training=False)
    x = torch.stack([tf(load_rgb(paths[i])) for i in chosen])
    model = model.to(device).eval()
    with torch.no_grad():
        predicted = model(x.to(device)).argmax(1).cpu().tolist()
    maps = gradcam_maps(model, x.to(device), predicted, override=override)
    mean = torch.tensor(data_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(data_cfg["std"]).view(3, 1, 1)
    shown = [((xi * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8) for xi in x]
    titles = [f"true {classes[labels[i]]} / pred {classes[p]}" for i, p in zip(chosen, predicted)]
    wrong = [labels[i] != p for i, p in zip(chosen, predicted)]
    heading = f"{heading}: " if heading else ""
    heading += f"{len(chosen)} validation images, {sum(wrong)} predicted wrong (red)"
    return save_gradcam_grid(shown, maps, titles, path, heading, wrong)
