"""ImageNet-layout folders (``root/<split>/<class>/<image>``), listed strictly.

Class indices are the sorted class-folder names, as in torchvision's ``ImageFolder``
(pytorch/vision:torchvision/datasets/folder.py). Unlike ``ImageFolder``, which silently
ignores files with other extensions and counts hidden folders such as
``.ipynb_checkpoints`` as classes, listing here is strict: a non-image file, an empty
class folder or a split whose classes differ from the training split's is an error that
names the path and the fix (``skip_corrupt`` turns unusable *files* into counted skips;
class-set problems are always errors because they would shift every label). Hidden files
and folders (names starting with ``.``) are not data and are not listed.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torchvision.datasets import DatasetFolder

from fap.data.base import IMAGE_EXTENSIONS, SKIP_HINT, DataError, DataNotFoundError, SkipCounter, decode_rgb
from fap.data.seeding import SampleSeeds

__all__ = ["FolderDataset", "SplitListing", "check_same_classes", "find_classes", "scan_split", "split_dir"]

_logger = logging.getLogger(__name__)

VAL_LAYOUT_HINT = (
    "ImageNet's validation archive is flat; sort it into class folders first "
    "(e.g. with the valprep.sh script from the PyTorch ImageNet example)"
)


def split_dir(root: str, split: str) -> str:
    """``root/split``, checked to exist.

    Raises:
        DataNotFoundError: (a ``FileNotFoundError``) naming the missing folder and the splits
            that do exist.
    """
    if not os.path.isdir(root):
        raise DataNotFoundError(f"data.path={root!r}: no such directory; point data.path at the folder "
                                f"holding the split folders (e.g. train/ and val/)")
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        present = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        raise DataNotFoundError(f"{path}: no such split folder; folders in {root}: {present or 'none'}. "
                                f"Set data.train_split / data.val_split to one of them")
    return path


def find_classes(directory: str) -> Tuple[List[str], Dict[str, int]]:
    """Sorted class folders of one split, as torchvision's ``find_classes`` but ignoring hidden folders.

    Raises:
        DataError: the folder holds no class folders.
    """
    entries = [e for e in os.scandir(directory) if not e.name.startswith(".")]
    classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        files = [e.name for e in entries if e.is_file()]
        hint = f" but {len(files)} loose files; {VAL_LAYOUT_HINT}" if files else ""
        raise DataError(f"{directory}: no class folders{hint}. Expected {directory}/<class>/<image>")
    return classes, {c: i for i, c in enumerate(classes)}


def check_same_classes(reference: Sequence[str], other: Sequence[str], *, reference_dir: str, other_dir: str) -> None:
    """Raise if two splits do not have exactly the same classes (labels would not line up)."""
    if list(reference) == list(other):
        return
    missing = sorted(set(reference) - set(other))
    extra = sorted(set(other) - set(reference))
    raise DataError(
        f"class folders of {other_dir} differ from {reference_dir}: missing {_head(missing)}, "
        f"extra {_head(extra)}. Both splits need the same class folders (an empty one may be added "
        f"only if it gets images), otherwise labels would not match"
    )


@dataclass
class SplitListing:
    """What one split folder holds: classes, their image files, and files that are not images."""

    directory: str
    classes: List[str]
    images: Dict[str, List[str]]
    non_images: List[str] = field(default_factory=list)

    @property
    def empty_classes(self) -> List[str]:
        return [c for c in self.classes if not self.images[c]]

    @property
    def num_images(self) -> int:
        return sum(len(v) for v in self.images.values())


def scan_split(directory: str) -> SplitListing:
    """List a split folder (recursively within each class, sorted, following links).

    Raises:
        DataError: the folder holds no class folders.
    """
    classes, _ = find_classes(directory)
    listing = SplitListing(directory=directory, classes=classes, images={})
    for cls in classes:
        listing.images[cls] = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(directory, cls), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    listing.images[cls].append(path)
                else:
                    listing.non_images.append(path)
    return listing


class FolderDataset(DatasetFolder):
    """One split of an ImageNet-layout folder, yielding ``(uint8 image, label)``.

    A torchvision ``DatasetFolder`` (``classes``, ``class_to_idx``, ``samples``, ``targets``)
    whose listing is strict and whose decoding errors name the file.

    Args:
        root: the split folder, e.g. ``/data/imagenet/train``.
        transform: PIL image -> ``uint8`` tensor (see :func:`fap.data.transforms.build_transform`).
        skip_corrupt: skip (log and count) non-image files and undecodable images instead of raising.
        classes: the class list to index by (the training split's); the split must have exactly these.
        sample_seeds: seed the transform of each sample from ``(seed, epoch, index)``
            (:class:`~fap.data.seeding.SampleSeeds`; training), so that its random crop and flip
            do not depend on the worker count or on where a resumed epoch starts.
    """

    def __init__(
            self,
            root: str,
            *,
            transform: Optional[Callable] = None,
            skip_corrupt: bool = False,
            classes: Optional[Sequence[str]] = None,
            sample_seeds: Optional[SampleSeeds] = None,
    ):
        self.skip_corrupt = skip_corrupt
        self.sample_seeds = sample_seeds
        self.reference_classes = list(classes) if classes is not None else None
        self.skipped_files: List[str] = []
        super().__init__(root, loader=decode_rgb, extensions=IMAGE_EXTENSIONS, transform=transform)
        self.skips = SkipCounter(initial=len(self.skipped_files))
        if self.skipped_files:
            _logger.warning("%s: skipped %d unusable files while listing (skip_corrupt=True): %s",
                            root, len(self.skipped_files), _head(self.skipped_files))

    @property
    def num_skipped(self) -> int:
        """Files skipped so far: at listing, plus images that failed to decode in any worker."""
        return self.skips.value

    def set_epoch(self, epoch: int) -> None:
        """Augment as in ``epoch`` (with ``sample_seeds``; otherwise nothing to do)."""
        if self.sample_seeds is not None:
            self.sample_seeds.set_epoch(epoch)

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        classes, class_to_idx = find_classes(directory)
        if self.reference_classes is not None:
            check_same_classes(self.reference_classes, classes, reference_dir="the training split",
                               other_dir=directory)
        return classes, class_to_idx

    def make_dataset(
            self,
            directory: str,
            class_to_idx: Dict[str, int],
            extensions: Optional[Tuple[str, ...]] = None,
            is_valid_file: Optional[Callable[[str], bool]] = None,
            allow_empty: bool = False,
    ) -> List[Tuple[str, int]]:
        listing = scan_split(directory)
        if listing.non_images and not self.skip_corrupt:
            raise DataError(f"{listing.non_images[0]}: not an image file (extensions read: "
                            f"{' '.join(IMAGE_EXTENSIONS)}); move it out of the dataset, or {SKIP_HINT}"
                            + (f" ({len(listing.non_images)} such files)" if len(listing.non_images) > 1 else ""))
        self.skipped_files = list(listing.non_images)
        if listing.empty_classes:
            raise DataError(f"{os.path.join(directory, listing.empty_classes[0])}: empty class folder (no images); "
                            f"add images or remove the folder from every split")
        return [(path, class_to_idx[cls]) for cls in listing.classes for path in listing.images[cls]]

    def __getitem__(self, index: int) -> Optional[Tuple[torch.Tensor, int]]:
        path, target = self.samples[index]
        try:
            image = decode_rgb(path)
        except DataError:
            if not self.skip_corrupt:
                raise
            self.skips.add(1)
            _logger.warning("skipped unreadable image %s (skip_corrupt=True; %d skipped so far)",
                            path, self.num_skipped)
            return None
        return apply_transform(self.transform, image, index, self.sample_seeds), target


def apply_transform(transform: Optional[Callable], image, index: int, sample_seeds: Optional[SampleSeeds]):
    """``transform(image)``, with the generators seeded for sample ``index`` if ``sample_seeds`` is given."""
    if transform is None:
        return image
    if sample_seeds is None:
        return transform(image)
    with sample_seeds.scope(index):
        return transform(image)


def _head(items: Sequence[str], n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(items[:n]) or "none"
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")
