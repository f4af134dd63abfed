"""``fap data inspect PATH``: what a dataset holds and what is wrong with it, before training on it.

Reads any layout fap trains from: an ImageNet-layout folder (or one split folder), an HF
``datasets`` directory, or FFCV ``.beton`` files (a directory of them or one file). For
each split it reports the number of images, the classes and images per class, and image
sizes; it lists the problems the loaders would stop at (non-image files, empty class
folders, splits whose classes differ, labels out of range, images that do not decode).
Image sizes and decodability are checked on an evenly spaced sample of ``max_images``
images per split (all of them with ``max_images=None``); FFCV sizes come from the file's
metadata.
"""
from __future__ import annotations

import collections
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from fap.data.base import IMAGE_EXTENSIONS, DataError, decode_rgb

__all__ = ["DatasetReport", "SplitReport", "format_report", "inspect_path"]


@dataclass
class SplitReport:
    """One split: counts, classes, sizes (``"WxH" -> count`` over the images checked)."""

    name: str
    num_images: int
    classes: List[str]
    images_per_class: Dict[str, int]
    sizes: Dict[str, int] = field(default_factory=dict)
    images_checked: int = 0


@dataclass
class DatasetReport:
    """A whole dataset: its kind, splits and the problems found."""

    path: str
    kind: str
    splits: List[SplitReport]
    problems: List[str]

    def to_dict(self) -> Dict:
        return asdict(self)


def inspect_path(path: str, *, max_images: Optional[int] = 1000) -> DatasetReport:
    """Inspect the dataset at ``path``.

    Args:
        path: a dataset root (folder, HF or FFCV), a single split folder, or a ``.beton`` file.
        max_images: per split, how many images to decode for sizes and errors (None: all).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.endswith(".beton") or (os.path.isdir(path) and any(f.endswith(".beton") for f in os.listdir(path))):
        return _inspect_ffcv(path)
    from fap.data.hf import detect_layout

    layout = detect_layout(path)
    if layout != "imagefolder":
        return _inspect_hf(path, layout, max_images=max_images)
    return _inspect_folder(path, max_images=max_images)


# -- ImageNet-layout folders ----------------------------------------------------------------

def _inspect_folder(path: str, *, max_images: Optional[int]) -> DatasetReport:
    from fap.data.folder import scan_split

    split_dirs = _split_dirs(path)
    problems: List[str] = []
    splits: List[SplitReport] = []
    reference: Optional[Tuple[str, List[str]]] = None
    for name, directory in split_dirs:
        try:
            listing = scan_split(directory)
        except DataError as e:
            problems.append(str(e))
            continue
        problems += [f"{p}: not an image file" for p in listing.non_images]
        problems += [f"{os.path.join(directory, c)}: empty class folder" for c in listing.empty_classes]
        if reference is None:
            reference = (directory, listing.classes)
        elif listing.classes != reference[1]:
            missing = sorted(set(reference[1]) - set(listing.classes))
            extra = sorted(set(listing.classes) - set(reference[1]))
            problems.append(f"{directory}: classes differ from {reference[0]} (missing {missing or 'none'}, "
                            f"extra {extra or 'none'})")
        files = [p for c in listing.classes for p in listing.images[c]]
        sizes, errors, checked = _check_images(((p, p) for p in _evenly(files, max_images)))
        problems += errors
        splits.append(SplitReport(name=name, num_images=len(files), classes=listing.classes,
                                  images_per_class={c: len(listing.images[c]) for c in listing.classes},
                                  sizes=sizes, images_checked=checked))
    return DatasetReport(path=path, kind="folder", splits=splits, problems=problems)


def _split_dirs(path: str) -> List[Tuple[str, str]]:
    """``[(split name, folder)]``: the split folders under ``path``, or ``path`` itself if it is one."""
    subdirs = sorted(e.path for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    holds_images = any(
        f.lower().endswith(IMAGE_EXTENSIONS) for d in subdirs for f in os.listdir(d)
    )
    if holds_images or not subdirs:  # path's subfolders are classes: path is one split
        return [(os.path.basename(os.path.normpath(path)), path)]
    return [(os.path.basename(d), d) for d in subdirs]


# -- HF datasets ------------------------------------------------------------------------------

def _inspect_hf(path: str, layout: str, *, max_images: Optional[int]) -> DatasetReport:
    from fap.data import hf

    problems: List[str] = []
    splits: List[SplitReport] = []
    reference: Optional[List[str]] = None
    for name in _hf_split_names(path, layout):
        where = f"{path} [{name}]"
        try:
            ds, _ = hf.load_split(path, name)
            classes = hf.split_classes(ds, where=where)
            labels = np.asarray(ds.with_format("numpy", columns=["label"])["label"], dtype=np.int64)
        except (DataError, FileNotFoundError) as e:
            problems.append(str(e))
            continue
        if reference is None:
            reference = classes
        elif not hf.has_class_names(ds):
            classes = reference  # plain integer labels index the first split's classes
        elif classes != reference:
            problems.append(f"{where}: class names differ from the first split's ({len(classes)} vs "
                            f"{len(reference)} classes)")
        try:
            hf.check_labels(ds, len(reference), where=where)
        except DataError as e:
            problems.append(str(e))
        valid = labels[(labels >= 0) & (labels < len(classes))]
        counts = np.bincount(valid, minlength=len(classes))
        problems += _empty_classes(where, classes, counts)
        rows = _evenly(list(range(len(ds))), max_images)
        images = ds.select_columns(["image"])

        def samples(rows=rows, images=images, where=where) -> Iterable[Tuple[str, object]]:
            for i in rows:
                img = images[i]["image"]
                yield f"{where} row {i}", img["bytes"] if img.get("bytes") is not None else img.get("path")

        sizes, errors, checked = _check_images(samples())
        problems += errors
        splits.append(SplitReport(name=name, num_images=len(ds), classes=classes,
                                  images_per_class={c: int(n) for c, n in zip(classes, counts)},
                                  sizes=sizes, images_checked=checked))
    return DatasetReport(path=path, kind=f"hf ({layout})", splits=splits, problems=problems)


def _hf_split_names(path: str, layout: str) -> List[str]:
    if layout == "disk":
        import json

        dict_file = os.path.join(path, "dataset_dict.json")
        if os.path.isfile(dict_file):
            with open(dict_file) as f:
                return list(json.load(f)["splits"])
        return sorted(e.name for e in os.scandir(path) if os.path.isfile(os.path.join(e.path, "state.json")))
    from fap.data import hf

    hf.require_datasets()
    return [str(s) for s in hf.get_data_patterns(path)]


# -- FFCV -----------------------------------------------------------------------------------

def _inspect_ffcv(path: str) -> DatasetReport:
    from fap.data import ffcv

    files = [path] if path.endswith(".beton") else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".beton"))
    root = os.path.dirname(files[0])
    problems: List[str] = []
    splits: List[SplitReport] = []
    classes: Optional[List[str]] = None
    if os.path.isfile(os.path.join(root, ffcv.CLASSES_FILE)):
        classes = ffcv.beton_classes(root, "")
    for file in files:
        try:
            reader = ffcv._read_fields(file)
            labels = ffcv.beton_labels(file)
        except (DataError, ImportError) as e:
            problems.append(str(e))
            continue
        names = classes or [str(i) for i in range(int(labels.max()) + 1)]
        bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
        if bad.size:
            problems.append(f"{file}: label {int(labels[bad[0]])} of sample {int(bad[0])} is outside "
                            f"[0, {len(names)}) ({bad.size} such samples)")
        meta = reader.metadata[f"f{list(reader.handlers).index('image')}"]
        sizes = collections.Counter(f"{w}x{h}" for w, h in zip(meta["width"], meta["height"]))
        counts = np.bincount(labels[(labels >= 0) & (labels < len(names))], minlength=len(names))
        problems += _empty_classes(file, names, counts)
        splits.append(SplitReport(name=os.path.basename(file)[:-len(".beton")], num_images=int(reader.num_samples),
                                  classes=names, images_per_class={c: int(n) for c, n in zip(names, counts)},
                                  sizes=dict(sizes.most_common()), images_checked=int(reader.num_samples)))
    return DatasetReport(path=path, kind="ffcv", splits=splits, problems=problems)


# -- shared -----------------------------------------------------------------------------------

def _empty_classes(where: str, classes: Sequence[str], counts: np.ndarray) -> List[str]:
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if not empty:
        return []
    shown = ", ".join(empty[:5]) + (f" (+{len(empty) - 5} more)" if len(empty) > 5 else "")
    return [f"{where}: {len(empty)} of {len(classes)} classes have no images: {shown}"]


def _evenly(items: Sequence, limit: Optional[int]) -> List:
    """At most ``limit`` items, evenly spaced (all of them if ``limit`` is None)."""
    if limit is None or len(items) <= limit:
        return list(items)
    picks = np.linspace(0, len(items) - 1, limit).round().astype(int)
    return [items[i] for i in picks]


def _check_images(samples: Iterable[Tuple[str, object]]) -> Tuple[Dict[str, int], List[str], int]:
    """Decode ``(name, path or bytes)`` pairs: sizes seen, decode errors, how many were checked."""
    sizes: collections.Counter = collections.Counter()
    errors: List[str] = []
    checked = 0
    for name, source in samples:
        checked += 1
        try:
            img = decode_rgb(source, name=name)
        except (DataError, FileNotFoundError) as e:
            errors.append(str(e).split("; ")[0])
            continue
        sizes[f"{img.width}x{img.height}"] += 1
    return dict(sizes.most_common()), errors, checked


def format_report(report: DatasetReport, *, max_problems: int = 20) -> str:
    """The report as text for the terminal."""
    lines = [f"{report.path}: {report.kind} dataset, {len(report.splits)} split(s)"]
    for s in report.splits:
        per_class = list(s.images_per_class.values())
        spread = (f"{min(per_class)}-{max(per_class)} per class" if per_class and min(per_class) != max(per_class)
                  else f"{per_class[0] if per_class else 0} per class")
        lines.append(f"  {s.name}: {s.num_images} images, {len(s.classes)} classes ({spread})")
        if s.sizes:
            common = ", ".join(f"{k} ({v})" for k, v in list(s.sizes.items())[:3])
            more = f", +{len(s.sizes) - 3} other sizes" if len(s.sizes) > 3 else ""
            lines.append(f"    image sizes ({s.images_checked} checked): {common}{more}")
    if report.splits:
        classes = report.splits[0].classes
        shown = ", ".join(classes[:12]) + (f", ... (+{len(classes) - 12})" if len(classes) > 12 else "")
        lines.append(f"  classes: {shown}")
    if report.problems:
        lines.append(f"  problems ({len(report.problems)}):")
        lines += [f"    - {p}" for p in report.problems[:max_problems]]
        if len(report.problems) > max_problems:
            lines.append(f"    ... and {len(report.problems) - max_problems} more")
    else:
        lines.append("  problems: none found" + _sample_note(report))
    return "\n".join(lines)


def _sample_note(report: DatasetReport) -> str:
    """`` in 500 of 1,300 images checked (--all decodes every one)`` when only a sample was decoded."""
    checked = sum(s.images_checked for s in report.splits)
    total = sum(s.num_images for s in report.splits)
    if checked >= total:
        return ""
    return f" in the {checked:,} of {total:,} images checked (--all decodes every one)"
