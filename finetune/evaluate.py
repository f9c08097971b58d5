"""The best trial of a backbone, evaluated once on the test split: the probe's metric set, CIs, confusion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.data import FinetuneData, eval_transform
from finetune.model import Target
from finetune.trainer import TrialSetup, predict_logits
from probe.metrics import bootstrap_ci, compute_metrics, default_top_k
from probe.plots import plot_confusion


def evaluate_test(model: torch.nn.Module, target: Target, data: FinetuneData, out: Path, setup: TrialSetup,
                  n_boot: int) -> dict[str, Any]:
    """Test metrics with 95% bootstrap CIs (``n_boot`` resamples) and the confusion figure, written to ``out``."""
    metric, device, seed, workers = setup.metric, setup.device, setup.seed, setup.data_workers
    model.to(device)
    logits, labels = predict_logits(model, data.splits["test"], eval_transform(target.data_config), device=device,
                                    batch_size=64, workers=workers)
    proba = logits.softmax(1).cpu().numpy()
    y = labels.cpu().numpy()
    k = default_top_k(len(data.classes))
    metrics = compute_metrics(y, proba, top_k=k, per_class=True)
    ci = bootstrap_ci(y, proba, n_boot=n_boot, seed=seed, top_k=k)
    plot_confusion(np.asarray(metrics["confusion"]), data.classes,
                   f"{target.name} fine-tuned\ntest {metric} {metrics[metric]:.3f}", out / "confusion.png",
                   random_weights=target.record["weights"] == "random")
    return {"test": metrics, "test_ci": {m: list(v) for m, v in ci.items()}, "n_test": int(len(y))}
