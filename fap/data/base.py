"""Pieces every fap data source shares: the error type, strict image decoding, skip counting.

fap's sources all yield ``(images, labels)``: ``uint8`` images of shape ``(B, 3, H, W)``
and ``int64`` labels of shape ``(B,)``. Pixels stay ``uint8`` up to the model, which
normalises them itself (see ``fap.models.PixelModel``); :func:`to_unit_float` turns a
batch into the ``[0, 1]`` pixel space that attacks work in.

Nothing is dropped silently: a file that cannot be used raises :class:`DataError` naming
it, unless the caller set ``skip_corrupt``; then it is skipped, logged and counted in a
:class:`SkipCounter` that DataLoader worker processes share with the main process.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import uuid
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image, UnidentifiedImageError

from fap.checks import DataError, DataNotFoundError  # defined torch-free, so `fap.cli` catches them cheaply

__all__ = [
    "DataError",
    "DataNotFoundError",
    "IMAGE_EXTENSIONS",
    "SkipCounter",
    "build_atomically",
    "collate_uint8",
    "decode_rgb",
    "is_complete",
    "move_into_place",
    "to_unit_float",
]

# The extensions torchvision's ImageFolder accepts (torchvision.datasets.folder.IMG_EXTENSIONS).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

SKIP_HINT = "set data.skip_corrupt=True to skip (and count) such files instead"


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """Turn a ``uint8`` batch into ``float32`` pixels in ``[0, 1]``; pass float batches through.

    Args:
        images: ``(B, 3, H, W)`` (or any shape) ``uint8`` or floating-point tensor.

    Returns:
        ``images / 255`` as ``float32`` for ``uint8`` input (memory format kept), else ``images``.
    """
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if images.is_floating_point():
        return images
    raise TypeError(f"expected a uint8 or floating-point image batch, got dtype {images.dtype}")


def decode_rgb(source: Union[str, os.PathLike, bytes], *, name: Optional[str] = None) -> Image.Image:
    """Fully decode an image file or its bytes into an RGB PIL image.

    Decoding is forced (``Image.load``) so that truncated files fail here, with the file
    named, rather than later inside a transform.

    Args:
        source: a path or the encoded bytes.
        name: what to call the image in errors (defaults to the path).

    Raises:
        DataError: the bytes are not a readable image.
        FileNotFoundError: the path does not exist.
    """
    name = name or str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with Image.open(fp) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise
    except UnidentifiedImageError as e:
        raise DataError(f"{name}: not an image file PIL can read ({e}); remove it, or {SKIP_HINT}") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: corrupt or truncated image ({e}); re-download or remove it, or {SKIP_HINT}") from e


class SkipCounter:
    """Counts skipped samples across DataLoader worker processes.

    The count lives in shared memory (a ``multiprocessing.Value``), so increments made in
    worker processes are seen by the main process, e.g. by the engine when it logs.

    Args:
        initial: skips already known when the dataset was built (e.g. at file listing).
    """

    def __init__(self, initial: int = 0):
        self._value = multiprocessing.Value("q", int(initial))

    def add(self, n: int = 1) -> None:
        with self._value.get_lock():
            self._value.value += n

    @property
    def value(self) -> int:
        return int(self._value.value)


def collate_uint8(
        samples: Sequence[Optional[Tuple[torch.Tensor, int]]],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(uint8 image, label)`` samples into a batch, leaving out skipped ones (``None``).

    A batch that lost samples to ``skip_corrupt`` is smaller than ``batch_size``; every
    skip is counted and logged where it happened.
    """
    kept: List[Tuple[torch.Tensor, int]] = [s for s in samples if s is not None]
    if not kept:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    images = torch.stack([img for img, _ in kept])
    labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
    return images, labels



# --------------------------------------------------------------------------------------
# Generated datasets (demo, corrupted copies): built in a temporary folder, renamed into
# place, and recognised as finished by a marker file holding the settings they were made with
# --------------------------------------------------------------------------------------

def is_complete(out_dir: str, settings: Dict, marker: str) -> bool:
    """``out_dir`` holds a finished dataset made with exactly ``settings`` (``marker`` file)."""
    try:
        with open(os.path.join(out_dir, marker)) as f:
            return json.load(f) == json.loads(json.dumps(settings))
    except (OSError, ValueError):
        return False


def build_atomically(out_dir: str, settings: Dict, marker: str, write: Callable[[str], None], *, what: str) -> str:
    """Make a generated dataset at ``out_dir`` once and atomically; returns ``out_dir`` (absolute).

    A finished ``out_dir`` made with the same ``settings`` is kept as it is. Otherwise
    ``write(tmp)`` fills a private sibling folder (same file system), the ``marker`` file
    holding ``settings`` is written last, and the folder is renamed into place; the sibling
    is removed on any error, so nothing half-written is left behind.

    Raises:
        FileExistsError: ``out_dir`` holds something else (``what`` names what it is not).
    """
    out_dir = os.path.abspath(out_dir)
    if is_complete(out_dir, settings, marker):
        return out_dir
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a complete {what} made with {settings} (its {marker} "
                              "is missing or differs); delete it or choose another directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)  # keeps the umask
    try:
        write(tmp)
        with open(os.path.join(tmp, marker), "w") as f:
            json.dump(settings, f, indent=1, sort_keys=True)
        move_into_place(tmp, out_dir, settings, marker)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def move_into_place(tmp: str, out_dir: str, settings: Dict, marker: str) -> None:
    """Rename ``tmp`` to ``out_dir`` atomically; if another process finished the same
    dataset first (same settings), keep theirs."""
    try:
        if os.path.isdir(out_dir) and not os.listdir(out_dir):
            os.rmdir(out_dir)
        os.rename(tmp, out_dir)
    except OSError:
        if not is_complete(out_dir, settings, marker):
            raise
