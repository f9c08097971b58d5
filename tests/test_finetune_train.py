"""Stage two on a tiny model and a tiny dataset: head from stage one, cache-fed frozen phase, trials, the command."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import built_once
from PIL import Image

import finetune.trainer as trainer_module
from cache import open_cache
from configs.extract import ExtractSettings
from configs.finetune import Augment, load_tuning
from configs.probe import ProbeSettings
from extract.pipeline import extract_features
from finetune.cli import main as finetune_main
from finetune.data import EvalRegion, eval_transform, load_data, train_transform
from finetune.model import build_classifier, load_checkpoint
from finetune.pipeline import select_targets
from finetune.trainer import StudyStopped, TrialSetup, run_trial
from probe.pipeline import run_probe

GRID = """
train: {batch_size: 16, warmup_epochs: 1, standardize: true}
heads:
  linear: {lr: [0.01], weight_decay: [0.001], epochs: [10], patience: [5]}
default: {type: linear, lr: 0.01, weight_decay: 0.001, epochs: 10, patience: 5}
"""
SEARCH = {"train": {"epochs": 3, "eval_batch_size": 16, "patience": 3},
          "defaults": {"frozen_epochs": 1, "last_block_epochs": 1, "batch_size": 8},
          "augment": {"hflip": 0.0, "color_jitter": 0.0, "scale": [0.6, 1.0]},
          "gradcam": {"images": 4},
          "space": {"lr": {"log": [1e-5, 1e-2]}, "batch_size": {"ordered": [4, 8, 16]}, "frozen_epochs": {"int": [0, 2]}}}


def blob_images(root: Path, per_class: int = 16, size: int = 40) -> Path:
    """Three classes told apart by where a bright blob sits, with noise: learnable, not trivial."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c, (cx, cy) in enumerate([(0.25, 0.25), (0.75, 0.5), (0.3, 0.8)]):
        for i in range(per_class):
            blob = np.exp(-((xx - cx - rng.normal(0, 0.05)) ** 2 + (yy - cy) ** 2) / 0.02)
            img = np.clip(blob[..., None] * [220, 180, 90] + rng.normal(40, 20, (size, size, 3)), 0, 255)
            path = root / f"class{c}" / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.astype(np.uint8)).save(path)
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_once(tmp_path_factory, "probed", probed_workdir)


def probed_workdir(base: Path, backbone: str = "test_resnet.r160_in1k") -> Path:
    """extract (float32 cache, so logits compare tightly) and probe, as stage one leaves them."""
    data = blob_images(base / "images")
    grid = base / "grid.yaml"
    grid.write_text(GRID)
    work = base / "run"
    extract_features(ExtractSettings(data=str(data), backbones=[backbone], workdir=work,
                                     pretrained=False, image_size=[48], batch_size=16, workers=0, device="cpu",
                                     progress=False, dtype="float32"))
    run_probe(ProbeSettings(workdir=work, grid_file=grid, device="cpu", bootstrap=50, progress=False))
    return work


@pytest.fixture(scope="module")
def target_and_data(workdir: Path):
    targets, metric = select_targets(workdir, top=1, backbones=None, metric=None)
    return targets[0], load_data(workdir, targets[0].cache), metric


def trial(target_and_data, folder: Path, **overlay) -> trainer_module.TrialOutcome:
    target, data, metric = target_and_data
    tuning = load_tuning(overlay={**SEARCH, **overlay})
    return run_trial(target, data, tuning.defaults, tuning, folder, TrialSetup(metric, torch.device("cpu")))


def test_a_workdir_probed_by_a_relative_path_is_fine_tuned_after_a_move_from_another_directory(
        workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """results.json records the paths the probe was given (here relative to where it ran); stage two finds the
    cache and the head in the workdir it is given, wherever that now is."""
    import shutil

    first = tmp_path / "first"
    shutil.copytree(workdir / "features", first / "run" / "features")
    shutil.copy(workdir / "dataset.json", first / "run" / "dataset.json")
    monkeypatch.chdir(first)
    run_probe(ProbeSettings(workdir=Path("run"), device="cpu", bootstrap=20, progress=False))  # as typed
    moved = tmp_path / "moved"
    shutil.move(first / "run", moved)
    monkeypatch.chdir(tmp_path)
    (target,), _ = select_targets(moved, top=1, backbones=None, metric=None)
    assert target.cache == moved / "features" / "test_resnet.r160_in1k@48.h5" and target.cache.is_file()
    assert target.head_file == moved / "probe" / "heads" / "test_resnet.r160_in1k@48.pt" and target.head_file.is_file()
    assert len(load_data(moved, target.cache).splits["val"].paths) > 0


def test_stage_two_names_images_that_are_gone_and_labels_that_changed(workdir: Path, tmp_path: Path) -> None:
    """Fine-tuning reads the images again: images moved away since extraction, or labels and splits changed by
    another extraction, are each one error saying what to do, before any trial starts."""
    import shutil

    from cache import CacheError

    work = tmp_path / "run"
    shutil.copytree(workdir / "features", work / "features")
    record = json.loads((workdir / "dataset.json").read_text())
    cache = work / "features" / "test_resnet.r160_in1k@48.h5"
    (work / "dataset.json").write_text(json.dumps({**record, "root": str(tmp_path / "elsewhere")}))
    with pytest.raises(CacheError, match=r"image\(s\) recorded in test_resnet.r160_in1k@48.h5 are gone, e.g. .*"
                                         r"Restore them or run `python -m extract` again"):
        load_data(work, cache)
    (work / "dataset.json").write_text(json.dumps({**record, "annotation_fingerprint": "0" * 16}))
    with pytest.raises(CacheError, match=r"its labels/splits differ from .*dataset.json .*Run `python -m extract` "
                                         r"and `python -m probe` again first"):
        load_data(work, cache)


def test_what_every_trial_needs_is_checked_before_any_trial(workdir: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Every trial starts from the probe's head and uses the augmentation: a missing or unreadable head, or options
    timm refuses, are answered at once (exit 2) with no trial recorded. They used to fail each trial, and the study
    kept those failures after the cause was fixed."""
    import shutil

    work = tmp_path / "run"
    shutil.copytree(workdir, work, symlinks=True)
    head = work / "probe" / "heads" / "test_resnet.r160_in1k@48.pt"
    saved = head.read_bytes()
    args = ["--workdir", str(work), "--top", "1", "--optimizer", "none", "--epochs", "1", "--no-latency",
            "--gradcam-images", "0", "--no-progress"]
    head.unlink()
    assert finetune_main(args) == 2
    assert f"the probe head {head} is missing; run `python -m probe` again, or use --head random" in caplog.text
    head.write_bytes(b"not a checkpoint")
    assert finetune_main(args) == 2
    assert f"{head}: not a readable head file (" in caplog.text and "Traceback" not in caplog.text
    assert not (work / "finetune").exists()
    head.write_bytes(saved)
    # Augmentation options timm refuses: one line before any trial too (every trial crashed on them).
    space = tmp_path / "space.yaml"
    space.write_text("augment: {auto_augment: bogus}\n")
    assert finetune_main([*args, "--space", str(space)]) == 2
    assert "augment: timm cannot build the training transform from" in caplog.text
    assert "Unknown AA policy bogus" in caplog.text and not (work / "finetune").exists()
    if not torch.cuda.is_available():  # an ONNX Runtime engine this machine lacks: before the search, not after it
        assert finetune_main([a for a in args if a != "--no-latency"] + ["--provider", "cuda"]) == 2
        assert "--provider cuda: CUDAExecutionProvider is not usable here" in caplog.text
        assert not (work / "finetune").exists()
    assert finetune_main(args) == 0
    # Stage one chose again (another head in the same file): the study is not continued from a different start.
    ckpt = torch.load(head, weights_only=True)
    ckpt["state_dict"] = {k: v + 0.01 for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, head)
    caplog.clear()
    assert finetune_main(args) == 2
    assert "The trials started from another head: stage one chose again" in caplog.text


def test_a_ranked_cache_that_was_deleted_is_named_as_missing(workdir: Path, tmp_path: Path) -> None:
    """It used to be reported as a cache "that does not belong to this workdir's dataset"."""
    import shutil

    from cache import CacheError

    work = tmp_path / "run"
    shutil.copytree(workdir, work, symlinks=True)
    (work / "features" / "test_resnet.r160_in1k@48.h5").unlink()
    with pytest.raises(CacheError, match=r"cache\(s\) test_resnet.r160_in1k@48.h5 missing from .*features. Run "
                                         r"`python -m extract` again for them \(then `python -m probe`\)"):
        select_targets(work, top=1, backbones=None, metric=None)


def test_head_from_stage_one_gives_the_probe_logits(target_and_data) -> None:
    target, data, _ = target_and_data
    model, config, source = build_classifier(target, head_init="probe", data=data, drop_path_rate=0.1)
    assert source.startswith("probe (linear")
    tf = eval_transform(target.data_config)
    val = data.splits["val"]
    from runtime.images import load_rgb

    x = torch.stack([tf(load_rgb(p)) for p in val.paths])
    model.eval()
    with torch.no_grad():
        logits = model(x)
        expected = model.head(torch.as_tensor(data.val_features))
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    # ... and those are the probe's own logits: the saved head on the cached features.
    from probe.classifier import load_head

    head, _ = load_head(target.head_file)
    with torch.no_grad():
        assert torch.equal(head(torch.as_tensor(data.val_features)), expected)
    random_model, _, random_source = build_classifier(target, head_init="random", data=data)
    assert random_source == "random"
    assert not torch.allclose(random_model.head.fc.weight, model.head.fc.weight)


def test_trial_trains_stages_writes_outputs_and_reloads(target_and_data, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="finetune.trainer"):
        outcome = trial(target_and_data, tmp_path / "t")
    assert outcome.status == "ok", outcome.reason
    # Every epoch's result is logged at INFO (with --no-progress it is all that shows a trial is alive), each new
    # best marked, with the numbers metrics.csv keeps.
    lines = [r.getMessage() for r in caplog.records if " epoch " in r.getMessage() and r.levelname == "INFO"]
    assert [line.split(" epoch ")[1].split(" ")[0] for line in lines] == ["0/2", "1/2", "2/2"]
    assert "(head, from the cache)" in lines[0] and "1 block(s) unfrozen" in lines[1]
    assert [i for i, line in enumerate(lines) if "(best so far)" in line][-1] == outcome.best_epoch
    rows = (tmp_path / "t" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"epoch", "trainable_blocks", "lr_head", "lr_min", "train_loss", "val_loss", "val_macro_f1"} <= set(header)
    sources = [r.split(",")[header.index("source")] for r in rows[1:]]
    assert sources == ["cache", "images", "images"]  # head only from the cache; then through the model
    blocks = [int(r.split(",")[header.index("stage_blocks")]) for r in rows[1:]]
    assert blocks[0] == 0 and blocks[1] == 1 and blocks[2] > 1
    assert not (tmp_path / "t" / "last.pt").exists()  # removed once the trial ended (keep_last: false)
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["params"]["frozen_epochs"] == 1 and config["augment"]["hflip"] == 0.0
    ckpt = torch.load(tmp_path / "t" / "best_model.pt", weights_only=True)
    assert ckpt["epoch"] == outcome.best_epoch and ckpt["val_metric"] == pytest.approx(outcome.metric)
    val = [float(r.split(",")[header.index("val_macro_f1")]) for r in rows[1:]]
    assert [f"val macro_f1 {v:.4f}" in line for v, line in zip(val, lines)] == [True] * 3
    model, _ = load_checkpoint(tmp_path / "t" / "best_model.pt")
    target, data, _ = target_and_data
    from finetune.trainer import predict_logits

    logits, labels = predict_logits(model, data.splits["val"], eval_transform(target.data_config),
                                    device=torch.device("cpu"), batch_size=8, workers=0)
    from probe.metrics import fast_metric

    assert fast_metric("macro_f1", labels.numpy(), logits.softmax(1).numpy()) == pytest.approx(outcome.metric)


def test_frozen_phase_never_runs_the_backbone(target_and_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_images(*args, **kwargs):
        raise AssertionError("an image was loaded while the backbone is frozen")

    monkeypatch.setattr(trainer_module, "image_loader", no_images)
    monkeypatch.setattr(trainer_module, "predict_logits", no_images)
    outcome = trial(target_and_data, tmp_path / "t", defaults={**SEARCH["defaults"], "frozen_epochs": 3}, space={})
    assert outcome.status == "ok", outcome.reason
    assert outcome.epochs == 3


def test_diverging_trial_is_recorded_as_failed(target_and_data, tmp_path: Path) -> None:
    outcome = trial(target_and_data, tmp_path / "t", defaults={**SEARCH["defaults"], "lr": 1e30}, space={})
    assert outcome.status == "failed" and outcome.reason.startswith("diverged: non-finite")


@pytest.mark.parametrize("error, reason", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     "out of memory (batch size 8): CUDA out of memory. Tried to allocate 2.00 GiB"),
    (ValueError("a broken layer\nwith a second line"), "crashed: ValueError: a broken layer"),
])
def test_a_trial_that_runs_out_of_memory_or_crashes_is_failed_with_its_reason(
        target_and_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, reason: str) -> None:
    """README: such a trial is recorded as failed with its reason (one line), its last.pt removed, and the search
    goes on; the epochs it finished are counted."""
    def image_epoch(self, epoch: int) -> float:
        raise error

    monkeypatch.setattr(trainer_module._Trial, "_train_on_images", image_epoch)
    outcome = trial(target_and_data, tmp_path / "t", defaults={**SEARCH["defaults"], "frozen_epochs": 1}, space={})
    assert (outcome.status, outcome.reason, outcome.epochs) == ("failed", reason, 1)  # the cache epoch finished
    assert not (tmp_path / "t" / "last.pt").exists()


def test_frozen_epochs_through_the_backbone_when_not_from_the_cache(target_and_data, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """train.frozen_from_cache: false trains the head-only epochs through the frozen backbone on augmented
    images (the cached features are not used), and says so in metrics.csv."""
    def no_cache(self, epoch: int) -> float:
        raise AssertionError("the cached features were used")

    monkeypatch.setattr(trainer_module._Trial, "_train_from_cache", no_cache)
    outcome = trial(target_and_data, tmp_path / "t", train={**SEARCH["train"], "epochs": 1, "frozen_from_cache": False},
                    defaults={**SEARCH["defaults"], "frozen_epochs": 1}, space={})
    assert outcome.status == "ok", outcome.reason
    (row,) = _history(tmp_path / "t")
    assert (row["trainable_blocks"], row["source"]) == ("head only", "images")


def test_gradient_accumulation_trains_as_one_larger_batch(target_and_data, tmp_path: Path) -> None:
    """train.accum_steps = 2 with batch 4 gives the updates of batch 8: every update averages the loss over all
    its examples (the epoch's last, smaller group too: it was divided by accum_steps whatever its size) and the
    learning rate follows the updates. Checked on the cache epoch, where nothing else is random."""
    def head_after(folder: Path, accum: int, batch: int) -> list[torch.Tensor]:
        outcome = trial(target_and_data, folder, train={**SEARCH["train"], "epochs": 1, "accum_steps": accum},
                        defaults={**SEARCH["defaults"], "batch_size": batch, "frozen_epochs": 1}, space={})
        assert outcome.status == "ok", outcome.reason
        model, _ = load_checkpoint(folder / "best_model.pt")
        return [p.detach().clone() for p in model.head.parameters()]

    target, data, _ = target_and_data
    assert len(data.train_labels) % 8 not in (0, 4)  # the last group is smaller than the others, and split
    one = head_after(tmp_path / "a", accum=1, batch=8)
    accumulated = head_after(tmp_path / "b", accum=2, batch=4)
    for a, b in zip(one, accumulated):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_an_error_the_workdir_must_fix_stops_the_trial_instead_of_failing_it(
        target_and_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A UserError inside a trial (the backbone's recorded weights file moved) is raised to the study, which stops
    with it; it is no trial's result."""
    from extract.models import WeightsError

    def moved(record, **extra):
        raise WeightsError(f"{record['backbone']}: recorded weights file:1234 from /w.pth are missing or have changed")

    monkeypatch.setattr("finetune.model._backbone", moved)
    with pytest.raises(WeightsError, match="are missing or have changed"):
        trial(target_and_data, tmp_path / "t", space={})


def stop_after_epoch_1(monkeypatch: pytest.MonkeyPatch):
    """An event set once a trial has written its second epoch (0 and 1), as a study shutting down would;
    and the list of row counts of each metrics.csv write."""
    import threading

    stop, written = threading.Event(), []
    real_write = trainer_module.write_csv

    def write_then_stop(path, rows):
        real_write(path, rows)
        written.append(len(rows))
        if len(rows) == 2:
            stop.set()

    monkeypatch.setattr(trainer_module, "write_csv", write_then_stop)
    return stop, written


def test_interrupted_trial_resumes_at_the_next_epoch(target_and_data, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:

    stop, written = stop_after_epoch_1(monkeypatch)
    target, data, metric = target_and_data
    tuning = load_tuning(overlay={**SEARCH, "train": {**SEARCH["train"], "patience": 5}})
    args = (target, data, tuning.defaults, tuning, tmp_path / "t", TrialSetup(metric, torch.device("cpu")))
    with pytest.raises(StudyStopped):
        run_trial(*args, stop=stop)
    assert (tmp_path / "t" / "last.pt").is_file()
    before = (tmp_path / "t" / "metrics.csv").read_text().splitlines()
    outcome = run_trial(*args)
    after = (tmp_path / "t" / "metrics.csv").read_text().splitlines()
    assert outcome.status == "ok" and outcome.epochs == 3
    assert after[:3] == before  # the first two epochs were kept, not trained again
    assert written == [1, 2, 3]


def test_a_last_pt_of_other_hyperparameters_is_not_resumed(target_and_data, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A trial folder reused with other hyperparameters (a study restarted by hand) starts the trial over instead of
    continuing another configuration's weights."""
    stop, written = stop_after_epoch_1(monkeypatch)
    target, data, metric = target_and_data
    tuning = load_tuning(overlay={**SEARCH, "train": {**SEARCH["train"], "patience": 5}})
    setup = TrialSetup(metric, torch.device("cpu"))
    with pytest.raises(StudyStopped):
        run_trial(target, data, tuning.defaults, tuning, tmp_path / "t", setup, stop=stop)
    assert (tmp_path / "t" / "last.pt").is_file()
    other = tuning.params({"lr": tuning.defaults.lr * 3})
    outcome = run_trial(target, data, other, tuning, tmp_path / "t", setup)
    assert "last.pt belongs to other hyperparameters; starting the trial over" in caplog.text
    assert outcome.status == "ok" and written == [1, 2, 1, 2, 3]  # epochs 0 and 1 trained again


@pytest.mark.parametrize("data_workers", [0, 2], ids=["augmented-here", "augmented-in-workers"])
def test_a_resumed_trial_trains_exactly_as_an_uninterrupted_one(target_and_data, tmp_path: Path, data_workers: int,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Each epoch's randomness (augmentation, dropout, drop-path, batch order) comes from the trial's seed and
    the epoch, not from what ran before it in the process: stopping after epoch 1 and resuming gives the same
    weights and the same metrics, bit for bit, as one run; with the images augmented in this process or in
    loader workers (the command's default)."""
    target, data, metric = target_and_data
    tuning = load_tuning(overlay={**SEARCH, "train": {**SEARCH["train"], "patience": 5},
                                  "defaults": {**SEARCH["defaults"], "drop_rate": 0.3, "drop_path_rate": 0.2},
                                  "augment": {**SEARCH["augment"], "hflip": 0.5}})
    setup = TrialSetup(metric, torch.device("cpu"), data_workers=data_workers)
    whole = run_trial(target, data, tuning.defaults, tuning, tmp_path / "whole", setup)
    stop, _ = stop_after_epoch_1(monkeypatch)
    with pytest.raises(StudyStopped):
        run_trial(target, data, tuning.defaults, tuning, tmp_path / "resumed", setup, stop=stop)
    torch.rand(100)  # whatever else the process drew in between
    resumed = run_trial(target, data, tuning.defaults, tuning, tmp_path / "resumed", setup)
    assert (resumed.metric, resumed.best_epoch, resumed.epochs) == (whole.metric, whole.best_epoch, whole.epochs)

    def rows(folder: str) -> list[list[str]]:  # every column but the epoch's seconds
        lines = [line.split(",") for line in (tmp_path / folder / "metrics.csv").read_text().splitlines()]
        keep = [i for i, name in enumerate(lines[0]) if name != "seconds"]
        return [[line[i] for i in keep] for line in lines]

    assert rows("resumed") == rows("whole")
    a, b = (load_checkpoint(tmp_path / f / "best_model.pt")[0].state_dict() for f in ("whole", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_last_checkpoint_restarts_the_trial_instead_of_failing_it(target_and_data, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            caplog: pytest.LogCaptureFixture) -> None:

    stop, _ = stop_after_epoch_1(monkeypatch)
    target, data, metric = target_and_data
    tuning = load_tuning(overlay={**SEARCH, "train": {**SEARCH["train"], "patience": 5}})
    args = (target, data, tuning.defaults, tuning, tmp_path / "t", TrialSetup(metric, torch.device("cpu")))
    with pytest.raises(StudyStopped):
        run_trial(*args, stop=stop)
    last = tmp_path / "t" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])  # a power loss cut it short
    outcome = run_trial(*args)
    assert outcome.status == "ok" and outcome.epochs == 3
    assert "last.pt is unreadable" in caplog.text and list((tmp_path / "t").glob("last.pt.unreadable-*"))


def test_a_command_whose_every_trial_fails_exits_1_with_the_reasons_kept(workdir: Path, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Nothing fine-tuned is not a success: the summary keeps each failure's reason, and the exit status is 1 (as
    profiling's when nothing could be measured). An empty search space runs the default configuration once."""
    import shutil

    import yaml

    work = tmp_path / "run"
    shutil.copytree(workdir, work)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**{k: SEARCH[k] for k in ("train", "augment")}, "space": {},
                                     "defaults": {**SEARCH["defaults"], "lr": 1.0e30}}))
    args = ["--workdir", str(work), "--space", str(space), "--top", "1", "--budget", "5", "--no-progress",
            "--data-workers", "0", "--gradcam-images", "0", "--no-latency"]
    assert finetune_main(args) == 1
    assert "every trial failed" in caplog.text and "the search space is empty" in caplog.text
    summary = (work / "finetune" / "summary.md").read_text()
    assert "trial 000 failed: diverged: non-finite training loss" in summary
    (study,) = [json.loads(line) for p in (work / "finetune").glob("*/trials.jsonl") for line in p.open()
                if json.loads(line)["event"] == "end"]
    assert study["status"] == "failed"  # one trial: the default, not the budget of 5


def test_command_end_to_end_and_rerun_continues(workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    work = tmp_path / "run"
    shutil.copytree(workdir, work)
    config = tmp_path / "exp.yaml"
    import yaml

    config.write_text(yaml.safe_dump({"finetune": {"top": 1, "budget": 2, "search": SEARCH, "bootstrap": 50,
                                                   "data_workers": 0}}))
    mlruns = (tmp_path / "mlruns").as_uri()
    args = ["--workdir", str(work), "--config", str(config), "--no-progress"]
    assert finetune_main([*args, "--mlflow", mlruns]) == 0
    out = work / "finetune"
    slug = "test_resnet.r160_in1k@48"
    # MLflow: every trial's epochs as metric history, the best trial's test metric, the ONNX model as an artifact
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlruns)
    (run,) = client.search_runs([client.get_experiment_by_name("backbone-bench/run").experiment_id])
    epochs = [int(r["epoch"]) for r in csv.DictReader((out / slug / "trial-001" / "metrics.csv").open())]
    history = client.get_metric_history(run.info.run_id, "test_resnet.r160_in1k/48px/trial-001/val_macro_f1")
    assert sorted(m.step for m in history) == epochs and len(epochs) >= 2
    tested = json.loads((out / "best" / slug / "metrics.json").read_text())["test"]["macro_f1"]
    assert run.data.metrics["test_resnet.r160_in1k/48px/best/test_macro_f1"] == pytest.approx(tested)
    assert "model.onnx" in {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run.info.run_id, f"finetune/best/{slug}")}
    for rel in (f"{slug}/trials.jsonl", f"{slug}/study.json", f"{slug}/trial-000/config.json",
                f"{slug}/trial-000/metrics.csv", f"{slug}/trial-000/best_model.pt", f"{slug}/trial-001/config.json",
                f"best/{slug}/best_model.pt", f"best/{slug}/metrics.json", f"best/{slug}/confusion.png",
                f"best/{slug}/model.onnx", "summary.md", "summary.json", "search.png", f"gradcam/{slug}.png",
                f"gradcam/{slug}-probe.png"):
        assert (out / rel).is_file(), rel
    study = json.loads((out / slug / "study.json").read_text())
    assert len(study["trials"]) == 2 and study["best"] is not None and study["delegate"]
    best = json.loads((out / "best" / slug / "metrics.json").read_text())
    assert best["trial"] == study["best"]["trial"]
    test = best["test"]
    assert {"accuracy", "macro_f1", "roc_auc", "log_loss", "confusion", "per_class"} <= set(test)
    lo, hi = best["test_ci"]["macro_f1"]
    assert lo <= test["macro_f1"] <= hi
    assert best["latency"]["max_rel_error"] < 1e-3 and best["latency"]["p50_ms"] > 0
    summary = (out / "summary.md").read_text()
    assert "probe val macro_f1" in summary and "RANDOM" in summary
    assert slug.split("@")[0] in capsys.readouterr().out
    # The same command again: every trial is finished, nothing trains or is tested again.
    lines = (out / slug / "trials.jsonl").read_text()
    mtime = (out / "best" / slug / "metrics.json").stat().st_mtime_ns
    assert finetune_main(args) == 0
    assert (out / slug / "trials.jsonl").read_text() == lines
    assert (out / "best" / slug / "metrics.json").stat().st_mtime_ns == mtime
    # Other search options on the same study: refused with what to do.
    assert finetune_main(args + ["--optimizer", "random"]) == 2
    assert "--restart" in capsys.readouterr().err
    # --restart keeps the old study aside, and the new best is tested, not the old result reused.
    assert finetune_main(args + ["--optimizer", "random", "--restart"]) == 0
    assert len(list(out.glob(f"{slug}.old-*"))) == 1
    retested = json.loads((out / "best" / slug / "metrics.json").read_text())
    assert retested["source_checkpoint"]["mtime_ns"] != best["source_checkpoint"]["mtime_ns"]


def test_killed_study_resumes_where_it_stopped(workdir: Path, tmp_path: Path) -> None:
    import shutil

    work = tmp_path / "run"
    shutil.copytree(workdir, work)
    args = ["--workdir", str(work), "--budget", "4", "--epochs", "2", "--gradcam-images", "0", "--no-latency",
            "--no-progress", "--data-workers", "0", "--bootstrap", "20", "--space", str(tmp_path / "s.yaml")]
    (tmp_path / "s.yaml").write_text(json.dumps({k: SEARCH[k] for k in ("defaults", "augment", "space")}))
    log = work / "finetune" / "test_resnet.r160_in1k@48" / "trials.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=Path(__file__).parents[1],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and '"event": "end"' in log.read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = [json.loads(x) for x in log.read_text().splitlines() if '"end"' in x]
    assert finished, "the study was killed before any trial finished"
    assert len(finished) < 4, "the study finished before it could be killed"
    first = (work / "finetune" / "test_resnet.r160_in1k@48" / "trial-000" / "metrics.csv").read_text()
    assert finetune_main(args) == 0
    events = [json.loads(x) for x in log.read_text().splitlines()]
    ends = [e["trial"] for e in events if e["event"] == "end"]
    assert sorted(ends) == [0, 1, 2, 3]  # none repeated, none lost
    assert (work / "finetune" / "test_resnet.r160_in1k@48" / "trial-000" / "metrics.csv").read_text() == first


def test_clear_errors_without_probe_results(tmp_path: Path, workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert finetune_main(["--workdir", str(tmp_path / "empty"), "--no-progress"]) == 2
    assert "python -m probe" in caplog.text
    caplog.clear()
    assert finetune_main(["--workdir", str(workdir), "--backbones", "vit_huge*", "--no-progress"]) == 2
    assert "matches nothing the probe ranked" in caplog.text
    # As extract took it: without the pretrained tag (README's `--backbones convnext_tiny`), or with the size.
    for item in ("test_resnet", "test_resnet@48"):
        (target,), _ = select_targets(workdir, top=1, backbones=[item], metric=None)
        assert target.record["backbone"] == "test_resnet.r160_in1k"
    with open_cache(next((workdir / "features").glob("*.h5"))) as fc:
        assert fc.num_rows == 48


def test_knn_probe_head_is_replaced_by_a_trained_linear_probe(workdir: Path, tmp_path: Path) -> None:
    import shutil

    work = tmp_path / "run"
    shutil.copytree(workdir, work)
    grid = tmp_path / "knn.yaml"
    grid.write_text("heads: {knn: {k: [3]}}\ndefault: {type: knn, k: 3}\n")
    run_probe(ProbeSettings(workdir=work, grid_file=grid, device="cpu", bootstrap=20, progress=False))
    targets, metric = select_targets(work, top=1, backbones=None, metric=None)
    assert targets[0].probe["head"].startswith("knn")
    data = load_data(work, targets[0].cache)
    model, config, source = build_classifier(targets[0], head_init="probe", data=data, metric=metric)
    assert config.type == "linear" and source.startswith("linear probe") and "knn" in source
    with torch.no_grad():
        predicted = model.head.eval()(torch.as_tensor(data.val_features)).argmax(1).numpy()
    assert (predicted == data.val_labels).mean() > 0.5  # trained on the cache, not a random start (3 classes)


# --- issue #14: an image epoch starts where the cache epochs ended -------------------------------------------------

def _history(folder: Path) -> list[dict[str, str]]:
    import csv

    with (folder / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


NO_AUGMENT = {"hflip": 0.0, "color_jitter": 0.0, "scale": [1.0, 1.0], "ratio": [1.0, 1.0]}


def test_image_epoch_at_learning_rate_zero_keeps_the_cache_path_metric(target_and_data, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Learning rate 0 everywhere: whatever changes between the cache epoch and the image epochs is not learning
    # but the way blocks behave once unfrozen (BatchNorm's batch statistics and running-statistics updates).
    monkeypatch.setattr(trainer_module, "stage_lr_factor", lambda *a, **k: 0.0)
    outcome = trial(target_and_data, tmp_path / "t", augment=NO_AUGMENT,
                    defaults={**SEARCH["defaults"], "drop_path_rate": 0.0}, space={})
    assert outcome.status == "ok", outcome.reason
    rows = _history(tmp_path / "t")
    assert [r["source"] for r in rows] == ["cache", "images", "images"]
    cache_loss, cache_f1 = float(rows[0]["val_loss"]), float(rows[0]["val_macro_f1"])
    for row in rows[1:]:
        assert float(row["val_macro_f1"]) == pytest.approx(cache_f1, abs=1e-9)
        assert float(row["val_loss"]) == pytest.approx(cache_loss, rel=1e-4)


def test_layernorm_family_image_epoch_at_learning_rate_zero_keeps_the_cache_path_metric(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same default for a ViT (LayerNorm: no running statistics to drift; dropout and drop-path are what
    # train mode changes, and they are off here).
    work = probed_workdir(tmp_path_factory.mktemp("vit"), "test_vit.r160_in1k")
    targets, metric = select_targets(work, top=1, backbones=None, metric=None)
    monkeypatch.setattr(trainer_module, "stage_lr_factor", lambda *a, **k: 0.0)
    folder = tmp_path_factory.mktemp("vit-trial") / "t"
    outcome = trial((targets[0], load_data(work, targets[0].cache), metric), folder, augment=NO_AUGMENT,
                    defaults={**SEARCH["defaults"], "drop_path_rate": 0.0}, space={})
    assert outcome.status == "ok", outcome.reason
    rows = _history(folder)
    assert [r["source"] for r in rows] == ["cache", "images", "images"]
    for row in rows[1:]:
        assert float(row["val_macro_f1"]) == pytest.approx(float(rows[0]["val_macro_f1"]), abs=1e-9)
        assert float(row["val_loss"]) == pytest.approx(float(rows[0]["val_loss"]), rel=1e-4)


def test_image_epoch_at_a_tiny_learning_rate_moves_by_no_more_than_noise(target_and_data, tmp_path: Path) -> None:
    outcome = trial(target_and_data, tmp_path / "t", defaults={**SEARCH["defaults"], "lr": 1e-8}, space={})
    assert outcome.status == "ok", outcome.reason
    rows = _history(tmp_path / "t")
    n_val = len(target_and_data[1].val_labels)
    accuracy = [float(r["val_accuracy"]) for r in rows]
    # One validation image changing its prediction is the noise floor.
    assert max(accuracy) - min(accuracy) <= 1 / n_val + 1e-9, accuracy
    losses = [float(r["val_loss"]) for r in rows]
    assert max(losses) - min(losses) < 0.01 * losses[0] + 1e-3, losses


def test_first_image_epoch_loss_is_of_the_order_of_the_last_cache_epoch(target_and_data, tmp_path: Path) -> None:
    outcome = trial(target_and_data, tmp_path / "t", augment=NO_AUGMENT, space={})
    assert outcome.status == "ok", outcome.reason
    rows = _history(tmp_path / "t")
    cache, first_images = rows[0], rows[1]
    assert cache["source"] == "cache" and first_images["source"] == "images"
    assert float(first_images["train_loss"]) < 3 * float(cache["train_loss"]) + 0.1, rows


def test_each_unfreezing_stage_gets_its_own_warm_up_and_decay() -> None:
    from finetune.trainer import stage_lr_factor
    from finetune.unfreeze import default_schedule, stage_span

    schedule = default_schedule(2, 1, 0.1)  # head 0-1, last block 2, the rest from 3
    assert [stage_span(schedule, e, 5) for e in range(5)] == [(0, 2), (0, 2), (2, 3), (3, 5), (3, 5)]
    # The short run: 3 epochs, the last one through images. Its block must learn at about the base rate.
    start, end = stage_span(schedule, 2, 3)
    factors = [stage_lr_factor(2 + i / 100, start=start, end=end, warmup=1.0) for i in range(100)]
    assert max(factors) > 0.99 and sum(factors) / len(factors) > 0.4
    # Every stage starts low (a fresh warm-up for weights with no optimizer state yet) and ends near 0.
    for s, e in [(0, 2), (2, 3), (3, 5)]:
        assert stage_lr_factor(s, start=s, end=e, warmup=1.0) < 0.01
        assert stage_lr_factor(e - 1e-6, start=s, end=e, warmup=1.0) < 0.01
        assert stage_lr_factor(s + (e - s) / 2, start=s, end=e, warmup=1.0) > 0.9


def test_second_finetune_on_a_running_study_is_refused(workdir: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    from runtime.locks import exclusive

    work = tmp_path / "run"
    shutil.copytree(workdir, work)
    with exclusive(work, "study-test_resnet.r160_in1k@48"):  # as a running `python -m finetune` holds it
        assert finetune_main(["--workdir", str(work), "--budget", "1", "--no-progress", "--no-latency"]) == 2
    assert f"study-test_resnet.r160_in1k@48 in {work} is in use by pid {os.getpid()}" in caplog.text
    assert not (work / "finetune" / "test_resnet.r160_in1k@48" / "trials.jsonl").exists()


FRAMED_CFG = {"crop_mode": "center", "crop_pct": 0.875, "input_size": [3, 48, 48], "interpolation": "bicubic",
              "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def _framed_image(frame: int) -> Image.Image:
    """Grey noise inside a red frame of ``frame`` pixels: the frame lies outside timm's evaluation crop."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(60, 140, (100, 100, 3)).astype(np.uint8)
    pixels[:frame], pixels[-frame:], pixels[:, :frame], pixels[:, -frame:] = 255, 255, 255, 255
    pixels[:frame, :, 1:] = pixels[-frame:, :, 1:] = pixels[:, :frame, 1:] = pixels[:, -frame:, 1:] = 0
    return Image.fromarray(pixels)


def _red_pixels(view: torch.Tensor) -> int:
    rgb = view * 0.5 + 0.5  # undo mean = std = 0.5
    return int(((rgb[0] > 0.9) & (rgb[1] < 0.3)).sum())


def test_training_crops_never_show_what_the_evaluation_view_leaves_out() -> None:
    # The cache saw the centre crop (floor(48 / 0.875) = 54 px for 100 -> 89 px kept, 5 px cut each side); a
    # training crop from the whole image would show the frame the stage-one head never saw (issue #14).
    image = _framed_image(5)
    assert _red_pixels(eval_transform(FRAMED_CFG)(image)) == 0
    assert EvalRegion(FRAMED_CFG)(image).size == (89, 89)
    augment = Augment(hflip=0.5, vflip=0.5, color_jitter=0.0, scale=(0.08, 1.0))
    transform = train_transform(FRAMED_CFG, augment)
    torch.manual_seed(0)
    assert sum(_red_pixels(transform(image)) for _ in range(300)) == 0
    # timm's own training crop (from the whole image) does show it: the check above can fail.
    whole = torchvision.transforms.Compose(transform.transforms[1:])
    assert sum(_red_pixels(whole(image)) for _ in range(300)) > 0


def test_a_training_crop_of_the_whole_region_is_the_evaluation_view() -> None:
    image = _framed_image(5)
    still = Augment(hflip=0.0, color_jitter=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    train_view, eval_view = train_transform(FRAMED_CFG, still)(image), eval_transform(FRAMED_CFG)(image)
    assert train_view.shape == eval_view.shape == (3, 48, 48)
    # Crop-then-resize against resize-then-crop: the same pixels up to interpolation at the edges.
    assert (train_view - eval_view).abs().mean() < 0.06


def test_patience_counts_only_in_the_last_stage(target_and_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every epoch after the first scores worse. Early stopping must not end the trial inside the last-block stage
    # (a stage's warm-up dips first); it counts from the whole-model stage on.
    scores = iter([0.9, 0.5, 0.4, 0.3, 0.2, 0.1])
    real = trainer_module.fast_metric
    monkeypatch.setattr(trainer_module, "fast_metric",
                        lambda metric, y, p: real(metric, y, p) if metric == "accuracy" else next(scores))
    outcome = trial(target_and_data, tmp_path / "t", train={**SEARCH["train"], "epochs": 6, "patience": 1},
                    defaults={**SEARCH["defaults"], "frozen_epochs": 1, "last_block_epochs": 2}, space={})
    assert outcome.status == "ok" and outcome.best_epoch == 0
    rows = _history(tmp_path / "t")
    # epoch 0 head only, 1-2 last block (not counted), 3 whole model: one bad epoch there = patience 1
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]


def test_the_start_head_after_a_knn_probe_trains_in_float32_on_any_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the probe chose kNN, stage two starts from the probe's default linear head trained on the cache — in
    float32 even where the grid's products default to bfloat16, so the start does not depend on the CPU."""
    from types import SimpleNamespace

    import probe.train
    from configs.probe import load_grid
    from finetune.model import linear_probe_head
    from probe.train import Examples, Fit, train_grid

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(120, 16)).astype(np.float32), rng.integers(0, 3, 120)
    x[np.arange(120), y] += 2
    data = SimpleNamespace(train_features=x[:80], train_labels=y[:80], val_features=x[80:], val_labels=y[80:],
                           classes=["a", "b", "c"])
    monkeypatch.setattr(probe.train, "native_bfloat16", lambda device: True)  # auto would be bfloat16
    head, config = linear_probe_head(data, "macro_f1", seed=3)
    grid = load_grid()
    (want,) = train_grid([config], Examples(x[:80], y[:80]), Examples(x[80:], y[80:]), 3,
                         Fit(options=grid.train.model_copy(update={"precision": "float32"}), seed=3))
    (low,) = train_grid([config], Examples(x[:80], y[:80]), Examples(x[80:], y[80:]), 3,
                        Fit(options=grid.train, seed=3))
    assert torch.equal(head.fc.weight, want.head.fc.weight) and torch.equal(head.fc.bias, want.head.fc.bias)
    assert not torch.equal(low.head.fc.weight, want.head.fc.weight)  # bfloat16 would have trained another head
