"""HuggingFace ``datasets`` sources: ``save_to_disk`` directories, parquet/arrow files, image folders.

Three local layouts are read, all offline (set ``HF_DATASETS_OFFLINE=1``; nothing here
contacts the hub):

- a ``save_to_disk`` directory (``dataset_dict.json``, or one saved ``Dataset`` per split
  in ``path/<split>``), read with ``datasets.load_from_disk``;
- parquet or arrow files with ``image`` and ``label`` columns, like the hub's ImageNet-1k
  (``data/train-00000-of-00257.parquet``, ``data/validation-*.parquet``); splits are
  found by ``datasets``' own file-name patterns (``datasets.data_files.get_data_patterns``)
  and only the requested split is loaded;
- an image folder ``path/<split>/<class>/<image>``, read with the ``imagefolder`` builder
  after fap's strict listing (``datasets`` itself ignores non-image files and drops
  empty class folders without a word).

A requested split name that the data spells differently but ``datasets`` treats as the
same split (``val`` / ``validation`` / ``valid`` / ``dev``) is accepted and logged.

Images are decoded in the DataLoader workers, by fap rather than by ``datasets`` (the
image column is cast to ``Image(decode=False)``), so that a corrupt image raises an error
naming its file or row, or is skipped and counted under ``skip_corrupt``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fap.checks import import_extra

try:  # optional (pip install 'fap[hf]'): detect_layout works without it, reading a split does not
    import datasets
    from datasets.data_files import SPLIT_KEYWORDS, get_data_patterns
except ImportError:
    datasets = SPLIT_KEYWORDS = get_data_patterns = None

from fap.data.base import DataError, DataNotFoundError, SkipCounter, decode_rgb
from fap.data.folder import FolderDataset, apply_transform, split_dir
from fap.data.seeding import SampleSeeds

__all__ = ["HFImageDataset", "detect_layout", "load_split", "require_datasets", "split_classes"]

_logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
_DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}


def detect_layout(path: str) -> str:
    """Which kind of HF dataset directory ``path`` is: ``"disk"``, ``"parquet"``, ``"arrow"`` or ``"imagefolder"``.

    Raises:
        DataNotFoundError: ``path`` does not exist.
    """
    if not os.path.isdir(path):
        raise DataNotFoundError(f"data.path={path!r}: no such directory (expected an HF dataset directory: "
                                f"save_to_disk output, parquet/arrow files, or an image folder)")
    if _is_saved(path) or any(_is_saved(os.path.join(path, e.name)) for e in os.scandir(path) if e.is_dir()):
        return "disk"
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            builder = _DATA_FILE_BUILDERS.get(os.path.splitext(name)[1].lower())
            if builder and not name.startswith("."):
                return builder
    return "imagefolder"


def _is_saved(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


def require_datasets() -> None:
    """Raise `fap.checks.MissingExtra` (naming ``fap[hf]``) when HF ``datasets`` is not installed."""
    if datasets is None:
        import_extra("datasets", "hf", "reading an HF datasets directory (data.source='hf')")


def resolve_split(requested: str, available: Sequence[str], *, where: str) -> str:
    """The split in ``available`` that ``requested`` names, using ``datasets``' split synonyms.

    Raises:
        DataError: no such split; the message lists the splits there are.
    """
    require_datasets()
    available = [str(a) for a in available]
    if requested in available:
        return requested
    for canonical, synonyms in SPLIT_KEYWORDS.items():
        family = {str(canonical), *synonyms}
        if requested in family:
            matches = [a for a in available if a in family]
            if len(matches) == 1:
                _logger.info("%s: using split %r for requested split %r", where, matches[0], requested)
                return matches[0]
    raise DataError(f"{where}: no split {requested!r}; splits found: {sorted(available) or 'none'}. "
                    f"Set data.train_split / data.val_split to one of them")


def load_split(path: str, split: str, *, skip_corrupt: bool = False,
               reference_classes: Optional[Sequence[str]] = None) -> Tuple[datasets.Dataset, int]:
    """Load one split as a ``datasets.Dataset`` with an undecoded ``image`` column and a ``label`` column.

    Args:
        path: the HF dataset directory.
        split: split name (synonyms such as ``val``/``validation`` are matched).
        skip_corrupt: for image folders, skip (and count) non-image files instead of raising.
        reference_classes: the training split's classes; image-folder splits must have the same.

    Returns:
        The dataset and the number of files skipped while listing (image folders only).

    Raises:
        MissingExtra: HF ``datasets`` is not installed (``pip install 'fap[hf]'``).
    """
    require_datasets()
    layout = detect_layout(path)
    skipped = 0
    if layout == "disk":
        ds = _load_from_disk(path, split)
    elif layout in ("parquet", "arrow"):
        ds = _load_data_files(path, split, builder=layout)
    else:
        ds, skipped = _load_imagefolder(path, split, skip_corrupt=skip_corrupt, reference_classes=reference_classes)
    where = f"{path} [{split}]"
    missing = [c for c in (IMAGE_COLUMN, LABEL_COLUMN) if c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; columns are {ds.column_names}. fap reads "
                        f"'{IMAGE_COLUMN}' (images) and '{LABEL_COLUMN}' (int class index); rename with "
                        f"Dataset.rename_column")
    return ds.cast_column(IMAGE_COLUMN, datasets.Image(decode=False)), skipped


def _load_from_disk(path: str, split: str) -> datasets.Dataset:
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        dd = datasets.load_from_disk(path)
        return dd[resolve_split(split, list(dd.keys()), where=path)]
    if os.path.isfile(os.path.join(path, "state.json")):
        raise DataError(f"{path}: a single saved Dataset, not one per split; save a DatasetDict "
                        f"(DatasetDict({{'train': ..., 'val': ...}}).save_to_disk(path)) or one Dataset per "
                        f"split in {path}/<split>")
    subdirs = [e.name for e in os.scandir(path) if e.is_dir() and _is_saved(os.path.join(path, e.name))]
    return datasets.load_from_disk(os.path.join(path, resolve_split(split, subdirs, where=path)))


def _load_data_files(path: str, split: str, *, builder: str) -> datasets.Dataset:
    patterns = get_data_patterns(path)
    name = resolve_split(split, list(patterns.keys()), where=path)
    ds = datasets.load_dataset(builder, data_dir=path, data_files={name: patterns[name]}, split=name)
    return ds


def _load_imagefolder(path: str, split: str, *, skip_corrupt: bool,
                      reference_classes: Optional[Sequence[str]]) -> Tuple[datasets.Dataset, int]:
    directory = split_dir(path, split)
    # fap's strict listing first: errors for non-image files, empty classes, class mismatches
    listing = FolderDataset(directory, skip_corrupt=skip_corrupt, classes=reference_classes)
    ds = datasets.load_dataset("imagefolder", data_dir=directory, split="train")
    if len(ds) != len(listing.samples):
        raise DataError(f"{directory}: datasets' imagefolder found {len(ds)} images, fap's listing "
                        f"{len(listing.samples)}; check for unusual extensions or metadata files")
    return ds, listing.num_skipped


def split_classes(ds: datasets.Dataset, *, where: str) -> List[str]:
    """Class names of a split: the ``ClassLabel`` names, or ``"0".."N-1"`` for a plain integer label."""
    feature = ds.features[LABEL_COLUMN]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    labels = _labels(ds)
    if labels.size == 0:
        raise DataError(f"{where}: the split is empty")
    return [str(i) for i in range(int(labels.max()) + 1)]


def has_class_names(ds: datasets.Dataset) -> bool:
    """Whether the label column is a ``ClassLabel`` (names known) rather than plain integers."""
    return isinstance(ds.features[LABEL_COLUMN], datasets.ClassLabel)


def check_labels(ds: datasets.Dataset, num_classes: int, *, where: str) -> None:
    """Raise if any label is outside ``[0, num_classes)``, naming the first bad row."""
    labels = _labels(ds)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        row = int(bad[0])
        hint = " (-1 marks unlabelled images, e.g. the hub ImageNet-1k's test split)" if labels[row] == -1 else ""
        raise DataError(f"{where}: label {int(labels[row])} at row {row} is outside [0, {num_classes}){hint}; "
                        f"{bad.size} such rows. Labels must index the training split's {num_classes} classes")


def _labels(ds: datasets.Dataset) -> np.ndarray:
    return np.asarray(ds.with_format("numpy", columns=[LABEL_COLUMN])[LABEL_COLUMN], dtype=np.int64)


class HFImageDataset(torch.utils.data.Dataset):
    """A map-style torch dataset over an HF split; decodes in the worker, yields ``(uint8 image, label)``.

    Args:
        data: a split from :func:`load_split` (``image`` column not decoded).
        transform: PIL image -> ``uint8`` tensor.
        classes: class names (index = label).
        skip_corrupt: skip, log and count undecodable images instead of raising.
        where: how to name the split in messages, e.g. ``"/data/in1k [train]"``.
        skipped_at_listing: files already skipped while listing (image folders).
        sample_seeds: seed each sample's transform from ``(seed, epoch, row)`` (training);
            see :class:`~fap.data.seeding.SampleSeeds`.
    """

    def __init__(self, data: datasets.Dataset, *, transform: Optional[Callable], classes: Sequence[str],
                 skip_corrupt: bool = False, where: str = "", skipped_at_listing: int = 0,
                 sample_seeds: Optional[SampleSeeds] = None):
        self.data = data
        self.sample_seeds = sample_seeds
        self.transform = transform
        self.classes = list(classes)
        self.skip_corrupt = skip_corrupt
        self.where = where
        self.skips = SkipCounter(initial=skipped_at_listing)

    @property
    def num_skipped(self) -> int:
        """Images skipped so far (listing plus decoding in any worker)."""
        return self.skips.value

    def set_epoch(self, epoch: int) -> None:
        """Augment as in ``epoch`` (with ``sample_seeds``; otherwise nothing to do)."""
        if self.sample_seeds is not None:
            self.sample_seeds.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Optional[Tuple[torch.Tensor, int]]:
        row = self.data[int(index)]
        return self._sample(int(index), row[IMAGE_COLUMN], row[LABEL_COLUMN])

    def __getitems__(self, indices: Sequence[int]) -> List[Optional[Tuple[torch.Tensor, int]]]:
        # one arrow read per batch instead of one per image (used by torch's batched fetcher)
        indices = [int(i) for i in indices]
        rows = self.data[indices]
        return [self._sample(i, img, label) for i, img, label in zip(indices, rows[IMAGE_COLUMN], rows[LABEL_COLUMN])]

    def _sample(self, index: int, image: Dict[str, Any], label: int) -> Optional[Tuple[torch.Tensor, int]]:
        path = image.get("path")
        name = f"{self.where} row {index}" + (f" ({path})" if path else "")
        try:
            if image.get("bytes") is not None:
                pil = decode_rgb(image["bytes"], name=name)
            elif path:
                pil = decode_rgb(path, name=name)
            else:
                raise DataError(f"{name}: the image has neither bytes nor a path")
        except DataError:
            if not self.skip_corrupt:
                raise
            self.skips.add(1)
            _logger.warning("skipped unreadable image %s (skip_corrupt=True; %d skipped so far)",
                            name, self.num_skipped)
            return None
        return apply_transform(self.transform, pil, index, self.sample_seeds), int(label)
