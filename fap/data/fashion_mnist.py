"""Fashion-MNIST (Xiao et al., 2017) from its idx files into an ImageNet-layout folder.

Debian's ``dataset-fashion-mnist`` package installs the four standard idx files in
``/usr/share/datasets/fashion-mnist/``. :func:`convert_fashion_mnist` writes them as
``train/<k>_<name>/*.png`` (the 60,000 training images) and ``val/<k>_<name>/*.png`` (the
10,000 ``t10k`` images): RGB, 32x32 (each 28x28 image centred on a black 2-pixel
border, as LeNet-5 padded MNIST), lossless PNG, so that a 28-pixel centre crop
(``crop_pct=0.875``) gives back the original pixels. Class folders are prefixed with the
Fashion-MNIST label, so the sorted folder order *is* the dataset's label order.

The idx format (LeCun et al.): a 4-byte big-endian magic number whose third byte is the
element type (0x08 = uint8) and fourth the number of dimensions, one big-endian uint32 per
dimension, then the data.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import uuid
from typing import Dict, Optional

import numpy as np
from PIL import Image

__all__ = ["CLASSES", "DEFAULT_SRC", "IDX_FILES", "convert_fashion_mnist", "read_idx"]

DEFAULT_SRC = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle_boot")
MARKER = ".fap-fashion-mnist.json"
_PAD = 2  # 28 + 2 * 2 = 32


def read_idx(path: str) -> np.ndarray:
    """Read a (gzipped) idx file of unsigned bytes into a NumPy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {len(data) - offset} bytes "
                         f"(truncated download?)")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _check_src(src: str) -> None:
    names = [n for pair in IDX_FILES.values() for n in pair]
    missing = [n for n in names if not os.path.isfile(os.path.join(src, n))]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST idx files missing in {src}: {', '.join(missing)}. Install Debian's package with "
            f"`apt-get install -y dataset-fashion-mnist` (files go to {DEFAULT_SRC}), or pass --src DIR holding "
            f"{', '.join(names)}")


def _balanced_subset(labels: np.ndarray, limit: Optional[int]) -> np.ndarray:
    """The first ``limit`` indices in file order, taken as evenly as possible over the classes."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    classes = np.unique(labels)
    quota = {c: limit // len(classes) + (1 if k < limit % len(classes) else 0) for k, c in enumerate(classes)}
    keep = np.concatenate([np.flatnonzero(labels == c)[:quota[c]] for c in classes])
    return np.sort(keep)


def convert_fashion_mnist(
        out_dir: str,
        *,
        src: str = DEFAULT_SRC,
        max_train: Optional[int] = None,
        max_val: Optional[int] = None,
        holdout: int = 0,
) -> Dict[str, int]:
    """Write Fashion-MNIST as an ImageNet-layout folder of 32x32 RGB PNGs; reuse a complete copy.

    Args:
        out_dir: destination (gets ``train/``, ``val/`` and a completion marker).
        src: directory holding the four idx files.
        max_train: keep at most this many training images, class-balanced, first in file order.
        max_val: the same for the validation (``t10k``) images.
        holdout: also write ``holdout/``: this many more training images, class-balanced,
            the next in file order after those of ``train/`` and disjoint from them: a
            split of the *training* images on which to choose schedules, so that the test
            images (``val/``) are used for the comparison alone.

    Returns:
        Images written per split, e.g. ``{"train": 60000, "val": 10000}`` (and ``"holdout"``).

    Raises:
        FileNotFoundError: idx files missing (the message names the Debian package).
        FileExistsError: ``out_dir`` holds something else.
    """
    _check_src(src)
    for key, limit in (("max_train", max_train), ("max_val", max_val)) + ((("holdout", holdout),) if holdout else ()):
        if limit is not None and limit < len(CLASSES):
            raise ValueError(f"{key}={limit}: keep at least {len(CLASSES)} images so every class has one")
    if holdout and max_train is None:
        raise ValueError(f"holdout={holdout} needs max_train: the held-out images are training images that "
                         "train/ does not hold")
    settings = {"format": 1, "max_train": max_train, "max_val": max_val}
    if holdout:
        settings["holdout"] = int(holdout)
    out_dir = os.path.abspath(out_dir)
    marker = os.path.join(out_dir, MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            recorded = json.load(f)
        if recorded.get("settings") == settings:
            return recorded["counts"]
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a Fashion-MNIST copy made with {settings}; "
                              f"delete it or choose another --out")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        counts = {}
        for split, limit in (("train", max_train), ("val", max_val)):
            counts[split] = _write_split(src, tmp, split, limit)
        if holdout:
            counts["holdout"] = _write_split(src, tmp, "train", holdout, skip=max_train, folder="holdout")
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"settings": settings, "counts": counts}, f, indent=1)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def _write_split(src: str, root: str, split: str, limit: Optional[int], *, skip: Optional[int] = None,
                 folder: Optional[str] = None) -> int:
    """Write ``limit`` class-balanced images of the idx ``split`` to ``root/<folder or split>``;
    ``skip``: leave out the first ``skip`` balanced ones (those another split holds)."""
    images_file, labels_file = (os.path.join(src, n) for n in IDX_FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{images_file} / {labels_file}: shapes {images.shape} / {labels.shape} do not form "
                         f"a labelled image set")
    if labels.max() >= len(CLASSES):
        raise ValueError(f"{labels_file}: label {labels.max()} outside Fashion-MNIST's {len(CLASSES)} classes")
    out = folder or split
    folders = [f"{k}_{name}" for k, name in enumerate(CLASSES)]
    for name in folders:
        os.makedirs(os.path.join(root, out, name))
    if skip is None:
        keep = _balanced_subset(labels, limit)
    else:
        rest = np.setdiff1d(np.arange(len(labels)), _balanced_subset(labels, skip))
        keep = rest[_balanced_subset(labels[rest], limit)]
        if len(keep) < limit:
            raise ValueError(f"holdout={limit}: only {len(keep)} training images are left after the {skip} of train/")
    for i in keep:
        padded = np.pad(images[i], _PAD)
        rgb = np.repeat(padded[:, :, None], 3, axis=2)
        Image.fromarray(rgb).save(os.path.join(root, out, folders[labels[i]], f"{split}_{i:05d}.png"))
    return int(len(keep))

