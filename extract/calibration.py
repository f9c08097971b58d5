"""The CPU batch size and torch thread count for an extraction, chosen by measuring them.

On a CPU the batch size the user would type costs far more than it seems: a large batch falls out of
the caches (EfficientNet-B0 @ 128 px on 2 cores: 85 images/s at batch 16, 66 at batch 64), and decoding
workers take cores from torch's threads. So when ``--batch-size`` is not given, each backbone's forward
pass — exactly as extraction runs it — is timed on random images at a few batch sizes, with all of the
process's threads and with the threads the decoding workers leave free, and the fastest is used. The
measurement takes a few seconds and is kept per machine,
torch version, model and input size in ``~/.cache/backbone-bench/extract-calibration.json``
(``$XDG_CACHE_HOME``), so it is paid once. On a GPU the batch is 64, halved on out-of-memory.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from runtime.files import atomic_write_text

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 4, 16, 64)
GPU_BATCH_SIZE = 64
MIN_SECONDS = 0.25  # of timed forward passes per setting, after one warm-up batch
LONG_BATCH_SECONDS = 1.0


@dataclass(frozen=True)
class Setting:
    batch_size: int
    threads: int | None  # torch intra-op threads; None: leave torch's as they are
    images_per_second: float | None = None  # forward-only, as measured


def cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "backbone-bench" / "extract-calibration.json"


def machine() -> str:
    """What a calibration holds for: this CPU model and core count, and this torch."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()} | torch {torch.__version__}"


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` inside, restored after."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def throughput(forward: Callable[[torch.Tensor], object], batch: torch.Tensor, threads: int,
               min_seconds: float = MIN_SECONDS) -> float:
    """Images per second of ``forward`` on ``batch`` with ``threads`` torch threads (one warm-up pass first)."""
    with torch_threads(threads):
        forward(batch)
        done, t0 = 0, time.perf_counter()
        while done == 0 or time.perf_counter() - t0 < min_seconds:
            forward(batch)
            done += len(batch)
        return done / (time.perf_counter() - t0)


def measure(forward: Callable[[torch.Tensor], object], input_size: tuple[int, ...], thread_options: list[int],
            max_batch: int, batch_sizes: tuple[int, ...] = BATCH_SIZES) -> list[Setting]:
    """Forward-only throughput: the first thread count over the batch sizes (ascending, stopping at the first
    one clearly slower than the best so far — throughput rises to one peak, then falls — or once one batch
    takes a second), each other thread count at the best batch size only."""
    generator = torch.Generator().manual_seed(0)
    sizes = [b for b in batch_sizes if b <= max_batch] or [max_batch]
    results: list[Setting] = []
    for threads in thread_options:
        candidates = sizes if not results else [max(results, key=lambda r: r.images_per_second or 0.0).batch_size]
        best = 0.0
        for b in candidates:
            rate = throughput(forward, torch.randn(b, *input_size, generator=generator), threads)
            results.append(Setting(b, threads, rate))
            # Past the peak; or one batch already takes a second, so a larger one has no overhead left to
            # amortise (and would cost seconds to time: ResNet-50 @ 224 at batch 64 takes ~10 s per pass here).
            if rate < 0.9 * best or b / rate >= LONG_BATCH_SECONDS:
                break
            best = max(best, rate)
    return results


def choose(name: str, forward: Callable[[torch.Tensor], object], input_size: tuple[int, ...], device: torch.device,
           workers: int, images: int, how: str) -> Setting:
    """The batch size (and on a CPU the torch threads) for extracting ``images`` images with ``forward``, which
    runs the model ``how`` (layout and precision: a measurement of another way is not reused)."""
    if device.type != "cpu":
        return Setting(min(GPU_BATCH_SIZE, images), None)
    cores = torch.get_num_threads()  # the process's share: a Slurm job's cpus-per-task, say
    options = sorted({cores, max(1, cores - workers)}, reverse=True)
    key = (f"{machine()} | {name} | {'x'.join(map(str, input_size))} | threads {','.join(map(str, options))}"
           f" | {how}")
    path = cache_file()
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        known = {}
    if key in known and known[key]["batch_size"] <= max(images, 1):
        setting = Setting(**known[key])
        log.info("%s: batch %d on %d thread(s) (calibrated earlier on this machine: %.1f images/s forward-only)",
                 name, setting.batch_size, setting.threads, setting.images_per_second)
        return setting
    t0 = time.perf_counter()
    results = measure(forward, input_size, options, max_batch=max(images, 1))
    setting = max(results, key=lambda r: r.images_per_second or 0.0)
    log.info("%s: batch %d on %d thread(s), %.1f images/s forward-only (calibrated in %.1fs: %s)", name,
             setting.batch_size, setting.threads, setting.images_per_second, time.perf_counter() - t0,
             ", ".join(f"b{r.batch_size}/t{r.threads} {r.images_per_second:.1f}" for r in results))
    try:  # a cache that cannot be written costs the next run another calibration, nothing else
        known[key] = asdict(setting)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(known, indent=1, sort_keys=True))
    except OSError as exc:
        log.warning("could not keep the calibration in %s (%s)", path, exc)
    return setting
