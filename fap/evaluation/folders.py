"""Evaluation folders whose labels are the *model's* label indices.

Robustness sets are ImageNet-layout folders named by class: ImageNet-C
(``<corruption>/<severity>/<wnid>/``; Hendrycks & Dietterich 2019), ImageNet-R and
ImageNet-A (200 of the 1000 WordNet ids; Hendrycks et al. 2021), ImageNet-Sketch (Wang
et al., NeurIPS 2019) and Stylized-ImageNet (Geirhos et al., ICLR 2019) with all 1000.
ImageNet-V2 (Recht et al., ICML 2019) names its folders by label index (``0`` ... ``999``).
An ``ImageFolder`` would number whatever folders it finds ``0..n-1``, which is wrong for
every subset; here each folder is looked up in the model's class list instead, and a
folder that is not one of the model's classes is an error naming it.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torchvision.datasets import DatasetFolder

from fap.data.base import IMAGE_EXTENSIONS, DataError, decode_rgb
from fap.data.corrupt import ALL_CORRUPTIONS, SEVERITIES

__all__ = ["ModelFolder", "align_classes", "imagenet_c_layout", "list_class_folders"]


def list_class_folders(root: str) -> List[str]:
    """Sorted, non-hidden sub-folders of ``root``.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        DataError: it has no sub-folders.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such directory")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"{root}: no class folders; expected {root}/<class>/<image>")
    return names


def align_classes(
        folders: Sequence[str], *, model_classes: Optional[Sequence[str]], num_classes: int, where: str,
) -> Dict[str, int]:
    """Map each class folder of an evaluation set to the model's label index.

    Rules, in order:

    1. the model's class names are known: a folder named like a class gets its index;
    2. every folder name is an integer and none is a class name (ImageNet-V2's layout):
       the integer is the label index;
    3. the class names are unknown and there are exactly ``num_classes`` folders: sorted
       order, the ``ImageFolder`` convention the training loader followed.

    Args:
        folders: the set's class folder names.
        model_classes: the model's class names in label order, or None if unknown.
        num_classes: the model's number of outputs.
        where: the folder, for error messages.

    Raises:
        DataError: a folder matches none of the model's classes (named, with examples of
            valid names), or the alignment cannot be decided.
    """
    if model_classes is not None:
        index = {name: i for i, name in enumerate(model_classes)}
        unknown = [f for f in folders if f not in index]
        if not unknown:
            return {f: index[f] for f in folders}
        if not _all_integers(folders):
            raise DataError(
                f"{where}: class folders {_head(unknown)} are not classes of the model ({len(unknown)} of "
                f"{len(folders)} folders). The model's {len(model_classes)} classes are named like "
                f"{_head(model_classes, 3)}; evaluate a set made for the classes the model was trained on"
            )
    if _all_integers(folders):
        labels = {f: int(f) for f in folders}
        bad = [f for f, i in labels.items() if not 0 <= i < num_classes]
        if bad:
            raise DataError(f"{where}: class folders {_head(bad)} are label indices outside the model's "
                            f"0..{num_classes - 1}")
        return labels
    if len(folders) == num_classes:
        return {f: i for i, f in enumerate(folders)}
    raise DataError(
        f"{where}: cannot tell which model outputs its {len(folders)} class folders ({_head(folders, 3)}) "
        f"stand for: the model has {num_classes} classes and its class names are unknown. Pass the class "
        f"names in label order (classes=... / --classes FILE, e.g. the training split's class folders)"
    )


def _all_integers(names: Sequence[str]) -> bool:
    return all(n.isdigit() for n in names)


def _head(items: Sequence[str], n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")


class ModelFolder(DatasetFolder):
    """An ImageNet-layout folder yielding ``(uint8 image, model label index)``.

    Args:
        root: a folder of class folders.
        model_classes: the model's class names in label order, or None (see :func:`align_classes`).
        num_classes: the model's number of outputs.
        transform: PIL image -> uint8 tensor (``fap.data.transforms.build_transform(..., train=False)``).
        allowed: if given, the class names this set may contain (e.g. ImageNet-R's 200);
            another folder is an error.
        name: what to call the set in errors.
    """

    def __init__(
            self,
            root: str,
            *,
            model_classes: Optional[Sequence[str]],
            num_classes: int,
            transform: Optional[Callable] = None,
            allowed: Optional[Sequence[str]] = None,
            name: str = "",
    ):
        self._model_classes = None if model_classes is None else list(model_classes)
        self._num_classes = num_classes
        self._allowed = None if allowed is None else set(allowed)
        self._name = name or root
        super().__init__(root, loader=decode_rgb, extensions=IMAGE_EXTENSIONS, transform=transform,
                         allow_empty=False)

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        folders = list_class_folders(directory)
        if self._allowed is not None:
            foreign = [f for f in folders if f not in self._allowed]
            if foreign:
                raise DataError(f"{directory}: class folders {_head(foreign)} are not {self._name} classes; "
                                f"{self._name} has {len(self._allowed)} classes named like "
                                f"{_head(sorted(self._allowed), 3)}")
        return folders, align_classes(folders, model_classes=self._model_classes, num_classes=self._num_classes,
                                      where=directory)


def imagenet_c_layout(root: str, corruptions: Optional[Sequence[str]] = None) -> Dict[str, Dict[int, str]]:
    """The ``{corruption: {severity: folder}}`` of an ImageNet-C layout, checked complete.

    Args:
        root: a folder of ``<corruption>/<severity>/<class>/<image>``.
        corruptions: the corruptions to evaluate (each must be present); default every
            corruption folder found.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        DataError: a folder that is not a known corruption, a requested corruption that is
            missing, or a corruption without exactly the severities 1..5 (named).
    """
    found = list_class_folders(root)
    unknown = [f for f in found if f not in ALL_CORRUPTIONS]
    if unknown:
        raise DataError(f"{root}: folders {_head(unknown)} are not ImageNet-C corruptions; expected the layout "
                        f"<corruption>/<severity>/<class>/<image> with corruptions among {', '.join(ALL_CORRUPTIONS)}")
    if corruptions is not None:
        bad = [c for c in corruptions if c not in ALL_CORRUPTIONS]
        if bad:
            raise DataError(f"corruptions={list(corruptions)!r}: {_head(bad)} unknown; expected names among "
                            f"{', '.join(ALL_CORRUPTIONS)}")
        missing = [c for c in corruptions if c not in found]
        if missing:
            raise DataError(f"{root}: no folder for corruption(s) {_head(missing)}; found {_head(found, 19)}")
        found = [c for c in ALL_CORRUPTIONS if c in corruptions]
    else:
        found = [c for c in ALL_CORRUPTIONS if c in found]
    expected = [str(s) for s in SEVERITIES]
    layout: Dict[str, Dict[int, str]] = {}
    for corruption in found:
        folder = os.path.join(root, corruption)
        severities = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
        missing = [s for s in expected if s not in severities]
        extra = [s for s in severities if s not in expected]
        if missing or extra:
            problem = (f"missing severity folder(s) {', '.join(missing)}" if missing else "") + \
                      ("; " if missing and extra else "") + \
                      (f"unexpected folder(s) {_head(extra)}" if extra else "")
            raise DataError(f"{folder}: {problem}. ImageNet-C needs the 5 severities as folders 1, 2, 3, 4, 5, "
                            f"each holding class folders (found: {', '.join(severities) or 'none'})")
        layout[corruption] = {int(s): os.path.join(folder, s) for s in expected}
    return layout
