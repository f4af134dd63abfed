"""``fap data corrupt SRC OUT``: an ImageNet-C-style corrupted copy of an ImageNet-layout set.

ImageNet-C (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019) is the ImageNet validation set after
``Resize(256)`` / ``CenterCrop(224)``, corrupted by 15 corruptions (noise, blur, weather,
digital) at 5 severities, plus 4 held-out ones (speckle noise, Gaussian blur, spatter,
saturate), each image saved as a JPEG of quality 85 in the layout
``<corruption>/<severity>/<class>/<image>``. :func:`make_corrupted` writes the same layout
for any ImageNet-layout split folder (``<class>/<image>``), e.g. the demo's ``val/``, so
that ``fap eval --suite imagenet_c=OUT`` scores it like ImageNet-C.

The corruptions are those of the ``imagecorruptions`` package (Michaelis et al.,
"Benchmarking Robustness in Object Detection", 2019), whose ``imagecorruptions-imaug``
release runs on current NumPy / SciPy / scikit-image. They follow the ImageNet-C code
closely but are not bit-identical to it (motion blur and snow do not use ImageMagick;
the frost and glass-blur randomness differs), so errors on a copy made here are for
comparing models with each other, not with published ImageNet-C tables: for those,
evaluate on the released ImageNet-C.

Determinism: image ``i`` under corruption ``c`` at severity ``s`` draws its randomness from
``numpy.random.SeedSequence([seed, index of c, s, i])``. ``imagecorruptions`` draws from
NumPy's legacy global generator, so each call seeds it and the caller's generator state
is restored afterwards. The same seed gives the same images whatever the number of
worker processes. A marker file (:data:`MARKER`), written last before an atomic rename,
tells a complete copy from an interrupted one; a complete copy made with the same
settings is reused.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from fap.data.base import build_atomically

__all__ = [
    "ALL_CORRUPTIONS",
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "MARKER",
    "SEVERITIES",
    "add_arguments",
    "corrupt_image",
    "list_images",
    "make_corrupted",
    "run",
]

# The 15 ImageNet-C corruptions, in the paper's order (noise, blur, weather, digital).
CORRUPTIONS: Tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
# The 4 held-out ("extra") corruptions released with ImageNet-C.
EXTRA_CORRUPTIONS: Tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS: Tuple[str, ...] = CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES: Tuple[int, ...] = (1, 2, 3, 4, 5)
MARKER = ".fap-corrupt.json"
FORMAT_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MIN_SIDE = 32  # imagecorruptions refuses smaller images
# imagecorruptions functions that take their own seed instead of the global generator
_SEEDED = ("glass_blur", "impulse_noise")


# --------------------------------------------------------------------------------------
# Listing the source
# --------------------------------------------------------------------------------------

def list_images(src: str) -> List[Tuple[str, str]]:
    """``(class name, image path)`` pairs of an ImageNet-layout split folder, in sorted order.

    Args:
        src: a folder of class folders, each holding images (e.g. ``imagenet/val``).

    Raises:
        FileNotFoundError: ``src`` is not a directory.
        ValueError: ``src`` holds no class folders, a class folder holds no images, a
            file that is not an image, or sub-folders (``src`` is then a dataset root
            with splits, such as the demo's ``train/`` and ``val/``; pass one split).
    """
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such directory; pass an ImageNet-layout split folder (<class>/<image>)")
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{src}: no class folders; expected {src}/<class>/<image>")
    pairs: List[Tuple[str, str]] = []
    for cls in classes:
        folder = os.path.join(src, cls)
        entries = sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)
        subdirs = [e.name for e in entries if e.is_dir()]
        if subdirs:
            raise ValueError(
                f"{folder} holds folders ({', '.join(subdirs[:3])}), not images: {src} looks like a dataset root "
                f"with splits; pass one split folder, e.g. {os.path.join(src, cls)}")
        images = []
        for e in entries:
            if not e.name.lower().endswith(IMAGE_EXTENSIONS):
                raise ValueError(f"{e.path}: not an image file (extensions read: {' '.join(IMAGE_EXTENSIONS)}); "
                                 f"move it out of {src}")
            images.append(e.path)
        if not images:
            raise ValueError(f"{folder}: empty class folder; add images or remove it")
        pairs.extend((cls, path) for path in images)
    return pairs


def _output_names(pairs: Sequence[Tuple[str, str]]) -> List[str]:
    """``<class>/<file>.jpg`` for each image; JPEG names are kept, others get ``.jpg``."""
    names, seen = [], {}
    for cls, path in pairs:
        base = os.path.basename(path)
        stem, ext = os.path.splitext(base)
        name = os.path.join(cls, base if ext.lower() in (".jpg", ".jpeg") else stem + ".jpg")
        if name in seen:
            raise ValueError(f"{path} and {seen[name]} would both be written as {name}; rename one of them")
        seen[name] = path
        names.append(name)
    return names


# --------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _legacy_numpy_seed(seed: int) -> Iterator[None]:
    """Seed NumPy's global legacy generator (what imagecorruptions draws from), then restore it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _image_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    sequence = np.random.SeedSequence([seed, ALL_CORRUPTIONS.index(corruption), severity, index])
    return int(sequence.generate_state(1)[0])


def corrupt_image(image: Image.Image, corruption: str, severity: int, *, seed: int) -> Image.Image:
    """Corrupt one RGB image with ``imagecorruptions``, reproducibly.

    Args:
        image: an RGB image at least 32 pixels on each side.
        corruption: one of :data:`ALL_CORRUPTIONS`.
        severity: 1 (mildest) to 5.
        seed: a 32-bit seed for the corruption's randomness.

    Returns:
        The corrupted RGB image, same size.
    """
    from imagecorruptions import corrupt

    if corruption not in ALL_CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; expected one of {', '.join(ALL_CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity={severity!r}: expected an int in 1..5")
    if min(image.size) < MIN_SIDE:
        raise ValueError(f"image of {image.size[0]}x{image.size[1]} px: imagecorruptions needs at least "
                         f"{MIN_SIDE} px per side; pass image_size (--image-size) >= {MIN_SIDE}")
    kwargs = {"seed": seed} if corruption in _SEEDED else {}
    with _legacy_numpy_seed(seed):
        out = corrupt(np.asarray(image.convert("RGB"), dtype=np.uint8), corruption_name=corruption,
                      severity=severity, **kwargs)
    return Image.fromarray(np.asarray(out, dtype=np.uint8))


def _preprocess(image_size: Optional[int], crop_pct: float):
    """ImageNet-C's ``Resize(floor(size / crop_pct))`` + ``CenterCrop(size)``, or nothing."""
    if image_size is None:
        return None
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(math.floor(image_size / crop_pct)), transforms.CenterCrop(image_size)])


# --------------------------------------------------------------------------------------
# The whole set
# --------------------------------------------------------------------------------------

def make_corrupted(
        src: str,
        out: str,
        *,
        corruptions: Optional[Sequence[str]] = None,
        severities: Sequence[int] = SEVERITIES,
        seed: int = 0,
        image_size: Optional[int] = None,
        crop_pct: float = 0.875,
        jpeg_quality: int = 85,
        per_class: Optional[int] = None,
        num_workers: Optional[int] = None,
        progress: bool = True,
) -> str:
    """Write ``out/<corruption>/<severity>/<class>/<image>.jpg`` for every image of ``src``.

    Args:
        src: an ImageNet-layout split folder (``<class>/<image>``), e.g. ``demo/val``.
        out: destination; created atomically. A complete copy with the same settings is
            reused; anything else there is an error.
        corruptions: names from :data:`ALL_CORRUPTIONS`; default the 15 of :data:`CORRUPTIONS`.
        severities: subset of 1..5; default all five.
        seed: randomness of the corruptions (same seed, same images).
        image_size: if set, ``Resize(floor(image_size / crop_pct))`` + ``CenterCrop(image_size)``
            first, as ImageNet-C did (224 and 0.875 reproduce its 256/224); if None, the
            images are corrupted at their own size (at least 32 px).
        crop_pct: see ``image_size``.
        jpeg_quality: quality of the written JPEGs (ImageNet-C: 85).
        per_class: corrupt only the first N images of each class (in file-name order), for
            a small copy; None = every image.
        num_workers: processes (0 = this process; None = one per CPU, at most 8).
        progress: show a progress bar.

    Returns:
        ``out`` as an absolute path.

    Raises:
        FileExistsError: ``out`` holds something else.
        ValueError: bad settings, or a source image that cannot be used (named).
    """
    corruptions, severities = _check_settings(corruptions, severities, image_size=image_size, crop_pct=crop_pct,
                                              jpeg_quality=jpeg_quality, per_class=per_class)
    src = os.path.abspath(os.path.expanduser(src))
    out = os.path.abspath(os.path.expanduser(out))
    pairs = _first_per_class(list_images(src), per_class)
    names = _output_names(pairs)
    settings = {
        "format": FORMAT_VERSION, "src": src, "images": len(pairs), "corruptions": list(corruptions),
        "severities": list(severities), "seed": int(seed), "image_size": image_size,
        "crop_pct": float(crop_pct), "jpeg_quality": int(jpeg_quality), "package": _package_version(),
    }
    if per_class is not None:  # only when set: copies made before the option still match
        settings["per_class"] = int(per_class)
    if os.path.commonpath([src, out]) == src:
        raise ValueError(f"out={out} is inside src={src}; write the corrupted copy elsewhere")

    def write(tmp: str) -> None:
        _run_jobs([(c, s, tmp, pairs, names, settings) for c in settings["corruptions"] for s in settings["severities"]],
                  num_workers=num_workers, progress=progress)

    return build_atomically(out, settings, MARKER, write, what="copy")


def _check_settings(corruptions, severities, *, image_size, crop_pct, jpeg_quality, per_class):
    """`make_corrupted`'s settings, checked: ``(corruptions, sorted severities)`` as tuples."""
    corruptions = tuple(CORRUPTIONS if corruptions is None else corruptions)
    unknown = [c for c in corruptions if c not in ALL_CORRUPTIONS]
    if unknown or not corruptions:
        raise ValueError(f"corruptions={list(corruptions)!r}: unknown {unknown or 'empty list'}; "
                         f"expected names from {', '.join(ALL_CORRUPTIONS)}")
    severities = tuple(sorted(set(int(s) for s in severities)))
    if not severities or any(s not in SEVERITIES for s in severities):
        raise ValueError(f"severities={list(severities)!r}: expected a non-empty subset of 1..5")
    if image_size is not None and image_size < MIN_SIDE:
        raise ValueError(f"image_size={image_size}: imagecorruptions needs at least {MIN_SIDE} px")
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct={crop_pct}: expected a float in (0, 1]")
    if not 1 <= jpeg_quality <= 95:
        raise ValueError(f"jpeg_quality={jpeg_quality}: expected an int in 1..95")
    if per_class is not None and not (isinstance(per_class, int) and per_class >= 1):
        raise ValueError(f"per_class={per_class!r}: expected None (every image) or an int >= 1")
    return corruptions, severities


def _first_per_class(pairs: List[Tuple[str, str]], per_class: Optional[int]) -> List[Tuple[str, str]]:
    """The first ``per_class`` of each class's ``(class, path)`` pairs (all when None), in order."""
    if per_class is None:
        return pairs
    taken: Dict[str, int] = {}
    kept = []
    for cls, path in pairs:
        if taken.get(cls, 0) < per_class:
            taken[cls] = taken.get(cls, 0) + 1
            kept.append((cls, path))
    return kept


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("imagecorruptions-imaug", "imagecorruptions"):
        try:
            return f"{dist}=={version(dist)}"
        except PackageNotFoundError:
            continue
    raise ModuleNotFoundError(
        "fap data corrupt needs the imagecorruptions package: pip install 'imagecorruptions-imaug>=1.1.5' "
        "(the original imagecorruptions 1.1.2 does not run on NumPy 2 / SciPy >= 1.14)")


def _run_jobs(jobs: List[Tuple], *, num_workers: Optional[int], progress: bool) -> None:
    from tqdm.auto import tqdm

    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc="corrupting", unit="set", disable=not progress)
    try:
        if num_workers > 1 and len(jobs) > 1:
            _compile_once({job[0] for job in jobs})
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ProcessPoolExecutor(max_workers=num_workers, mp_context=context) as pool:
                for future in as_completed([pool.submit(_write_set, job) for job in jobs]):
                    future.result()
                    bar.update(1)
        else:
            for job in jobs:
                _write_set(job)
                bar.update(1)
    finally:
        bar.close()


def _compile_once(corruptions) -> None:
    """Compile glass blur's numba kernel here, so that forked workers inherit it instead of
    each spending seconds compiling it (severity 3's all-int parameters are a second signature)."""
    if "glass_blur" in corruptions:
        for severity in (1, 3):
            corrupt_image(Image.new("RGB", (MIN_SIDE, MIN_SIDE)), "glass_blur", severity, seed=0)


def _write_set(job: Tuple) -> None:
    """Write one (corruption, severity) copy of every image."""
    corruption, severity, root, pairs, names, settings = job
    preprocess = _preprocess(settings["image_size"], settings["crop_pct"])
    made_dirs = set()
    for index, ((_, path), name) in enumerate(zip(pairs, names)):
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except OSError as e:
            raise ValueError(f"{path}: not a readable image ({e}); remove it from {settings['src']}") from e
        if preprocess is not None:
            image = preprocess(image)
        try:
            result = corrupt_image(image, corruption, severity, seed=_image_seed(settings["seed"], corruption,
                                                                                 severity, index))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        target = os.path.join(root, corruption, str(severity), name)
        folder = os.path.dirname(target)
        if folder not in made_dirs:
            os.makedirs(folder, exist_ok=True)
            made_dirs.add(folder)
        result.save(target, format="JPEG", quality=settings["jpeg_quality"], optimize=True)


# --------------------------------------------------------------------------------------
# `fap data corrupt`
# --------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fap data corrupt SRC OUT``."""
    parser.add_argument("src", help="an ImageNet-layout split folder (<class>/<image>), e.g. demo/val")
    parser.add_argument("out", help="destination: OUT/<corruption>/<severity>/<class>/<image>.jpg")
    parser.add_argument("--corruptions", default="common",
                        help="'common' (the 15 of ImageNet-C, default), 'all' (+ the 4 held-out: "
                             f"{', '.join(EXTRA_CORRUPTIONS)}) or a comma-separated list")
    parser.add_argument("--severities", default="1,2,3,4,5", help="comma-separated subset of 1..5 (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same images (default: 0)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize to IMAGE_SIZE/CROP_PCT and centre-crop IMAGE_SIZE first, as ImageNet-C did "
                             "(224 with the default crop 0.875 gives its 256/224); default: keep each image's size")
    parser.add_argument("--crop-pct", type=float, default=0.875, help="see --image-size (default: 0.875)")
    parser.add_argument("--jpeg-quality", type=int, default=85, help="JPEG quality (ImageNet-C: 85, the default)")
    parser.add_argument("--per-class", type=int, default=None,
                        help="corrupt only the first N images of each class, for a small copy (default: all)")
    parser.add_argument("--num-workers", type=int, default=None, help="processes (default: one per CPU, at most 8)")


def _parse_corruptions(value: str) -> Tuple[str, ...]:
    if value == "common":
        return CORRUPTIONS
    if value == "all":
        return ALL_CORRUPTIONS
    return tuple(v.strip() for v in value.split(",") if v.strip())


def run(args: argparse.Namespace) -> int:
    """Run ``fap data corrupt``; returns the exit code."""
    try:
        severities = [int(s) for s in str(args.severities).split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--severities={args.severities!r}: expected comma-separated ints in 1..5")
    out = make_corrupted(args.src, args.out, corruptions=_parse_corruptions(args.corruptions),
                         severities=severities, seed=args.seed, image_size=args.image_size,
                         crop_pct=args.crop_pct, jpeg_quality=args.jpeg_quality, per_class=args.per_class,
                         num_workers=args.num_workers)
    print(f"corrupted copy ready in {out} (<corruption>/<severity>/<class>/<image>.jpg); evaluate on it with "
          f"fap eval MODEL --suite imagenet_c={out}")
    return 0
