"""The demo: vanilla training and Fast AdvProp side by side, on fap's built-in images, on a CPU.

    make demo
    # = accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no recipes/demo.py

It generates the demo dataset on first use (`fap.data.make_demo`: 10 classes of drawn
shapes and textures in clutter, 48 x 48 px JPEGs, 5000 training and 1000 validation
images in the ImageNet folder layout), trains a small ResNet twice with the same compute
budget, prints the two results side by side and saves ``runs/demo/demo.png``
(validation top-1 against compute spent, and the corruption errors) and
``runs/demo/demo.json``.

The comparison is the paper's (Mei et al., ICLR 2022, Table 1), scaled down:

* vanilla: 12 epochs at a loader batch of 128;
* Fast AdvProp: the same 128 clean images per step plus 32 for the adversarial split
  (p_adv = 0.2, loader batch 160): 1.2x the image-passes per step, so 12 / 1.2 = 10
  epochs (`fap.methods.budget_matched`), 1.0x vanilla's compute over the run. Auxiliary
  BN statistics in groups of 16 give Shuffling BN two groups to mix on one process.

Both runs end with a robustness column, the paper's other half: the unnormalised mean
top-1 error on a corrupted copy of the validation set (`corrupted_copy`: 200 images under
the 15 ImageNet-C corruptions at severities 1-5, made with `fap data corrupt` on first use
and cached beside the data).

The model is timm's ``test_resnet`` (0.37 M parameters, BatchNorm), AdamW, 40 px random
crops and flips: of what we tried, what learns most in a few CPU minutes on these images.
The README ("Set-up") has the measured table and what it does and does not show: at this
toy scale the model is far from converged and Fast AdvProp trails vanilla, on clean and on
corrupted images. Tutorial 02 is the controlled experiment.
"""
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

import fap
import fap.cli
from fap.data import DataConfig, make_demo
from fap.evaluation.config import SuiteConfig
from fap.methods import CONFIGS, budget_matched

VANILLA_EPOCHS, CLEAN_BATCH = 12, 128
LOADER_WORKERS = 1
# The corrupted copy: the first 20 validation images of each class (200), under the 15
# ImageNet-C corruptions at 5 severities each (15,000 images, made once).
CORRUPTED_PER_CLASS = 20
METHODS = ("vanilla", "fast_advprop")
LABELS = {"vanilla": "vanilla", "fast_advprop": "Fast AdvProp"}


def config(method: str, out_dir: str = "runs/demo") -> fap.TrainConfig:
    method_cfg = CONFIGS[method]()
    if method == "fast_advprop":
        batch = round(CLEAN_BATCH / (1 - method_cfg.p_adv))   # 160 = 128 clean + 32 adversarial
        epochs, _ = budget_matched(VANILLA_EPOCHS, p_adv=method_cfg.p_adv)
    else:
        batch, epochs = CLEAN_BATCH, VANILLA_EPOCHS
    return fap.TrainConfig(
        train=fap.RunSection(name=f"demo_{method}", epochs=epochs, batch_size=batch, reference_epochs=VANILLA_EPOCHS,
                             seed=0),
        data=DataConfig(source="demo", path="data/demo", image_size=40, crop_pct=40 / 48, scale=(0.6, 1.0),
                        hflip=0.5, num_workers=LOADER_WORKERS),
        model=fap.ModelConfig(name="test_resnet", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                              dual_norm=method != "vanilla", aux_group_size=16 if method != "vanilla" else None),
        method=method_cfg,
        # 2e-3 per 128 clean images: lr_base_size is the loader batch that holds them.
        optim=fap.OptimConfig(opt="adamw", lr=2e-3, lr_base_size=batch, weight_decay=0.05),
        sched=fap.ScheduleConfig(sched="cosine", warmup_epochs=0.5, warmup_lr=1e-4),
        checkpoint=fap.CheckpointConfig(every_steps=0, every_epochs=0),   # a demo: nothing to resume
        log=fap.LogConfig(output_dir=f"{out_dir}/{method}", every_steps=10),
        # Filled in by main() once the corrupted copy exists (`corrupted_copy`).
        final_eval=SuiteConfig(clean=False, batch_size=250, num_workers=LOADER_WORKERS),
    )


def smoke(cfg: fap.TrainConfig) -> fap.TrainConfig:
    """Two updates per method on tiny images."""
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, epochs=2, batch_size=20, max_steps=2, reference_epochs=None),
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


def eval_curve(run_dir: Path, image_passes_per_epoch: float):
    """(compute in vanilla epochs, top-1) after each evaluation of a run."""
    points = []
    passes_per_step = None
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["type"] == "train":
            passes_per_step = record["image_passes_per_step"]
        elif record["type"] == "eval" and passes_per_step:
            points.append((record["step"] * passes_per_step / image_passes_per_epoch, record["top1"]))
    return points


def corruption_errors(summary) -> dict:
    """``{corruption: top-1 error (%)}`` of a run's final evaluation on the corrupted copy."""
    flat = summary.get("final_eval") or {}
    prefix, suffix = "eval/imagenet_c/", "/error"
    return {k[len(prefix):-len(suffix)]: v for k, v in flat.items() if k.startswith(prefix) and k.endswith(suffix)}


def plot(summaries, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    for method, s in summaries.items():
        # One vanilla epoch = one forward+backward pass per training image.
        points = eval_curve(Path(s["output_dir"]), s["updates_per_epoch"] * s["batch_size"])
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o",
                    label=f"{LABELS[method]}: top-1 {s['top1']:.1f}%, {s['cost_ratio_run']:.2f}x vanilla's compute")
    ax.set_xlabel("compute spent (vanilla epochs: one forward+backward per training image)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("clean validation images, same compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    errors = {m: corruption_errors(s) for m, s in summaries.items()}
    names = sorted(set.intersection(*(set(e) for e in errors.values()))) if errors else []
    width = 0.8 / max(1, len(errors))
    for i, (method, err) in enumerate(errors.items()):
        mean = summaries[method]["final_eval"].get("eval/imagenet_c/mean_error")
        values = [err[n] for n in names] + ([mean] if mean is not None else [])
        bx.bar([j + i * width for j in range(len(values))], values, width, label=LABELS[method])
    bx.set_xticks([j + width * (len(errors) - 1) / 2 for j in range(len(names) + 1)])
    bx.set_xticklabels([n.replace("_", " ") for n in names] + ["mean"], rotation=60, ha="right", fontsize=8)
    bx.set_ylabel("top-1 error (%), severities 1-5")
    bx.set_ylim(0, 100)
    bx.set_title(f"corrupted validation copy ({CORRUPTED_PER_CLASS} images per class), lower is better")
    bx.grid(alpha=0.3, axis="y")
    bx.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(summaries) -> str:
    mean_error = lambda s: (s.get("final_eval") or {}).get("eval/imagenet_c/mean_error")  # noqa: E731
    rows = [
        ("epochs", lambda s: f"{s['epochs']}"),
        ("loader batch", lambda s: f"{s['batch_size']}"),
        ("validation top-1 (%)", lambda s: f"{s['top1']:.2f}"),
        ("validation top-5 (%)", lambda s: f"{s['top5']:.2f}"),
        ("corruption error, mean (%)", lambda s: "-" if mean_error(s) is None else f"{mean_error(s):.2f}"),
        ("image-passes per step", lambda s: f"{s['image_passes_per_step']}"),
        ("cost vs vanilla, per step", lambda s: f"{s['cost_ratio_per_step']:.2f}x"),
        ("cost vs vanilla, whole run", lambda s: f"{s['cost_ratio_run']:.2f}x"),
        ("wall time (s)", lambda s: f"{s['train_seconds']:.0f}"),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [" " * width + "".join(f"{LABELS[m]:>16}" for m in summaries)]
    lines += [name.ljust(width) + "".join(f"{fn(s):>16}" for s in summaries.values()) for name, fn in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        # One thread for the model's arithmetic per core not decoding images: OpenMP threads
        # that outnumber the cores wait on each other (2 threads + 2 loader workers on 2
        # cores ran 10x slower than 1 + 1 here).
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - LOADER_WORKERS))
    summaries = {}
    out_dir = None
    import accelerate

    for method in METHODS:
        cfg = fap.parse_args(config(method), argv, smoke=smoke)
        if not cfg.final_eval.imagenet_c:
            state = accelerate.PartialState()
            if state.is_main_process:
                corrupted_copy(cfg.data, cfg.final_eval.corruptions)
            state.wait_for_everyone()
            corrupted = corrupted_copy(cfg.data, cfg.final_eval.corruptions)  # complete now: reused
            cfg = dataclasses.replace(cfg, final_eval=dataclasses.replace(cfg.final_eval, imagenet_c=corrupted))
        if out_dir is None:
            # --log.output_dir names the demo's directory; each method gets a sub-directory.
            given = next((a.split("=", 1)[1] for a in argv if a.startswith("--log.output_dir=")), None)
            out_dir = Path(given or "runs/demo")
        cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, output_dir=str(out_dir / method)))
        summaries[method] = fap.train(cfg)
    if accelerate.PartialState().is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "demo.json").write_text(json.dumps(summaries, indent=1))
        path = plot(summaries, out_dir)
        print("\n" + table(summaries) + f"\n\nplot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(fap.cli.run_main(main))  # a mistake in the arguments: one line and status 2 (--debug: traceback)
