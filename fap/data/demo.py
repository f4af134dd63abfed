"""The embedded demo dataset: procedurally drawn objects in clutter, written as ImageNet-layout JPEGs.

No machine fap runs on in CI can download a dataset, yet a new user must see every
pipeline (folder, HF ``datasets``, FFCV) work. :func:`make_demo` draws a deterministic
RGB classification set with some of the character of natural images and writes it as
``train/<class>/*.jpg`` and ``val/<class>/*.jpg``, exactly the ImageNet folder layout.

Each class is a shape or texture family (disc, ring, triangle, square, star, cross,
crescent, arrow; and irregular blobs filled with stripes or a checkerboard). Every
image draws, independently of its class, a textured background (multi-octave value
noise, sometimes with striped or chequered patches), clutter (lines, arcs and small
shapes of any class), the object at a random scale, aspect, rotation and position with
a random fill (solid, gradient or noise; texture classes use their texture) and colours,
up to two occluders, then colour jitter, blur, sensor noise and JPEG compression. So
colour says nothing about the class, and occlusion, low contrast and small objects make
some images genuinely ambiguous: a small CNN trained for minutes on two CPU cores learns
a lot but stays well below 100% validation accuracy.

Determinism: image ``i`` of class ``c`` in split ``s`` is drawn from its own
``numpy.random.SeedSequence([seed, s, c, i])`` stream, so the same seed gives
byte-identical files (with the same NumPy/Pillow/libjpeg) regardless of order or workers.
A marker file (:data:`MARKER`) written last, after an atomic rename into place, tells a
complete copy from an interrupted one; :func:`make_demo` reuses a complete copy.
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fap.data.base import build_atomically

__all__ = ["CLASSES", "MARKER", "is_demo", "make_demo", "render_image"]

_logger = logging.getLogger(__name__)

# Class folders; their sorted order is the label order (as for any ImageNet-layout folder).
CLASSES: Tuple[str, ...] = (
    "arrow", "checker", "crescent", "cross", "disc", "ring", "square", "star", "stripes", "triangle",
)
MARKER = ".fap-demo.json"
FORMAT_VERSION = 1
_SPLIT_CODES = {"train": 0, "val": 1}
_SUPERSAMPLE = 2  # draw at 2x, then box-downsample: anti-aliased edges


def make_demo(
        out_dir: str,
        seed: int = 0,
        *,
        image_size: int = 48,
        train_per_class: int = 500,
        val_per_class: int = 100,
        num_classes: int = len(CLASSES),
        jpeg_quality: int = 90,
        num_workers: Optional[int] = None,
) -> str:
    """Create the demo dataset at ``out_dir``, or reuse a complete copy made with the same settings.

    Args:
        out_dir: destination; gets ``train/<class>/*.jpg``, ``val/<class>/*.jpg`` and :data:`MARKER`.
        seed: base seed; the same seed gives byte-identical files.
        image_size: side of the square JPEGs, in pixels.
        train_per_class: training images per class.
        val_per_class: validation images per class.
        num_classes: how many of :data:`CLASSES` to use (the first ``num_classes``), 2..10.
        jpeg_quality: JPEG quality of the written files.
        num_workers: processes drawing images (0 = in this process; None = up to 4, one per CPU).

    Returns:
        ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` holds something else (other files, or a demo made
            with different settings).
    """
    settings = {
        "format": FORMAT_VERSION, "seed": int(seed), "image_size": int(image_size),
        "train_per_class": int(train_per_class), "val_per_class": int(val_per_class),
        "classes": list(CLASSES[:num_classes]), "jpeg_quality": int(jpeg_quality),
    }
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes={num_classes}: the demo has 2..{len(CLASSES)} classes")
    if image_size < 16:
        raise ValueError(f"image_size={image_size}: use at least 16 px")
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(f"train_per_class={train_per_class}, val_per_class={val_per_class}: need at least 1 each")
    return build_atomically(out_dir, settings, MARKER, lambda tmp: _write_all(tmp, settings, num_workers=num_workers),
                            what="fap demo")


def is_demo(path: str) -> bool:
    """Whether ``path`` holds a complete demo (made with any settings)."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f).get("format") == FORMAT_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def _write_all(root: str, settings: Dict, *, num_workers: int) -> None:
    jobs = []
    for split, per_class in (("train", settings["train_per_class"]), ("val", settings["val_per_class"])):
        for c, name in enumerate(settings["classes"]):
            os.makedirs(os.path.join(root, split, name))
            jobs.append((root, split, c, name, per_class, settings))
    total = sum(j[4] for j in jobs)
    _logger.info("drawing %d demo images into %s", total, root)
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    if num_workers > 1:
        # fork where available: workers need only numpy and PIL, not a fresh interpreter
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=context) as pool:
            list(pool.map(_write_class, jobs))
    else:
        for job in jobs:
            _write_class(job)


def _write_class(job: Tuple) -> None:
    root, split, c, name, count, settings = job
    for i in range(count):
        rng = np.random.default_rng(np.random.SeedSequence([settings["seed"], _SPLIT_CODES[split], c, i]))
        img = render_image(rng, CLASSES.index(name), image_size=settings["image_size"])
        img.save(os.path.join(root, split, name, f"{name}_{i:05d}.jpg"), format="JPEG",
                 quality=settings["jpeg_quality"])


# --------------------------------------------------------------------------------------
# Drawing. Everything happens on a canvas _SUPERSAMPLE times larger than the output.
# --------------------------------------------------------------------------------------

def render_image(rng: np.random.Generator, class_id: int, *, image_size: int = 48) -> Image.Image:
    """Draw one RGB image of class ``CLASSES[class_id]``.

    Args:
        rng: the image's own random stream.
        class_id: index into :data:`CLASSES`.
        image_size: output side in pixels.
    """
    size = image_size * _SUPERSAMPLE
    canvas = _background(rng, size)
    _clutter(rng, canvas, size)
    _draw_object(rng, canvas, CLASSES[class_id], size)
    for _ in range(rng.choice(3, p=[0.6, 0.35, 0.05])):
        _occluder(rng, canvas, size)
    return _finish(rng, canvas, image_size)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random ``cells x cells`` grid, bicubically upsampled."""
    grid = Image.fromarray(rng.random((cells, cells), dtype=np.float32), mode="F")
    return np.clip(np.asarray(grid.resize((size, size), Image.BICUBIC)), 0.0, 1.0)


def _fractal_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    octaves = [_value_noise(rng, size, cells) * w for cells, w in ((3, 0.5), (6, 0.3), (12, 0.2))]
    return sum(octaves)


def _texture(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A ``(size, size, 3)`` float texture of the given kind, in random colours."""
    a, b = _colour(rng), _colour(rng)
    if kind == "solid":
        return np.broadcast_to(a, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = rng.uniform(0, math.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    if kind == "gradient":
        t = (u - u.min()) / max(float(np.ptp(u)), 1e-6)
    elif kind == "noise":
        t = _value_noise(rng, size, int(rng.integers(3, 9)))
    elif kind == "stripes":
        period = rng.uniform(0.07, 0.16)
        t = (np.sin(2 * math.pi * u / period) > rng.uniform(-0.3, 0.3)).astype(np.float32)
    elif kind == "checker":
        period = rng.uniform(0.07, 0.14)
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return a + (b - a) * t[..., None]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    colours = [_colour(rng) for _ in range(3)]
    t1, t2 = _fractal_noise(rng, size), _fractal_noise(rng, size)
    canvas = (colours[0] * (1 - t1[..., None]) + colours[1] * t1[..., None])
    canvas = canvas * (1 - 0.5 * t2[..., None]) + colours[2] * 0.5 * t2[..., None]
    if rng.random() < 0.2:  # a patterned patch: texture alone must not give the class
        patch = _texture(rng, str(rng.choice(["stripes", "checker"])), size)
        mask = _mask(size, lambda d: _draw_polygon(d, _blob(rng), *_placement(rng, size, (0.15, 0.3))))
        canvas = _composite(canvas, patch, mask)
    return canvas.astype(np.float32)


def _clutter(rng: np.random.Generator, canvas: np.ndarray, size: int) -> None:
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 6))):
        fill = tuple(int(x) for x in _colour(rng))
        kind = rng.random()
        if kind < 0.45:
            pts = [tuple(p) for p in rng.uniform(0, size, (2, 2))]
            draw.line(pts, fill=fill, width=int(rng.integers(1, 5)))
        elif kind < 0.75:
            box = _box(rng, size, 0.05, 0.2)
            draw.arc(box, start=float(rng.uniform(0, 360)), end=float(rng.uniform(0, 360)), fill=fill,
                     width=int(rng.integers(1, 4)))
        else:  # a small shape of any class: the object is the large one
            shape = _unit_shape(rng, CLASSES[int(rng.integers(len(CLASSES)))])
            _draw_polygon(draw, shape, *_placement(rng, size, (0.05, 0.11)), fill=fill)
    canvas[...] = np.asarray(img, dtype=np.float32)


def _draw_object(rng: np.random.Generator, canvas: np.ndarray, name: str, size: int) -> None:
    shape = _unit_shape(rng, name)
    placement = _placement(rng, size, (0.26, 0.44))
    mask = _mask(size, lambda d: _draw_polygon(d, shape, *placement))
    kind = name if name in ("stripes", "checker") else str(rng.choice(["solid", "gradient", "noise"], p=[0.4, 0.3, 0.3]))
    # redraw colours (a few times) until the object stands out from what is behind it
    behind = (canvas * mask).sum(axis=(0, 1)) / max(float(mask.sum()), 1.0)
    for _ in range(4):
        fill = _texture(rng, kind, size)
        if np.linalg.norm((fill * mask).sum(axis=(0, 1)) / max(float(mask.sum()), 1.0) - behind) > 60:
            break
    result = _composite(canvas, fill, mask)
    if rng.random() < 0.4:  # an outline in another colour
        img = Image.fromarray(np.clip(result, 0, 255).astype(np.uint8))
        _draw_polygon(ImageDraw.Draw(img), shape, *placement, outline=tuple(int(x) for x in _colour(rng)),
                      width=int(rng.integers(1, 4)))
        result = np.asarray(img, dtype=np.float32)
    canvas[...] = result


def _occluder(rng: np.random.Generator, canvas: np.ndarray, size: int) -> None:
    """A bar or an ellipse in front of (part of) the object."""
    fill = _texture(rng, str(rng.choice(["solid", "noise", "gradient"])), size)
    unit = _circle(24) if rng.random() < 0.5 else np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    half_width, aspect = rng.uniform(0.06, 0.16) * size, rng.uniform(0.25, 1.0)
    placement = (cx, cy, half_width, rng.uniform(0, 2 * math.pi), aspect)
    mask = _mask(size, lambda d: _draw_polygon(d, [unit], *placement))
    canvas[...] = _composite(canvas, fill, mask)


def _finish(rng: np.random.Generator, canvas: np.ndarray, image_size: int) -> Image.Image:
    """Colour jitter, blur, downsample, sensor noise."""
    mean = canvas.mean(axis=(0, 1), keepdims=True)
    contrast = rng.uniform(0.65, 1.25)
    gain = rng.uniform(0.8, 1.2, size=3)
    x = (canvas - mean) * contrast + mean * gain + rng.uniform(-25, 25)
    if rng.random() < 0.1:
        x = np.repeat(x.mean(axis=2, keepdims=True), 3, axis=2)
    img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.3))))
    img = img.reduce(_SUPERSAMPLE)
    sigma = rng.uniform(0, 8)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, sigma, (image_size, image_size, 3))
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------
# Geometry: shapes are polygons (a list of rings, the first filled, the others holes) on
# the unit disc, placed by (centre, radius, rotation, aspect).
# --------------------------------------------------------------------------------------

def _circle(n: int = 40, r: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _blob(rng: np.random.Generator) -> List[np.ndarray]:
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 5):
        r += rng.uniform(0.03, 0.12) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
    r /= r.max()
    return [np.stack([r * np.cos(t), r * np.sin(t)], axis=1)]


def _unit_shape(rng: np.random.Generator, name: str) -> List[np.ndarray]:
    if name == "disc":
        return [_circle()]
    if name == "ring":
        return [_circle(), _circle(r=rng.uniform(0.45, 0.7))]
    if name == "triangle":
        t = np.deg2rad(90 + 120 * np.arange(3) + rng.uniform(-10, 10, 3))
        return [np.stack([np.cos(t), np.sin(t)], axis=1)]
    if name == "square":
        t = np.deg2rad(45 + 90 * np.arange(4))
        return [np.stack([np.cos(t), np.sin(t)], axis=1) * 0.9]
    if name == "star":
        t = np.linspace(0, 2 * math.pi, 10, endpoint=False) + math.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.35, 0.5))
        return [np.stack([r * np.cos(t), r * np.sin(t)], axis=1)]
    if name == "cross":
        w = rng.uniform(0.25, 0.38)
        pts = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w),
               (-w, w), (-w, 1)]
        return [np.array(pts, dtype=np.float64)]
    if name == "crescent":
        return [_circle(), _circle(r=rng.uniform(0.75, 0.9), cx=rng.uniform(0.35, 0.55))]
    if name == "arrow":
        w, head = rng.uniform(0.18, 0.3), rng.uniform(0.55, 0.75)
        pts = [(-1, -w), (0.1, -w), (0.1, -head), (1, 0), (0.1, head), (0.1, w), (-1, w)]
        return [np.array(pts, dtype=np.float64)]
    if name in ("stripes", "checker"):
        return _blob(rng)
    raise ValueError(f"unknown demo class {name!r}; classes: {CLASSES}")


def _placement(rng: np.random.Generator, size: int, radius_range: Tuple[float, float]) -> Tuple:
    radius = rng.uniform(*radius_range) * size
    margin = 0.6 * radius
    cx, cy = rng.uniform(margin, size - margin, 2)
    return cx, cy, radius, rng.uniform(0, 2 * math.pi), rng.uniform(0.7, 1.0)


def _draw_polygon(draw: ImageDraw.ImageDraw, rings: Sequence[np.ndarray], cx: float, cy: float, radius: float,
                  angle: float, aspect: float, fill=None, outline=None, width: int = 1) -> None:
    """Draw ``rings`` (first = shape, rest = holes) scaled, squashed, rotated and moved."""
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    for k, ring in enumerate(rings):
        pts = (ring * (radius, radius * aspect)) @ rot.T + (cx, cy)
        pts = [tuple(p) for p in pts]
        if outline is not None:
            draw.polygon(pts, outline=outline, width=width)
        elif fill is not None:
            draw.polygon(pts, fill=fill if k == 0 else None)
        else:
            draw.polygon(pts, fill=255 if k == 0 else 0)


def _mask(size: int, paint) -> np.ndarray:
    m = Image.new("L", (size, size), 0)
    paint(ImageDraw.Draw(m))
    return np.asarray(m, dtype=np.float32)[..., None] / 255.0


def _composite(canvas: np.ndarray, fill: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return canvas * (1 - mask) + fill * mask


def _box(rng: np.random.Generator, size: int, lo: float, hi: float) -> List[float]:
    cx, cy = rng.uniform(0, size, 2)
    r = rng.uniform(lo, hi) * size
    return [cx - r, cy - r, cx + r, cy + r]
