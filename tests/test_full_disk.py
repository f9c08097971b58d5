"""A full disk stops a command with one clear line, publishes nothing that looks complete, and the same
command resumes once there is space (issue #10). The file system is a small tmpfs mounted for the test."""

from __future__ import annotations

import errno
import importlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import CLASSES, make_image

from cache import open_cache
from cache.writer import HEADROOM


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    where = Path("/tmp") / f"bb-full-{uuid.uuid4().hex[:8]}"  # not under tmp_path: pytest cleans that up
    if not _mount_tmpfs(where, "8m"):
        if os.environ.get("CI"):
            pytest.fail("CI must be able to mount a tmpfs (it runs as root)")
        pytest.skip("mounting a tmpfs is not permitted here (needs root); the full-disk tests need one")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        shutil.rmtree(where, ignore_errors=True)


def fill(fs: Path, leave: int) -> Path:
    """Fill ``fs`` until ``leave`` bytes are free."""
    st = os.statvfs(fs)
    filler = fs / "filler"
    with filler.open("wb") as fh:
        fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_a_figure_that_finds_no_room_leaves_the_previous_one(small_fs: Path) -> None:
    """A PNG that the disk cannot hold fails with ENOSPC, and the figure of the run before stays whole: a reader
    never finds half an image under the name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from runtime.figures import save_png

    path = small_fs / "plots" / "pareto.png"
    save_png(plt.subplots(figsize=(6, 4))[0], path, 100)  # empty axes: a few kB
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.imshow(np.random.default_rng(0).random((200, 300)))  # noise: ~400 kB that do not compress
    filler = fill(small_fs, 50_000)  # room for part of the new image, even with the old one's space, not all of it
    try:
        with pytest.raises(OSError) as raised:
            save_png(fig, path, 100)
    finally:
        filler.unlink()
    assert raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["pareto.png"]  # no temporary file left behind
    assert not plt.get_fignums()  # closed, as after a successful write


@pytest.fixture
def run(capsys: pytest.CaptureFixture) -> Callable[..., subprocess.CompletedProcess]:
    """``run(module, *args)``: ``python -m module args`` in this process — the command's ``main``, which ``python -m``
    calls — with its exit code and what it printed (fresh processes would cost seconds of start-up each; the kill
    tests use real ones)."""
    def command(module: str, *args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = importlib.import_module(f"{module}.cli").main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess([module, *args], code, out.out, out.err)
    return command


def test_extract_on_a_full_disk_stops_then_resumes(small_fs: Path, tmp_path: Path,
                                                   run: Callable[..., subprocess.CompletedProcess]) -> None:
    def extract(data: Path, work: Path) -> subprocess.CompletedProcess:
        return run("extract", "--data", str(data), "--workdir", str(work), "--backbones",
                       "test_efficientnet.r160_in1k", "--no-pretrained", "--image-size", "64", "--batch-size", "8",
                       "--workers", "0", "--no-progress", "--store-maps")

    data = tmp_path / "images"
    for c, cls in enumerate(CLASSES):
        for i in range(12):
            make_image(data / cls / f"{i:02d}.png", seed=100 * c + i)
    reference = extract(data, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    (ref_path,) = (tmp_path / "reference" / "features").glob("*.h5")

    work = small_fs / "run"
    # Room for the dataset record and the start of the cache, not for all of it.
    filler = fill(small_fs, leave=HEADROOM + ref_path.stat().st_size // 3)
    first = extract(data, work)
    assert first.returncode == 2, first.stderr
    assert "no space left on device" in first.stderr and "run the same command again" in first.stderr
    assert "Traceback" not in first.stderr
    assert not list((work / "features").glob("*.h5")), "a cache was published although its rows were not written"

    filler.unlink()
    second = extract(data, work)
    assert second.returncode == 0, second.stderr
    (path,) = (work / "features").glob("*.h5")
    with open_cache(path) as got, open_cache(ref_path) as ref:
        assert got.num_rows == ref.num_rows
    with h5py.File(path) as got, h5py.File(ref_path) as ref:
        np.testing.assert_array_equal(got["pooled"][...], ref["pooled"][...])  # every row, none zero-filled
        np.testing.assert_array_equal(got["maps"][...], ref["maps"][...])


@pytest.mark.slow
def test_probe_profiling_and_finetune_on_a_full_disk(small_fs: Path, tmp_path: Path,
                                                    run: Callable[..., subprocess.CompletedProcess]) -> None:
    data = tmp_path / "images"
    for c, cls in enumerate(CLASSES):
        for i in range(12):
            make_image(data / cls / f"{i:02d}.png", seed=100 * c + i)
    work = small_fs / "run"
    common = ["--workdir", str(work), "--no-progress"]
    assert run("extract", *common, "--data", str(data), "--backbones", "test_resnet.r160_in1k", "--no-pretrained",
               "--image-size", "48", "--batch-size", "8", "--workers", "0").returncode == 0

    def refused(module: str, *args: str, leave: int = 0) -> str:
        filler = fill(small_fs, leave)
        try:
            done = run(module, *common, *args)
        finally:
            filler.unlink()
        assert done.returncode == 2, done.stderr
        assert "no space left on device" in done.stderr and "Traceback" not in done.stderr
        return done.stderr

    refused("probe")
    assert not (work / "probe").exists()  # nothing published
    assert run("probe", *common, "--bootstrap", "20").returncode == 0
    results = (work / "probe" / "results.json").read_text()
    grid = tmp_path / "grid.yaml"  # a small grid: what matters is that its files find no room
    grid.write_text("heads:\n  linear: {lr: [0.01, 0.1], epochs: [3]}\n  knn: {k: [3]}\n")
    refused("probe", "--grid", "--grid-file", str(grid), leave=20_000)
    assert (work / "probe" / "results.json").read_text() == results  # the previous complete set stands

    timing = ["--batch-sizes", "1", "--min-runs", "2", "--min-seconds", "0", "--warmup", "1", "--provider", "cpu"]
    refused("profiling", *timing)
    assert run("profiling", *common, *timing).returncode == 0

    study = work / "finetune" / "test_resnet.r160_in1k@48" / "trials.jsonl"
    tune = ["--budget", "1", "--epochs", "2", "--gradcam-images", "0", "--no-latency", "--data-workers", "0",
            "--bootstrap", "20"]
    # Room to start the study and its first trial, not to save the trial's model.
    refused("finetune", *tune, leave=HEADROOM // 4)
    assert '"event": "end"' not in (study.read_text() if study.exists() else "")  # not recorded as a failed trial
    done = run("finetune", *common, *tune)
    assert done.returncode == 0, done.stderr
    ends = [line for line in study.read_text().splitlines() if '"event": "end"' in line]
    assert len(ends) == 1 and '"status": "ok"' in ends[0]
