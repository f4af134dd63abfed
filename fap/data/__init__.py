"""fap's data: ImageNet-layout folders, HF ``datasets``, FFCV ``.beton`` files and a built-in demo set.

Every source yields ``(uint8 images (B, 3, H, W), int64 labels (B,))``; the model
normalises (see ``fap.models``) and :func:`to_unit_float` gives the ``[0, 1]`` pixels that
attacks work in. ``fap data ...`` (``fap.data.cli``) makes, converts and inspects datasets.

FFCV and HF ``datasets`` are imported only when a source needs them. The config
(`fap.data.config`) and the errors are torch-free and imported at once; the rest on first
use (PEP 562), so ``fap.config`` reads ``DataConfig`` without loading torch.
"""
from fap.checks import DataError, DataNotFoundError
from fap.data.config import SOURCES, DataConfig
from fap.lazy import lazy_exports

_LAZY = {
    "to_unit_float": "fap.data.base",
    "make_demo": "fap.data.demo",
    "build_dataset": "fap.data.loader",
    "build_loader": "fap.data.loader",
    "class_names": "fap.data.loader",
    "num_classes": "fap.data.loader",
    "set_epoch": "fap.data.loader",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

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
