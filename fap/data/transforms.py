"""Train and eval transforms: timm's ImageNet transforms, stopped at ``uint8`` tensors.

``timm.data.create_transform(..., use_prefetcher=True)`` ends with ``MaybePILToTensor``
instead of ``ToTensor + Normalize`` (huggingface/pytorch-image-models:
timm/data/transforms_factory.py), so images leave the data pipeline as ``uint8``
``(3, H, W)`` tensors and fap normalises them inside the model.

Training: RandomResizedCrop(``scale``, ratio 3/4..4/3) + horizontal flip (+ an optional
timm AutoAugment/RandAugment/AugMix policy). timm's default colour jitter is switched off
so that folder, HF and FFCV training see the same augmentation (FFCV-ImageNet's recipe is
RandomResizedCrop + flip). Eval: resize the short side to ``floor(image_size / crop_pct)``
then centre-crop ``image_size``, which is what FFCV's ``CenterCropRGBImageDecoder(ratio=crop_pct)``
does in one step.

Pillow 13 refuses ``ImageOps.posterize(img, 0)``, which timm's AutoAugment/RandAugment ask for
at the strong end of ``PosterizeIncreasing`` (magnitude 10) and the weak end of ``Posterize``
("keep 0 up to 4 MSB", timm/data/auto_augment.py): a random crash a few times per ImageNet
epoch. The transforms built here keep timm's meaning of 0 bits kept (a black image, what
Pillow returned before) on the ops of the transform they build; nothing global is patched.
"""
from __future__ import annotations

from typing import Callable

from PIL import Image, ImageOps
from timm.data import create_transform

from fap.data.config import DataConfig

__all__ = ["build_transform"]


def build_transform(cfg: DataConfig, *, train: bool) -> Callable:
    """The PIL -> ``uint8`` tensor transform for one split.

    Args:
        cfg: the data config (``image_size``, ``crop_pct``, ``interpolation``, ``scale``,
            ``hflip``, ``auto_augment``).
        train: random training augmentation if True, deterministic eval crop if False.

    Returns:
        A callable mapping an RGB PIL image to a ``uint8`` ``(3, image_size, image_size)`` tensor.
    """
    if train:
        transform = create_transform(
            input_size=cfg.image_size,
            is_training=True,
            scale=tuple(cfg.scale),
            hflip=cfg.hflip,
            color_jitter=None,
            auto_augment=cfg.auto_augment,
            interpolation=cfg.interpolation,
            use_prefetcher=True,
        )
        _keep_zero_bit_posterize(transform)
        return transform
    return create_transform(
        input_size=cfg.image_size,
        is_training=False,
        interpolation="bilinear" if cfg.interpolation == "random" else cfg.interpolation,
        crop_pct=cfg.crop_pct,
        use_prefetcher=True,
    )


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's ``posterize`` op, with 0 bits kept meaning a black image (as before Pillow 13)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _keep_zero_bit_posterize(transform: Callable) -> None:
    """Point the Posterize ops of timm's AutoAugment / RandAugment / AugMix in ``transform`` at :func:`_posterize`."""
    for stage in getattr(transform, "transforms", []):
        ops = list(getattr(stage, "ops", []))  # RandAugment, AugMixAugment
        ops += [op for sub_policy in getattr(stage, "policy", []) for op in sub_policy]  # AutoAugment
        for op in ops:
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize
