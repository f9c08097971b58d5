"""Where the images come from: an image folder, a CSV, or the demo dataset.

Every source ends as a :class:`Dataset`: classes, one :class:`Sample` per readable
image with its label and split, the files that could not be read, and two
fingerprints: ``content`` (which files, and their bytes) and ``annotations``
(classes, labels, splits). ``dataset.json`` in the workdir records all of it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from configs.extract import ExtractSettings
from runtime.errors import UserError
from runtime.files import atomic_write_text
from runtime.images import IMAGE_SUFFIXES, check_readable
from runtime.locks import exclusive

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_HASH_BYTES = 1 << 16  # bytes hashed at each end of a file for the fingerprint


class DatasetError(UserError, ValueError):
    """The data cannot be used as given; the message says what to change."""


@dataclass(frozen=True)
class Sample:
    id: str  # path relative to the data root, with forward slashes
    path: Path
    label: int
    split: str


@dataclass
class Dataset:
    root: Path
    source: str  # "folder", "csv" or "demo"
    classes: list[str]
    samples: list[Sample]  # sorted by id
    skipped: list[dict[str, str]] = field(default_factory=list)
    content_fingerprint: str = ""
    annotation_fingerprint: str = ""

    def counts(self) -> dict[str, dict[str, int]]:
        per = {s: Counter() for s in SPLITS}
        for s in self.samples:
            per[s.split][self.classes[s.label]] += 1
        return {s: {c: per[s][c] for c in self.classes} for s in SPLITS}

    def to_json(self) -> dict[str, Any]:
        counts = self.counts()
        return {
            "root": str(self.root),
            "source": self.source,
            "classes": self.classes,
            "num_images": len(self.samples),
            "counts": {s: {"total": sum(c.values()), **c} for s, c in counts.items()},
            "content_fingerprint": self.content_fingerprint,
            "annotation_fingerprint": self.annotation_fingerprint,
            "skipped": self.skipped,
            "num_skipped": len(self.skipped),
        }


# ----------------------------------------------------------------------------- sources


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _from_folder(root: Path) -> tuple[list[tuple[Path, str, str | None]], list[str]]:
    """Entries (path, class name, split or None) and the class names found in ``root``."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise DatasetError(f"{root}: no class folders found. Expected root/<class>/* or root/{{train,val,test}}/<class>/*.")
    names = {p.name for p in subdirs}
    entries: list[tuple[Path, str, str | None]] = []
    if names & set(SPLITS):
        missing = [s for s in SPLITS if s not in names]
        if missing:
            raise DatasetError(
                f"{root}: has split folders {sorted(names & set(SPLITS))} but not {missing}. "
                "Provide all of train/, val/ and test/, or use root/<class>/* and let extract split it."
            )
        classes: set[str] = set()
        for split in SPLITS:
            for cdir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
                classes.add(cdir.name)
                entries += [(p, cdir.name, split) for p in _list_images(cdir)]
        for split in SPLITS:
            for cls in sorted(classes):
                if not (root / split / cls).is_dir():
                    raise DatasetError(f"{root}: class '{cls}' has no folder in {split}/ (every split needs every class)")
        return entries, sorted(classes)
    for cdir in subdirs:
        images = _list_images(cdir)
        if not images:
            raise DatasetError(f"{root}: class folder '{cdir.name}' holds no images ({', '.join(IMAGE_SUFFIXES)}). Remove it or add images.")
        entries += [(p, cdir.name, None) for p in images]
    return entries, [p.name for p in subdirs]


def _from_csv(csv_path: Path, fold: int | None) -> tuple[list[tuple[Path, str, str | None]], list[str]]:
    try:  # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{csv_path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                           "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise DatasetError(
            f"{csv_path}: missing column(s) {missing}; found {columns}. "
            "The CSV needs 'path' and 'label' columns, and optionally 'split' (train/val/test) or 'fold'."
        )
    if not rows:
        raise DatasetError(f"{csv_path}: no rows")
    has_split, has_fold = "split" in columns, "fold" in columns
    if has_fold and fold is None:
        values = sorted({r["fold"] for r in rows if r["fold"].lower() != "test"})
        raise DatasetError(f"{csv_path}: has a 'fold' column; choose the validation fold with --fold K (folds: {', '.join(values)})")
    if fold is not None and not has_fold:
        raise DatasetError(f"--fold {fold} given, but {csv_path} has no 'fold' column")
    if has_fold:
        folds = sorted({int(r["fold"]) for r in rows if r["fold"].lstrip("-").isdigit()})
        if fold not in folds:
            raise DatasetError(f"--fold {fold}: {csv_path} has folds {', '.join(map(str, folds))}; choose one of them")
    entries: list[tuple[Path, str, str | None]] = []
    for line, row in enumerate(rows, start=2):
        if not row["path"] or not row["label"]:
            raise DatasetError(f"{csv_path}:{line}: empty path or label")
        split: str | None = None
        if has_split and row.get("split"):
            split = row["split"].lower()
            if split not in SPLITS:
                raise DatasetError(f"{csv_path}:{line}: split '{row['split']}' is not one of {', '.join(SPLITS)}")
        if has_fold and split != "test":
            value = row["fold"]
            if value.lower() == "test":
                split = "test"
            else:
                try:
                    split = "val" if int(value) == fold else "train"
                except ValueError:
                    raise DatasetError(f"{csv_path}:{line}: fold '{value}' is not an integer (or 'test')") from None
        entries.append((csv_path.parent / row["path"], row["label"], split))
    split_given = [e[2] is not None for e in entries]
    if any(split_given) and not all(split_given):
        raise DatasetError(f"{csv_path}: some rows have a split and some do not; give every row one")
    if all(split_given) and not any(e[2] == "test" for e in entries):
        raise DatasetError(f"{csv_path}: no test rows; mark them with split=test (or fold=test)")
    return entries, sorted({e[1] for e in entries})


def materialise_demo(target: Path) -> Path:
    """Write scikit-learn's handwritten digits (1,797 images, 10 classes) as PNGs under ``target``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    marker = target / ".complete"
    if marker.is_file() and marker.read_text().strip() == str(len(digits.images)):
        return target
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        out = target / str(label) / f"{i:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        # 0..16 ink levels to 8-bit grayscale; loading makes it RGB like any other image.
        Image.fromarray(np.rint(image * (255.0 / 16.0)).astype(np.uint8), mode="L").save(out)
    marker.write_text(str(len(digits.images)))
    return target


# ----------------------------------------------------------------------------- splitting


def stratified_split(labels: list[int], ratios: tuple[float, float, float], seed: int, classes: list[str]) -> list[str]:
    """Seeded, stratified assignment of each item to train/val/test."""
    from sklearn.model_selection import train_test_split

    counts = Counter(labels)
    for label, n in counts.items():
        if n < 3:
            raise DatasetError(f"class '{classes[label]}' has {n} readable image(s); at least 3 are needed to split it into train/val/test")
    idx = np.arange(len(labels))
    y = np.asarray(labels)
    train_r, val_r, test_r = ratios
    n_classes = len(counts)

    def part(n: int, frac: float) -> int:
        # Every class must land in every split, so each part needs at least one image per class.
        return max(int(round(n * frac)), n_classes)

    rest, test = train_test_split(idx, test_size=part(len(idx), test_r), stratify=y, random_state=seed)
    train, val = train_test_split(rest, test_size=part(len(idx), val_r), stratify=y[rest], random_state=seed)
    out = [""] * len(labels)
    for name, members in (("train", train), ("val", val), ("test", test)):
        for i in members:
            out[i] = name
    return out


# ----------------------------------------------------------------------------- fingerprints


def _file_digest(path: Path) -> str:
    """Hash of the size and the first and last 64 KiB: changes when a file is replaced, costs one seek."""
    h = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as fh:
        h.update(fh.read(_HASH_BYTES))
        if size > 2 * _HASH_BYTES:
            fh.seek(-_HASH_BYTES, 2)
            h.update(fh.read(_HASH_BYTES))
    return h.hexdigest()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- loading


def find_images(data: str, *, workdir: Path, fold: int | None = None
                ) -> tuple[Path, str, list[tuple[Path, str, str | None]], list[str]]:
    """The images ``data`` names (folder, CSV or ``demo``) as (root, source, (path, class, split) entries, classes),
    listed but not read: seconds even for a large dataset, so that a wrong ``--data`` is answered at once."""
    if data == "demo":
        root = materialise_demo(workdir / "data" / "demo")
        source = "demo"
        entries, classes = _from_folder(root)
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise DatasetError(f"--data {data}: no such file or folder. Give an image folder, a CSV (path,label[,split|fold]) or 'demo'.")
        if path.is_dir():
            root, source = path.resolve(), "folder"
            entries, classes = _from_folder(root)
        elif path.suffix.lower() == ".csv":
            root, source = path.resolve().parent, "csv"
            entries, classes = _from_csv(path.resolve(), fold)
        else:
            raise DatasetError(f"--data {data}: a file that is not a .csv. Give an image folder, a CSV or 'demo'.")
    if fold is not None and source != "csv":
        raise DatasetError("--fold applies only to a CSV with a 'fold' column")
    root = root.resolve()
    if not entries:
        raise DatasetError(f"--data {data}: no images found")

    missing = [str(p) for p, _, _ in entries if not p.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} listed file(s) do not exist, e.g. {missing[:3]}. Fix the paths (CSV paths are relative to the CSV).")
    return root, source, entries, classes


def load_dataset(
    data: str,
    *,
    workdir: Path,
    seed: int = 0,
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    fold: int | None = None,
    max_unreadable: float = 0.01,
    workers: int = 4,
) -> Dataset:
    """Resolve ``data`` (folder, CSV or ``demo``), check every file, split, fingerprint, write ``dataset.json``."""
    root, source, entries, classes = find_images(data, workdir=workdir, fold=fold)

    def rel_id(p: Path) -> str:
        p = p.resolve()
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            return p.as_posix()

    ids = [rel_id(p) for p, _, _ in entries]
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if dupes:
        raise DatasetError(f"file(s) listed more than once: {dupes[:3]}")

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        digests = list(pool.map(lambda e: _file_digest(e[0]), entries))
    files_fp = _digest(sorted(zip(ids, digests)))

    # Checking every image decodes costs a full decode, so it runs once per set of files.
    previous = _read_dataset_json(workdir)
    if previous.get("files_fingerprint") == files_fp and "unreadable" in previous:
        unreadable = dict(previous["unreadable"])
    else:
        log.info("Checking that %d images decode ...", len(entries))
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            reasons = list(pool.map(lambda e: check_readable(e[0]), entries))
        unreadable = {i: r for i, r in zip(ids, reasons) if r is not None}
    for image_id, reason in sorted(unreadable.items()):
        log.warning("Skipping unreadable image %s (%s)", image_id, reason)
    if unreadable:
        frac = len(unreadable) / len(entries)
        if frac > max_unreadable:
            raise DatasetError(
                f"{len(unreadable)} of {len(entries)} images ({frac:.1%}) could not be read, more than the allowed "
                f"--max-unreadable {max_unreadable:.1%}; e.g. {sorted(unreadable)[:3]}. Fix or remove them, or raise --max-unreadable."
            )
        log.warning("Skipped %d unreadable image(s) of %d; they are listed in dataset.json", len(unreadable), len(entries))

    kept = [(i, p, c, s, d) for i, (p, c, s), d in zip(ids, entries, digests) if i not in unreadable]
    kept.sort(key=lambda t: t[0])
    class_index = {c: k for k, c in enumerate(classes)}
    labels = [class_index[c] for _, _, c, _, _ in kept]
    present = Counter(labels)
    for c, k in class_index.items():
        if present[k] == 0:
            raise DatasetError(f"class '{c}' has no readable images; remove it or add images")
    if all(s is None for _, _, _, s, _ in kept):
        splits = stratified_split(labels, split_ratios, seed, classes)
    else:
        splits = [s for _, _, _, s, _ in kept]
        for split in SPLITS:
            have = {lab for lab, s in zip(labels, splits) if s == split}
            lacking = [classes[k] for k in range(len(classes)) if k not in have]
            if lacking:
                raise DatasetError(
                    f"split '{split}' has no images of class(es) {lacking}; every split needs every class. "
                    "Move some images there, or drop the split assignment and let extract make a stratified split."
                )

    samples = [Sample(id=i, path=p, label=lab, split=s) for (i, p, _, _, _), lab, s in zip(kept, labels, splits)]
    dataset = Dataset(
        root=root,
        source=source,
        classes=list(classes),
        samples=samples,
        skipped=[{"id": i, "reason": r} for i, r in sorted(unreadable.items())],
        content_fingerprint=_digest([(i, d) for i, _, _, _, d in kept]),
        annotation_fingerprint=_digest({"classes": classes, "rows": [(s.id, s.label, s.split) for s in samples]}),
    )
    record = dataset.to_json()
    record["files_fingerprint"] = files_fp
    record["unreadable"] = unreadable
    atomic_write_text(workdir / "dataset.json", json.dumps(record, indent=2))
    return dataset


def _read_dataset_json(workdir: Path) -> dict[str, Any]:
    path = workdir / "dataset.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def default_workers() -> int:
    """Decoding workers: one per spare core, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def decode_workers(settings: ExtractSettings) -> int:
    return default_workers() if settings.workers is None else settings.workers


def images_for(settings: ExtractSettings) -> None:
    """Check that ``settings.data`` names images (:func:`find_images`) without reading them."""
    with exclusive(settings.workdir, "dataset", wait=True):  # the demo images may be written here
        find_images(settings.data, workdir=settings.workdir, fold=settings.fold)


def dataset_for(settings: ExtractSettings) -> Dataset:
    """``settings.data`` read, checked and split as ``settings`` say: every file fingerprinted, and decoded the first
    time (minutes for a large dataset; :func:`images_for` answers a wrong ``--data`` at once)."""
    # dataset.json and the demo images are shared by every process on the workdir: one writes them at a time.
    with exclusive(settings.workdir, "dataset", wait=True):
        return load_dataset(settings.data, workdir=settings.workdir, seed=settings.seed,
                            split_ratios=settings.split_ratios, fold=settings.fold,
                            max_unreadable=settings.max_unreadable, workers=max(decode_workers(settings), 1))
