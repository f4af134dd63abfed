"""Tutorial 02's experiment, as planned in ``plans/02_disentangled_learning.md``: what is
specific to the disentangled-learning hypothesis. Runs, reuse, statistics and tables are
`fap.experiment`'s (the same as ``fap compare``).

* the data: Fashion-MNIST with a held-out split of the training images
  (`fap.data.fashion_mnist.convert_fashion_mnist(..., holdout=...)`) and a corrupted copy of
  the first test images per class;
* the base: one vanilla run to its plateau, and a twice longer one;
* Protocol A: arms that fine-tune the base (`model.init_from`) with AdvProp's paired attack,
  changing only the norm mode and ε (Xie et al., CVPR 2020, Sec. 4.2);
* `measure`: what every fine-tune run measures beyond `fap.experiment`'s defaults
  (the branch table, BatchNorm recalibration, the swap test; `fap.experiment.measures`);
* `layer_shift`: clean and adversarial batch statistics through the same norms, per layer.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import fap
import fap.experiment
from fap.data import DataConfig
from fap.evaluation.config import SuiteConfig
from fap.experiment import Arm, Contrast
from fap.methods.config import CONFIGS

# Without a GPU, tell DeepSpeed's import (through accelerate, when a model is evaluated here)
# that it runs on the CPU, instead of a warning in the outputs that it guessed so.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

MODEL = dict(name="test_resnet", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
BASE_LR = 4e-3          # the base's AdamW peak, per 128 images (pilots/02_schedule.md)
FINETUNE_LRS = (1e-3, 3e-3)   # the held-out pilot chooses between them (pilots/02_finetune.md)
PILOT_SEED = 100        # not one of the experiment's seeds
BATCH = 128             # clean images per step in every arm


@dataclasses.dataclass(frozen=True)
class Size:
    """What ``FAP_TUTORIAL_SIZE`` selects."""
    train_images: int
    holdout_images: int
    val_images: Optional[int]      # None: all 10,000 test images
    corrupted_per_class: int
    seeds: Tuple[int, ...]
    base_epochs: int
    long_epochs: int
    finetune_epochs: int
    layer_images: int              # images per set for the per-layer statistics
    branch_images: int             # images attacked for the branch table
    jobs: int                      # runs at a time
    max_steps: Optional[int] = None


SIZES = {
    "full": Size(train_images=3840, holdout_images=2000, val_images=None, corrupted_per_class=20,
                 seeds=(0, 1, 2, 3, 4, 5), base_epochs=36, long_epochs=72, finetune_epochs=4, layer_images=512,
                 branch_images=1000, jobs=2),
    "ci": Size(train_images=160, holdout_images=100, val_images=100, corrupted_per_class=1, seeds=(0, 1),
               base_epochs=2, long_epochs=3, finetune_epochs=1, layer_images=32, branch_images=20, jobs=2,
               max_steps=2),
}

# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


def prepare_data(work: Path, size: Size) -> Dict[str, str]:
    """Fashion-MNIST (``FAP_FASHION_MNIST``, default Debian's ``dataset-fashion-mnist``) as an
    ImageNet folder with ``train/``, ``holdout/`` and ``val/`` (the test images), and a corrupted
    copy of the first ``corrupted_per_class`` test images of each class."""
    from fap.data.corrupt import make_corrupted
    from fap.data.fashion_mnist import DEFAULT_SRC, convert_fashion_mnist

    src = os.environ.get("FAP_FASHION_MNIST", DEFAULT_SRC)
    root = work / f"fmnist_{size.train_images}_h{size.holdout_images}"
    convert_fashion_mnist(str(root), src=src, max_train=size.train_images, max_val=size.val_images,
                          holdout=size.holdout_images)
    corrupted = make_corrupted(str(root / "val"), str(work / f"fmnist_c{size.corrupted_per_class}"),
                               per_class=size.corrupted_per_class, num_workers=os.cpu_count() or 1, progress=False)
    return {"path": str(root), "corrupted": corrupted}


def data_config(paths: Dict[str, str], val_split: str = "val") -> DataConfig:
    # 28x28 grey photos centred in 32x32 RGB PNGs; mild random crops (area 0.8-1) and flips
    return DataConfig(source="folder", path=paths["path"], val_split=val_split, image_size=32, crop_pct=1.0,
                      scale=(0.8, 1.0), num_workers=0)


# ------------------------------------------------------------------------------------------
# The base: vanilla to its plateau (curve on the held-out training images)
# ------------------------------------------------------------------------------------------

def base_config(paths: Dict[str, str], size: Size) -> fap.TrainConfig:
    return fap.TrainConfig(
        train=fap.RunSection(name="base", epochs=size.base_epochs, batch_size=BATCH, max_steps=size.max_steps),
        data=data_config(paths, "holdout"),
        model=fap.ModelConfig(**MODEL, dual_norm=False),
        method=CONFIGS["vanilla"](),
        optim=fap.OptimConfig(opt="adamw", lr=BASE_LR, lr_base_size=BATCH, weight_decay=0.05),
        sched=fap.ScheduleConfig(sched="cosine", warmup_epochs=0.5, warmup_lr=1e-4),
        checkpoint=fap.CheckpointConfig(every_steps=0, every_epochs=1, keep=1),
        log=fap.LogConfig(trackers=(), progress=False),
        final_eval=SuiteConfig(clean=False, batch_size=250, num_workers=0),
    )


def run_base(paths: Dict[str, str], size: Size, work: Path):
    """The base (``base_epochs``) and the longer run (``long_epochs``), seed 0, both at once."""
    import concurrent.futures as futures

    def one(epochs: int):
        return fap.experiment.run(base_config(paths, size), [Arm("vanilla", ("--method", "vanilla"))], [0],
                                  out=work / f"base{epochs}", protocol="equal-epochs", epochs=epochs,
                                  train_images=0, progress=False, quiet=True)

    with futures.ThreadPoolExecutor(2) as pool:   # each run is its own process; threads only wait
        base, longer = pool.map(one, (size.base_epochs, size.long_epochs))
    return base, longer


def base_dir(work: Path, size: Size) -> Path:
    return work / f"base{size.base_epochs}" / "runs" / "vanilla" / "seed0"


# ------------------------------------------------------------------------------------------
# Protocol A: fine-tune the base, changing only the norms and ε
# ------------------------------------------------------------------------------------------

ARMS = (
    Arm("continue", ("--method", "vanilla", "--model.dual_norm=false")),
    Arm("dual-0", ("--method", "advprop", "--method.norms=dual", "--method.epsilon=0", "--model.dual_norm=true")),
    Arm("dual-2", ("--method", "advprop", "--method.norms=dual", "--method.epsilon=2", "--model.dual_norm=true")),
    Arm("mixed-2", ("--method", "advprop", "--method.norms=mixed", "--method.epsilon=2", "--model.dual_norm=false")),
    Arm("dual-24", ("--method", "advprop", "--method.norms=dual", "--method.epsilon=24", "--model.dual_norm=true")),
    Arm("mixed-24", ("--method", "advprop", "--method.norms=mixed", "--method.epsilon=24",
                     "--model.dual_norm=false")),
    Arm("shared-24", ("--method", "advprop", "--method.norms=shared", "--method.epsilon=24",
                      "--model.dual_norm=false")),
)
PILOT_ARMS = ("continue", "dual-24", "mixed-24")


# Declared in the plan (plans/02_disentangled_learning.md) before the runs.
PRIMARY = (
    Contrast("dual-24", "mixed-24", "top1", primary=True),                          # P1
    Contrast("dual-24", "mixed-24", "top1", primary=True, c="dual-2", d="mixed-2"),  # P2
    Contrast("dual-2", "dual-0", "top1", primary=True),                             # P3
    Contrast("dual-2", "dual-0", "corruption_error", primary=True),                 # P4
)
SECONDARY = (
    Contrast("dual-0", "continue", "top1"),                   # S1
    Contrast("dual-2", "mixed-2", "top1"),                    # S2
    Contrast("mixed-24", "shared-24", "top1"),                # S3
    Contrast("dual-24", "shared-24", "top1"),                 # S4
    Contrast("dual-24", "dual-0", "top1"),                    # S5
    Contrast("dual-24", "dual-0", "corruption_error"),        # S6
    Contrast("dual-24", "mixed-24", "corruption_error"),      # S7
    Contrast("dual-24", "mixed-24", "recal_top1"),            # S8
    Contrast("dual-2", "continue", "top1"),                   # S9
    Contrast("dual-2", "continue", "corruption_error"),       # S10
)


def finetune_config(paths: Dict[str, str], size: Size, base: Path, lr: float, val_split: str = "val"):
    """The fine-tune's base config: ``config(method) -> TrainConfig`` for `fap.experiment`."""
    def config(method: str) -> fap.TrainConfig:
        method_cfg = CONFIGS[method]()
        if method == "advprop":   # PGD-1 (step = ε) toward a random wrong label, AdvProp's attack
            method_cfg = dataclasses.replace(method_cfg, attack_steps=1)
        return fap.TrainConfig(
            train=fap.RunSection(name="finetune", epochs=size.finetune_epochs, batch_size=BATCH,
                                 max_steps=size.max_steps, eval_every=size.finetune_epochs),
            data=data_config(paths, val_split),
            model=fap.ModelConfig(**MODEL, dual_norm=method != "vanilla", init_from=str(base)),
            method=method_cfg,
            optim=fap.OptimConfig(opt="adamw", lr=lr, lr_base_size=BATCH, weight_decay=0.05),
            sched=fap.ScheduleConfig(sched="cosine", warmup_epochs=0.25, warmup_lr=1e-5),
            checkpoint=fap.CheckpointConfig(every_steps=0, every_epochs=1, keep=1),
            log=fap.LogConfig(trackers=(), progress=False),
            final_eval=SuiteConfig(clean=False, imagenet_c=paths["corrupted"] if val_split == "val" else "",
                                   batch_size=250, num_workers=0),
        )
    return config


def run_pilots(paths: Dict[str, str], size: Size, work: Path) -> Dict[float, Optional[object]]:
    """The held-out pilots that choose the fine-tune learning rate (seed `PILOT_SEED`);
    None for a learning rate at which a pilot run failed (e.g. stopped on a non-finite loss)."""
    from fap.experiment.runner import ExperimentError

    arms = [a for a in ARMS if a.name in PILOT_ARMS]
    out = {}
    for lr in FINETUNE_LRS:
        try:
            out[lr] = fap.experiment.run(finetune_config(paths, size, base_dir(work, size), lr, "holdout"), arms,
                                         [PILOT_SEED], out=work / f"pilot_lr{lr:g}", protocol="equal-epochs",
                                         epochs=size.finetune_epochs, jobs=size.jobs, train_images=None,
                                         progress=False, quiet=True)
        except ExperimentError as e:
            print(f"pilot at lr {lr:g} failed: {e}")
            out[lr] = None
    return out


def choose_lr(pilots: Dict[float, Optional[object]], base_holdout: float) -> Tuple[float, List[str]]:
    """The plan's rule: the larger learning rate unless, at it, vanilla-continue ends more than
    0.5 points below the base on the held-out images, or a pilot run failed or ended below 80 %."""
    low, high = min(FINETUNE_LRS), max(FINETUNE_LRS)
    r = pilots.get(high)
    if r is None:
        return low, [f"a pilot at {high:g} failed"]
    top1 = {a: r.arm(a, "top1")["values"][0] for a in PILOT_ARMS}
    reasons = []
    if top1["continue"] < base_holdout - 0.5:
        reasons.append(f"continue at {high:g} ends at {top1['continue']:.2f}, more than 0.5 below the base's "
                       f"{base_holdout:.2f}")
    reasons += [f"{a} at {high:g} ends at {v:.2f} < 80" for a, v in top1.items() if v < 80]
    return (low if reasons else high), reasons


def run_finetune(paths: Dict[str, str], size: Size, work: Path, lr: float):
    """Protocol A: every arm x seed, `fap.experiment`'s statistics on the declared contrasts."""
    return fap.experiment.run(finetune_config(paths, size, base_dir(work, size), lr), ARMS, size.seeds,
                              out=work / "finetune", protocol="equal-epochs", epochs=size.finetune_epochs,
                              contrasts=PRIMARY + SECONDARY, jobs=size.jobs, train_images=0, measure=measure,
                              quiet=True)


def measure(run_dir: str, cfg, summary) -> Dict[str, float]:
    """Per fine-tune run: the branch table and the swap test (dual norms), and BatchNorm
    recalibration on the clean training images (every arm); `fap.experiment.measures`."""
    from fap.experiment.measures import branch_scores, recalibrated_top1, swap_scores

    out = recalibrated_top1(run_dir, cfg, summary)
    out.update(branch_scores(run_dir, cfg, summary))
    out.update(swap_scores(run_dir, cfg, summary))
    return out


def interval_row(values_a: Sequence[float], values_b: Sequence[float]) -> str:
    """``mean [low, high]`` of the per-seed differences a − b (95 % t interval)."""
    from fap.experiment.stats import paired

    d = paired(values_a, values_b)
    ci = d["interval"]
    return f"{d['mean']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else " (no interval)")


def per_seed(results, arm: str, metric: str) -> List[float]:
    return results.arm(arm, metric)["values"]


def mean_ci(results, arm: str, metric: str) -> str:
    s = results.arm(arm, metric)
    ci = s["interval"]
    return f"{s['mean']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


# ------------------------------------------------------------------------------------------
# Per-layer two-domain evidence
# ------------------------------------------------------------------------------------------

def load_run_model(run_dir: Path):
    """A run's final model (auxiliary norms included where it has them), in eval mode."""
    from fap.checkpoint import list_checkpoints, load_checkpoint_weights, read_marker
    from fap.models import create_model

    checkpoint = list_checkpoints(run_dir)[-1]
    model_cfg = read_marker(checkpoint)["config"]["model"]
    net = create_model(MODEL["name"], num_classes=10, mean=MODEL["mean"], std=MODEL["std"],
                       dual_norm=model_cfg["dual_norm"])
    net.load_state_dict(load_checkpoint_weights(checkpoint), strict=True)
    return net.eval()


def batch_statistics(model, images) -> Dict[str, Tuple]:
    """Per BatchNorm layer (in forward order): the per-channel mean and variance of its input
    for ``images``, through whichever norms the model is routed to."""
    import torch

    stats, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not name.endswith("aux_norm"):
            def hook(mod, args, name=name):
                x = args[0].detach().double()
                stats[name] = (x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3)))
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    return stats


def shift(a: Dict[str, Tuple], b: Dict[str, Tuple]) -> List[Dict[str, float]]:
    """Per layer: the median over channels of |mean_b − mean_a| / sd_a and of |log(var_b / var_a)|."""
    import torch

    rows = []
    for name, (mean_a, var_a) in a.items():
        mean_b, var_b = b[name]
        sd = var_a.clamp_min(1e-12).sqrt()
        rows.append({"layer": name, "mean_shift": float(((mean_b - mean_a).abs() / sd).median()),
                     "log_var_ratio": float((var_b.clamp_min(1e-12) / var_a.clamp_min(1e-12)).log().abs().median())})
    return rows


def layer_shift(model, clean, labels, null_images, *, epsilon: float, attack_branch: str, seed: int = 0):
    """Clean vs adversarial (the training attack at ``epsilon``, made through
    ``attack_branch``) and clean vs other clean images (the null), every set through the
    **main** norms in eval mode."""
    import torch

    from fap.attacks import pgd
    from fap.methods.config import ADVPROP_RANDOM_INIT_PROB
    from fap.norm import has_dual_norm, route

    g = torch.Generator().manual_seed(seed)
    branch = attack_branch if has_dual_norm(model) else "main"
    with route(model, branch):
        adv = pgd(model, clean, labels, epsilon=epsilon, steps=1, step=epsilon, targeted=True, num_classes=10,
                  random_init_prob=ADVPROP_RANDOM_INIT_PROB, generator=g)
    with route(model, "main"):
        s_clean = batch_statistics(model, clean)
        s_adv = batch_statistics(model, adv)
        s_null = batch_statistics(model, null_images)
    return {"adversarial": shift(s_clean, s_adv), "null": shift(s_clean, s_null)}


def plot_layers(curves: Dict[str, Dict[str, List[Dict[str, float]]]], axes) -> None:
    """Per model (one colour): the adversarial shift (solid) and the null's (dashed) against
    depth, for the mean (``axes[0]``) and the variance (``axes[1]``)."""
    for k, (label, c) in enumerate(curves.items()):
        for ax, key, title in ((axes[0], "mean_shift", "|Δ batch mean| / clean sd (median over channels)"),
                               (axes[1], "log_var_ratio", "|log(batch var ratio)| (median over channels)")):
            for kind, style in (("adversarial", "-"), ("null", "--")):
                ys = [r[key] for r in c[kind]]
                ax.plot(range(len(ys)), ys, style, color=f"C{k}", marker="o", ms=2,
                        label=f"{label}: {'clean vs adversarial' if kind == 'adversarial' else 'null: clean vs clean'}")
            ax.set_xlabel("BatchNorm layer (input to output)")
            ax.set_ylabel(title, fontsize=8)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)


def val_images(paths: Dict[str, str], n: int, offset: int = 0):
    """``n`` test images (evenly spaced from ``offset``) as [0, 1] floats, with labels."""
    import torch

    from fap.data import build_loader, to_unit_float

    dataset = build_loader(data_config(paths), "val", batch_size=1, train=False).dataset
    step = max(1, len(dataset) // (2 * n))
    idx = [offset + 2 * step * i for i in range(n)]
    xs, ys = zip(*(dataset[i] for i in idx))
    return to_unit_float(torch.stack(list(xs))), torch.tensor(ys)
