"""Issue 18's table: is a run resumed mid-epoch bitwise equal to the uninterrupted run?

``python tests/resume_table.py ROW [ROW ...]`` (rows: the keys of ``ROWS``; ``all`` for every
one). Data: ``make_demo(image_size=32, train_per_class=12)`` (120 images), as a folder, read
through HF ``datasets`` or written to FFCV. Run: timm ``test_resnet``, 6 epochs of 6 updates
(batch 20), a checkpoint every 2 updates; then a second run resumed from the first one's
``step_00000022`` (epoch 3, after its 4th update; ``RESUME_STEP`` picks another), and the two
exports compared bitwise. Work files in ``$REPRO_DIR`` (default ``/tmp/fap_resume_table``).
Runs on CPU in about 12 s a row (FFCV rows 40-170 s: numba compiles its pipeline each epoch).
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

WORK = Path(os.environ.get("REPRO_DIR", "/tmp/fap_resume_table"))
PY = sys.executable
BASE = {"train.name": "r", "train.seed": 0, "train.epochs": 6, "train.batch_size": 20, "data.source": "folder",
        "data.image_size": 32, "data.crop_pct": 1.0, "model.name": "test_resnet", "model.mean": "0.5,0.5,0.5",
        "model.std": "0.25,0.25,0.25", "optim.opt": "momentum", "optim.lr": 0.05, "optim.lr_base_size": 0,
        "sched.sched": "cosine", "sched.warmup_epochs": 0.5, "log.trackers": "", "log.progress": "false",
        "checkpoint.every_steps": 2, "checkpoint.keep": 0, "checkpoint.every_epochs": 0}
ROWS = {
    "vanilla-w0": {"method": "vanilla", "data.num_workers": 0},
    "vanilla-w1": {"method": "vanilla", "data.num_workers": 1},
    "vanilla-w2": {"method": "vanilla", "data.num_workers": 2},
    "fap-w0": {"method": "fast_advprop", "data.num_workers": 0},
    "fap-w1": {"method": "fast_advprop", "data.num_workers": 1},
    "fap-w2-randaug-mixup": {"method": "fast_advprop", "data.num_workers": 2,
                             "data.auto_augment": "rand-m9-mstd0.5-inc1", "mixup.mixup_alpha": 0.8,
                             "mixup.cutmix_alpha": 1.0},
    "vanilla-deterministic": {"method": "vanilla", "data.num_workers": 0, "data.scale": "1.0,1.0", "data.hflip": 0.0},
    "vanilla-hf-w1": {"method": "vanilla", "data.num_workers": 1, "data.source": "hf"},
    "fap-hf-w2": {"method": "fast_advprop", "data.num_workers": 2, "data.source": "hf"},
    "vanilla-ffcv": {"method": "vanilla", "data.num_workers": 1, "data.source": "ffcv"},
    "fap-ffcv": {"method": "fast_advprop", "data.num_workers": 2, "data.source": "ffcv"},
}


def data(source):
    from fap.data import make_demo
    demo = WORK / "demo"
    make_demo(str(demo), image_size=32, train_per_class=12, val_per_class=4, num_workers=0)
    if source != "ffcv":
        return demo
    betons = WORK / "betons"
    if not (betons / "val.beton").exists():
        from fap.data.ffcv import convert_to_betons
        convert_to_betons(str(demo), str(betons), num_workers=1)
    return betons


def train(out, row, **extra):
    args = {**BASE, **ROWS[row], "data.path": str(data(ROWS[row].get("data.source", "folder"))),
            "log.output_dir": str(out), **extra}
    method = args.pop("method")
    cmd = [PY, "-m", "fap.engine", "--method", method] + [f"--{k}={v}" for k, v in args.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{row}: failed\n{p.stderr[-3000:]}")


def equal(a, b):
    ea, eb = load_file(str(a / "export" / "model.safetensors")), load_file(str(b / "export" / "model.safetensors"))
    return ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


rows = list(ROWS) if sys.argv[1:] == ["all"] else sys.argv[1:]
print("| row | export bitwise equal to the straight run | time |\n|---|---|---|", flush=True)
for row in rows:
    t = time.time()
    straight, resumed = WORK / row / "straight", WORK / row / "resumed"
    shutil.rmtree(WORK / row, ignore_errors=True)
    train(straight, row)
    step = int(os.environ.get("RESUME_STEP", 22))
    train(resumed, row, **{"checkpoint.resume": str(straight / "checkpoints" / f"step_{step:08d}")})
    print(f"| {row} | {'yes' if equal(straight, resumed) else 'no'} | {time.time() - t:.0f}s |", flush=True)
