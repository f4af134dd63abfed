"""A numerics fingerprint of the library: what fap computes, not how its source reads.

Committed results (the tutorials' outputs, an experiment's runs) stay valid while the library
computes the same numbers. `probe` computes a few hundred named float64 numbers that cover
the arithmetic those results depend on, in well under a minute on a CPU:

* two SGD updates of timm's ``test_resnet`` (float64, fixed weights and images) with every
  method x norm mode: vanilla; Fast AdvProp dual / shared / mixed (Mei et al., ICLR 2022);
  AdvProp dual / shared / mixed, PGD-1 toward a random label (Xie et al., CVPR 2020): each
  step's reported losses and counts, then every parameter's and buffer's sum of squares
  (so loss weights, per-group normalisation, routing, the attacks, random starts, Shuffling
  BN and the BN statistics all leave a mark);
* evaluation through the main norms of the vanilla model: the logits of clean images, and
  of the same images under PGD-3 from a random start (`fap.attacks.pgd`);
* the corruptions (`fap.data.corrupt.corrupt_image`) of one image, each at severity 3, and
  the corrupted-copy writer (`fap.data.corrupt.make_corrupted`) on two images.

`compare` reports the probes that moved by more than ``rtol`` (1e-9: a loss weight changed by
1e-6 moves many of them, while float64 rounding across CPUs does not); `fingerprint` is a
short hash of the probes rounded to 8 significant digits, for stamps and cache keys.

What it cannot see: numbers computed only in float32/bf16 (the probes run in float64), data
loading and augmentation, the engine's schedule, optimizers other than SGD, the evaluation
suite's folder handling, DDP/DeepSpeed/FSDP2, and detection.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

__all__ = ["probe", "fingerprint", "compare", "RTOL"]

RTOL = 1e-9
METHODS: Tuple[Tuple[str, str], ...] = (("vanilla", "dual"), ("fast_advprop", "dual"), ("fast_advprop", "shared"),
                                        ("fast_advprop", "mixed"), ("advprop", "dual"), ("advprop", "shared"),
                                        ("advprop", "mixed"))
CLASSES, BATCH, SIZE = 4, 20, 32


def probe() -> Dict[str, float]:
    """The named numbers (float64) described in the module docstring."""
    import torch

    out: Dict[str, float] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method, norms in METHODS:
            model = _train(method, norms, out)
            if method == "vanilla":
                _evaluate(model, out)
        _corruptions(out)
    finally:
        torch.set_num_threads(threads)
    return out


def _data(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.rand(BATCH, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
    return images, labels


def _train(method: str, norms: str, out: Dict[str, float]):
    import dataclasses

    import torch

    from fap.methods import CONFIGS, build_method
    from fap.models import create_model

    cfg = CONFIGS[method]()
    if method != "vanilla":
        cfg = dataclasses.replace(cfg, norms=norms, epsilon=8.0)
    if method == "fast_advprop" and norms != "dual":
        cfg = dataclasses.replace(cfg, shuffle=False)  # one set of norms: no BN groups to shuffle across
    if method == "advprop":
        cfg = dataclasses.replace(cfg, attack_steps=1, num_classes=CLASSES)
    dual = method == "vanilla" or norms == "dual"
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=CLASSES, dual_norm=dual,
                         aux_group_size=2 if method == "fast_advprop" and dual else None).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    m = build_method(method, cfg)
    model.train()
    name = f"{method}/{norms}" if method != "vanilla" else "vanilla"
    for step in range(2):
        images, labels = _data(step)
        torch.manual_seed(100 + step)
        metrics = m.train_step(model, images, labels, backward=lambda loss: loss.backward())
        opt.step()
        opt.zero_grad()
        for k, v in sorted(metrics.items()):
            out[f"{name}/step{step}/{k}"] = float(v)
    for k, t in sorted(model.state_dict().items()):
        if t.is_floating_point():
            out[f"{name}/state/{k}"] = float((t.double() ** 2).sum())
    return model


def _evaluate(model, out: Dict[str, float]) -> None:
    import torch

    from fap.attacks import pgd
    from fap.norm import route

    images, labels = _data(7)
    model.eval()
    with route(model, "main"):
        with torch.no_grad():
            clean = model(images)
        x_adv = pgd(model, images, labels, epsilon=8.0, steps=3, random_init_prob=1.0,
                    generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            adv = model(x_adv)
    out["eval/clean/logits"] = float((clean ** 2).sum())
    out["eval/clean/correct"] = float((clean.argmax(1) == labels).sum())
    out["eval/pgd/perturbation"] = float(((x_adv - images) ** 2).sum())
    out["eval/pgd/logits"] = float((adv ** 2).sum())
    out["eval/pgd/correct"] = float((adv.argmax(1) == labels).sum())


def _corruptions(out: Dict[str, float]) -> None:
    import numpy as np
    from PIL import Image

    from fap.data.corrupt import CORRUPTIONS, corrupt_image, make_corrupted

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    for name in CORRUPTIONS:
        pixels = np.asarray(corrupt_image(image, name, 3, seed=0), dtype=np.float64)
        out[f"corrupt/{name}/s3"] = float((pixels ** 2).sum())
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "val" / "c0"
        src.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(src / f"{i}.png")
        root = make_corrupted(str(Path(tmp) / "val"), str(Path(tmp) / "c"), corruptions=["gaussian_noise", "fog"],
                              severities=[2], num_workers=0, progress=False)
        for f in sorted(Path(root).rglob("*.*")):
            if f.suffix.lower() in (".png", ".jpg", ".jpeg"):
                pixels = np.asarray(Image.open(f).convert("RGB"), dtype=np.float64)
                out[f"corrupted_copy/{f.relative_to(root)}"] = float((pixels ** 2).sum())


def fingerprint(values: Dict[str, float]) -> str:
    """16 hex digits of the probes rounded to 8 significant digits (stable across CPUs)."""
    text = json.dumps({k: _round(v) for k, v in sorted(values.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _round(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.8g}"


def compare(reference: Dict[str, float], now: Dict[str, float], *, rtol: float = RTOL) -> List[str]:
    """Names of the probes that differ (missing, new, or moved by more than ``rtol``)."""
    moved = sorted(set(reference) ^ set(now))
    for k in sorted(set(reference) & set(now)):
        a, b = reference[k], now[k]
        if not (a == b or abs(a - b) <= rtol * max(abs(a), abs(b))):
            moved.append(k)
    return moved
