from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from conftest import make_image

from cache import CacheError, list_caches, open_cache
from cache.writer import CacheWriter
from configs.extract import ExtractSettings
from extract.backbones import BackboneError
from extract.cli import main
from extract.models import RANDOM_INIT_SEED
from extract.pipeline import extract_features
from runtime.images import load_rgb

REPO = Path(__file__).resolve().parents[1]


def features(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["pooled"][...]


def test_cache_format_and_values(image_folder: Path, extract_kwargs: dict) -> None:
    (result,) = extract_features(ExtractSettings(data=str(image_folder), **extract_kwargs))
    assert result.status == "built" and result.rows == 30 and result.path.name == "test_resnet.r160_in1k@64.h5"
    with h5py.File(result.path, "r") as f:
        assert set(f) == {"pooled", "labels", "split", "ids", "view", "row_crc"}
        assert f["pooled"].dtype == np.float16 and f["pooled"].shape == (30, result.feature_dim)
        attrs = dict(f.attrs)
        assert attrs["complete"] and attrs["backbone"] == "test_resnet.r160_in1k" and attrs["weights"] == "random"
        cfg = json.loads(attrs["data_config"])
        assert cfg["input_size"] == [3, 64, 64] and {"mean", "std", "interpolation", "crop_pct", "crop_mode"} <= set(cfg)
        assert "versions" in json.loads(attrs["meta"]) and attrs["dataset_fingerprint"]
        ids = f["ids"].asstr()[...]
        assert list(ids) == sorted(ids)
        pooled = f["pooled"][...].astype(np.float32)
        # Each row's checksum is zlib's CRC-32 of the row's stored bytes.
        import zlib
        assert [zlib.crc32(row.tobytes()) for row in f["pooled"][...]] == list(f["row_crc"][...])
    # Independent reference: timm's own eval transform and the model's pooled output.
    torch.manual_seed(RANDOM_INIT_SEED)
    model = timm.create_model("test_resnet.r160_in1k", pretrained=False, num_classes=0).eval()
    tf = timm.data.create_transform(**cfg, is_training=False)
    x = torch.stack([tf(load_rgb(image_folder / i)) for i in ids[:5]])
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(pooled[:5], expected, rtol=2e-3, atol=2e-3)  # float16 storage


def test_channels_last_forward_stores_the_same_pooled_features_and_maps_as_a_plain_forward(
        image_folder: Path, extract_kwargs: dict) -> None:
    """On a CPU the extractor runs convolutions channels-last (faster); what it stores is the model's plain NCHW
    output all the same: pooled features, and feature maps in (C, H, W) order. (In float32, to compare exactly.)"""
    from extract.extractor import _Forward

    torch.manual_seed(RANDOM_INIT_SEED)
    model = timm.create_model("test_resnet.r160_in1k", pretrained=False, num_classes=0).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        fmap = model.forward_features(x)
        pooled = model.forward_head(fmap, pre_logits=True)
    forward = _Forward(model, torch.device("cpu"), store_maps=True, batch_size=2, amp=False)  # two micro-batches
    got_pooled, got_maps = forward(x)
    assert forward.channels_last and model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(got_pooled, pooled.numpy(), rtol=1e-4, atol=1e-5)
    assert got_maps.shape == tuple(fmap.shape)
    np.testing.assert_allclose(got_maps.astype(np.float32), fmap.half().float().numpy(), rtol=1e-2, atol=1e-2)
    # and through the whole command into the cache, against timm's eval transform and a plain forward
    (result,) = extract_features(ExtractSettings(data=str(image_folder),
                                                 **{**extract_kwargs, "store_maps": True, "amp": False}))
    with h5py.File(result.path, "r") as f:
        cfg = json.loads(f.attrs["data_config"])
        ids, stored = f["ids"].asstr()[:4], f["maps"][:4].astype(np.float32)
        assert json.loads(f.attrs["meta"])["precision"] == "float32"
    tf = timm.data.create_transform(**cfg, is_training=False)
    with torch.no_grad():
        want = model.forward_features(torch.stack([tf(load_rgb(image_folder / i)) for i in ids])).contiguous()
    np.testing.assert_allclose(stored, want.half().float().numpy(), rtol=1e-2, atol=1e-2)


def test_mixed_precision_forward_is_bfloat16_close_to_float32_and_recorded(
        image_folder: Path, extract_kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --amp, where the CPU multiplies bfloat16 natively (made so here, so that any CPU runs this test), the
    forward runs in it: features within bfloat16's rounding of float32's, the cache's meta says which. Without
    --amp a CPU extracts in float32, as stage two and profiling run the model."""
    import runtime.device
    from extract.extractor import _Forward

    monkeypatch.setattr(runtime.device, "native_bfloat16", lambda device: True)
    torch.manual_seed(RANDOM_INIT_SEED)
    model = timm.create_model("test_resnet.r160_in1k", pretrained=False, num_classes=0).eval()
    x = torch.randn(6, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    low = _Forward(model, torch.device("cpu"), store_maps=False, batch_size=4, amp=True)
    full = _Forward(model, torch.device("cpu"), store_maps=False, batch_size=4)  # the default on a CPU
    assert (low.precision, low.how) == ("bfloat16", "channels-last, bfloat16") and full.precision == "float32"
    got, exact = torch.as_tensor(low(x)[0]), torch.as_tensor(full(x)[0])
    assert got.dtype == torch.float32 and not torch.equal(got, exact)  # really rounded, and stored as float
    torch.testing.assert_close(exact, want, rtol=1e-4, atol=1e-5)
    assert float((got - want).norm() / want.norm()) < 0.03
    assert float(torch.nn.functional.cosine_similarity(got, want).min()) > 0.999
    # On CUDA it is on unless --no-amp says otherwise (bfloat16 where the GPU has it); nothing runs on one here.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert _Forward(model, torch.device("cuda"), store_maps=False, batch_size=4).precision == "bfloat16"
    assert _Forward(model, torch.device("cuda"), store_maps=False, batch_size=4, amp=False).precision == "float32"
    for amp, precision in ((True, "bfloat16"), (None, "float32"), (False, "float32")):
        (result,) = extract_features(ExtractSettings(data=str(image_folder), **{**extract_kwargs, "amp": amp,
                                                                                "force": True}))
        with h5py.File(result.path, "r") as f:
            assert json.loads(f.attrs["meta"])["precision"] == precision


def test_reader_api(image_folder: Path, extract_kwargs: dict) -> None:
    (result,) = extract_features(ExtractSettings(data=str(image_folder), **extract_kwargs))
    (entry,) = list_caches(extract_kwargs["workdir"])
    assert entry.complete and entry.backbone == "test_resnet.r160_in1k" and entry.image_size == 64
    with open_cache(entry.path) as fc:
        counts = fc.split_counts()
        assert sum(counts.values()) == 30 and fc.image_size == 64 and fc.classes == ["cat", "dog", "fox"]
        train = fc.load("train")
        assert train.features.dtype == np.float32 and train.features.shape == (counts["train"], fc.feature_dim)
        assert set(train.labels) == {0, 1, 2}
        blocks = list(fc.iter_batches("train", rows=4))
        np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), train.features)
        np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), train.labels)
        assert all(len(b[0]) <= 4 for b in blocks)
        everything = fc.load()
        assert len(everything.labels) == 30
        with pytest.raises(CacheError, match="--store-maps"):
            fc.load("val", maps=True)


def test_reader_refuses_partial_and_missing(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="python -m extract"):
        open_cache(tmp_path / "features" / "x@64.h5")
    path = tmp_path / "x@64.h5"
    with h5py.File(path, "w") as f:
        f.attrs["complete"] = False
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(path)


def test_complete_cache_reused_fast(image_folder: Path, extract_kwargs: dict) -> None:
    (first,) = extract_features(ExtractSettings(data=str(image_folder), **extract_kwargs))
    mtime = first.path.stat().st_mtime_ns
    (again,) = extract_features(ExtractSettings(data=str(image_folder), **extract_kwargs))
    assert again.status == "reused" and again.seconds < 1.0
    assert first.path.stat().st_mtime_ns == mtime
    (forced,) = extract_features(ExtractSettings(data=str(image_folder), **{**extract_kwargs, "force": True}))
    assert forced.status == "built"


def test_stale_cache_rebuilt(image_folder: Path, extract_kwargs: dict, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    (first,) = extract_features(ExtractSettings(data=str(image_folder), **extract_kwargs))
    before = features(first.path)
    make_image(image_folder / "cat" / "00.png", seed=999)  # same name, other pixels
    (second,) = extract_features(ExtractSettings(data=str(image_folder), **extract_kwargs))
    assert second.status == "built"
    assert "stale cache (dataset changed)" in caplog.text
    assert not np.array_equal(before, features(second.path))
    (third,) = extract_features(ExtractSettings(data=str(image_folder), **{**extract_kwargs, "dtype": "float32"}))
    assert third.status == "built" and features(third.path).dtype == np.float32


def test_new_split_relabels_without_forward_pass(image_folder: Path, extract_kwargs: dict, tmp_path: Path) -> None:
    fold_of = lambda i: "test" if i >= 8 else str(i % 2)  # noqa: E731
    rows = [f"images/{c}/{i:02d}.png,{c},{fold_of(i)}" for c in ("cat", "dog", "fox") for i in range(10)]
    csv_path = tmp_path / "folds.csv"
    csv_path.write_text("path,label,fold\n" + "\n".join(rows) + "\n")
    (a,) = extract_features(ExtractSettings(data=str(csv_path), fold=0, **extract_kwargs))
    feats = features(a.path)
    (b,) = extract_features(ExtractSettings(data=str(csv_path), fold=1, **extract_kwargs))
    assert b.status == "relabelled"
    np.testing.assert_array_equal(features(b.path), feats)
    with open_cache(b.path) as fc:
        val = fc.load("val")
    assert all(int(Path(i).stem) % 2 == 1 for i in val.ids)


def test_interrupted_run_resumes_to_identical_file(image_folder: Path, extract_kwargs: dict, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    reference_kwargs = {**extract_kwargs, "workdir": tmp_path / "reference"}
    (ref,) = extract_features(ExtractSettings(data=str(image_folder), **reference_kwargs))

    calls = {"n": 0}
    original = CacheWriter.write

    def dying_write(self, start, pooled, maps=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        return original(self, start, pooled, maps)

    monkeypatch.setattr(CacheWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        extract_features(ExtractSettings(data=str(image_folder), **extract_kwargs))
    monkeypatch.setattr(CacheWriter, "write", original)
    partial = extract_kwargs["workdir"] / "features" / "test_resnet.r160_in1k@64.h5.partial"
    assert partial.exists() and not partial.with_suffix("").exists()
    with h5py.File(partial, "r") as f:
        assert f.attrs["rows_done"] == 16 and not f.attrs["complete"]
    (resumed,) = extract_features(ExtractSettings(data=str(image_folder), **extract_kwargs))
    assert resumed.status == "resumed" and not partial.exists()
    np.testing.assert_array_equal(features(resumed.path), features(ref.path))


def test_killed_process_resumes(tmp_path: Path) -> None:
    """SIGKILL a real extraction mid-way; the same command finishes it with what an uninterrupted run writes."""
    root = tmp_path / "many"
    for c in range(2):
        for i in range(160):
            make_image(root / f"c{c}" / f"{i:03d}.png", seed=c * 1000 + i, size=32)
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "extract", "--data", str(root), "--backbones", "test_vit.r160_in1k",
           "--no-pretrained", "--workdir", str(work), "--image-size", "64", "--batch-size", "4", "--workers", "0",
           "--device", "cpu", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HDF5_USE_FILE_LOCKING": "FALSE", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = work / "features" / "test_vit.r160_in1k@64.h5.partial"
    deadline = time.time() + 120
    rows_done = 0
    while time.time() < deadline and proc.poll() is None:
        if partial.exists():
            try:
                with h5py.File(partial, "r", locking=False) as f:
                    rows_done = int(f.attrs.get("rows_done", 0))
            except OSError:
                pass
            if rows_done >= 40:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < rows_done < 320, "the run should have been killed mid-way"
    assert partial.exists()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    final = work / "features" / "test_vit.r160_in1k@64.h5"
    assert final.exists() and not partial.exists()
    # The uninterrupted run in this process (a fresh interpreter costs seconds of imports), on one torch thread as
    # the commands above had (OMP_NUM_THREADS=1): the same reductions, so the same bits.
    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*cmd[3:cmd.index("--workdir") + 1], str(reference), *cmd[cmd.index("--workdir") + 2:]]) == 0
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(features(final), features(reference / "features" / final.name))


def test_views_maps_and_resolution_sweep(image_folder: Path, extract_kwargs: dict) -> None:
    kwargs = {**extract_kwargs, "backbones": ["test_vit.r160_in1k"], "image_size": [64, 96], "views": 2,
              "store_maps": True}
    results = extract_features(ExtractSettings(data=str(image_folder), **kwargs))
    assert [r.image_size for r in results] == [64, 96]
    with open_cache(results[0].path) as fc:
        n_train = fc.split_counts()["train"]
        assert fc.num_rows == 30 + 2 * n_train and fc.num_views == 2
        plain = fc.load("train")
        aug = fc.load("train", views=True, maps=True)
        assert len(aug.labels) == 3 * n_train and set(aug.views) == {0, 1, 2}
        # ViT tokens folded back to a (C, H, W) grid: 64 px / patch 16 = 4.
        assert aug.maps.shape[1:] == (fc.feature_dim, 4, 4) and aug.maps.dtype == np.float16
        first = plain.ids[0]
        rows = aug.features[aug.ids == first]
        assert len(rows) == 3 and not np.allclose(rows[0], rows[1])  # augmented views differ
        assert len(fc.load("val", views=True).labels) == fc.split_counts()["val"]  # no views for val
    with open_cache(results[1].path) as fc:
        assert fc.load("val", maps=True).maps.shape[2:] == (6, 6)


def test_a_wrong_backbone_is_answered_before_any_image_is_read(image_folder: Path, extract_kwargs: dict,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fingerprinting and decoding every image takes minutes on a large dataset: a typo in --backbones or a bad
    backbones file must not wait for it."""
    import extract.dataset

    def no_reading(*args, **kwargs):
        raise AssertionError("an image was read before the backbones were checked")

    monkeypatch.setattr(extract.dataset, "_file_digest", no_reading)
    monkeypatch.setattr(extract.dataset, "check_readable", no_reading)
    with pytest.raises(BackboneError, match="Did you mean: resnet50"):
        extract_features(ExtractSettings(data=str(image_folder), **{**extract_kwargs, "backbones": ["resnet5O"]}))
    (tmp_path / "b.yaml").write_text("sets:\n  mine:\n    - {model: resnet50.a1_in1k, preprocess: {std: 0}}\n")
    with pytest.raises(BackboneError, match=r"sets\.mine\[0\]\.preprocess\.std"):
        extract_features(ExtractSettings(data=str(image_folder), **{**extract_kwargs, "backbones": ["mine"],
                                                                     "backbones_file": tmp_path / "b.yaml"}))


def test_cli_end_to_end_and_errors(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                   caplog: pytest.LogCaptureFixture) -> None:
    work = tmp_path / "cli"
    argv = ["--data", str(image_folder), "--backbones", "test_resnet.r160_in1k", "--no-pretrained",
            "--workdir", str(work), "--image-size", "64", "--workers", "0", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "test_resnet.r160_in1k" in out and "built" in out and "random" in out
    assert (work / "config.yaml").is_file() and (work / "dataset.json").is_file()
    assert main([*argv[:3], "resnet5O", *argv[4:]]) == 2
    assert "Did you mean" in caplog.text
    assert main(["--data", str(tmp_path / "nope"), *argv[2:]]) == 2
    assert "no such file or folder" in caplog.text


def test_out_of_memory_halves_the_batch_and_gives_the_same_features(monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """README: the batch is halved automatically on out-of-memory, down to 1; any other error is not retried."""
    from extract.extractor import _Forward

    model = timm.create_model("test_resnet.r160_in1k", pretrained=False, num_classes=0).eval()
    batch = torch.randn(8, 3, 48, 48)
    expected, _ = _Forward(model, torch.device("cpu"), store_maps=False, batch_size=8, amp=False)(batch)
    original = _Forward.run

    def small_memory(self, x):
        if len(x) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, x)

    monkeypatch.setattr(_Forward, "run", small_memory)
    forward = _Forward(model, torch.device("cpu"), store_maps=False, batch_size=8, amp=False)
    with caplog.at_level(logging.WARNING):
        pooled, _ = forward(batch)
    assert forward.micro == 2  # 8 -> 4 -> 2, and it stays there for the next batches
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-5)
    assert [r.getMessage() for r in caplog.records] == ["out of memory; batch size halved to 4",
                                                        "out of memory; batch size halved to 2"]

    def broken(self, x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(_Forward, "run", broken)
    with pytest.raises(RuntimeError, match="shapes"):
        _Forward(model, torch.device("cpu"), store_maps=False, batch_size=8, amp=False)(batch)
    monkeypatch.setattr(_Forward, "run", lambda self, x: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(torch.OutOfMemoryError):  # not even one image fits: the error, not a loop
        _Forward(model, torch.device("cpu"), store_maps=False, batch_size=4, amp=False)(batch)


@pytest.mark.parametrize("fault", ["too large", "nan"])
def test_features_a_cache_cannot_hold_stop_extraction_with_the_image_named(
        image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        fault: str) -> None:
    """A cache never holds NaN or inf. Features beyond float16's range (65504) are refused with the way out
    (--dtype float32, which then stores them); NaN from the model is refused naming the image it came from."""
    from extract.extractor import _Forward

    original = _Forward.run

    def faulty(self, x):
        pooled, maps = original(self, x)
        if fault == "nan":
            pooled = pooled.clone()
            pooled[1, 0] = float("nan")  # the second image of every batch
            return pooled, maps
        return pooled * 1e6, maps  # finite in float32, not in float16

    monkeypatch.setattr(_Forward, "run", faulty)
    work = tmp_path / "run"
    argv = ["--data", str(image_folder), "--backbones", "test_resnet.r160_in1k", "--no-pretrained", "--workdir",
            str(work), "--image-size", "64", "--batch-size", "8", "--workers", "0", "--no-progress"]
    assert main(argv) == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text and "test_resnet.r160_in1k@64.h5" in line
    assert not list((work / "features").glob("*.h5"))  # nothing published
    if fault == "nan":
        assert "NaN or infinite features for image 'cat/01.png':" in line  # the first batch's second image
        return
    assert "exceed float16's range" in line and "65504" in line and "--dtype float32" in line
    assert main([*argv, "--dtype", "float32"]) == 0
    (entry,) = list_caches(work)
    with open_cache(entry.path) as fc:
        assert np.isfinite(fc.load().features).all() and np.abs(fc.load().features).max() > 65504


def test_reader_refuses_a_cache_with_non_finite_features(image_folder: Path, extract_kwargs: dict) -> None:
    """A cache written before the writer checked (an overflowed float16 value) is refused with what to do, not
    read as numbers."""
    (result,) = extract_features(ExtractSettings(data=str(image_folder), **extract_kwargs))
    with h5py.File(result.path, "r+") as f:
        f["pooled"][3, 5] = np.inf
    with open_cache(result.path) as fc, pytest.raises(CacheError, match="NaN or infinite features.*--force"):
        fc.load()


@pytest.mark.parametrize("claimed", ["zeroed", 5000, -7, "truncated"])
def test_resume_trusts_only_rows_that_verify(image_folder: Path, extract_kwargs: dict, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture, claimed) -> None:
    """A partial file's row count is a claim: rows whose bytes do not match their checksum are written again."""
    (ref,) = extract_features(ExtractSettings(data=str(image_folder), **{**extract_kwargs,
                                                                         "workdir": tmp_path / "reference"}))
    (done,) = extract_features(ExtractSettings(data=str(image_folder), **extract_kwargs))
    partial = done.path.with_name(done.path.name + ".partial")
    done.path.rename(partial)
    with h5py.File(partial, "r+") as f:
        f.attrs["complete"] = False
        n = len(f["pooled"])
        if claimed == "truncated":  # a kill while HDF5 wrote its metadata: a file h5py cannot open
            pass
        elif claimed == "zeroed":  # rows 10.. never reached the disk (read back as zeros), all counted as done
            f["pooled"][10:] = 0
            f.attrs["rows_done"] = n
        else:
            f.attrs["rows_done"] = claimed
    if claimed == "truncated":
        partial.write_bytes(partial.read_bytes()[:partial.stat().st_size // 2])
    caplog.set_level(logging.INFO)
    (again,) = extract_features(ExtractSettings(data=str(image_folder), **extract_kwargs))
    assert again.status in ("resumed", "built")
    if claimed == "truncated":
        assert f"{partial.name}: partial file unreadable (" in caplog.text and "starting again" in caplog.text
    if claimed == "zeroed":
        assert f"{n} rows recorded as written, 10 verified; resuming at row 10" in caplog.text
    with h5py.File(again.path) as got, h5py.File(ref.path) as want:
        np.testing.assert_array_equal(got["pooled"][...], want["pooled"][...])
