"""What only a detection run has (Mei et al., ICLR 2022, Table 7): its data, model and export.

A detection run is an ordinary run of `fap.engine.train` with ``task="detection"``: the
engine, config, methods, checkpoints, EMA, pre-emption and logging are the classification
run's. `fap.tasks.DetectionTask` calls this module for the three things that are RetinaNet's:

* `build_data`: COCO-format images and boxes (`fap.data.coco`) in `GlobalBatches`; the demo
  detection set (``data.source="demo-det"``) is made on first use;
* `build_model`: torchvision's RetinaNet-FPN with trainable, dual BatchNorm
  (`fap.detection.model`), optionally with a local trunk (``detection.backbone_weights``);
* `export_detector`: a plain torchvision RetinaNet (aux norms stripped) and its ``config.json``.

Sharding: every process reads its own slice of the same global batch (`GlobalBatches`):
micro-batch ``j`` of process ``r`` is slice ``j·world + r`` of it. One process with
``accum_steps = 2`` therefore sees exactly the micro-batches that two processes see, each
normalised by its own BatchNorm batch, and the update is the same (tested).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch

from fap.checks import ConfigError

__all__ = ["GlobalBatches", "build_data", "build_model", "detection_arch", "export_detector"]


class GlobalBatches:
    """This process's micro-batches of each global batch (see the module docstring).

    Args:
        n: dataset size.
        batch_size: the global batch (all processes, all micro-batches); the last partial one is dropped.
        world, rank, accum_steps: processes, this process, micro-batches per update.
        seed: the order of epoch ``e`` is ``randperm(n)`` seeded with ``(seed, e)``.
    """

    def __init__(self, n: int, batch_size: int, *, world: int = 1, rank: int = 0, accum_steps: int = 1,
                 seed: int = 0):
        if batch_size % (world * accum_steps) or batch_size > n:
            raise ConfigError(f"train.batch_size={batch_size} must divide into processes ({world}) x accum_steps "
                              f"({accum_steps}) and not exceed the {n} training images")
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world, rank
        self.accum, self.seed, self.epoch = accum_steps, seed, 0
        self.micro = batch_size // (world * accum_steps)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return (self.n // self.batch_size) * self.accum

    def __iter__(self) -> Iterator[List[int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for start in range(0, self.n - self.batch_size + 1, self.batch_size):
            batch = order[start:start + self.batch_size]
            for j in range(self.accum):
                k = j * self.world + self.rank
                yield batch[k * self.micro:(k + 1) * self.micro]


def build_data(cfg, *, world: int, rank: int) -> Tuple[torch.utils.data.DataLoader, object, int]:
    """(training loader of `GlobalBatches`, the validation `CocoDetection`, number of classes)."""
    from fap.data.coco import dataset_for, detection_collate, num_classes_of

    d = cfg.data
    if not d.path:
        raise ConfigError("data.path is empty: point the run at a COCO-format root (DIR/<split>/images, "
                          "DIR/annotations/instances_<split>.json), or --data.source=demo-det --data.path=data/demo-det")
    if d.source == "demo-det" and not os.path.isdir(d.path):
        from fap.data.demo_det import make_demo_det

        make_demo_det(d.path)
    t = cfg.train
    train_set = dataset_for(d.path, d.train_split, flip_prob=cfg.detection.flip_prob, seed=t.seed)
    val_set = dataset_for(d.path, d.val_split)
    sampler = GlobalBatches(len(train_set), t.batch_size, world=world, rank=rank, accum_steps=t.accum_steps,
                            seed=t.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=d.num_workers,
                                         collate_fn=detection_collate)
    return loader, val_set, cfg.model.num_classes or num_classes_of(train_set.coco)


def detection_arch(detection, num_classes: int) -> Dict:
    """What an export records to rebuild the network: the ``detection`` section (or its dict) and the classes."""
    get = detection.get if isinstance(detection, dict) else functools.partial(getattr, detection)
    return {"backbone": get("backbone"), "num_classes": num_classes, "min_size": get("min_size"),
            "max_size": get("max_size")}


def build_model(cfg, num_classes: int):
    """The `Detector`: RetinaNet, optional local trunk weights, dual BatchNorm (``model.dual_norm``)."""
    from fap.detection.model import Detector, plain_retinanet
    from fap.norm import convert_dual_norm

    d = cfg.detection
    net = plain_retinanet(num_classes, backbone=d.backbone, min_size=d.min_size, max_size=d.max_size)
    if d.backbone_weights:
        _load_trunk(net, d.backbone_weights)
    if cfg.model.dual_norm:
        convert_dual_norm(net, aux_group_size=cfg.model.aux_group_size)
    return Detector(net, detection_arch(d, num_classes))


def _load_trunk(net, path: str) -> None:
    """Load a ResNet state dict (timm and torchvision share the names) into the FPN's trunk; fc is dropped."""
    if not os.path.isfile(path):
        raise ConfigError(f"detection.backbone_weights={path!r}: no such file (a .safetensors or .pt ResNet "
                          "state dict)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = {k[len("net."):] if k.startswith("net.") else k: v for k, v in sd.items()}  # a fap PixelModel's keys
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    missing, unexpected = net.backbone.body.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(f"detection.backbone_weights={path}: not a {type(net.backbone.body).__name__} ResNet "
                          f"trunk (missing {missing[:3]}, unexpected {unexpected[:3]})")


def export_detector(state_dict: Dict[str, torch.Tensor], out_dir: Path, *, arch: Dict) -> Path:
    """``model.safetensors`` (aux norms stripped: a plain torchvision RetinaNet, loaded strictly
    to check) and ``config.json`` (``task: detection`` and the `detection_arch`) in ``out_dir``.

    Args:
        state_dict: a `Detector`'s weights (keys ``net.*``), e.g. a run's or a checkpoint's.
    """
    from safetensors.torch import save_file

    from fap.detection.model import plain_retinanet
    from fap.norm import strip_aux

    net_sd = {k[len("net."):]: v for k, v in state_dict.items() if k.startswith("net.")}
    sd = {k: v.detach().cpu().contiguous() for k, v in strip_aux(net_sd).items()}
    plain_retinanet(arch["num_classes"], backbone=arch["backbone"], min_size=arch["min_size"],
                    max_size=arch["max_size"]).load_state_dict(sd, strict=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps({"task": "detection", "arch": arch}, indent=1))
    return out_dir
