"""The demo: vanilla training and Fast AdvProp side by side, on fap's built-in images, on a CPU.

    make demo
    # = accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no recipes/demo.py

It generates the demo dataset on first use (fap.data.make_demo: 10 classes of drawn shapes
and textures in clutter, 48 x 48 px, 3000 training and 1000 validation images, ImageNet
folder layout, about 30 s), trains a small ResNet twice with the same budget of compute,
prints the two results side by side and saves ``runs/demo/demo.png`` (validation top-1
against compute spent). On a 2-core CPU the whole job takes about 5 minutes.

The comparison is the paper's, scaled down (Mei et al., ICLR 2022, Table 1):

* vanilla: 10 epochs at a batch of 128;
* Fast AdvProp: the same 128 clean images per step plus 32 for the adversarial split
  (p_adv = 0.2, batch 160), 1 + p_adv = 1.2x the image-passes per step, so 10 / 1.2 -> 8
  epochs (`fap.methods.budget_matched`): 0.96x vanilla's compute in total. Auxiliary BN
  statistics in groups of 16 give Shuffling BN two groups to mix on one process.

What to expect (measured, see the README's demo section for the exact numbers of a run):
the two reach similar validation accuracy at the same compute, which is the paper's claim
(76.2 vs 76.5 on ImageNet); a few epochs on 3000 images are too few to resolve a 0.3-point
difference, so do not read the sign of the gap from one run.
"""
import dataclasses
import json
import os
import sys
from pathlib import Path

import fap
from fap.data import DataConfig
from fap.methods import CONFIGS, budget_matched

VANILLA_EPOCHS, CLEAN_BATCH = 10, 128
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
        data=DataConfig(source="demo", path="data/demo", image_size=48, crop_pct=1.0, scale=(0.25, 1.0),
                        hflip=0.5, num_workers=2),
        # A ResNet-18 at half width: small enough for a CPU, with BatchNorm for the dual norms.
        model=fap.ModelConfig(name="resnet18", kwargs={"channels": [32, 64, 128, 256]},
                              dual_norm=method != "vanilla", aux_group_size=16 if method != "vanilla" else None),
        method=method_cfg,
        optim=fap.OptimConfig(opt="momentum", lr=0.2, lr_base_size=batch, momentum=0.9, weight_decay=5e-4),
        sched=fap.ScheduleConfig(sched="cosine", warmup_epochs=1, warmup_lr=0.02),
        checkpoint=fap.CheckpointConfig(every_steps=0, every_epochs=0),   # a demo: nothing to resume
        log=fap.LogConfig(output_dir=f"{out_dir}/{method}", every_steps=5),
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
    )


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


def plot(summaries, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, s in summaries.items():
        # One vanilla epoch = one forward+backward pass per training image.
        points = eval_curve(Path(s["output_dir"]), s["updates_per_epoch"] * s["batch_size"])
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o",
                    label=f"{LABELS[method]}: top-1 {s['top1']:.1f}%, {s['cost_ratio_run']:.2f}x vanilla's compute")
    ax.set_xlabel("compute spent (vanilla epochs: one forward+backward per training image)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("fap demo: same compute, vanilla vs Fast AdvProp")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "demo.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(summaries) -> str:
    rows = [
        ("epochs", lambda s: f"{s['epochs']}"),
        ("loader batch", lambda s: f"{s['batch_size']}"),
        ("validation top-1 (%)", lambda s: f"{s['top1']:.2f}"),
        ("validation top-5 (%)", lambda s: f"{s['top5']:.2f}"),
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
    summaries = {}
    out_dir = None
    for method in METHODS:
        cfg = fap.parse_args(config(method), argv, smoke=smoke)
        if out_dir is None:
            # --log.output_dir names the demo's directory; each method gets a sub-directory.
            given = next((a.split("=", 1)[1] for a in argv if a.startswith("--log.output_dir=")), None)
            out_dir = Path(given or "runs/demo")
        cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, output_dir=str(out_dir / method)))
        summaries[method] = fap.train(cfg)
    import accelerate

    if accelerate.PartialState().is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "demo.json").write_text(json.dumps(summaries, indent=1))
        path = plot(summaries, out_dir)
        print("\n" + table(summaries) + f"\n\nplot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
