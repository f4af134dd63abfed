"""``fap compare``: does it help on my data? Arms x seeds of ordinary runs, paired statistics."""
from __future__ import annotations

import argparse
import runpy
import shlex
import sys
from pathlib import Path

from fap.checks import ConfigError

__all__ = ["add_arguments", "run", "load_recipe"]

DESCRIPTION = """\
Train named arms x seeds as ordinary fap runs and compare them with paired statistics.

  fap compare --recipe recipes/demo.py \\
      --arm vanilla='--method vanilla' \\
      --arm fast='--method fast_advprop' \\
      --arm fast-null='--method fast_advprop --method.epsilon=0' \\
      --seeds 0 1 2 --protocol equal-compute --jobs 2 --out runs/compare \\
      --primary fast:vanilla:top1 --secondary fast:fast-null:top1 \\
      -- --data.path=data/demo

Base config: a recipe's `config` (a TrainConfig, or a function of the method name, as every
recipes/*.py has; --smoke applies its `smoke`), or fap train's defaults; then the common
overrides after `--`, then each arm's own overrides (--section.key=value, --method NAME).

Protocol: equal-epochs (every arm trains vanilla's epochs and milestones) or equal-compute
(each arm's epochs and milestones are vanilla's divided by its cost per loader image, from the
methods' own cost ledger, fap.methods.matched_budget: Fast AdvProp at p_adv 0.2 trains 105 -> 87
epochs, AdvProp PGD-K 1/(K+2) of them). The protocol owns train.epochs, train.reference_epochs
and sched.milestones; vanilla's length comes from --epochs, else from the base config.

Runs: each (arm, seed) is a run directory OUT/runs/ARM/seedS (fap eval and fap export work on
it), trained in its own process; --jobs N at a time, the cores split between them. Started
again, the experiment reads back finished runs, resumes unfinished ones from their last
checkpoint (a run without checkpoints gets one per epoch) and trains the rest. A run directory
made with another config is refused, naming each key that differs.

Measured per run: what its final evaluation measures (clean top-1/top-5; with
--final_eval.* also corruption error, PGD, ...; detection: mAP), clean top-1 of the export on
the validation split with each image's outcome, and top-1 on clean training images (the
regime: under- or over-fitting).

Statistics (scipy): per arm mean, sd, 95 % t interval and every seed; per contrast A - B on a
metric (A:B:METRIC, declared before the runs): per-seed paired differences, mean, t interval,
paired t-test, an exact McNemar test on per-image clean top-1 outcomes pooled over seeds, and
the smallest difference the design detects with 80 % power. Primary contrasts at 95 %;
secondary ones Holm-corrected as one family. A difference is resolved only when its interval
excludes 0 after correction.

Interactions: A:B:C:D:METRIC is the difference of differences (A - B) - (C - D) per seed, e.g.
does dual - mixed grow with epsilon: --secondary dual24:mixed24:dual2:mixed2:top1. It gets the
same seed-level statistics; McNemar does not apply to it (n/a). Every arm of a contrast must
have its metric: one that some arm's runs lack (a --measure that returns nothing for it) is an
error naming the arm and its metrics, after the runs, which are kept for the corrected contrast.

Metrics: top1, top5, train_top1, corruption_error (unnormalised mean error over the corrupted
copy), mce, pgd_top1, map, map_corrupted, any eval/<set>/<metric> key of the final
evaluation, and what --measure returns.

Output: OUT/results.json (every run, every statistic), OUT/report.md (tables), OUT/results.png
(every seed as a dot, means and intervals; contrasts as intervals around 0), and the headline
tables on stdout. fap.experiment.run(...) does the same from Python and returns the results.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fap compare``."""
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--recipe", default=None, metavar="FILE",
                        help="a recipe (recipes/*.py) whose `config` is the base (default: fap train's defaults)")
    parser.add_argument("--smoke", action="store_true", help="apply the recipe's smoke transformation to the base")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=OVERRIDES", required=True,
                        help="an arm: its name and its overrides, e.g. fast='--method fast_advprop' (repeat)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--protocol", default="equal-compute", choices=("equal-epochs", "equal-compute"),
                        help="how long each arm trains (default: equal-compute)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="vanilla's epochs (default: the base config's train.reference_epochs or train.epochs)")
    parser.add_argument("--primary", action="append", default=[], metavar="A:B[:C:D]:METRIC",
                        help="a primary contrast, A minus B on METRIC (A:B:METRIC), or the interaction "
                             "(A - B) - (C - D) (A:B:C:D:METRIC), tested at 95 %% (repeat; at most a few)")
    parser.add_argument("--secondary", action="append", default=[], metavar="A:B[:C:D]:METRIC",
                        help="a secondary contrast, A:B:METRIC or A:B:C:D:METRIC, Holm-corrected with the other "
                             "secondary ones (repeat)")
    parser.add_argument("--out", default="runs/compare", help="the experiment folder (default: runs/compare)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default: 1)")
    parser.add_argument("--launcher", default="", metavar="COMMAND",
                        help="run each worker under this command, e.g. 'accelerate launch --config_file "
                             "accelerate_configs/multi_gpu.yaml' (default: this Python, one process)")
    parser.add_argument("--train-images", type=int, default=10000,
                        help="training accuracy on this many clean training images, evenly spaced; 0 = all, "
                             "-1 = not measured (default: 10000)")
    parser.add_argument("--measure", default=None, metavar="MODULE:FUNCTION",
                        help="an extra per-run measurement: FUNCTION(run_dir, config, summary) -> {name: number}")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="-- --section.key=value",
                        help="overrides for every arm, after --")


def load_recipe(path: str):
    """A recipe file's ``(config, smoke)``; `ConfigError` if it has no ``config``."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--recipe {path}: no such file")
    module = runpy.run_path(str(file), run_name="fap_recipe")
    if "config" not in module:
        raise ConfigError(f"--recipe {path}: it defines no `config` (a TrainConfig or a function of the method name)")
    return module["config"], module.get("smoke")


def run(args: argparse.Namespace) -> int:
    from fap.config import TrainConfig
    from fap.experiment import Arm, Contrast
    from fap.experiment.runner import run as run_experiment

    base, smoke = (load_recipe(args.recipe) if args.recipe else (TrainConfig(), None))
    if args.smoke and smoke is None:
        raise ConfigError("--smoke: " + (f"{args.recipe} defines no `smoke`" if args.recipe else "give a --recipe"))
    contrasts = [Contrast.parse(t, primary=True) for t in args.primary]
    contrasts += [Contrast.parse(t, primary=False) for t in args.secondary]
    from fap.experiment.runner import ExperimentError

    try:
        run_experiment(
            base, [Arm.parse(t) for t in args.arm], args.seeds, out=args.out, protocol=args.protocol,
            contrasts=contrasts, overrides=args.overrides, smoke=smoke if args.smoke else None, epochs=args.epochs,
            jobs=args.jobs, launcher=shlex.split(args.launcher), measure=args.measure,
            train_images=None if args.train_images < 0 else args.train_images, progress=not args.quiet,
        )
    except ExperimentError as e:  # a run failed: its name and log tail, not this process's traceback
        print(f"fap compare: error: {e}", file=sys.stderr)
        return 2 if e.status == 2 else 1
    print(f"\nwrote {Path(args.out) / 'results.json'}, report.md and results.png")
    return 0
