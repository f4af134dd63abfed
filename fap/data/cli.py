"""``fap data ...``: make, convert and inspect datasets.

Subcommands::

    fap data demo --out DIR                      # draw the demo set (ImageNet layout, JPEG)
    fap data demo-det --out DIR                  # draw the demo detection set (COCO format)
    fap data fashion-mnist --out DIR [--src DIR] [--max-train N] [--max-val N]
    fap data to-beton SRC OUT [--splits train val] [--write-mode proportion] [--max-resolution 500]
                              [--jpeg-quality 90] [--compress-probability 0.5]
    fap data inspect PATH [--max-images N | --all] [--json]
    fap data corrupt SRC OUT [--corruptions ...] [--severities 1 2 3 4 5]   # ImageNet-C-style copy

``fap.cli`` dispatches ``fap data`` here through :func:`add_arguments` and :func:`run`.
Each subcommand is a pair ``_add_<name>(parser)`` / ``_run_<name>(args) -> int`` listed
in :data:`SUBCOMMANDS` (``corrupt`` keeps its pair in `fap.data.corrupt`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable, Dict, Tuple

__all__ = ["SUBCOMMANDS", "add_arguments", "run"]


# -- demo ---------------------------------------------------------------------------------------

def _add_demo(parser: argparse.ArgumentParser) -> None:
    from fap.data.demo import CLASSES

    parser.add_argument("--out", required=True, help="destination directory (reused if already complete)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default: 0)")
    parser.add_argument("--image-size", type=int, default=48, help="side of the JPEGs in pixels (default: 48)")
    parser.add_argument("--train-per-class", type=int, default=500, help="default: 500")
    parser.add_argument("--val-per-class", type=int, default=100, help="default: 100")
    parser.add_argument("--num-classes", type=int, default=len(CLASSES),
                        help=f"use the first N of: {', '.join(CLASSES)} (default: {len(CLASSES)})")
    parser.add_argument("--num-workers", type=int, default=None, help="drawing processes (default: up to 4)")


def _run_demo(args: argparse.Namespace) -> int:
    from fap.data.demo import make_demo

    out = make_demo(args.out, seed=args.seed, image_size=args.image_size, train_per_class=args.train_per_class,
                    val_per_class=args.val_per_class, num_classes=args.num_classes, num_workers=args.num_workers)
    print(f"demo dataset ready in {out} (train/ and val/, ImageNet layout); train on it with "
          f"data.source=folder (or demo) data.path={out}")
    return 0


# -- demo-det -----------------------------------------------------------------------------------

def _add_demo_det(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="destination directory (reused if already complete)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default: 0)")
    parser.add_argument("--image-size", type=int, default=96, help="side of the JPEGs in pixels (default: 96)")
    parser.add_argument("--train-images", type=int, default=160, help="default: 160")
    parser.add_argument("--val-images", type=int, default=40, help="default: 40")
    parser.add_argument("--num-classes", type=int, default=5, help="use the first N demo shapes (default: 5)")
    parser.add_argument("--max-objects", type=int, default=4, help="objects per image, 2..N (default: 4)")


def _run_demo_det(args: argparse.Namespace) -> int:
    from fap.data.demo_det import make_demo_det

    out = make_demo_det(args.out, seed=args.seed, image_size=args.image_size, train_images=args.train_images,
                        val_images=args.val_images, num_classes=args.num_classes, max_objects=args.max_objects)
    print(f"demo detection set ready in {out} (train/images, val/images, annotations/instances_*.json, COCO "
          f"format); corrupt its val split with: fap data corrupt {out}/val OUT")
    return 0


# -- fashion-mnist ------------------------------------------------------------------------------

def _add_fashion_mnist(parser: argparse.ArgumentParser) -> None:
    from fap.data.fashion_mnist import DEFAULT_SRC

    parser.add_argument("--out", required=True, help="destination directory")
    parser.add_argument("--src", default=DEFAULT_SRC,
                        help=f"directory with the four idx .gz files (default: {DEFAULT_SRC}, from the Debian "
                             f"package dataset-fashion-mnist)")
    parser.add_argument("--max-train", type=int, default=None, help="keep at most N training images (balanced)")
    parser.add_argument("--max-val", type=int, default=None, help="keep at most N validation images (balanced)")
    parser.add_argument("--holdout", type=int, default=0,
                        help="also write holdout/: N more training images (balanced, disjoint from train/; needs "
                             "--max-train), to choose schedules on without touching the test images in val/")


def _run_fashion_mnist(args: argparse.Namespace) -> int:
    from fap.data.fashion_mnist import convert_fashion_mnist

    counts = convert_fashion_mnist(args.out, src=args.src, max_train=args.max_train, max_val=args.max_val,
                                   holdout=args.holdout)
    held = f", {counts['holdout']} held-out training" if "holdout" in counts else ""
    print(f"Fashion-MNIST ready in {os.path.abspath(args.out)}: {counts['train']} train, {counts['val']} val{held} "
          f"images (32x32 RGB PNG, ImageNet layout)")
    return 0


# -- to-beton -----------------------------------------------------------------------------------

def _add_to_beton(parser: argparse.ArgumentParser) -> None:
    from fap.data.ffcv import WRITE_MODES

    parser.add_argument("src", help="ImageNet-layout folder root, or an HF dataset directory")
    parser.add_argument("out", help="directory for <split>.beton and classes.json")
    parser.add_argument("--splits", nargs="+", default=["train", "val"],
                        help="splits to write; the first defines the classes (default: train val)")
    parser.add_argument("--source", choices=("auto", "folder", "hf"), default="auto",
                        help="how to read SRC (default: auto)")
    parser.add_argument("--write-mode", choices=WRITE_MODES, default="proportion",
                        help="FFCV RGBImageField write mode (default: proportion, as ffcv-imagenet)")
    parser.add_argument("--max-resolution", type=int, default=500,
                        help="longest image side kept; 0 keeps the original (default: 500)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="default: 90")
    parser.add_argument("--compress-probability", type=float, default=0.5,
                        help="fraction JPEG-compressed in proportion mode (default: 0.5)")
    parser.add_argument("--num-workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="writer processes (default: one per CPU, at most 16)")
    parser.add_argument("--chunk-size", type=int, default=100, help="samples per work item (default: 100)")
    parser.add_argument("--skip-corrupt", action="store_true", help="leave unreadable images out, counted")


def _run_to_beton(args: argparse.Namespace) -> int:
    from fap.data.ffcv import convert_to_betons

    summary = convert_to_betons(
        args.src, args.out, splits=args.splits, source=args.source, skip_corrupt=args.skip_corrupt,
        write_mode=args.write_mode, max_resolution=args.max_resolution or None, jpeg_quality=args.jpeg_quality,
        compress_probability=args.compress_probability, num_workers=args.num_workers, chunk_size=args.chunk_size)
    for split, counts in summary.items():
        print(f"{os.path.join(args.out, split + '.beton')}: {counts['written']} images"
              + (f", {counts['skipped']} skipped" if counts["skipped"] else ""))
    return 0


# -- inspect ------------------------------------------------------------------------------------

def _add_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="dataset root (folder, HF or FFCV), a split folder, or a .beton file")
    parser.add_argument("--max-images", type=int, default=1000,
                        help="images decoded per split for sizes and errors (default: 1000)")
    parser.add_argument("--all", action="store_true", help="decode every image")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _run_inspect(args: argparse.Namespace) -> int:
    from fap.data.inspect import format_report, inspect_path

    report = inspect_path(args.path, max_images=None if args.all else args.max_images)
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report))
    return 1 if report.problems else 0


# -- dispatch -----------------------------------------------------------------------------------

def _corrupt():
    from fap.data import corrupt  # imports imagecorruptions only when its command runs
    return corrupt


SUBCOMMANDS: Dict[str, Tuple[str, Callable, Callable]] = {
    "demo": ("draw the built-in demo dataset (ImageNet layout, JPEG)", _add_demo, _run_demo),
    "demo-det": ("draw the built-in demo detection set (COCO format)", _add_demo_det, _run_demo_det),
    "fashion-mnist": ("write Fashion-MNIST's idx files as an ImageNet-layout folder", _add_fashion_mnist,
                      _run_fashion_mnist),
    "to-beton": ("write FFCV .beton files from a folder or HF dataset", _add_to_beton, _run_to_beton),
    "corrupt": ("write an ImageNet-C-style corrupted copy of an ImageNet-layout split",
                lambda p: _corrupt().add_arguments(p), lambda a: _corrupt().run(a)),
    "inspect": ("report classes, counts, image sizes and problems of a dataset", _add_inspect, _run_inspect),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fap data`` subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    for name, (help_text, add, run_fn) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_data_run=run_fn)


def run(args: argparse.Namespace) -> int:
    """Run the chosen ``fap data`` subcommand; errors about the data are printed in one line, exit status 2."""
    from fap.data.base import DataError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._data_run(args) or 0)
    except (DataError, FileNotFoundError, FileExistsError, ImportError, ValueError) as e:
        print(f"fap data {args.data_command}: error: {e}", file=sys.stderr)
        return 2
