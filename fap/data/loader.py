"""``build_loader``, ``num_classes``, ``class_names``: one entry point for every data source.

Folder, HF and demo data come back as a plain ``torch.utils.data.DataLoader`` over the
whole split: the engine hands it to ``accelerator.prepare``, which shards it across
processes. FFCV data comes back as an :class:`~fap.data.ffcv.FFCVLoader` that is already
sharded (Accelerate leaves non-torch loaders alone). All of them yield
``(uint8 images (B, 3, H, W), int64 labels (B,))``; :func:`set_epoch` selects the epoch
whose order and training augmentation the next iteration produces, both fixed by
``(seed, epoch)`` and, for the augmentation, each sample's index (:mod:`fap.data.seeding`).

Every split is checked against the training split when it is built: same classes, labels
in range. Folder-based splits are listed eagerly (missing paths, non-image files, empty
classes); corrupt image bytes are found when decoded, in the loader's workers.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional

import torch
from torch.utils.data import DataLoader

from fap.checks import ConfigError
from fap.data.base import DataError, DataNotFoundError, collate_uint8
from fap.data.config import DataConfig
from fap.data.seeding import SampleSeeds
from fap.data.transforms import build_transform

__all__ = ["build_dataset", "build_loader", "class_names", "num_classes", "set_epoch"]

_logger = logging.getLogger(__name__)


def build_loader(
        cfg: DataConfig,
        split: str,
        *,
        batch_size: int,
        train: bool,
        seed: int = 0,
        num_processes: int = 1,
        process_index: int = 0,
        drop_last: Optional[bool] = None,
):
    """A loader over one split, yielding ``(uint8 images, int64 labels)``.

    Args:
        cfg: the data config.
        split: a split name, or the roles ``"train"`` / ``"val"`` meaning ``cfg.train_split`` /
            ``cfg.val_split``.
        batch_size: images per batch (per process).
        train: training augmentation and shuffling if True; eval crop and file order if False.
        seed: the run's seed: the shuffling order of epoch ``e`` depends on ``(seed, e)`` only, and
            when ``train`` the augmentation of sample ``i`` in epoch ``e`` on ``(seed, e, i)`` only
            (see :mod:`fap.data.seeding`), so a mid-epoch resume sees the very same images.
        num_processes: data-parallel processes; used by FFCV only (Accelerate shards the others).
        process_index: this process's index; used by FFCV only.
        drop_last: drop the last incomplete batch (default: ``train``).

    Returns:
        A ``torch.utils.data.DataLoader`` (folder, hf, demo; not sharded) or an
        :class:`~fap.data.ffcv.FFCVLoader` (ffcv; sharded, with ``set_epoch``).
    """
    cfg.validate()
    drop_last = train if drop_last is None else drop_last
    if cfg.source == "ffcv":
        return _build_ffcv_loader(cfg, split, batch_size=batch_size, train=train, seed=seed,
                                  num_processes=num_processes, process_index=process_index, drop_last=drop_last)
    dataset = build_dataset(cfg, split, train=train, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=drop_last,
        num_workers=cfg.num_workers,
        collate_fn=collate_uint8,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def set_epoch(loader, epoch: int) -> None:
    """Make the next iteration of ``loader`` produce epoch ``epoch``: its order and its augmentation.

    ``loader`` is one from :func:`build_loader`, possibly prepared by Accelerate (whose
    ``set_epoch`` reaches the sampler but not the dataset once the sampler has one).
    """
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    dataset = getattr(loader, "dataset", None)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def build_dataset(cfg: DataConfig, split: str, *, train: bool, seed: int = 0) -> torch.utils.data.Dataset:
    """The map-style dataset behind :func:`build_loader` for folder, hf and demo sources.

    It yields ``(uint8 image, label)`` or ``None`` for a skipped image, and exposes
    ``classes``, ``num_skipped`` and ``set_epoch``. With ``train``, each sample's random
    augmentation is seeded from ``(seed, epoch, index)`` (:class:`~fap.data.seeding.SampleSeeds`);
    call ``dataset.set_epoch(epoch)`` before iterating an epoch.
    """
    cfg.validate()
    root = _root(cfg)
    name = cfg.split_name(split)
    transform = build_transform(cfg, train=train)
    sample_seeds = SampleSeeds(seed) if train else None
    if cfg.source in ("folder", "demo"):
        from fap.data.folder import FolderDataset, split_dir

        reference = _folder_classes(root, cfg.train_split) if name != cfg.train_split else None
        return FolderDataset(split_dir(root, name), transform=transform, skip_corrupt=cfg.skip_corrupt,
                             classes=reference, sample_seeds=sample_seeds)
    if cfg.source == "hf":
        return _hf_dataset(cfg, root, name, transform=transform, sample_seeds=sample_seeds)
    raise ValueError(f"data.source={cfg.source!r} has no torch dataset; use build_loader")


def num_classes(cfg: DataConfig) -> int:
    """Number of classes, read from the training split."""
    return len(class_names(cfg))


def class_names(cfg: DataConfig) -> List[str]:
    """Class names in label order, read from the training split."""
    cfg.validate()
    root = _root(cfg)
    if cfg.source in ("folder", "demo"):
        return _folder_classes(root, cfg.train_split)
    if cfg.source == "hf":
        from fap.data import hf

        ds, _ = hf.load_split(root, cfg.train_split)
        return hf.split_classes(ds, where=f"{root} [{cfg.train_split}]")
    from fap.data import ffcv

    return ffcv.beton_classes(root, cfg.train_split)


def _root(cfg: DataConfig) -> str:
    """The dataset root, checked; for the demo source, made on first use."""
    if not cfg.path:
        raise ConfigError(f"data.path is empty: set it to the dataset directory for source={cfg.source!r}"
                         + (" (the demo is created there on first use)" if cfg.source == "demo" else ""))
    root = os.path.expanduser(cfg.path)
    if cfg.source == "demo":
        from fap.data.demo import is_demo, make_demo

        if not is_demo(root):  # a complete demo made with other settings is used as it is
            make_demo(root)
    elif not os.path.exists(root):
        raise DataNotFoundError(f"data.path={cfg.path!r}: no such directory; point data.path at the dataset "
                                f"for source={cfg.source!r} (see fap.data.DataConfig)")
    return root


def _folder_classes(root: str, train_split: str) -> List[str]:
    from fap.data.folder import find_classes, split_dir

    classes, _ = find_classes(split_dir(root, train_split))
    return classes


def _hf_dataset(cfg: DataConfig, root: str, name: str, *, transform, sample_seeds) -> torch.utils.data.Dataset:
    from fap.data import hf

    where = f"{root} [{name}]"
    layout = hf.detect_layout(root)
    reference = None
    if name != cfg.train_split:
        train_ds, _ = hf.load_split(root, cfg.train_split)
        reference = hf.split_classes(train_ds, where=f"{root} [{cfg.train_split}]")
    data, skipped = hf.load_split(root, name, skip_corrupt=cfg.skip_corrupt,
                                  reference_classes=reference if layout == "imagefolder" else None)
    classes = hf.split_classes(data, where=where)
    if reference is not None and classes != reference:
        if hf.has_class_names(data):
            raise DataError(f"{where}: class names differ from the training split's ({len(classes)} vs "
                            f"{len(reference)} classes); both splits must share one ClassLabel")
        classes = reference  # plain integer labels: checked against the training split's range below
    hf.check_labels(data, len(classes), where=where)
    return hf.HFImageDataset(data, transform=transform, classes=classes, skip_corrupt=cfg.skip_corrupt,
                             where=where, skipped_at_listing=skipped, sample_seeds=sample_seeds)


def _build_ffcv_loader(cfg: DataConfig, split: str, **kwargs):
    from fap.data import ffcv

    ffcv.import_ffcv()
    root = _root(cfg)
    classes = ffcv.beton_classes(root, cfg.train_split)
    if cfg.interpolation not in ("bilinear", "random"):
        _logger.warning("data.interpolation=%r does not apply to FFCV: its decoders resize with OpenCV's "
                        "area interpolation", cfg.interpolation)
    return ffcv.FFCVLoader(
        ffcv.beton_path(root, cfg.split_name(split)),
        image_size=cfg.image_size,
        crop_pct=cfg.crop_pct,
        scale=tuple(cfg.scale),
        hflip=cfg.hflip,
        num_workers=cfg.num_workers,
        num_classes=len(classes),
        **kwargs,
    )
