"""fap's data: ImageNet-layout folders, HF ``datasets``, FFCV ``.beton`` files and a built-in demo set.

Every source yields ``(uint8 images (B, 3, H, W), int64 labels (B,))``; the model
normalises (see ``fap.models``) and :func:`to_unit_float` gives the ``[0, 1]`` pixels that
attacks work in. ``fap data ...`` (``fap.data.cli``) makes, converts and inspects datasets.

FFCV and HF ``datasets`` are imported only when a source needs them.
"""
from fap.data.base import DataError, DataNotFoundError, to_unit_float
from fap.data.config import SOURCES, DataConfig
from fap.data.demo import make_demo
from fap.data.loader import build_dataset, build_loader, class_names, num_classes, set_epoch

__all__ = [
    "DataNotFoundError",
    "SOURCES",
    "DataConfig",
    "DataError",
    "build_dataset",
    "build_loader",
    "class_names",
    "make_demo",
    "num_classes",
    "set_epoch",
    "to_unit_float",
]
