"""COCO-format detection data: an image folder plus an instances JSON, checked entry by entry.

The detection half of Fast AdvProp (Mei et al., ICLR 2022, Table 7) trains RetinaNet on
COCO. :func:`load_coco` reads an instances JSON (``images``, ``annotations``,
``categories``) and checks every entry before anything trains: a box outside its image,
an unknown category, a missing image file or a duplicate id is a `DataError` naming the
file, the entry and what would be right. The checked dict becomes a ``pycocotools.COCO``
index (the ground truth of `fap.detection.evaluate`), built without reading the file twice.

:class:`CocoDetection` yields ``(uint8 image (3, H, W), target)`` with ``target`` =
``{"boxes": (N, 4) float32 xyxy pixels, "labels": (N,) int64 category ids, "image_id":
int}``: labels are COCO category ids, as torchvision's COCO detectors use them (a model
needs ``num_classes = max id + 1``). Crowd annotations are kept out of training targets
(as torchvision's references do) but stay in the evaluation ground truth.
:func:`detection_collate` pads a batch to its largest height and width (zeros at the
bottom and right, so boxes keep their coordinates) and gathers the targets in a
`DetectionTargets` (what `fap.tasks.DetectionTask` reads).

Layout: ``fap data demo-det`` writes ``DIR/<split>/images/*.jpg`` and
``DIR/annotations/instances_<split>.json`` (:func:`split_paths`), which is also what
``fap data corrupt DIR/<split> OUT`` turns into ``OUT/<corruption>/<severity>/images``.
For COCO itself, link ``val2017`` as ``coco/val/images`` and the JSON as
``coco/annotations/instances_val.json``, or pass the two paths directly.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from fap.data.base import DataError, DataNotFoundError

__all__ = ["CocoDetection", "check_coco", "detection_collate", "load_coco", "num_classes_of", "split_paths"]


def split_paths(root: str, split: str) -> Tuple[str, str]:
    """``(images folder, instances JSON)`` of ``split`` in the demo-det layout under ``root``."""
    return os.path.join(root, split, "images"), os.path.join(root, "annotations", f"instances_{split}.json")


def load_coco(images_dir: str, ann_file: str, *, check_files: bool = True):
    """Read and check an instances JSON; return a ``pycocotools.coco.COCO`` index of it.

    Args:
        images_dir: folder the images' ``file_name`` entries are relative to.
        ann_file: the instances JSON.
        check_files: also check that every image file exists.

    Raises:
        DataNotFoundError: the JSON, the folder or an image file is missing (named).
        DataError: the JSON is malformed or an entry is wrong (named, with what would be right).
    """
    if not os.path.isfile(ann_file):
        raise DataNotFoundError(f"{ann_file}: no such instances JSON; expected COCO-format annotations "
                                "(make a demo with `fap data demo-det --out DIR`)")
    if not os.path.isdir(images_dir):
        raise DataNotFoundError(f"{images_dir}: no such image folder (the images of {ann_file})")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except ValueError as e:
        raise DataError(f"{ann_file}: not valid JSON ({e})") from e
    check_coco(data, ann_file)
    if check_files:
        for img in data["images"]:
            if not os.path.isfile(os.path.join(images_dir, img["file_name"])):
                raise DataNotFoundError(f"{ann_file}: image id {img['id']} names file_name {img['file_name']!r}, "
                                        f"which is not in {images_dir}; add the file or remove the entry")
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


def check_coco(data: Dict[str, Any], source: str = "instances JSON") -> None:
    """Raise `DataError` naming the first bad entry of a COCO instances dict."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{source}: key {key!r} is missing or not a list (a COCO instances file has "
                            "images, annotations and categories)")
    categories = {c.get("id") for c in data["categories"]}
    if any(not isinstance(c, int) or c < 1 for c in categories):
        raise DataError(f"{source}: category ids {sorted(map(str, categories))} must be ints >= 1")
    images = {}
    for img in data["images"]:
        missing = [k for k in ("id", "file_name", "width", "height") if k not in img]
        if missing:
            raise DataError(f"{source}: image entry {img} lacks {missing}")
        if img["id"] in images:
            raise DataError(f"{source}: image id {img['id']} appears twice; image ids must be unique")
        images[img["id"]] = img
    seen = set()
    for ann in data["annotations"]:
        _check_annotation(ann, images, categories, seen, source)


def _check_annotation(ann: Dict, images: Dict, categories: set, seen: set, source: str) -> None:
    where = f"{source}: annotation id {ann.get('id')!r}"
    for k in ("id", "image_id", "category_id", "bbox"):
        if k not in ann:
            raise DataError(f"{where} lacks {k!r}")
    if ann["id"] in seen:
        raise DataError(f"{where} appears twice; annotation ids must be unique")
    seen.add(ann["id"])
    img = images.get(ann["image_id"])
    if img is None:
        raise DataError(f"{where} has image_id {ann['image_id']!r}, which no image entry has")
    if ann["category_id"] not in categories:
        raise DataError(f"{where} (image {img['file_name']}) has category_id {ann['category_id']!r}, which is not "
                        f"among the categories {sorted(categories)}")
    box = ann["bbox"]
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise DataError(f"{where} (image {img['file_name']}) has bbox {box!r}; expected [x, y, width, height]")
    x, y, w, h = box
    tol = 1.0  # COCO's own boxes overhang by rounding now and then
    if w <= 0 or h <= 0 or x < -tol or y < -tol or x + w > img["width"] + tol or y + h > img["height"] + tol:
        raise DataError(f"{where} (image {img['file_name']}) has bbox [x, y, w, h] = {box}, outside the "
                        f"{img['width']}x{img['height']} image or empty; expected w, h > 0, 0 <= x, x + w <= "
                        f"{img['width']}, 0 <= y, y + h <= {img['height']}")


def num_classes_of(coco) -> int:
    """The detector's ``num_classes`` for these categories: ``max id + 1`` (labels are category ids)."""
    return max(coco.getCatIds()) + 1


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format images and targets (see the module docstring).

    Args:
        images_dir: folder of the images.
        ann_file: the instances JSON.
        coco: an index already loaded (`load_coco`) instead of reading ``ann_file``.
        flip_prob: probability of a horizontal flip (training: 0.5, the 1x recipe's only
            augmentation); drawn from ``(seed, epoch, index)``, so an epoch is reproducible.
        seed: seed of the flips.
    """

    def __init__(self, images_dir: str, ann_file: str, *, coco=None, flip_prob: float = 0.0, seed: int = 0):
        self.images_dir = images_dir
        self.coco = coco if coco is not None else load_coco(images_dir, ann_file)
        self.ids = sorted(self.coco.imgs)
        self.flip_prob, self.seed, self.epoch = flip_prob, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        from PIL import Image

        info = self.coco.imgs[self.ids[index]]
        path = os.path.join(self.images_dir, info["file_name"])
        try:
            with Image.open(path) as im:
                image = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        except OSError as e:
            raise DataError(f"{path}: not a readable image ({e}); replace it or remove image id {info['id']}") from e
        anns = [a for a in self.coco.imgToAnns.get(info["id"], []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        w = image.shape[-1]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.shape[-2])
        if self.flip_prob > 0:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]))
            if float(torch.rand((), generator=g)) < self.flip_prob:
                image = image.flip(-1)
                boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        return image, {"boxes": boxes, "labels": labels, "image_id": int(info["id"])}


class DetectionTargets:
    """One target dict per image, indexed like a batch.

    Supports what the methods and the engine do to labels: ``len``, ``t[:n]``, ``t[n:]``,
    ``t[perm]`` (a LongTensor), ``t.to(device)`` and ``shape[0]``.
    """

    def __init__(self, targets: Sequence[Dict[str, torch.Tensor]]):
        self.targets: List[Dict] = list(targets)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def shape(self) -> Tuple[int]:
        return (len(self.targets),)

    def __getitem__(self, index: Union[slice, torch.Tensor, Sequence[int]]) -> "DetectionTargets":
        if isinstance(index, slice):
            return DetectionTargets(self.targets[index])
        if isinstance(index, torch.Tensor):
            index = index.tolist()
        return DetectionTargets([self.targets[int(i)] for i in index])

    def to(self, device, non_blocking: bool = False) -> "DetectionTargets":
        return DetectionTargets([{k: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v)
                                  for k, v in t.items()} for t in self.targets])

    def contiguous(self) -> "DetectionTargets":
        return self

    def clone(self) -> "DetectionTargets":
        return DetectionTargets([{k: (v.clone() if torch.is_tensor(v) else v) for k, v in t.items()}
                                 for t in self.targets])

    def __repr__(self) -> str:
        return f"DetectionTargets({len(self)} images, {sum(len(t['boxes']) for t in self.targets)} boxes)"


def detection_collate(batch: List[Tuple[torch.Tensor, Dict]]):
    """``(uint8 images (B, 3, H_max, W_max) zero-padded at bottom/right, DetectionTargets)``."""
    h = max(img.shape[-2] for img, _ in batch)
    w = max(img.shape[-1] for img, _ in batch)
    images = torch.zeros((len(batch), 3, h, w), dtype=torch.uint8)
    for i, (img, _) in enumerate(batch):
        images[i, :, :img.shape[-2], :img.shape[-1]] = img
    return images, DetectionTargets([t for _, t in batch])


def dataset_for(root: str, split: str, *, flip_prob: float = 0.0, seed: int = 0,
                images_dir: Optional[str] = None) -> CocoDetection:
    """The `CocoDetection` of ``split`` under ``root`` (demo-det layout); ``images_dir`` overrides
    the image folder (a corrupted copy of the split)."""
    default_images, ann = split_paths(root, split)
    return CocoDetection(images_dir or default_images, ann, flip_prob=flip_prob, seed=seed)
