"""No silent wrong result (issue #10): locks between processes, file modes, storage errors as one line."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest

from configs.extract import ExtractSettings
from extract.cli import main as extract_main
from extract.pipeline import extract_features
from runtime.errors import WriteFailed, as_user_error
from runtime.figures import save_png
from runtime.files import atomic_write_text, write_csv
from runtime.locks import Busy, exclusive


def test_files_written_atomically_follow_the_umask(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        write_csv(tmp_path / "b.csv", [{"x": 1}])
        save_png(plt.figure(figsize=(1, 1)), tmp_path / "c.png", 10)
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    plain = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert plain == 0o644
    for name in ("a.json", "b.csv", "c.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == plain, name


def test_storage_errors_become_one_line_with_what_to_do() -> None:
    full = as_user_error(OSError(errno.ENOSPC, "No space left on device", "/w/probe/results.json"))
    assert isinstance(full, WriteFailed)
    assert str(full) == ("no space left on device writing /w/probe/results.json; free space (or fix the permission) "
                         "and run the same command again — it resumes where it stopped")
    torch_save = as_user_error(RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed "
                                            "writing file data/0: file write failed"))
    assert isinstance(torch_save, WriteFailed)
    assert as_user_error(ValueError("a bug")) is None  # keeps its traceback


def test_workdir_that_is_a_file_is_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    assert extract_main(["--data", "demo", "--workdir", str(afile)]) == 2
    assert "--workdir: is a file, not a folder" in caplog.text and "Traceback" not in caplog.text


def test_lock_names_its_holder_and_is_released_when_the_holder_dies(tmp_path: Path) -> None:
    import subprocess
    import sys

    with exclusive(tmp_path, "study-x"):
        with pytest.raises(Busy, match=f"study-x in {tmp_path} is in use by pid {os.getpid()} on "):
            with exclusive(tmp_path, "study-x"):
                pass
    # A process killed while it holds the lock leaves no lock behind.
    code = ("import os, sys, time; sys.path.insert(0, '.'); from runtime.locks import exclusive\n"
            f"with exclusive({str(tmp_path)!r}, 'study-x'):\n    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Busy, match=f"pid {holder.pid}"):
        with exclusive(tmp_path, "study-x"):
            pass
    holder.kill()
    holder.wait()
    with exclusive(tmp_path, "study-x"):  # stale: taken at once
        pass


def test_second_extract_of_a_cache_waits_for_the_first_then_reuses_it(tmp_path: Path, extract_kwargs: dict,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging
    import subprocess
    import sys

    from conftest import CLASSES, make_image

    image_folder = tmp_path / "many"
    for c, cls in enumerate(CLASSES):
        for i in range(100):  # enough that the first process is still building when the second asks
            make_image(image_folder / cls / f"{i:03d}.png", seed=1000 * c + i)
    settings = ExtractSettings(data=str(image_folder), **extract_kwargs)
    work = settings.workdir
    note = work / ".locks" / "cache-test_resnet.r160_in1k@64.h5.owner"
    first = subprocess.Popen(
        [sys.executable, "-m", "extract", "--data", str(image_folder), "--workdir", str(work), "--backbones",
         "test_resnet.r160_in1k", "--no-pretrained", "--image-size", "64", "--batch-size", "1", "--workers", "0",
         "--no-progress"],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (note.is_file() and json.loads(note.read_text())["pid"] == first.pid):
        time.sleep(0.05)  # until the first process holds the cache's lock
    caplog.set_level(logging.INFO)
    (second,) = extract_features(settings)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0 and "| built" in out
    assert f"is in use by pid {first.pid}" in caplog.text and "waiting for it" in caplog.text
    assert second.status == "reused"


# ----------------------------------------------------------------------------- bad input: one line, exit 2


def _csv_dataset(root: Path, text: str, encoding: str) -> Path:
    from conftest import CLASSES, make_image

    for c, cls in enumerate(CLASSES):
        for i in range(6):
            make_image(root / cls / f"{i}.png", seed=10 * c + i)
    path = root / "labels.csv"
    path.write_bytes(text.encode(encoding))
    return path


def _rows(fold: bool = False) -> str:
    from conftest import CLASSES

    head = "path,label,fold\n" if fold else "path,label\n"
    return head + "".join(f"{cls}/{i}.png,{cls}{f',{i % 3}' if fold else ''}\n" for cls in CLASSES for i in range(6))


def test_csv_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    from extract.dataset import load_dataset

    path = _csv_dataset(tmp_path / "d", _rows(), "utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    dataset = load_dataset(str(path), workdir=tmp_path / "w")
    assert len(dataset.samples) == 18 and dataset.classes == ["cat", "dog", "fox"]


@pytest.mark.parametrize("case, message", [
    ("latin1", "not UTF-8 text (byte"),
    ("fold99", "--fold 99: "),
    ("image_size", "--image-size[0]: Input should be less than or equal to 4096"),
])
def test_bad_dataset_input_is_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str,
                                       message: str) -> None:
    argv = ["--workdir", str(tmp_path / "w"), "--backbones", "test_resnet.r160_in1k", "--no-pretrained",
            "--no-progress"]
    if case == "latin1":
        path = _csv_dataset(tmp_path / "d", _rows().replace("cat/0.png,cat", "cat/0.png,caté"), "latin-1")
        argv += ["--data", str(path)]
    elif case == "fold99":
        argv += ["--data", str(_csv_dataset(tmp_path / "d", _rows(fold=True), "utf-8")), "--fold", "99"]
    else:
        argv += ["--data", "demo", "--image-size", "100000"]
    assert extract_main(argv) == 2
    assert message in caplog.text and "Traceback" not in caplog.text
    if case == "fold99":
        assert "has folds 0, 1, 2; choose one of them" in caplog.text


@pytest.mark.parametrize("text, message", [
    (b"extract:\n  data: caf\xe9\n", "not UTF-8 text"),
    (b"extract:\n  data: demo\n  batch_size: 8\n  batch_size: 16\n", "line 4: key 'batch_size' given twice"),
    (b"extract:\n  data: [demo\n", "not valid YAML (while parsing a flow sequence"),
    (b"- extract\n- probe\n", "the config file must be a mapping of keys, got list"),
    (b"extract: demo\n", "section 'extract' must be a mapping of keys"),
    (b"extarct: {data: demo}\n", "unknown top-level key 'extarct'; allowed: the sections extract, probe"),
    (None, "cannot read the config file (Is a directory)"),
])
def test_bad_yaml_is_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture, text: bytes | None,
                              message: str) -> None:
    config = tmp_path / "exp.yaml"
    if text is None:  # a folder where the file should be
        config.mkdir()
    else:
        config.write_bytes(text)
    assert extract_main(["--config", str(config), "--workdir", str(tmp_path / "w")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and len(errors[0].splitlines()) == 1, errors
    assert f"{config}: {message}" in errors[0] and "Traceback" not in caplog.text


def test_files_in_features_that_are_not_caches_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import h5py

    from probe.cli import main as probe_main

    work = tmp_path / "w"
    (work / "features").mkdir(parents=True)
    with h5py.File(work / "features" / "mine@64.h5", "w") as f:
        f["x"] = [1, 2, 3]
    (work / "features" / "x@64.h5").write_bytes(os.urandom(4096))
    assert probe_main(["--workdir", str(work), "--no-progress"]) == 2
    assert "mine@64.h5 (an HDF5 file that `extract` did not write" in caplog.text
    assert "x@64.h5 (not an HDF5 file" in caplog.text and "interrupted" not in caplog.text


def test_hand_edited_dataset_record_is_one_line(tmp_path: Path) -> None:
    from cache import CacheError, dataset_record

    (tmp_path / "dataset.json").write_text('{"root": "/data", "classes": ["a"]}')
    with pytest.raises(CacheError, match="no content_fingerprint, annotation_fingerprint .edited by hand"):
        dataset_record(tmp_path)
    (tmp_path / "dataset.json").write_text('{"root": ')
    with pytest.raises(CacheError, match="unreadable .JSONDecodeError"):
        dataset_record(tmp_path)


def test_float_image_with_nan_is_scaled_from_its_finite_pixels(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from runtime.images import load_rgb

    arr = np.linspace(0, 1000, 64, dtype=np.float32).reshape(8, 8)
    arr[0, 0], arr[0, 1] = np.nan, np.inf
    Image.fromarray(arr, mode="F").save(tmp_path / "x.tif")
    got = np.asarray(load_rgb(tmp_path / "x.tif"))[..., 0]
    assert got.max() == 255 and got[7, 7] == 255 and got[4, 0] > 0  # not a black image


def test_hdf5_locking_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, image_folder: Path, tmp_path: Path) -> None:
    """For file systems where HDF5's own locking fails (Lustre, NFS); the project's locks stay."""
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    argv = ["--data", str(image_folder), "--workdir", str(tmp_path / "w"), "--backbones", "test_resnet.r160_in1k",
            "--no-pretrained", "--image-size", "32", "--workers", "0", "--no-progress"]
    assert extract_main(argv) == 0 and "HDF5_USE_FILE_LOCKING" not in os.environ
    assert extract_main([*argv, "--no-hdf5-locking", "--force"]) == 0
    assert os.environ["HDF5_USE_FILE_LOCKING"] == "FALSE"
    assert (tmp_path / "w" / ".locks" / "cache-test_resnet.r160_in1k@32.h5.lock").exists()
