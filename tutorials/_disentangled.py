"""Tutorial 02's experiment: the arms, their runs (cached by configuration), the measurements
and the plots. The notebook shows one idea per cell; the long code lives here.

The experiment (Xie et al., CVPR 2020, Sec. 4.2 and Table 4's "vanilla adversarial
training"; Mei et al., ICLR 2022, Table 1 and the robustness columns of Table 2):

* one method at a time (AdvProp with paired PGD-1 copies toward a random label, or Fast
  AdvProp with its 20 % split and FGSM from a random start), one attack (ε = 8/255), and
  only the norm mode changing: ``dual`` / ``shared`` / ``mixed`` (`fap.methods.base.NORM_MODES`);
  an ε = 0 null per method (dual norms, no perturbation);
* two protocols: equal epochs (AdvProp's: every arm trains ``EPOCHS`` epochs) and equal
  compute (the paper's: ``EPOCHS`` vanilla epochs of image-passes, so a method at 1.2× per
  image trains ``EPOCHS / 1.2`` epochs);
* for every run: clean top-1 on the validation set, the corruption error on a corrupted copy
  of it, and top-1 under PGD-5; for dual-norm runs also clean and adversarial top-1 through
  each branch (`fap.evaluate.evaluate_model(..., branch=...)`).
"""
from __future__ import annotations

import concurrent.futures as futures
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

import fap
from fap.config import to_dict
from fap.data import DataConfig
from fap.evaluate import SuiteConfig, evaluate_model
from fap.methods import CONFIGS, build_method

EPSILON = 8.0          # training attack budget, in 1/255 pixel units, for every adversarial arm
MODEL = dict(name="test_resnet", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
LR = 4e-3              # AdamW, per loader batch; chosen on vanilla pilots alone (pilots/02_schedule.md)


@dataclasses.dataclass(frozen=True)
class Size:
    """What ``FAP_TUTORIAL_SIZE`` selects."""
    train_images: int
    val_images: Optional[int]      # None: all 10,000 test images
    corrupted_per_class: int       # validation images per class in the corrupted copy
    seeds: tuple
    epochs: int                    # EPOCHS: vanilla's length, and every arm's under equal epochs
    robust_images: int             # images attacked for PGD and for the branch table
    workers: int                   # training runs at a time (one compute thread each)
    reference_epochs: int          # one longer vanilla run: how much more a longer schedule gives
    max_steps: Optional[int] = None


SIZES = {
    "full": Size(train_images=3840, val_images=None, corrupted_per_class=20, seeds=(0, 1, 2), epochs=18,
                 robust_images=1000, workers=2, reference_epochs=36),
    "ci": Size(train_images=160, val_images=100, corrupted_per_class=1, seeds=(0,), epochs=6,
               robust_images=20, workers=1, reference_epochs=8, max_steps=2),
}


@dataclasses.dataclass(frozen=True)
class Arm:
    method: str                    # vanilla | advprop | fast_advprop
    norms: str = "dual"            # dual | shared | mixed (ignored by vanilla)
    epsilon: float = EPSILON

    @property
    def name(self) -> str:
        if self.method == "vanilla":
            return "vanilla"
        label = {"advprop": "AdvProp", "fast_advprop": "Fast AdvProp"}[self.method]
        return f"{label}, {self.norms}" + (", ε = 0" if self.epsilon == 0 else "")

    @property
    def slug(self) -> str:
        return f"{self.method}_{self.norms}_eps{self.epsilon:g}" if self.method != "vanilla" else "vanilla"


ARMS: List[Arm] = [Arm("vanilla")] + [
    Arm(method, norms, eps)
    for method in ("fast_advprop", "advprop")
    for norms, eps in (("dual", EPSILON), ("shared", EPSILON), ("mixed", EPSILON), ("dual", 0.0))
]
PROTOCOLS = ("equal epochs", "equal compute")


def method_config(arm: Arm):
    cfg = CONFIGS[arm.method]()
    if arm.method == "vanilla":
        return cfg
    overrides = dict(epsilon=arm.epsilon, norms=arm.norms)
    if arm.method == "advprop":
        # PGD-1 (3x vanilla per image): the cheapest AdvProp; targeted, as Xie et al.
        overrides.update(attack_steps=1, num_classes=10)
    if arm.method == "fast_advprop" and arm.norms != "dual":
        overrides.update(shuffle=False)   # one process, one set of norms: no BN groups to shuffle across
    return dataclasses.replace(cfg, **overrides)


def loader_batch(arm: Arm) -> int:
    """128 clean images per step in every arm; Fast AdvProp's loader batch adds its 32-image split."""
    return 160 if arm.method == "fast_advprop" else 128


def cost_per_image(arm: Arm) -> float:
    """Image-passes per loader image, from the method's own cost model (`Method.cost`)."""
    return build_method(arm.method, method_config(arm)).cost(loader_batch(arm)).ratio


def epochs(arm: Arm, protocol: str, size: Size) -> int:
    if protocol == "equal epochs":
        return size.epochs
    e = size.epochs / cost_per_image(arm)
    assert abs(e - round(e)) < 1e-9, f"{arm.name}: {size.epochs} vanilla epochs are not whole epochs of it"
    return round(e)


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------

def prepare_data(work: Path, size: Size) -> Dict[str, str]:
    """Fashion-MNIST as an ImageNet folder (from ``FAP_FASHION_MNIST``, default Debian's
    ``dataset-fashion-mnist``) and a corrupted copy of the first validation images per class."""
    from fap.data.corrupt import make_corrupted
    from fap.data.fashion_mnist import DEFAULT_SRC, convert_fashion_mnist

    src = os.environ.get("FAP_FASHION_MNIST", DEFAULT_SRC)
    root = work / f"fmnist_{size.train_images}"
    convert_fashion_mnist(str(root), src=src, max_train=size.train_images, max_val=size.val_images)
    subset = work / f"fmnist_val{size.corrupted_per_class}"
    if not subset.is_dir():
        partial = work / (subset.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        for cls in sorted(p for p in (root / "val").iterdir() if p.is_dir()):
            (partial / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:size.corrupted_per_class]:
                shutil.copy2(f, partial / cls.name / f.name)
        partial.rename(subset)
    corrupted = make_corrupted(str(subset), str(work / f"fmnist_c{size.corrupted_per_class}"),
                               num_workers=os.cpu_count() or 1, progress=False)
    return {"path": str(root), "corrupted": corrupted}


def data_config(paths: Dict[str, str]) -> DataConfig:
    # 28x28 grey photos centred in 32x32 RGB PNGs; mild random crops (area 0.8-1) and flips
    return DataConfig(source="folder", path=paths["path"], image_size=32, crop_pct=1.0, scale=(0.8, 1.0),
                      num_workers=1)


# ------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------

def config(arm: Arm, protocol: str, seed: int, size: Size, paths: Dict[str, str], work: Path) -> fap.TrainConfig:
    """One run. ``protocol="reference"``: vanilla at ``size.reference_epochs``, for the curve."""
    n = size.reference_epochs if protocol == "reference" else epochs(arm, protocol, size)
    batch = loader_batch(arm)
    fast_dual = arm.method == "fast_advprop" and arm.norms == "dual"
    eval_every = 1 if arm.method == "vanilla" else n     # vanilla's curve; the others' final weights
    return fap.TrainConfig(
        train=fap.RunSection(name=arm.slug, epochs=n, batch_size=batch, seed=seed, reference_epochs=size.epochs,
                             eval_every=eval_every, max_steps=size.max_steps),
        data=data_config(paths),
        # aux BN statistics in ghost groups of 16: two groups for Shuffling BN to mix on one process
        model=fap.ModelConfig(**MODEL, dual_norm=arm.method != "vanilla" and arm.norms == "dual",
                              aux_group_size=16 if fast_dual else None),
        method=method_config(arm),
        optim=fap.OptimConfig(opt="adamw", lr=LR, lr_base_size=batch, weight_decay=0.05),
        sched=fap.ScheduleConfig(sched="cosine", warmup_epochs=0.5, warmup_lr=1e-4),
        # the final weights, aux norms included, for the branch evaluation
        checkpoint=fap.CheckpointConfig(every_steps=0, every_epochs=n, keep=1),
        log=fap.LogConfig(output_dir=str(work / "runs" / protocol.replace(" ", "_") / f"{arm.slug}_s{seed}"),
                          trackers=(), progress=False),
        final_eval=SuiteConfig(clean=False, imagenet_c=paths["corrupted"], pgd_steps=5, pgd_epsilon=EPSILON,
                                   pgd_random_init_prob=1.0, pgd_max_images=size.robust_images, batch_size=250,
                                   num_workers=0),
    )


def config_key(cfg: fap.TrainConfig) -> str:
    """A digest of everything that defines a run and its measurements: the configuration, the
    fap source and this module's source. A cached result is reused only under the same key."""
    from _provenance import library_digest

    text = json.dumps(to_dict(cfg), sort_keys=True, default=str) + library_digest() + Path(__file__).read_text()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def branch_table(run_dir: str, data: DataConfig, images: int) -> Dict[str, float]:
    """Through each branch: clean top-1 (all validation images) and top-1 under the training
    attack (FGSM from a random start at ε, made against the branch that is evaluated) on
    ``images`` evenly spaced validation images."""
    suite = SuiteConfig(clean=True, pgd_steps=1, pgd_epsilon=EPSILON, pgd_step=EPSILON, pgd_random_init_prob=1.0,
                        pgd_max_images=images, batch_size=250, num_workers=0)
    out = {}
    for branch in ("main", "aux"):
        sets = evaluate_model(run_dir, suite, data=data, branch=branch)["sets"]
        out[f"clean_{branch}"] = sets["clean"]["top1"]
        out[f"adversarial_{branch}"] = sets["adversarial"]["top1"]
    return out


def train_one(job: dict) -> dict:
    """Train one run (in a worker process) and measure it; its log goes to ``train.log``."""
    import torch

    from fap.checkpoint import list_checkpoints, load_checkpoint_weights
    from fap.models import create_model
    from fap.norm import branch_distance

    torch.set_num_threads(1)
    cfg, arm, size = job["cfg"], job["arm"], job["size"]
    out = Path(cfg.log.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        summary = fap.train(cfg)
        flat = summary["final_eval"]
        row = dict(arm=arm.name, protocol=job["protocol"], seed=cfg.train.seed, epochs=cfg.train.epochs,
                   steps=summary["steps"], image_passes=summary["steps"] * summary["image_passes_per_step"],
                   train_seconds=summary["train_seconds"], top1=summary["top1"],
                   corruption_error=flat["eval/imagenet_c/mean_error"],
                   corruptions={k.split("/")[2]: v for k, v in flat.items() if k.endswith("/error")},
                   pgd=flat["eval/adversarial/top1"], curve=_curve(out), key=job["key"])
        if cfg.model.dual_norm:
            row.update(branch_table(str(out), cfg.data, size.robust_images))
            model = create_model(MODEL["name"], num_classes=10, mean=MODEL["mean"], std=MODEL["std"], dual_norm=True)
            model.load_state_dict(load_checkpoint_weights(list_checkpoints(str(out))[-1]), strict=True)
            row["distance"] = branch_distance(model)
    (out / "result.json").write_text(json.dumps(row))
    return row


def _curve(run_dir: Path) -> List[List[float]]:
    """(epoch, validation top-1) of every evaluation the run made."""
    points = []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["type"] == "eval":
            points.append([record["epoch"], record["top1"]])
    return points


def run_all(size: Size, paths: Dict[str, str], work: Path) -> List[dict]:
    """Every (protocol, arm, seed) and the longer vanilla reference run, ``size.workers`` at a
    time; a finished run whose configuration key (config + fap source) matches is read back."""
    runs = [(p, arm, seed) for p in PROTOCOLS for arm in ARMS for seed in size.seeds
            if not (arm.method == "vanilla" and p == "equal compute")]   # vanilla's run serves both protocols
    runs.append(("reference", ARMS[0], size.seeds[0]))
    jobs, results = [], []
    for protocol, arm, seed in runs:
        cfg = config(arm, protocol, seed, size, paths, work)
        key = config_key(cfg)
        done = Path(cfg.log.output_dir) / "result.json"
        if done.exists() and json.loads(done.read_text()).get("key") == key:
            results.append(json.loads(done.read_text()))
            continue
        shutil.rmtree(cfg.log.output_dir, ignore_errors=True)   # another configuration's leftovers
        jobs.append(dict(cfg=cfg, arm=arm, protocol=protocol, size=size, key=key))
    start = time.time()
    jobs.sort(key=lambda j: -j["cfg"].train.epochs * cost_per_image(j["arm"]))   # longest first
    with futures.ProcessPoolExecutor(size.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for row in pool.map(train_one, jobs):
            results.append(row)
            print(f"{row['protocol']:14} {row['arm']:26} seed {row['seed']}: top-1 {row['top1']:5.2f}, corruption "
                  f"error {row['corruption_error']:5.2f}, PGD-5 {row['pgd']:5.1f} ({row['train_seconds']:.0f} s)",
                  flush=True)
    print(f"{len(jobs)} runs trained, {len(results) - len(jobs)} read back, {(time.time() - start) / 60:.1f} min")
    vanilla = [r for r in results if r["arm"] == "vanilla" and r["protocol"] == "equal epochs"]
    return results + [dict(r, protocol="equal compute") for r in vanilla]


# ------------------------------------------------------------------------------------------
# Reading the results
# ------------------------------------------------------------------------------------------

def values(results, protocol: str, arm: str, key: str) -> np.ndarray:
    rows = sorted((r for r in results if r["protocol"] == protocol and r["arm"] == arm), key=lambda r: r["seed"])
    return np.array([r[key] for r in rows], dtype=float)


def mean_sd(v: np.ndarray) -> str:
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


METRICS = (("top1", "clean top-1 (%)", "↑"), ("corruption_error", "corruption error (%)", "↓"),
           ("pgd", f"PGD-5 top-1, ε = {EPSILON:g}/255 (%)", "↑"))


def results_table(results, protocol: str) -> str:
    """Markdown: every arm, mean ± std over seeds and each seed, for the three columns."""
    lines = [f"| {protocol} | epochs | compute vs vanilla | " + " | ".join(f"{t} {d}" for _, t, d in METRICS) + " |",
             "|---" * (3 + len(METRICS)) + "|"]
    van = values(results, protocol, "vanilla", "image_passes")
    for arm in ARMS:
        v = values(results, protocol, arm.name, "top1")
        if not len(v):
            continue
        ratio = values(results, protocol, arm.name, "image_passes").mean() / van.mean()
        cells = []
        for key, _, _ in METRICS:
            x = values(results, protocol, arm.name, key)
            cells.append(f"{mean_sd(x)} ({', '.join(f'{s:.1f}' for s in x)})")
        lines.append(f"| {arm.name} | {int(values(results, protocol, arm.name, 'epochs')[0])} | {ratio:.2f}× | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(results, protocol: str, a: str, b: str, key: str) -> dict:
    """``a − b`` per seed (same seed: same initial weights and data order) and whether it exceeds
    the spread: every seed's difference has the same sign and the mean difference is larger than
    the larger of the two arms' seed standard deviations."""
    x, y = values(results, protocol, a, key), values(results, protocol, b, key)
    d = x - y
    spread = max(x.std(ddof=1), y.std(ddof=1)) if len(x) > 1 else float("nan")
    resolved = bool(len(d) > 1 and (np.all(d > 0) or np.all(d < 0)) and abs(d.mean()) > spread)
    return dict(mean=d.mean(), per_seed=d, spread=spread, resolved=resolved)


def comparison_table(results, pairs: Sequence[tuple]) -> str:
    lines = ["| protocol | comparison | " + " | ".join(f"Δ {t}" for _, t, _ in METRICS) + " |",
             "|---" * (2 + len(METRICS)) + "|"]
    for protocol in PROTOCOLS:
        for a, b in pairs:
            cells = []
            for key, _, _ in METRICS:
                c = compare(results, protocol, a, b, key)
                mark = " **(exceeds spread)**" if c["resolved"] else ""
                cells.append(f"{c['mean']:+.2f} [{', '.join(f'{v:+.1f}' for v in c['per_seed'])}]; "
                             f"spread {c['spread']:.2f}{mark}")
            lines.append(f"| {protocol} | {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def branch_summary(results, protocol: str) -> str:
    """The 2x2 per dual-norm arm: rows clean / adversarial images, columns main / aux norms."""
    lines = ["| arm | images | main norms | auxiliary norms |", "|---|---|---|---|"]
    for arm in ARMS:
        if "clean_main" not in next((r for r in results if r["arm"] == arm.name), {}):
            continue
        for images in ("clean", "adversarial"):
            cells = [mean_sd(values(results, protocol, arm.name, f"{images}_{b}")) for b in ("main", "aux")]
            lines.append(f"| {arm.name} | {images} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------

def plot_curves(results, ax) -> None:
    """Vanilla's validation top-1 after every epoch: the runs of the experiment, and the longer reference."""
    rows = [r for r in results if r["arm"] == "vanilla" and r["protocol"] in ("equal epochs", "reference")]
    for r in sorted(rows, key=lambda r: (r["protocol"], r["seed"])):
        xs, ys = zip(*r["curve"])
        label = (f"{r['epochs']}-epoch schedule (reference), seed {r['seed']}" if r["protocol"] == "reference"
                 else f"{r['epochs']}-epoch schedule (the experiment), seed {r['seed']}")
        ax.plot(xs, ys, marker="o", ms=3, ls="--" if r["protocol"] == "reference" else "-", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_arms(results, axes) -> None:
    """One panel per protocol x metric: every seed as a dot, the mean as a bar-free marker with
    its standard deviation (dot plots: no bar baseline to truncate)."""
    names = [a.name for a in ARMS]
    for i, protocol in enumerate(PROTOCOLS):
        for j, (key, title, better) in enumerate(METRICS):
            ax = axes[i][j]
            for k, name in enumerate(names):
                v = values(results, protocol, name, key)
                if not len(v):
                    continue
                ax.scatter([k] * len(v), v, color="k", s=12, zorder=3)
                ax.errorbar(k, v.mean(), yerr=v.std(ddof=1) if len(v) > 1 else 0, fmt="D", ms=7, capsize=4,
                            color=f"C{k}", zorder=2)
            ax.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=7)
            ax.set_title(f"{protocol}: {title}, {better} better", fontsize=9)
            ax.grid(axis="y", alpha=0.3)


def batch_statistics(model, images, layers: Sequence[str]):
    """Per channel, the batch mean and variance of each named norm layer's input for ``images``."""
    import torch

    stats, hooks = {}, []
    modules = dict(model.named_modules())
    for name in layers:
        def hook(module, args, name=name):
            x = args[0].detach().float()
            stats[name] = (x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3)))
        hooks.append(modules[name].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    return stats
