"""``DataConfig``: where the images are and how they are cropped, validated on construction.

The fields mirror timm's data arguments (``--img-size``, ``--crop-pct``, ``--interpolation``,
``--scale``, ``--hflip``, ``--aa``; huggingface/pytorch-image-models:train.py) so that
recipes read like timm commands, plus the source of the images.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal, Optional

from fap.checks import ConfigError, check_choices

__all__ = ["DataConfig", "SOURCES", "DETECTION_SOURCES", "INTERPOLATIONS", "Source", "Interpolation"]

Source = Literal["folder", "hf", "ffcv", "demo", "coco", "demo-det"]
# The sources of a detection run (``task="detection"``): boxes, not class folders.
DETECTION_SOURCES = ("coco", "demo-det")
# Modes timm's str_to_interp_mode / str_to_pil_interp accept ("random" picks per image when training).
Interpolation = Literal["bilinear", "bicubic", "nearest", "lanczos", "box", "hamming", "random"]
SOURCES = typing.get_args(Source)
INTERPOLATIONS = typing.get_args(Interpolation)
# Prefixes of the policy strings timm.data.create_transform understands (timm/data/auto_augment.py).
AUTO_AUGMENT_PREFIXES = ("rand", "augmix", "original", "v0", "3a")


@dataclass
class DataConfig:
    """Where the data is and how images are prepared. Every source yields uint8 images.

    Args:
        source: ``"folder"`` (ImageNet layout: ``path/<split>/<class>/*.jpg``), ``"hf"``
            (an HF ``datasets`` directory: ``save_to_disk`` output, parquet/arrow files with
            ``image`` and ``label`` columns, or an image folder), ``"ffcv"`` (``path/<split>.beton``)
            or ``"demo"`` (the generated demo set at ``path``, made on first use). For a
            detection run (``task="detection"``): ``"coco"`` (``path/<split>/images`` and
            ``path/annotations/instances_<split>.json``, `fap.data.coco`) or ``"demo-det"``
            (the demo detection set in that layout at ``path``, made on first use).
        path: the dataset root, see ``source``.
        train_split: name of the training split (a folder, HF split or ``.beton`` stem).
        val_split: name of the validation split.
        image_size: side of the square crops fed to the model.
        crop_pct: eval centre crop = ``image_size / crop_pct`` resize, then ``image_size`` crop.
        interpolation: resize interpolation (timm names); FFCV decoders always use OpenCV's area.
        scale: RandomResizedCrop area range for training.
        hflip: horizontal flip probability for training.
        auto_augment: a timm policy string, e.g. ``"rand-m9-mstd0.5-inc1"`` (folder/hf/demo only).
        num_workers: decoding processes (DataLoader workers, or FFCV threads).
        skip_corrupt: skip, log and count unreadable images instead of raising.
    """

    source: Source = "folder"
    path: str = ""
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 224
    crop_pct: float = 0.875
    interpolation: Interpolation = "bilinear"
    scale: tuple = (0.08, 1.0)
    hflip: float = 0.5
    auto_augment: Optional[str] = None
    num_workers: int = 2
    skip_corrupt: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.scale, list):
            self.scale = tuple(self.scale)
        self.validate()

    def validate(self) -> "DataConfig":
        """Check every field; raise `ConfigError` (a ``ValueError``) naming the key, the value and what is valid.

        Returns:
            ``self``, so ``cfg.validate()`` can be chained.
        """
        check_choices(self, "data")  # source, interpolation
        _check(isinstance(self.path, str), "path", self.path, "a string (a directory)")
        for key in ("train_split", "val_split"):
            value = getattr(self, key)
            _check(isinstance(value, str) and bool(value) and "/" not in value, key, value,
                   "a split name such as 'train' or 'val'")
        _check(_is_int(self.image_size) and self.image_size >= 8, "image_size", self.image_size, "an int >= 8")
        _check(_is_number(self.crop_pct) and 0.0 < self.crop_pct <= 1.0, "crop_pct", self.crop_pct,
               "a float in (0, 1], e.g. 0.875")
        scale = tuple(self.scale) if isinstance(self.scale, (list, tuple)) else None
        _check(scale is not None and len(scale) == 2 and all(_is_number(s) for s in scale)
               and 0.0 < scale[0] <= scale[1] <= 1.0, "scale", self.scale,
               "two floats (min, max) with 0 < min <= max <= 1, e.g. (0.08, 1.0)")
        _check(_is_number(self.hflip) and 0.0 <= self.hflip <= 1.0, "hflip", self.hflip, "a probability in [0, 1]")
        if self.auto_augment is not None:
            _check(isinstance(self.auto_augment, str)
                   and self.auto_augment.startswith(AUTO_AUGMENT_PREFIXES), "auto_augment", self.auto_augment,
                   "None or a timm policy string starting with " + ", ".join(AUTO_AUGMENT_PREFIXES)
                   + " (e.g. 'rand-m9-mstd0.5-inc1')")
            _check(self.source != "ffcv", "auto_augment", self.auto_augment,
                   "None when source='ffcv': FFCV pipelines are numba-compiled and cannot run timm's "
                   "PIL policies; use source='folder' or 'hf' for auto augmentation")
        _check(_is_int(self.num_workers) and self.num_workers >= 0, "num_workers", self.num_workers, "an int >= 0")
        _check(isinstance(self.skip_corrupt, bool), "skip_corrupt", self.skip_corrupt, "True or False")
        return self

    def split_name(self, split: str) -> str:
        """Map a role (``"train"``/``"val"``) to the configured split name; other names pass through."""
        return {"train": self.train_split, "val": self.val_split}.get(split, split)


def _check(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"data.{key}={value!r} is not valid: expected {expected}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
