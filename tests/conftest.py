"""Shared fixtures: offline hub, small image datasets made on the fly, a tiny-model extraction helper."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest-xdist: the workers share the cores. torch.set_num_threads, not OMP_NUM_THREADS: with that variable
    # set at import, oneDNN takes other kernels, and a cache extracted here would no longer be bit-identical to
    # one extracted by a job (which sets its threads the same way, runtime.jobs.start_job).
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

CLASSES = ("cat", "dog", "fox")


@pytest.fixture(scope="session")
def demo_caches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir with the demo digits extracted through timm's test_resnet and test_efficientnet at 48 px, random
    weights: built once per run and shared by test_probe, test_profiling and test_report (read or copied only)."""
    def extract(base: Path) -> Path:
        from configs.extract import ExtractSettings
        from extract.pipeline import extract_features

        work = base / "run"
        extract_features(ExtractSettings(data="demo", backbones=["test_resnet.r160_in1k", "test_efficientnet.r160_in1k"],
                                         workdir=work, pretrained=False, image_size=[48], workers=0, device="cpu",
                                         progress=False))
        return work
    return built_once(tmp_path_factory, "demo-caches", extract)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]) -> Path:
    """What ``build(folder)`` returns, built once per test run and shared by every module and every xdist worker
    that asks for ``name``: the first one builds it under a lock, the others wait for it and reuse it (the
    pattern pytest-xdist documents for session fixtures). For what tests only read or copy, never change."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, above the workers'
    folder, done = root / f"shared-{name}", root / f"shared-{name}.built"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way (its test failed then)
            folder.mkdir()
            done.write_text(str(build(folder).relative_to(folder)))
    return folder / done.read_text()


def make_image(path: Path, seed: int, size: int = 24, mode: str = "RGB") -> Path:
    """A small deterministic image whose content depends on ``seed`` (so classes differ)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(path)
    else:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mode="RGB").save(path)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """root/<class>/*.png: three classes of ten images each."""
    root = tmp_path / "images"
    for c, cls in enumerate(CLASSES):
        for i in range(10):
            make_image(root / cls / f"{i:02d}.png", seed=100 * c + i)
    return root


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    """root/{train,val,test}/<class>/*.png."""
    root = tmp_path / "split-images"
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for c, cls in enumerate(CLASSES):
            for i in range(n):
                make_image(root / split / cls / f"{i}.png", seed=1000 * c + 10 * len(split) + i)
    return root


@pytest.fixture
def extract_kwargs(tmp_path: Path) -> dict:
    """Fast, deterministic extraction settings on timm's tiny ResNet with random weights."""
    return dict(
        backbones=["test_resnet.r160_in1k"], workdir=tmp_path / "run", pretrained=False,
        image_size=[64], batch_size=8, workers=0, device="cpu", progress=False,
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The few slow end-to-end tests first: started last, one of them would keep a worker busy after the
    others have finished (longest first is the classic rule for spreading jobs over workers)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
