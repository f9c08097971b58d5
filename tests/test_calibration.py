"""Extraction's batch size and thread count chosen by measuring them (extract/calibration.py)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest
import torch

from configs.extract import ExtractSettings
from extract import calibration
from extract.pipeline import extract_features


class FakeForward:
    """A forward pass whose cost per image depends on the batch size and the torch thread count: fastest at
    batch 16 on 2 threads, as on this project's 2-core machine."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, x: torch.Tensor) -> None:
        threads = torch.get_num_threads()
        self.calls.append((len(x), threads))
        per_image = {1: 4e-3, 4: 2e-3, 16: 1e-3, 64: 3e-3}[len(x)] * (1.0 if threads >= 2 else 1.8)
        time.sleep(per_image * len(x))


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh calibration file, short timings, and two torch threads (the worker's own restored after)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(calibration, "MIN_SECONDS", 0.02)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield tmp_path / "xdg"
    torch.set_num_threads(before)


HOW = "channels-last, float32"


def test_chooses_the_fastest_and_keeps_it(cache_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    forward = FakeForward()
    with caplog.at_level(logging.INFO):
        chosen = calibration.choose("m@64", forward, (3, 8, 8), torch.device("cpu"), workers=1, images=500, how=HOW)
    assert (chosen.batch_size, chosen.threads) == (16, 2)
    assert {b for b, t in forward.calls if t == 2} == {1, 4, 16, 64}  # swept, past the peak
    assert {b for b, t in forward.calls if t == 1} == {16}  # the other thread count at the best batch only
    assert torch.get_num_threads() == 2  # restored
    assert "calibrated in" in caplog.text
    stored = json.loads((cache_home / "backbone-bench" / "extract-calibration.json").read_text())
    (key,) = stored
    assert "m@64" in key and "3x8x8" in key and stored[key]["batch_size"] == 16
    # Kept per machine and model: the next run measures nothing.
    again = FakeForward()
    assert calibration.choose("m@64", again, (3, 8, 8), torch.device("cpu"), workers=1, images=500, how=HOW) == chosen
    assert again.calls == []
    # Another model (or input size) is measured afresh.
    other = FakeForward()
    calibration.choose("m@96", other, (3, 8, 8), torch.device("cpu"), workers=1, images=500, how=HOW)
    assert other.calls
    # So is the same model run another way (bfloat16 instead of float32, say).
    other_way = FakeForward()
    calibration.choose("m@64", other_way, (3, 8, 8), torch.device("cpu"), workers=1, images=500,
                       how="channels-last, bfloat16")
    assert other_way.calls


def test_small_data_and_gpu(cache_home: Path) -> None:
    forward = FakeForward()
    chosen = calibration.choose("m@64", forward, (3, 8, 8), torch.device("cpu"), workers=0, images=10, how=HOW)
    assert chosen.batch_size in (1, 4) and max(b for b, _ in forward.calls) <= 10  # never a batch beyond the data
    gpu = FakeForward()
    assert calibration.choose("m@64", gpu, (3, 8, 8), torch.device("cuda"), workers=4, images=1000, how=HOW) == \
        calibration.Setting(64, None)
    assert gpu.calls == []


def test_unwritable_cache_costs_a_warning(cache_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache_home.mkdir()
    (cache_home / "backbone-bench").write_text("a file where the folder goes")
    chosen = calibration.choose("m@64", FakeForward(), (3, 8, 8), torch.device("cpu"), workers=1, images=500, how=HOW)
    assert chosen.batch_size == 16
    assert "could not keep the calibration" in caplog.text


def test_extraction_without_batch_size_uses_the_calibration(cache_home: Path, image_folder: Path,
                                                            extract_kwargs: dict) -> None:
    kwargs = {**extract_kwargs, "batch_size": None}
    (result,) = extract_features(ExtractSettings(data=str(image_folder), **kwargs))
    with h5py.File(result.path) as f:
        meta = json.loads(f.attrs["meta"])
    stored = json.loads((cache_home / "backbone-bench" / "extract-calibration.json").read_text())
    (setting,) = stored.values()
    assert meta["batch_size"] == setting["batch_size"] and meta["torch_threads"] == setting["threads"]
    assert torch.get_num_threads() == 2
    # --batch-size still wins, and then nothing is measured.
    (again,) = extract_features(ExtractSettings(data=str(image_folder), **{**kwargs, "batch_size": 3, "force": True}))
    with h5py.File(again.path) as f:
        assert json.loads(f.attrs["meta"])["batch_size"] == 3


def test_no_larger_batch_once_one_batch_takes_long(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a batch takes LONG_BATCH_SECONDS, per-batch overheads are amortised: no larger batch is timed
    (for ResNet-50 @ 224 on 2 cores a batch of 64 alone takes ~10 s)."""
    monkeypatch.setattr(calibration, "LONG_BATCH_SECONDS", 0.01)  # batch 4 of FakeForward takes 8 ms, 16 takes 16
    forward = FakeForward()
    chosen = calibration.choose("slow@224", forward, (3, 8, 8), torch.device("cpu"), workers=1, images=500, how=HOW)
    assert {b for b, _ in forward.calls} == {1, 4, 16} and chosen.batch_size == 16
