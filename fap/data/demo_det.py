"""The demo *detection* set: the demo's shapes, several per image, with their boxes, in COCO format.

Fast AdvProp carries over to detection (Mei et al., ICLR 2022, Table 7: RetinaNet on
COCO). No CI machine can download COCO, so :func:`make_demo_det` draws a small,
deterministic stand-in offline, in the layout the detection pipeline reads
(`fap.data.coco`) and that ``fap data corrupt`` can corrupt::

    DIR/train/images/000000.jpg ...        DIR/annotations/instances_train.json
    DIR/val/images/000000.jpg ...          DIR/annotations/instances_val.json

Each image has the classification demo's textured background (`fap.data.demo`: value
noise, patterned patches) and clutter of lines and arcs (not the demo's small shapes: an
unannotated shape of an annotated class would be a wrong label), then 2 to ``max_objects`` objects of the demo's shape families at a random
scale, aspect, rotation, position and fill, later ones in front of earlier ones, then
colour jitter, blur and sensor noise. An object's box is the tight box of its drawn mask
(amodal: occlusion by a later object does not shrink it). Categories are the demo's
classes with COCO ids 1..K (``category_id`` = the label the detector predicts; id 0 is
never used, as in torchvision's COCO models).

Determinism: image ``i`` of split ``s`` is drawn from ``SeedSequence([seed, s, i, 7])``,
so the same seed gives byte-identical files (with the same NumPy/Pillow/libjpeg). A marker
file written last, after an atomic rename, tells a complete copy from an interrupted one.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

from fap.data import demo as _demo
from fap.data.base import build_atomically

__all__ = ["MARKER", "make_demo_det", "render_det_image", "SPLITS"]

MARKER = ".fap-demo-det.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
_SPLIT_CODES = {"train": 0, "val": 1}
_STREAM = 7  # keeps these streams apart from the classification demo's
MIN_BOX = 4  # px: smaller objects are redrawn


def make_demo_det(out_dir: str, seed: int = 0, *, image_size: int = 96, train_images: int = 160,
                  val_images: int = 40, num_classes: int = 5, max_objects: int = 4,
                  jpeg_quality: int = 90) -> str:
    """Create the demo detection set at ``out_dir``, or reuse a complete copy made with the same settings.

    Args:
        out_dir: destination (see the module docstring for the layout).
        seed: base seed; the same seed gives byte-identical files.
        image_size: side of the square JPEGs (>= 32, what ``fap data corrupt`` needs).
        train_images: images in ``train``.
        val_images: images in ``val``.
        num_classes: how many of the demo's classes (the first ``num_classes``), 1..10.
        max_objects: at most this many objects per image (at least 2 are drawn).
        jpeg_quality: JPEG quality of the written files.

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        ValueError: a setting out of range (named, with the valid range).
        FileExistsError: ``out_dir`` holds something else.
    """
    settings = {"format": FORMAT_VERSION, "seed": int(seed), "image_size": int(image_size),
                "train_images": int(train_images), "val_images": int(val_images),
                "classes": list(_demo.CLASSES[:num_classes]), "max_objects": int(max_objects),
                "jpeg_quality": int(jpeg_quality)}
    _check(image_size=image_size, train_images=train_images, val_images=val_images, num_classes=num_classes,
           max_objects=max_objects)
    def write(tmp: str) -> None:
        os.makedirs(os.path.join(tmp, "annotations"))
        for split in SPLITS:
            coco = _write_split(tmp, split, settings)
            with open(os.path.join(tmp, "annotations", f"instances_{split}.json"), "w") as f:
                json.dump(coco, f)

    return build_atomically(out_dir, settings, MARKER, write, what="demo-det")


def _check(*, image_size, train_images, val_images, num_classes, max_objects) -> None:
    limits = {"image_size": (image_size, 32, 1024), "train_images": (train_images, 1, 10 ** 6),
              "val_images": (val_images, 1, 10 ** 6), "num_classes": (num_classes, 1, len(_demo.CLASSES)),
              "max_objects": (max_objects, 2, 12)}
    for name, (value, lo, hi) in limits.items():
        if not (isinstance(value, int) and lo <= value <= hi):
            raise ValueError(f"demo-det: {name}={value!r}; expected an int in {lo}..{hi}")


def _write_split(root: str, split: str, settings: Dict) -> Dict:
    """Draw one split's images and return its COCO instances dict."""
    folder = os.path.join(root, split, "images")
    os.makedirs(folder)
    classes = settings["classes"]
    count = settings[f"{split}_images"]
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng(np.random.SeedSequence([settings["seed"], _SPLIT_CODES[split], i, _STREAM]))
        img, objects = render_det_image(rng, len(classes), image_size=settings["image_size"],
                                        max_objects=settings["max_objects"])
        name = f"{i:06d}.jpg"
        img.save(os.path.join(folder, name), format="JPEG", quality=settings["jpeg_quality"])
        images.append({"id": i + 1, "file_name": name, "width": img.width, "height": img.height})
        for label, (x0, y0, x1, y1) in objects:
            w, h = x1 - x0, y1 - y0
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0})
    categories = [{"id": c + 1, "name": name, "supercategory": "shape"} for c, name in enumerate(classes)]
    return {"info": {"description": f"fap demo-det {split}", "settings": settings}, "images": images,
            "annotations": annotations, "categories": categories}


def render_det_image(rng: np.random.Generator, num_classes: int, *, image_size: int = 96,
                     max_objects: int = 4) -> Tuple[Image.Image, List[Tuple[int, Tuple[float, float, float, float]]]]:
    """Draw one image and its objects.

    Args:
        rng: the image's own random stream.
        num_classes: objects are of the first ``num_classes`` demo classes.
        image_size: output side in pixels.
        max_objects: at most this many objects (at least 2).

    Returns:
        ``(image, [(class index, (x0, y0, x1, y1)), ...])`` with boxes in output pixels.
    """
    s = _demo._SUPERSAMPLE
    size = image_size * s
    canvas = _demo._background(rng, size)
    _clutter(rng, canvas, size)
    objects = []
    for _ in range(int(rng.integers(2, max_objects + 1))):
        label = int(rng.integers(num_classes))
        box = _draw_det_object(rng, canvas, _demo.CLASSES[label], size)
        if box is not None:
            objects.append((label, tuple(round(v / s, 2) for v in box)))
    return _demo._finish(rng, canvas, image_size), objects


def _clutter(rng: np.random.Generator, canvas: np.ndarray, size: int) -> None:
    """The demo's clutter without its small shapes: an unannotated shape of an annotated class
    would be a wrong label, not clutter."""
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 6))):
        fill = tuple(int(x) for x in _demo._colour(rng))
        if rng.random() < 0.55:
            draw.line([tuple(p) for p in rng.uniform(0, size, (2, 2))], fill=fill, width=int(rng.integers(1, 5)))
        else:
            draw.arc(_demo._box(rng, size, 0.05, 0.2), start=float(rng.uniform(0, 360)),
                     end=float(rng.uniform(0, 360)), fill=fill, width=int(rng.integers(1, 4)))
    canvas[...] = np.asarray(img, dtype=np.float32)


def _draw_det_object(rng: np.random.Generator, canvas: np.ndarray, name: str, size: int):
    """Draw one object (the demo's `_draw_object` at detection scale); return its mask's box."""
    shape = _demo._unit_shape(rng, name)
    placement = _demo._placement(rng, size, (0.1, 0.24))
    mask = _demo._mask(size, lambda d: _demo._draw_polygon(d, shape, *placement))
    ys, xs = np.nonzero(mask[..., 0] > 0.5)
    if len(xs) == 0 or xs.max() + 1 - xs.min() < MIN_BOX * _demo._SUPERSAMPLE \
            or ys.max() + 1 - ys.min() < MIN_BOX * _demo._SUPERSAMPLE:
        return None
    kind = name if name in ("stripes", "checker") else str(rng.choice(["solid", "gradient", "noise"],
                                                                       p=[0.4, 0.3, 0.3]))
    behind = (canvas * mask).sum(axis=(0, 1)) / max(float(mask.sum()), 1.0)
    for _ in range(4):  # colours that stand out from what is behind
        fill = _demo._texture(rng, kind, size)
        if np.linalg.norm((fill * mask).sum(axis=(0, 1)) / max(float(mask.sum()), 1.0) - behind) > 60:
            break
    canvas[...] = _demo._composite(canvas, fill, mask)  # no outline: it would reach past the box
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
