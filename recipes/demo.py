"""The demo: does Fast AdvProp help on fap's built-in images? Vanilla and Fast AdvProp, 3 seeds, on a CPU.

    make demo
    # = .venv/bin/python recipes/demo.py
    python recipes/demo.py --seeds 0 --smoke    # two updates per run (what the tests run)

It generates the demo dataset on first use (`fap.data.make_demo`: 10 classes of drawn
shapes and textures in clutter, 48 x 48 px JPEGs, 5000 training and 1000 validation
images in the ImageNet folder layout) and a corrupted copy of its validation split, then
runs one `fap.experiment` (the same as ``fap compare``): two arms x three seeds at equal
compute, with the paper's two columns (Mei et al., ICLR 2022, Table 1) declared before the
runs as primary contrasts, Fast AdvProp minus vanilla on

* clean top-1 on the 1000 validation images, and
* the corruption error: the unnormalised mean top-1 error on a corrupted copy of the
  validation set (200 images under the 15 ImageNet-C corruptions at severities 1-5, made
  with `fap data corrupt` on first use and cached beside the data).

The arms, scaled down from the paper:

* vanilla: 12 epochs at a loader batch of 128;
* Fast AdvProp: the same 128 clean images per step plus 32 for the adversarial split
  (p_adv = 0.2, loader batch 160): 1.2x the image-passes per step, so 12 / 1.2 = 10
  epochs (the methods' cost ledger, `fap.methods.matched_budget`), 1.0x vanilla's compute
  over the run. Auxiliary BN statistics in groups of 16 give Shuffling BN two groups to mix
  on one process.

The model is timm's ``test_resnet`` (0.37 M parameters, BatchNorm), AdamW, 40 px random
crops and flips: of what we tried, what learns most in a few CPU minutes on these images.
It prints the arms (mean ± sd and every seed, with training top-1 beside validation top-1:
the regime) and the contrasts (per-seed differences, 95 % t interval, paired t-test, exact
McNemar on per-image outcomes, the smallest difference this design detects), and writes
``runs/demo/report.md``, ``results.json`` and ``results.png``. Started again, it reads back
finished runs. The README ("Set-up") has the measured output and what it does and does not
show.
"""
import dataclasses
import os
import sys

import fap
import fap.cli
import fap.experiment
from fap.data import DataConfig, make_demo
from fap.evaluation.config import SuiteConfig
from fap.experiment import Arm, Contrast
from fap.methods import CONFIGS

VANILLA_EPOCHS, CLEAN_BATCH = 12, 128
LOADER_WORKERS = 1
# The corrupted copy: the first 20 validation images of each class (200), under the 15
# ImageNet-C corruptions at 5 severities each (15,000 images, made once).
CORRUPTED_PER_CLASS = 20


def config(method: str) -> fap.TrainConfig:
    """One arm's run; `fap.experiment` sets its epochs (equal compute), seed and run directory."""
    method_cfg = CONFIGS[method]()
    batch = round(CLEAN_BATCH / (1 - method_cfg.p_adv)) if method == "fast_advprop" else CLEAN_BATCH  # 160 = 128 + 32
    return fap.TrainConfig(
        train=fap.RunSection(name=f"demo_{method}", epochs=VANILLA_EPOCHS, batch_size=batch),
        data=DataConfig(source="demo", path="data/demo", image_size=40, crop_pct=40 / 48, scale=(0.6, 1.0),
                        hflip=0.5, num_workers=LOADER_WORKERS),
        model=fap.ModelConfig(name="test_resnet", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                              dual_norm=method != "vanilla", aux_group_size=16 if method != "vanilla" else None),
        method=method_cfg,
        # 2e-3 per 128 clean images: lr_base_size is the loader batch that holds them.
        optim=fap.OptimConfig(opt="adamw", lr=2e-3, lr_base_size=batch, weight_decay=0.05),
        sched=fap.ScheduleConfig(sched="cosine", warmup_epochs=0.5, warmup_lr=1e-4),
        checkpoint=fap.CheckpointConfig(every_steps=0, every_epochs=1, keep=1),   # an interrupted demo resumes
        log=fap.LogConfig(every_steps=10, trackers=()),
        # Filled in by main() once the corrupted copy exists (`corrupted_copy`).
        final_eval=SuiteConfig(clean=False, batch_size=250, num_workers=LOADER_WORKERS),
    )


def smoke(cfg: fap.TrainConfig) -> fap.TrainConfig:
    """Two updates per method on tiny images."""
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, batch_size=20, max_steps=2),
        data=dataclasses.replace(cfg.data, image_size=32, num_workers=0),
        model=dataclasses.replace(cfg.model, aux_group_size=2 if cfg.model.aux_group_size else None),
        sched=dataclasses.replace(cfg.sched, warmup_epochs=0.5),
        log=dataclasses.replace(cfg.log, every_steps=1),
        final_eval=dataclasses.replace(cfg.final_eval, corruptions=("gaussian_noise", "contrast"), num_workers=0),
    )


def corrupted_copy(data: DataConfig, corruptions=()) -> str:
    """A small ImageNet-C-style copy of the validation split, made on first use and cached.

    The first `CORRUPTED_PER_CLASS` images of each validation class are corrupted into
    ``<data.path>-<val_split>-c<N>`` by `fap data corrupt` (`fap.data.corrupt.make_corrupted`:
    every corruption at severities 1-5; it reuses a complete copy made with the same settings).
    """
    from fap.data.corrupt import make_corrupted

    if data.source == "demo":
        make_demo(data.path)  # reuses a complete copy
    root = data.path.rstrip("/")
    return make_corrupted(os.path.join(root, data.val_split), f"{root}-{data.val_split}-c{CORRUPTED_PER_CLASS}",
                          corruptions=corruptions or None, per_class=CORRUPTED_PER_CLASS,
                          num_workers=os.cpu_count() or 1, progress=False)


ARMS = (Arm("vanilla", ("--method", "vanilla")), Arm("fast_advprop", ("--method", "fast_advprop")))
# Declared before the runs: the paper's two columns, clean top-1 and the corruption error.
CONTRASTS = (Contrast("fast_advprop", "vanilla", "top1", primary=True),
             Contrast("fast_advprop", "vanilla", "corruption_error", primary=True))
SEEDS = (0, 1, 2)


def main(argv=None) -> int:
    """``python recipes/demo.py [--smoke] [--seeds S ...] [--jobs N] [--out DIR] [--section.key=value ...]``."""
    import argparse

    p = argparse.ArgumentParser(prog="recipes/demo.py", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="default: 0 1 2")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default: 1)")
    p.add_argument("--out", default="runs/demo", help="the experiment folder (default: runs/demo)")
    p.add_argument("--smoke", action="store_true", help="two updates per run on tiny images (the tests)")
    args, overrides = p.parse_known_args(argv)
    base = config("vanilla")
    if args.smoke:
        base = smoke(base)
    data = fap.parse_args(base, [a for a in overrides if a.startswith("--data.")]).data
    corruptions = base.final_eval.corruptions
    corrupted = corrupted_copy(data, corruptions)
    fap.experiment.run(config, ARMS, args.seeds, out=args.out, protocol="equal-compute", contrasts=CONTRASTS,
                       overrides=[f"--final_eval.imagenet_c={corrupted}"] + overrides,
                       smoke=smoke if args.smoke else None, epochs=2 if args.smoke else VANILLA_EPOCHS,
                       jobs=args.jobs, train_images=1000)
    print(f"\nreport: {args.out}/report.md, plot: {args.out}/results.png")
    return 0


if __name__ == "__main__":
    sys.exit(fap.cli.run_main(main))  # a mistake in the arguments: one line and status 2 (--debug: traceback)
