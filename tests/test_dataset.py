from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, make_image
from PIL import Image

from extract.dataset import DatasetError, load_dataset
from runtime.images import load_rgb


def split_counts(ds) -> dict[str, int]:
    return dict(Counter(s.split for s in ds.samples))


def test_folder_stratified_seeded_split(image_folder: Path, tmp_path: Path) -> None:
    ds = load_dataset(str(image_folder), workdir=tmp_path / "w", seed=3)
    assert ds.classes == list(CLASSES) and ds.source == "folder"
    assert len(ds.samples) == 30
    counts = ds.counts()
    for split in ("train", "val", "test"):
        assert all(counts[split][c] >= 1 for c in CLASSES)  # stratified: every class everywhere
    again = load_dataset(str(image_folder), workdir=tmp_path / "w2", seed=3)
    assert [(s.id, s.split) for s in again.samples] == [(s.id, s.split) for s in ds.samples]
    other = load_dataset(str(image_folder), workdir=tmp_path / "w3", seed=4)
    assert [s.split for s in other.samples] != [s.split for s in ds.samples]
    record = json.loads((tmp_path / "w" / "dataset.json").read_text())
    assert record["classes"] == list(CLASSES) and record["num_images"] == 30
    assert record["counts"]["train"]["total"] + record["counts"]["val"]["total"] + record["counts"]["test"]["total"] == 30
    assert record["content_fingerprint"] == ds.content_fingerprint


def test_split_ratios(image_folder: Path, tmp_path: Path) -> None:
    ds = load_dataset(str(image_folder), workdir=tmp_path / "w", split_ratios=(0.5, 0.2, 0.3))
    assert split_counts(ds) == {"train": 15, "val": 6, "test": 9}


def test_folder_with_split_subfolders(split_folder: Path, tmp_path: Path) -> None:
    ds = load_dataset(str(split_folder), workdir=tmp_path / "w")
    assert split_counts(ds) == {"train": 12, "val": 6, "test": 6}
    assert ds.samples[0].id.split("/")[0] in ("train", "val", "test")


def test_label_missing_from_a_split_is_named(split_folder: Path, tmp_path: Path) -> None:
    for p in (split_folder / "val" / "fox").iterdir():
        p.unlink()
    (split_folder / "val" / "fox").rmdir()
    with pytest.raises(DatasetError, match="fox"):
        load_dataset(str(split_folder), workdir=tmp_path / "w")


def test_empty_class_folder_is_named(image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "empty_cls").mkdir()
    with pytest.raises(DatasetError, match="empty_cls"):
        load_dataset(str(image_folder), workdir=tmp_path / "w")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_dataset(str(tmp_path / "nowhere"), workdir=tmp_path / "w")


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_csv_plain_and_with_split(image_folder: Path, tmp_path: Path) -> None:
    rows = [f"images/{c}/{i:02d}.png,{c}" for c in CLASSES for i in range(10)]
    ds = load_dataset(str(write_csv(tmp_path / "d.csv", "path,label", rows)), workdir=tmp_path / "w")
    assert ds.source == "csv" and len(ds.samples) == 30 and set(split_counts(ds)) == {"train", "val", "test"}
    split_of = lambda i: "train" if i < 6 else "val" if i < 8 else "test"  # noqa: E731
    rows = [f"images/{c}/{i:02d}.png,{c},{split_of(i)}" for c in CLASSES for i in range(10)]
    ds = load_dataset(str(write_csv(tmp_path / "s.csv", "path,label,split", rows)), workdir=tmp_path / "w")
    assert split_counts(ds) == {"train": 18, "val": 6, "test": 6}


def test_csv_folds(image_folder: Path, tmp_path: Path) -> None:
    fold_of = lambda i: "test" if i >= 8 else str(i % 4)  # noqa: E731
    rows = [f"images/{c}/{i:02d}.png,{c},{fold_of(i)}" for c in CLASSES for i in range(10)]
    csv_path = write_csv(tmp_path / "f.csv", "path,label,fold", rows)
    ds = load_dataset(str(csv_path), workdir=tmp_path / "w", fold=1)
    assert split_counts(ds) == {"train": 18, "val": 6, "test": 6}
    val_ids = {s.id for s in ds.samples if s.split == "val"}
    assert val_ids == {f"images/{c}/{i:02d}.png" for c in CLASSES for i in (1, 5)}
    ds2 = load_dataset(str(csv_path), workdir=tmp_path / "w", fold=2)
    assert ds2.content_fingerprint == ds.content_fingerprint  # same files
    assert ds2.annotation_fingerprint != ds.annotation_fingerprint  # other split
    with pytest.raises(DatasetError, match="--fold"):
        load_dataset(str(csv_path), workdir=tmp_path / "w")


def test_csv_missing_columns_named(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "bad.csv", "file,label", ["a.png,cat"])
    with pytest.raises(DatasetError, match=r"\['path'\]"):
        load_dataset(str(csv_path), workdir=tmp_path / "w")


def test_csv_nonexistent_file(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "bad.csv", "path,label", ["nope.png,cat"])
    with pytest.raises(DatasetError, match="do not exist"):
        load_dataset(str(csv_path), workdir=tmp_path / "w")


def test_demo_dataset(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    ds = load_dataset("demo", workdir=tmp_path / "w")
    digits = load_digits()
    assert ds.source == "demo" and ds.classes == [str(i) for i in range(10)]
    assert len(ds.samples) == len(digits.images) == 1797
    # The stored image is the digit itself, scaled from 0..16 to 0..255, as RGB.
    sample = next(s for s in ds.samples if s.id == "3/0003.png")
    rgb = np.asarray(load_rgb(sample.path))
    assert rgb.shape == (8, 8, 3)
    np.testing.assert_array_equal(rgb[..., 0], np.rint(digits.images[3] * 255 / 16).astype(np.uint8))
    assert digits.target[3] == 3


def test_unreadable_images_skipped_and_recorded(image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (image_folder / "cat" / "broken.png").write_bytes(b"not a png at all")
    good = (image_folder / "dog" / "00.png").read_bytes()
    (image_folder / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    ds = load_dataset(str(image_folder), workdir=tmp_path / "w", max_unreadable=0.1)
    assert len(ds.samples) == 30
    record = json.loads((tmp_path / "w" / "dataset.json").read_text())
    assert sorted(s["id"] for s in record["skipped"]) == ["cat/broken.png", "dog/truncated.png"]
    assert record["num_skipped"] == 2
    assert "cat/broken.png" in caplog.text


def test_too_many_unreadable_stops(image_folder: Path, tmp_path: Path) -> None:
    for i in range(5):
        (image_folder / "cat" / f"bad{i}.png").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="max-unreadable"):
        load_dataset(str(image_folder), workdir=tmp_path / "w", max_unreadable=0.05)


def test_grayscale_16bit_and_exif(tmp_path: Path) -> None:
    gray = make_image(tmp_path / "g.png", seed=1, mode="L")
    rgb = np.asarray(load_rgb(gray))
    assert rgb.shape == (24, 24, 3) and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()

    # 12-bit data in a 16-bit container: scaled per image to the full 8-bit range.
    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 16)  # 0..4080
    Image.fromarray(ramp).save(tmp_path / "x16.png")
    out = np.asarray(load_rgb(tmp_path / "x16.png"))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    np.testing.assert_allclose(out[..., 0].astype(float), ramp / ramp.max() * 255, atol=0.51)

    # EXIF orientation 6 (rotate 90° clockwise to display): a 30x20 file shows as 20x30.
    base = Image.new("RGB", (30, 20), (255, 0, 0))
    base.paste((0, 0, 255), (0, 0, 5, 5))  # blue mark in the top-left corner of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    shown = load_rgb(tmp_path / "rot.jpg")
    assert shown.size == (20, 30)
    arr = np.asarray(shown)
    assert arr[1, -2, 2] > 200 and arr[1, -2, 0] < 80  # the mark is now at the top-right


def _row(c: str, i: int, *rest: str) -> str:
    return ",".join([f"images/{c}/{i:02d}.png", c, *rest])


@pytest.mark.parametrize("header, rows, fold, message", [
    ("path,label", [], None, "d.csv: no rows"),
    ("path,label", [_row(c, i) for c in CLASSES for i in range(10)], 1, "--fold 1 given, but .*d.csv has no 'fold' column"),
    ("path,label", [_row("cat", 0), "images/cat/01.png,"], None, r"d.csv:3: empty path or label"),
    ("path,label,split", [_row("cat", 0, "training")], None,
     r"d.csv:2: split 'training' is not one of train, val, test"),
    ("path,label,fold", [_row("cat", 0, "1"), _row("cat", 1, "one")], 1,
     r"d.csv:3: fold 'one' is not an integer \(or 'test'\)"),
    ("path,label,split", [_row("cat", 0, "train"), _row("cat", 1, "")], None,
     "some rows have a split and some do not; give every row one"),
    ("path,label,split", [_row(c, i, "train" if i < 6 else "val") for c in CLASSES for i in range(10)], None,
     "no test rows; mark them with split=test"),
    ("path,label", [_row(c, i) for c in CLASSES for i in range(10)] + [_row("cat", 0)], None,
     r"listed more than once: \['images/cat/00.png'\]"),
])
def test_a_bad_csv_is_answered_with_its_line_and_the_fix(image_folder: Path, tmp_path: Path, header: str,
                                                          rows: list[str], fold: int | None, message: str) -> None:
    """Bad input gets one line that says where and what to do; nothing is written (no dataset.json)."""
    csv_path = write_csv(tmp_path / "d.csv", header, rows)
    with pytest.raises(DatasetError, match=message) as err:
        load_dataset(str(csv_path), workdir=tmp_path / "w", fold=fold)
    assert len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "w" / "dataset.json").exists()


def test_a_bad_folder_or_file_is_answered_with_the_layout_expected(image_folder: Path, split_folder: Path,
                                                                   tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no class folders found. Expected root/<class>/\*"):
        load_dataset(str(tmp_path / "empty"), workdir=tmp_path / "w")
    (tmp_path / "no-images" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="class folder 'cat' holds no images .*Remove it or add images"):
        load_dataset(str(tmp_path / "no-images"), workdir=tmp_path / "w")
    for p in (split_folder / "test").rglob("*.png"):
        p.unlink()
    for d in sorted((split_folder / "test").rglob("*"), reverse=True):
        d.rmdir()
    (split_folder / "test").rmdir()
    with pytest.raises(DatasetError, match=r"has split folders \['train', 'val'\] but not \['test'\]"):
        load_dataset(str(split_folder), workdir=tmp_path / "w")
    (tmp_path / "labels.txt").write_text("path,label\n")
    with pytest.raises(DatasetError, match="a file that is not a .csv"):
        load_dataset(str(tmp_path / "labels.txt"), workdir=tmp_path / "w")
    with pytest.raises(DatasetError, match="--fold applies only to a CSV"):
        load_dataset(str(image_folder), workdir=tmp_path / "w", fold=1)
    for p in sorted((image_folder / "fox").iterdir())[2:]:
        p.unlink()
    with pytest.raises(DatasetError, match=r"class 'fox' has 2 readable image\(s\); at least 3 are needed"):
        load_dataset(str(image_folder), workdir=tmp_path / "w")
    assert not (tmp_path / "w" / "dataset.json").exists()


def test_a_class_whose_every_image_is_unreadable_is_named(image_folder: Path, tmp_path: Path) -> None:
    for p in (image_folder / "fox").iterdir():
        p.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="class 'fox' has no readable images; remove it or add images"):
        load_dataset(str(image_folder), workdir=tmp_path / "w", max_unreadable=0.5)
