"""What differs between tasks (classification, detection); one engine and one set of methods serve both.

Following timm's task objects: a task owns what differs between tasks, one loop owns the rest.
Its *step half* is what a method needs: how to read targets and compute the loss. Its *run
half* is what the engine (`fap.engine`) needs: building the data and the model, the
evaluation that gives the run's headline metric (top-1 or COCO mAP), the final evaluation
suite, and the export. The engine picks the task by ``cfg.task`` (`get_task`) and never
names one.

Vanilla, AdvProp and Fast AdvProp (Mei et al., ICLR 2022) are the same passes whatever
the model predicts; only "loss of these images against these targets" changes. A task
object says that, so the methods (`fap.methods`) drive a classifier and a detector
through the one ``train_step`` interface and the engine stays task-blind:

* `ClassificationTask` (the default): targets are class indices (or Mixup soft targets),
  the loss is the per-sample cross-entropy, summed (`ce_sum`). Its code
  path is the one the methods always ran, operation for operation.
* `DetectionTask`: targets are a `DetectionTargets` (one dict of ``boxes`` (N, 4) xyxy
  pixels and ``labels`` per image); the model (`fap.detection.model.Detector`) returns
  per-image losses ``(B, 2)`` = (focal classification, box regression), each normalised
  by that image's foreground anchors exactly as torchvision's RetinaNet does, and the
  per-sample loss of image i is ``ℓ_i = cls_i + box_i``. Summing them makes Fast AdvProp's
  per-sample weights (1 per clean image, β per noisy and adversarial image) and its
  per-group normalisation by image counts carry over unchanged; vanilla's ``Σ ℓ_i / B`` is
  torchvision's own training loss.

What the paper states for detection (Sec. 5, Table 7, as read in the shared digest):
RetinaNet on COCO, BatchNorm statistics not frozen, 24 epochs for the baseline and 20 for
Fast AdvProp (24 / 1.2), mAP clean 35.8 → 35.8 and under 15 corruptions 17.6 → 19.0.
What we chose, because it states nothing more: the p_adv split is over *images* (the last
``round(p_adv·B)`` images of a batch are the adversarial split, all their boxes with them);
an image's loss is torchvision's per-image term (so a crowded image weighs as much as a
sparse one, as in torchvision's mean); loss weights and the per-group normalisation count
images; the attack is the classification one (ε = step = 1/255, random start, untargeted,
[0, 1] pixels before RetinaNet's own normalisation and resize) on the summed detection loss,
and boxes and labels are not touched.

A task's step half: ``check`` (inputs), ``forward`` (model output for a batch), ``loss_sum``,
``split`` (an output's first ``n`` rows and the rest), ``metrics``, ``cat`` and
``all_gather`` (targets across the rows of two passes, or across processes). Its run half:
``check_config``, ``build_data``, ``build_model``, ``evaluate``, ``describe``, ``final_eval``
and ``export``.

Layering: a task sits *below* the methods that drive it (the methods import this module,
never the reverse); its run half reaches down into `fap.data`, `fap.models`,
`fap.evaluation`, `fap.detection` and `fap.checkpoint`, never up into `fap.engine` or
`fap.cli` (checked by ``tests/test_imports.py``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fap.checks import ConfigError

from fap.data.coco import DetectionTargets  # a detection batch's targets: made by the data, read here

__all__ = ["Task", "TaskData", "ClassificationTask", "DetectionTask", "DetectionTargets", "CLASSIFICATION", "TASKS",
           "get_task", "ce_sum", "correct", "check_images", "branch_metrics"]


def ce_sum(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-sample cross-entropy, summed (never averaged: the methods normalise by counts).

    ``targets`` are class indices, or soft targets (Mixup/CutMix) of shape (B, C).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # losses in fp32 at least; fp64 stays fp64
    if targets.dim() == logits.dim():
        return torch.sum(-targets.float() * F.log_softmax(logits, dim=-1))
    return F.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing)


def correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Number of top-1 hits (soft targets: against their arg-max)."""
    if targets.dim() == logits.dim():
        targets = targets.argmax(dim=-1)
    return (logits.detach().argmax(dim=-1) == targets).sum()


def check_images(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}; divide uint8 by 255")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")


def branch_metrics(prefix: str, loss_sum: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> Dict:
    n = logits.shape[0]
    return {
        f"loss_{prefix}": loss_sum.detach() / n,
        f"correct_{prefix}": correct(logits, targets),
        f"count_{prefix}": n,
    }


class TaskData(NamedTuple):
    """What a task's `Task.build_data` gives the engine: the loaders, the number of classes, and
    whether Accelerate should shard each loader (``prepare``) or it is sharded already."""
    train: Any
    eval: Any
    num_classes: int
    prepare_train: bool
    prepare_eval: bool


class Task:
    """Base: what differs between tasks (see the module docstring).

    The step's half (``check`` ... ``all_gather``) is what the methods call; the run's half
    (``build_data``, ``build_model``, ``evaluate``, ``final_eval``, ``export``) is what the
    engine (`fap.engine`) calls. ``headline`` names the metric `evaluate` leads with.
    """

    name = "task"
    needs_targets = True
    headline = "top1"

    def check(self, images: torch.Tensor, targets) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}; divide uint8 by 255")
        if len(targets) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(targets)} targets")

    def forward(self, model, x: torch.Tensor, targets):
        raise NotImplementedError

    def loss_sum(self, output, targets, label_smoothing: float = 0.0) -> torch.Tensor:
        raise NotImplementedError

    def split(self, output, n: int):
        return output[:n], output[n:]

    def metrics(self, prefix: str, loss_sum: torch.Tensor, output, targets) -> Dict:
        raise NotImplementedError

    def cat(self, parts):
        return torch.cat(list(parts))

    def all_gather(self, targets, world: int):
        """Every process's targets, in rank order (a collective: every rank must call it)."""
        out = [torch.empty_like(targets) for _ in range(world)]
        dist.all_gather(out, targets.contiguous())
        return out

    # -- the run's half: what the engine asks of the task --------------------------------

    def model_name(self, cfg) -> str:
        """The model, in words (the run's banner)."""
        return cfg.model.name

    def check_config(self, cfg) -> None:
        """Task-specific checks of a validated `fap.config.TrainConfig` (raise `ConfigError`)."""

    def build_data(self, cfg, *, micro: int, world: int, rank: int) -> TaskData:
        raise NotImplementedError

    def build_model(self, cfg, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def evaluate(self, accelerator, model: nn.Module, loader, cfg, *, prepared: bool) -> Dict[str, float]:
        """The headline evaluation of ``model`` (main norms, every process takes part)."""
        raise NotImplementedError

    def describe(self, result: Dict[str, float]) -> str:
        """One line of ``evaluate``'s result for the console."""
        return " ".join(f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float))

    def final_eval(self, accelerator, model: nn.Module, cfg, out_dir: Path) -> Tuple[Dict[str, float], str]:
        """``cfg``'s final suite on the final weights: (flat numbers, a printable report); ({}, "") if none."""
        return {}, ""

    def export(self, cfg, state_dict: Dict[str, torch.Tensor], out_dir: Path, *, num_classes: int) -> Path:
        """The final weights without auxiliary norms, in the task's plain format (main process only)."""
        raise NotImplementedError


class ClassificationTask(Task):
    """Class indices (or soft targets), summed cross-entropy, top-1 hits."""

    name = "classification"
    needs_targets = False  # the model's forward takes images only

    def check(self, images, targets) -> None:
        check_images(images, targets)

    def forward(self, model, x, targets):
        return model(x)

    def loss_sum(self, output, targets, label_smoothing: float = 0.0):
        return ce_sum(output, targets, label_smoothing)

    def metrics(self, prefix, loss_sum, output, targets):
        return branch_metrics(prefix, loss_sum, output, targets)

    def build_data(self, cfg, *, micro, world, rank) -> TaskData:
        import fap.data as fdata

        tr = cfg.train
        eval_micro = max(1, math.ceil((tr.eval_batch_size or tr.batch_size) / world))
        shard = dict(seed=tr.seed, num_processes=world, process_index=rank)
        train = fdata.build_loader(cfg.data, "train", batch_size=micro, train=True, **shard)
        val = fdata.build_loader(cfg.data, "val", batch_size=eval_micro, train=False, **shard)
        loader = torch.utils.data.DataLoader  # FFCV loaders shard themselves
        return TaskData(train, val, cfg.model.num_classes or fdata.num_classes(cfg.data),
                        isinstance(train, loader), isinstance(val, loader))

    def build_model(self, cfg, num_classes):
        from fap.models import create_model

        m = cfg.model
        timm_kwargs = dict(m.kwargs)
        if m.drop_path_rate:
            timm_kwargs["drop_path_rate"] = m.drop_path_rate
        try:
            return create_model(m.name, num_classes=num_classes, dual_norm=m.dual_norm,
                                aux_group_size=m.aux_group_size, mean=m.mean, std=m.std, img_size=m.img_size,
                                **timm_kwargs)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from e

    @torch.no_grad()
    def evaluate(self, accelerator, model, loader, cfg, *, prepared):
        """Top-1 / top-5 (percent) and mean loss over all processes, duplicates of uneven
        sharding removed (`fap.evaluation.loop.score_loader`)."""
        from fap.evaluation.loop import score_loader
        from fap.norm import route

        channels_last = cfg.train.channels_last
        was_training = model.training
        model.eval()
        try:
            with route(model, "main"):
                counts = score_loader(accelerator, functools.partial(_forward, model, channels_last), loader,
                                      prepared=prepared, loss=True)
        finally:
            model.train(was_training)
        n = max(counts["images"], 1)
        return {"top1": 100.0 * counts["top1"] / n, "top5": 100.0 * counts["top5"] / n,
                "loss": counts["loss_sum"] / n, "count": int(counts["images"])}

    def describe(self, result):
        return f"top1 {result['top1']:.2f} top5 {result['top5']:.2f}" + (
            f" | EMA top1 {result['ema_top1']:.2f}" if "ema_top1" in result else "")

    def final_eval(self, accelerator, model, cfg, out_dir):
        """``cfg.final_eval`` (ImageNet-C/R/A, Sketch, Stylized, V2, PGD): `fap.evaluation.suite.run_suite`."""
        if not cfg.final_eval.requested():
            return {}, ""
        from fap.data import class_names
        from fap.evaluation.report import flatten, format_markdown, write_report
        from fap.evaluation.suite import run_suite

        results = run_suite(accelerator, model, cfg.final_eval, data=cfg.data, classes=class_names(cfg.data))
        if accelerator.is_main_process:
            write_report(results, str(out_dir))
        return flatten(results), format_markdown(results)

    def export(self, cfg, state_dict, out_dir, *, num_classes):
        """A plain timm model (`fap.checkpoint.export_timm`)."""
        from fap.checkpoint import export_timm

        return export_timm(state_dict, out_dir, model_cfg=_plain(cfg.model), num_classes=num_classes,
                           data_cfg=_plain(cfg.data))


def _plain(section) -> Dict[str, Any]:
    """A config section as JSON-ready values (tuples as lists), as `fap.config.to_dict` writes it."""
    return json.loads(json.dumps(dataclasses.asdict(section)))


def _forward(model: nn.Module, channels_last: bool, x: torch.Tensor) -> torch.Tensor:
    return model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)


class DetectionTask(Task):
    """Boxes and labels per image; the detector's per-image losses, summed (see the module docstring)."""

    name = "detection"
    needs_targets = True  # the model's forward takes images and targets (its loss is inside)
    headline = "map"

    def check(self, images, targets) -> None:
        super().check(images, targets)
        if not isinstance(targets, DetectionTargets):
            raise ValueError(f"detection targets must be a fap.tasks.DetectionTargets, got {type(targets).__name__}")

    def forward(self, model, x, targets):
        return model(x, targets.targets)

    def loss_sum(self, output, targets, label_smoothing: float = 0.0):
        if output.dtype in (torch.float16, torch.bfloat16):
            output = output.float()  # losses in fp32 at least; fp64 stays fp64 (as ce_sum)
        return output.sum()

    def metrics(self, prefix, loss_sum, output, targets):
        n = output.shape[0]
        parts = output.detach().float().sum(0)
        return {f"loss_{prefix}": loss_sum.detach() / n, f"loss_{prefix}_cls": parts[0] / n,
                f"loss_{prefix}_box": parts[1] / n, f"count_{prefix}": n}

    def cat(self, parts):
        return DetectionTargets([t for p in parts for t in p.targets])

    def all_gather(self, targets, world: int):
        out: List = [None] * world
        dist.all_gather_object(out, targets.to("cpu"))
        device = next((v.device for t in targets.targets for v in t.values() if torch.is_tensor(v)), "cpu")
        return [t.to(device) for t in out]

    def model_name(self, cfg) -> str:
        return f"RetinaNet {cfg.detection.backbone}-FPN"

    def check_config(self, cfg) -> None:
        m = cfg.method
        if getattr(m, "targeted", False):
            raise ConfigError("method.targeted=True with task='detection': a detector has no single label to "
                              "target; set --method.targeted=false (the attack is untargeted on the summed loss)")
        if cfg.mixup.enabled:
            raise ConfigError("mixup with task='detection': Mixup/CutMix mix class labels, a detector has boxes; "
                              "set --mixup.mixup_alpha=0 --mixup.cutmix_alpha=0")

    def build_data(self, cfg, *, micro, world, rank) -> TaskData:
        """COCO-format data in global batches (`fap.detection.train.build_data`), sharded already."""
        from fap.detection.train import build_data

        train, val, num_classes = build_data(cfg, world=world, rank=rank)
        return TaskData(train, val, num_classes, False, False)

    def build_model(self, cfg, num_classes):
        from fap.detection.train import build_model

        return build_model(cfg, num_classes)

    def evaluate(self, accelerator, model, loader, cfg, *, prepared):
        """COCO bbox mAP on the whole validation set. Every process scores it (the same numbers
        after `average_bn_stats`): a sharded model's forward is a collective all must join."""
        from fap.detection.evaluate import coco_map

        return coco_map(model, loader, batch_size=cfg.train.eval_batch_size or 8, device=accelerator.device)

    def describe(self, result):
        return f"mAP {result['map']:.2f} mAP50 {result['map50']:.2f}" + (
            f" | EMA mAP {result['ema_map']:.2f}" if "ema_map" in result else "")

    def final_eval(self, accelerator, model, cfg, out_dir):
        """The corrupted mAP on ``detection.corrupt_path``, if set (`fap.detection.evaluate.corrupted_map`)."""
        d = cfg.detection
        if not d.corrupt_path:
            return {}, ""
        from fap.data.coco import dataset_for
        from fap.detection.evaluate import corrupted_map, write_results

        results = corrupted_map(model, d.corrupt_path, dataset_for(cfg.data.path, cfg.data.val_split),
                                severities=d.corrupt_severities or None,
                                batch_size=cfg.train.eval_batch_size or 8, device=accelerator.device)
        if accelerator.is_main_process:
            write_results(results, out_dir)
        return results, f"mAP corrupted {results['map_corrupted']:.2f} ({d.corrupt_path})"

    def export(self, cfg, state_dict, out_dir, *, num_classes):
        """A plain torchvision RetinaNet (`fap.detection.train.export_detector`)."""
        from fap.detection.train import detection_arch, export_detector

        return export_detector(state_dict, out_dir, arch=detection_arch(cfg.detection, num_classes))


CLASSIFICATION = ClassificationTask()
TASKS: Dict[str, Task] = {"classification": CLASSIFICATION, "detection": DetectionTask()}


def get_task(name: str) -> Task:
    """The task a config names (``cfg.task``)."""
    if name not in TASKS:
        raise ConfigError(f"task={name!r}: expected one of {', '.join(TASKS)}")
    return TASKS[name]
