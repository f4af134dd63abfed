"""Pilot runs that chose tutorial 02's schedule: vanilla only, seed 0, full-size data.

Tutorial 02 asks for a vanilla schedule whose validation curve has flattened, inside about an
hour for the whole notebook on two cores. These runs measured vanilla alone, varying the
loader batch, the learning rate, the image size, the training-set size and the number of
epochs; no adversarial arm was run. Each job is ``(train images, batch, epochs, lr, image
size)``; everything else is tutorial 02's vanilla configuration (`_disentangled.config`).

    cd tutorials && python pilots/02_schedule.py            # every job, two at a time
    cd tutorials && python pilots/02_schedule.py bs128_e18_lr4e-3 bs128_e36_lr4e-3

Results (final and per-epoch validation top-1, train seconds) are appended to
``pilots/02_schedule.jsonl``; ``pilots/02_schedule.md`` is the committed record.
"""
import contextlib
import dataclasses
import json
import multiprocessing
import sys
from concurrent import futures
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

JOBS = {   # name: (train images, loader batch, epochs, AdamW lr, image size)
    "bs128_e12_lr2e-3": (3840, 128, 12, 2e-3, 32),   # the previous notebook's schedule
    "bs128_e30_lr2e-3": (3840, 128, 30, 2e-3, 32),   # the previous notebook's reference
    "bs64_e12_lr2e-3": (3840, 64, 12, 2e-3, 32),
    "bs64_e18_lr2e-3": (3840, 64, 18, 2e-3, 32),
    "bs64_e36_lr2e-3": (3840, 64, 36, 2e-3, 32),
    "bs32_e12_lr2e-3": (3840, 32, 12, 2e-3, 32),
    "bs32_e18_lr2e-3_px28": (3840, 32, 18, 2e-3, 28),
    "n1920_bs64_e24_lr2e-3": (1920, 64, 24, 2e-3, 32),
    "n1920_bs64_e48_lr2e-3": (1920, 64, 48, 2e-3, 32),
    "bs128_e12_lr1e-3": (3840, 128, 12, 1e-3, 32),
    "bs128_e12_lr4e-3": (3840, 128, 12, 4e-3, 32),
    "bs128_e12_lr8e-3": (3840, 128, 12, 8e-3, 32),
    "bs128_e18_lr4e-3": (3840, 128, 18, 4e-3, 32),
    "bs128_e36_lr4e-3": (3840, 128, 36, 4e-3, 32),
}
WORK = HERE.parent / "runs" / "pilots"


def run(name: str) -> dict:
    import torch

    import _disentangled as D
    import fap
    from fap.data.fashion_mnist import DEFAULT_SRC, convert_fashion_mnist

    torch.set_num_threads(1)
    n, batch, epochs, lr, px = JOBS[name]
    data = WORK / f"fmnist_{n}"
    convert_fashion_mnist(str(data), src=DEFAULT_SRC, max_train=n, max_val=None)
    paths = {"path": str(data), "corrupted": ""}
    cfg = D.config(D.ARMS[0], "reference", 0, D.SIZES["full"], paths, WORK)
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, epochs=epochs, batch_size=batch, reference_epochs=epochs),
        data=dataclasses.replace(cfg.data, image_size=px),
        optim=dataclasses.replace(cfg.optim, lr=lr, lr_base_size=batch),
        checkpoint=dataclasses.replace(cfg.checkpoint, every_epochs=epochs),
        final_eval=dataclasses.replace(cfg.final_eval, imagenet_c="", pgd_steps=0, clean=True),
        log=dataclasses.replace(cfg.log, output_dir=str(WORK / name)))
    out = Path(cfg.log.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        summary = fap.train(cfg)
    return dict(name=name, images=n, batch=batch, epochs=epochs, lr=lr, image_size=px, top1=summary["top1"],
                train_seconds=round(summary["train_seconds"], 1), curve=[p[1] for p in D._curve(out)])


if __name__ == "__main__":
    names = sys.argv[1:] or list(JOBS)
    with futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        for row in pool.map(run, names):
            print(json.dumps(row), flush=True)
            with open(HERE / "02_schedule.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
