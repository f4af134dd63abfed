"""``fap eval MODEL --suite ...``: the command line of the evaluation suite (`fap.evaluation.suite`).

What the suite scores and how is `fap.evaluation.suite` (clean, ImageNet-C/R/A, Sketch,
Stylized, V2, PGD; Mei et al., ICLR 2022 report them side by side); this module parses the
command line, loads the model and writes the report. It dispatches on data, not on
imports: an export or run whose ``config.json`` (or checkpoint marker) records
``task: detection`` is scored by the detection task's evaluation (COCO mAP, clean and
corrupted; `fap.detection.evaluate`). ``evaluate_model``, ``run_suite`` and ``SuiteConfig``
are re-exported here for the code that imports them from ``fap.evaluate``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, Sequence, Tuple

from fap.data.base import DataError
from fap.data.config import INTERPOLATIONS, DataConfig
from fap.evaluation.config import FOLDER_SETS, SuiteConfig
from fap.evaluation.loading import load_model
from fap.evaluation.paper import compare, paper_result
from fap.evaluation.report import flatten, format_markdown, write_report
from fap.evaluation.suite import DEFAULT_CROP_PCT, DEFAULT_IMAGE_SIZE, DEFAULT_INTERPOLATION, evaluate_model, \
    run_suite

__all__ = [
    "FOLDER_SETS",
    "SuiteConfig",
    "add_arguments",
    "evaluate_model",
    "flatten",
    "format_markdown",
    "run",
    "run_suite",
    "write_report",
]


# --------------------------------------------------------------------------------------
# `fap eval`
# --------------------------------------------------------------------------------------

SUITE_HELP = (
    "what to evaluate: 'clean' (top-1/top-5 on --data), 'pgd' (PGD-K accuracy on --data), and NAME=PATH for "
    "imagenet_c, imagenet_r, imagenet_a, sketch, stylized, v2 (e.g. imagenet_c=/data/imagenet-c). "
    "'clean=PATH' is short for --data PATH"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fap eval``."""
    parser.add_argument("model", help="an export directory (model.safetensors + config.json), a checkpoint or run "
                                      "directory, or a .safetensors file whose metadata names the architecture")
    parser.add_argument("--suite", nargs="+", required=True, metavar="SET", help=SUITE_HELP)
    parser.add_argument("--data", default="", help="root of the clean validation data (data.path)")
    parser.add_argument("--data-source", default="folder", choices=("folder", "hf", "ffcv", "demo"),
                        help="kind of --data (default: folder, i.e. DATA/VAL_SPLIT/<class>/<image>)")
    parser.add_argument("--val-split", default="val", help="validation split name (default: val)")
    parser.add_argument("--classes", default=None,
                        help="file with the model's class names in label order, one per line (default: recorded "
                             "with the weights, else the clean folder's classes, else ImageNet-1k's for 1000 classes)")
    parser.add_argument("--model-name", default=None, help="timm architecture, overriding the one recorded")
    parser.add_argument("--ema", action="store_true", help="evaluate a checkpoint's EMA weights")
    parser.add_argument("--branch", default="main", choices=("main", "aux"),
                        help="norms to evaluate through: main (default, what inference uses) or aux (a dual-norm "
                             "checkpoint's auxiliary norms and their running statistics; exports have none)")
    parser.add_argument("--corruptions", default="", help="comma-separated ImageNet-C corruptions (default: all found)")
    parser.add_argument("--pgd-steps", type=int, default=10, help="K of PGD-K for 'pgd' (default: 10)")
    parser.add_argument("--pgd-epsilon", type=float, default=1.0, help="ε in 1/255 units (default: 1)")
    parser.add_argument("--pgd-step", type=float, default=None, help="step in 1/255 units (default: min(max(1, ε/K), ε))")
    parser.add_argument("--pgd-random-init", type=float, default=0.0,
                        help="probability of a random start (default: 0, deterministic)")
    parser.add_argument("--pgd-max-images", type=int, default=0, help="attack at most N clean images (default: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per process and batch (default: 64)")
    parser.add_argument("--num-workers", type=int, default=2, help="loader workers per process (default: 2)")
    parser.add_argument("--image-size", type=int, default=None, help="eval crop (default: recorded with the model, else 224)")
    parser.add_argument("--crop-pct", type=float, default=None, help="eval crop fraction (default: recorded, else 0.875)")
    parser.add_argument("--interpolation", default=None, choices=INTERPOLATIONS, help="resize interpolation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the PGD random start")
    parser.add_argument("--out", default=None, help="directory for results.json and results.md "
                                                     "(default: eval-<model folder name>)")
    parser.add_argument("--compare", default=None, metavar="ROW",
                        help="put the results beside what the Fast AdvProp paper reports for ROW, e.g. "
                             "table1/fast_advprop, or table7/fast_advprop for a detector (recipes/paper.py --list "
                             "shows the rows; fap.evaluation.paper)")


def parse_suite(tokens: Sequence[str], args: argparse.Namespace) -> Tuple[SuiteConfig, str]:
    """``--suite`` tokens and the other arguments as a `SuiteConfig` and the clean data path."""
    fields: Dict[str, Any] = {"clean": False}
    data_path = args.data
    for token in tokens:
        name, _, path = token.partition("=")
        name = name.strip().replace("-", "_")
        if name == "clean":
            fields["clean"] = True
            data_path = path or data_path
        elif name in ("pgd", "adversarial"):
            fields["pgd_steps"] = args.pgd_steps
        elif name in FOLDER_SETS or name == "imagenet_c":
            if not path:
                raise SystemExit(f"--suite {token}: give the set's root as {name}=PATH")
            fields[name] = path
        else:
            raise SystemExit(f"--suite {token}: unknown set {name!r}; expected clean, pgd, or NAME=PATH with NAME in "
                             f"imagenet_c, {', '.join(FOLDER_SETS)}")
    if fields.get("pgd_steps") == 0:
        raise SystemExit("--suite pgd with --pgd-steps 0: give --pgd-steps >= 1")
    suite = SuiteConfig(
        **fields, corruptions=tuple(c.strip() for c in args.corruptions.split(",") if c.strip()),
        pgd_epsilon=args.pgd_epsilon, pgd_step=args.pgd_step, pgd_random_init_prob=args.pgd_random_init,
        pgd_max_images=args.pgd_max_images, batch_size=args.batch_size, num_workers=args.num_workers,
        image_size=args.image_size, crop_pct=args.crop_pct, interpolation=args.interpolation, seed=args.seed,
    )
    return suite.validate(), data_path


def run(args: argparse.Namespace) -> int:
    """Run ``fap eval``; returns the exit code (2 with a one-line message for unusable input).

    The model's task (recorded in its ``config.json`` or checkpoint marker) picks the evaluation.
    """
    from fap.evaluation.loading import WeightsError, recorded_task

    try:
        if recorded_task(args.model) == "detection":  # a RetinaNet run or export: COCO mAP, clean and corrupted
            from fap.detection.evaluate import evaluate_cli

            return evaluate_cli(args)
        return _run(args)
    except (DataError, WeightsError, FileNotFoundError, ValueError) as e:
        print(f"fap eval: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    suite, data_path = parse_suite(args.suite, args)
    if args.compare:
        try:  # an unknown row fails before any evaluation
            paper_result(args.compare, task="classification")
        except ValueError as e:
            raise ValueError(f"--compare {args.compare}: {e}") from None
    accelerator = Accelerator()
    info = load_model(args.model, model_name=args.model_name, ema=args.ema, branch=args.branch)
    data = None
    if suite.clean or suite.pgd_steps:
        if not data_path:
            raise SystemExit("'clean' and 'pgd' evaluate the clean validation set: give --data PATH (or clean=PATH)")
        data = DataConfig(source=args.data_source, path=data_path, val_split=args.val_split,
                          image_size=args.image_size or info.image_size or DEFAULT_IMAGE_SIZE,
                          crop_pct=args.crop_pct or info.crop_pct or DEFAULT_CROP_PCT,
                          interpolation=args.interpolation or info.interpolation or DEFAULT_INTERPOLATION,
                          num_workers=args.num_workers)
    out = args.out or f"eval-{os.path.basename(os.path.normpath(args.model))}"
    results = evaluate_model(info, suite, data=data, classes=args.classes, accelerator=accelerator, branch=args.branch)
    if args.compare:
        results["paper"] = compare(results, args.compare)
    if accelerator.is_main_process:
        write_report(results, out)
        print(format_markdown(results))
        print(f"\nwrote {os.path.join(out, 'results.json')} and {os.path.join(out, 'results.md')}")
    return 0
