"""One trial: fine-tune backbone + head with progressive unfreezing, written out plainly.

Per epoch: enter the unfreezing stage; train (from the feature cache while the
whole backbone is frozen, else through the model on augmented images); validate;
keep the best epoch's weights (``best_model.pt``); write ``metrics.csv``; save
``last.pt`` (model, optimizer, counters) so an interrupted trial resumes at the next
epoch. Each epoch draws its randomness (batch order, augmentation, dropout, drop-path)
from the trial's seed and the epoch alone, so a resumed trial trains exactly as an
uninterrupted one. A non-finite loss, an out-of-memory error or any crash ends the
trial as *failed* with its reason; the study goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from configs.finetune import TrialParams, TuningConfig
from finetune.blocks import backbone_blocks
from finetune.data import FinetuneData, Split, eval_transform, image_loader, train_transform
from finetune.model import Target, build_classifier, save_checkpoint
from finetune.unfreeze import ProgressiveUnfreezer, default_schedule, stage_span
from probe.metrics import METRICS, fast_metric
from probe.train import class_weights
from runtime.console import progress
from runtime.device import autocast, empty_cache, is_out_of_memory, uses_channels_last
from runtime.errors import as_user_error
from runtime.files import atomic_write_text, save_torch, write_csv

log = logging.getLogger(__name__)


class TrialFailed(RuntimeError):
    """The trial cannot finish (diverged, out of memory, crashed); the message is its recorded reason."""


class StudyStopped(Exception):
    """The study is shutting down; the trial resumes from its last epoch next time."""


@dataclass
class TrialOutcome:
    status: str  # "ok" or "failed"
    metric: float | None  # best validation value of the selection metric
    best_epoch: int | None = None
    epochs: int = 0
    seconds: float = 0.0
    reason: str | None = None
    val: dict[str, float] = field(default_factory=dict)
    head_source: str = ""


def stage_lr_factor(t: float, *, start: float, end: float, warmup: float) -> float:
    """The base learning rate's factor at ``t`` (in epochs) inside one unfreezing stage ``[start, end)``.

    Each stage warms up linearly over ``warmup`` epochs (at most half the stage), then decays by a
    cosine to 0 at the stage's end. One schedule over all stages would leave the blocks unfrozen
    last almost nothing to learn with (a 3-epoch run gave its image epoch a learning rate of 1.8e-8);
    a new stage restarts the warm-up, because the weights it unfreezes have no optimizer state yet.
    """
    length = max(end - start, 1e-9)
    u = min(max(t - start, 0.0), length)
    w = min(warmup, length / 2)
    if w > 0 and u < w:
        return max(u, 1e-3 * w) / w
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (u - w) / max(length - w, 1e-9))))


def _better(metric: str, a: float, b: float | None) -> bool:
    return b is None or (a > b if METRICS[metric] else a < b)


@dataclass(frozen=True)
class TrialSetup:
    """What the trials of a study share besides the fine-tuning file: the selection metric (resolved), the
    device, the head they start from (``probe`` or ``random``), the seed (trial n adds n), the image decoding
    workers, and whether to show progress bars."""

    metric: str
    device: torch.device
    head: str = "probe"
    seed: int = 0
    data_workers: int = 0
    progress: bool = False

    def for_trial(self, n: int) -> TrialSetup:
        """Trial ``n``'s setup: its own seed (``seed + n``), wherever it runs."""
        return replace(self, seed=self.seed + n)


class _Trial:
    def __init__(self, target: Target, data: FinetuneData, params: TrialParams, tuning: TuningConfig, folder: Path,
                 setup: TrialSetup, stop: threading.Event | None) -> None:
        self.target, self.data, self.params, self.tuning, self.metric = target, data, params, tuning, setup.metric
        self.opts = tuning.train
        self.folder, self.device, self.seed = folder, setup.device, setup.seed
        self.data_workers, self.progress, self.stop = setup.data_workers, setup.progress, stop
        device, metric, seed = setup.device, setup.metric, setup.seed
        self.model, self.head_config, self.head_source = build_classifier(
            target, head_init=setup.head, data=data, metric=metric, drop_rate=params.drop_rate,
            drop_path_rate=params.drop_path_rate, seed=seed)
        self.blocks = backbone_blocks(self.model.backbone, max_blocks=self.opts.max_blocks)
        schedule = default_schedule(params.frozen_epochs, params.last_block_epochs, params.final_lr_scale)
        self.unfreezer = ProgressiveUnfreezer(self.model.backbone, self.model.head, self.blocks, schedule, params,
                                              self.opts)
        self.model.to(device)
        self.cuda = device.type == "cuda"
        if self.opts.channels_last and uses_channels_last(device):
            self.model.to(memory_format=torch.channels_last)
        num_classes = len(data.classes)
        weight = class_weights(data.train_labels, num_classes).to(device) if self.opts.class_weighted else None
        self.criterion = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=params.label_smoothing)
        self.eval_criterion = torch.nn.CrossEntropyLoss(weight=weight)
        # float16 autocast needs loss scaling; bfloat16 (preferred where supported) does not.
        use_scaler = self.cuda and self.opts.amp and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.train_tf = train_transform(target.data_config, tuning.augment)
        self.eval_tf = eval_transform(target.data_config)
        self.history: list[dict[str, Any]] = []
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_val: dict[str, float] = {}
        self.bad_epochs = 0
        self.start_epoch = 0
        self._cached: dict[str, torch.Tensor] | None = None

    def _cache_tensors(self) -> dict[str, torch.Tensor]:
        """The cached train/val features on the device, moved there once per trial."""
        if self._cached is None:
            d, dev = self.data, self.device
            self._cached = {"x_train": torch.as_tensor(d.train_features, dtype=torch.float32, device=dev),
                            "y_train": torch.as_tensor(d.train_labels, device=dev),
                            "x_val": torch.as_tensor(d.val_features, dtype=torch.float32, device=dev),
                            "y_val": torch.as_tensor(d.val_labels, device=dev)}
        return self._cached

    # ------------------------------------------------------------------ plumbing
    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise StudyStopped

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device) if self.cuda and self.opts.amp else contextlib.nullcontext()

    def _set_lr(self, epoch: int, update: int, updates: int) -> None:
        """The learning rate of optimizer update ``update`` of the epoch's ``updates``."""
        t = epoch + update / max(1, updates)
        start, end = stage_span(self.unfreezer.schedule, epoch, self.opts.epochs)
        self.unfreezer.set_lr(self.params.lr * stage_lr_factor(t, start=start, end=end, warmup=self.opts.warmup_epochs))

    def _optimizer_step(self) -> None:
        opt = self.unfreezer.optimizer
        if self.opts.clip_grad > 0:
            self.scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.opts.clip_grad)
        self.scaler.step(opt)
        self.scaler.update()
        opt.zero_grad(set_to_none=True)

    def _backward(self, loss: torch.Tensor, epoch: int, step: int, share: float) -> None:
        """Backpropagate a micro-batch's mean ``loss``, weighted by ``share``, its part of its update's examples."""
        if not torch.isfinite(loss):
            raise TrialFailed(f"diverged: non-finite training loss ({loss.item()}) at epoch {epoch}, step {step}")
        self.scaler.scale(loss * share).backward()

    def _accumulated(self, step: int, steps: int, size: int, examples: int) -> tuple[int, int, float]:
        """For micro-batch ``step`` of ``steps`` (``size`` examples; ``examples`` in the epoch): its optimizer update,
        the epoch's number of updates, and its share of the update's examples. With ``train.accum_steps`` = k an
        update averages the loss over every example of its k micro-batches, as one batch k times as large would,
        the epoch's last, smaller group included; the learning rate follows the updates, not the micro-batches."""
        k, batch = self.opts.accum_steps, self.params.batch_size
        update = step // k
        first = update * k * batch
        return update, math.ceil(steps / k), size / (min(first + k * batch, examples) - first)

    @contextlib.contextmanager
    def _epoch_randomness(self, epoch: int) -> Iterator[None]:
        """torch's, numpy's and Python's global generators seeded from (seed, epoch) for one epoch, and given back
        afterwards. Dropout, drop-path and augmentation in this process (timm's transforms use ``random``) draw
        from them; seeded once per process instead, an epoch would depend on everything drawn before it: on
        which trials ran earlier, and on whether the trial was resumed. Loader workers are seeded by the
        loader's own generator. Trials in parallel threads share these generators and stay unrepeatable."""
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[self.device] if self.cuda else []):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            try:
                yield
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    # ------------------------------------------------------------------ one epoch
    def _train_from_cache(self, epoch: int) -> float:
        """The backbone is frozen: its outputs are the cached features, so only the head runs."""
        head = self.model.head
        head.train()
        cached = self._cache_tensors()
        x_all, y_all = cached["x_train"], cached["y_train"]
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        order = torch.randperm(len(x_all), generator=g).to(self.device)
        bs = self.params.batch_size
        steps = math.ceil(len(order) / bs)
        total, n = 0.0, 0
        for step in range(steps):
            self._check_stop()
            idx = order[step * bs:(step + 1) * bs]
            update, updates, share = self._accumulated(step, steps, len(idx), len(order))
            self._set_lr(epoch, update, updates)
            # The backbone's own head dropout (timm's drop_rate), which the cached features skipped.
            x = F.dropout(x_all[idx], p=self.params.drop_rate, training=True)
            loss = self.criterion(head(x), y_all[idx])
            self._backward(loss, epoch, step, share)
            if (step + 1) % self.opts.accum_steps == 0 or step + 1 == steps:
                self._optimizer_step()
            total += loss.item() * len(idx)
            n += len(idx)
        return total / max(1, n)

    def _train_on_images(self, epoch: int) -> float:
        self.unfreezer.train()
        loader = image_loader(self.data.splits["train"], self.train_tf, batch_size=self.params.batch_size, shuffle=True,
                              workers=self.data_workers, seed=self.seed * 1000 + epoch, pin_memory=self.cuda)
        steps = len(loader)
        total, n = 0.0, 0
        bar = progress(loader, desc=f"  epoch {epoch + 1}/{self.opts.epochs}", unit="batch", leave=False,
                       enabled=self.progress)
        for step, (x, y) in enumerate(bar):
            self._check_stop()
            update, updates, share = self._accumulated(step, steps, len(y), len(loader.dataset))
            self._set_lr(epoch, update, updates)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.opts.channels_last and uses_channels_last(self.device):
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                loss = self.criterion(self.model(x), y)
            self._backward(loss.float(), epoch, step, share)
            if (step + 1) % self.opts.accum_steps == 0 or step + 1 == steps:
                self._optimizer_step()
            total += loss.item() * len(y)
            n += len(y)
            bar.set_postfix(loss=f"{total / n:.4f}")
        bar.close()
        return total / max(1, n)

    @torch.no_grad()
    def _validate(self, from_cache: bool) -> tuple[float, np.ndarray]:
        if from_cache:
            self.model.head.eval()
            cached = self._cache_tensors()
            logits = self.model.head(cached["x_val"]).float()
            y = cached["y_val"]
        else:
            logits, y = predict_logits(self.model, self.data.splits["val"], self.eval_tf, device=self.device,
                                       batch_size=self.opts.eval_batch_size, workers=self.data_workers,
                                       amp=self.opts.amp, channels_last=self.opts.channels_last)
        loss = self.eval_criterion(logits, y).item()
        return loss, logits.softmax(1).cpu().numpy()

    # ------------------------------------------------------------------ state
    def _checkpoint_info(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "params": self.params.to_dict(), "metric": self.metric, "val_metric": self.best,
                "head_source": self.head_source}

    def _save_last(self, epoch: int) -> None:
        save_torch({"epoch": epoch, "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                    "optimizer": self.unfreezer.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                    "best": self.best, "best_epoch": self.best_epoch, "best_val": self.best_val,
                    "bad_epochs": self.bad_epochs, "history": self.history, "params": self.params.to_dict()},
                   self.folder / "last.pt")

    def resume(self) -> None:
        """Continue after the last finished epoch of an interrupted run of this same trial."""
        path = self.folder / "last.pt"
        if not path.is_file():
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # cut short by a power loss or a full disk: the program's own file, not a result
            aside = path.with_name(f"last.pt.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
            path.rename(aside)
            log.warning("%s: last.pt is unreadable (%s: %s); set aside as %s, starting the trial over",
                        self.folder, type(exc).__name__, str(exc).splitlines()[0][:100] if str(exc) else "", aside.name)
            return
        if state.get("params") != self.params.to_dict():
            log.warning("%s: last.pt belongs to other hyperparameters; starting the trial over", self.folder)
            return
        epoch = int(state["epoch"])
        self.unfreezer.apply(epoch)  # the parameter groups as they were when it was saved
        self.model.load_state_dict(state["model"])
        self.unfreezer.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.best, self.best_epoch, self.best_val = state["best"], state["best_epoch"], dict(state["best_val"])
        self.bad_epochs, self.history = int(state["bad_epochs"]), list(state["history"])
        self.start_epoch = epoch + 1
        log.info("%s: resuming after epoch %d", self.folder.name, epoch)

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrialOutcome:
        t0 = time.perf_counter()
        self.resume()
        stopped_early = self.bad_epochs >= self.opts.patience
        for epoch in range(self.start_epoch, self.opts.epochs):
            if stopped_early:
                break
            te = time.perf_counter()
            self.unfreezer.apply(epoch)
            from_cache = self.unfreezer.unfrozen == 0 and self.opts.frozen_from_cache
            with self._epoch_randomness(epoch):
                train_loss = self._train_from_cache(epoch) if from_cache else self._train_on_images(epoch)
            val_loss, proba = self._validate(from_cache=from_cache)
            if not math.isfinite(val_loss):
                raise TrialFailed(f"diverged: non-finite validation loss at epoch {epoch}")
            value = fast_metric(self.metric, self.data.val_labels, proba)
            accuracy = fast_metric("accuracy", self.data.val_labels, proba)
            lrs = [g["lr"] for g in self.unfreezer.optimizer.param_groups]
            row = {"epoch": epoch, "stage_blocks": self.unfreezer.unfrozen, "trainable_blocks":
                   "; ".join(self.unfreezer.trainable_blocks()) or "head only", "source": "cache" if from_cache else "images",
                   "lr_head": self.unfreezer.optimizer.param_groups[0]["lr"], "lr_min": min(lrs), "lr_max": max(lrs),
                   "train_loss": train_loss, "val_loss": val_loss, f"val_{self.metric}": value, "val_accuracy": accuracy,
                   "seconds": time.perf_counter() - te}
            self.history.append(row)
            if _better(self.metric, value, self.best):
                self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
                self.best_val = {self.metric: value, "accuracy": accuracy, "loss": val_loss}
                save_checkpoint(self.folder / "best_model.pt", self.model, self.head_config, record=self.target.record,
                                info=self._checkpoint_info(epoch))
            elif epoch >= self.unfreezer.schedule[-1].epoch:
                # Patience counts in the last stage only: each unfreezing stage starts with a warm-up on new
                # weights and may dip before it climbs (ELPV, Lite0: val QWK 0.69 -> 0.55 -> 0.65 -> ... -> 0.70).
                self.bad_epochs += 1
            write_csv(self.folder / "metrics.csv", self.history)
            self._save_last(epoch)
            # An epoch's result at INFO: a trial takes minutes, and with --no-progress (a batch job's log) this line is
            # all that shows it is alive and where it stands.
            log.info("%s %s epoch %d/%d (%s): train loss %.4f, val loss %.4f, val %s %.4f%s; %.0fs", self.target.name,
                     self.folder.name, epoch, self.opts.epochs - 1,
                     "head, from the cache" if from_cache else f"{self.unfreezer.unfrozen} block(s) unfrozen",
                     train_loss, val_loss, self.metric, value, " (best so far)" if self.best_epoch == epoch else "",
                     row["seconds"])
            log.debug("%s epoch %d: %s", self.folder.name, epoch, row)
            stopped_early = self.bad_epochs >= self.opts.patience
        if not self.opts.keep_last:
            (self.folder / "last.pt").unlink(missing_ok=True)
        return TrialOutcome("ok", self.best, self.best_epoch, len(self.history), time.perf_counter() - t0,
                            val=self.best_val, head_source=self.head_source)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, split: Split, transform: Any, *, device: torch.device, batch_size: int,
                   workers: int, amp: bool = True, channels_last: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32) and labels of every image of ``split``, in order, through the whole model."""
    model.eval()
    cuda = device.type == "cuda"
    loader = image_loader(split, transform, batch_size=batch_size, shuffle=False, workers=workers, seed=0,
                          pin_memory=cuda)
    out, labels = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if channels_last and uses_channels_last(device):
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device) if cuda and amp else contextlib.nullcontext():
            out.append(model(x).float())
        labels.append(y.to(device))
    return torch.cat(out), torch.cat(labels)


def run_trial(target: Target, data: FinetuneData, params: TrialParams, tuning: TuningConfig, folder: Path,
              setup: TrialSetup, stop: threading.Event | None = None) -> TrialOutcome:
    """Train one configuration in ``folder``; a failure is returned as a failed outcome, never raised.

    :class:`StudyStopped` and ``KeyboardInterrupt`` propagate: the trial is unfinished, not failed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    described = tuning.to_dict()
    atomic_write_text(folder / "config.json", json.dumps({
        "backbone": target.name, "params": params.to_dict(), "train": described["train"],
        "augment": described["augment"], "metric": setup.metric, "head": setup.head, "seed": setup.seed,
        "device": str(setup.device)}, indent=2))
    t0 = time.perf_counter()
    trial = None
    try:
        trial = _Trial(target, data, params, tuning, folder, setup, stop)
        return trial.run()
    except (StudyStopped, KeyboardInterrupt):
        raise
    except TrialFailed as exc:
        reason = str(exc)
    except Exception as exc:
        if as_user_error(exc) is not None:
            # Not the configuration's fault but the workdir's or the machine's (a full disk, a file gone since the
            # study started): the study stops with the error, and the trial runs again once it is fixed.
            raise
        if is_out_of_memory(exc):
            reason = f"out of memory (batch size {params.batch_size}): {str(exc).splitlines()[0]}"
            empty_cache(setup.device)
        else:
            reason = f"crashed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.debug("trial in %s crashed", folder, exc_info=True)
    (folder / "last.pt").unlink(missing_ok=True)
    epochs = len(trial.history) if trial is not None else 0
    return TrialOutcome("failed", None, epochs=epochs, seconds=time.perf_counter() - t0, reason=reason,
                        head_source=trial.head_source if trial is not None else "")
