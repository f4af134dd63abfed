"""What a training method needs to know about the task: how to read targets and compute the loss.

Vanilla, AdvProp and Fast AdvProp (Mei et al., ICLR 2022) are the same passes whatever
the model predicts; only "loss of these images against these targets" changes. A task
object says that, so the methods (`fap.methods`) drive a classifier and a detector
through the one ``train_step`` interface and the engine stays task-blind:

* `ClassificationTask` (the default): targets are class indices (or Mixup soft targets),
  the loss is the per-sample cross-entropy, summed (`fap.methods.base.ce_sum`). Its code
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

A task's methods: ``check`` (inputs), ``forward`` (model output for a batch), ``loss_sum``,
``split`` (an output's first ``n`` rows and the rest), ``metrics``, ``cat`` and
``all_gather`` (targets across the rows of two passes, or across processes).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.distributed as dist

__all__ = ["Task", "ClassificationTask", "DetectionTask", "DetectionTargets", "CLASSIFICATION"]


class DetectionTargets:
    """One target dict per image, indexed like a batch.

    Supports what the methods and the engine do to labels: ``len``, ``t[:n]``, ``t[n:]``,
    ``t[perm]`` (a LongTensor), ``t.to(device)`` and ``shape[0]``.
    """

    def __init__(self, targets: Sequence[Dict[str, torch.Tensor]]):
        self.targets: List[Dict] = list(targets)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def shape(self) -> Tuple[int]:
        return (len(self.targets),)

    def __getitem__(self, index: Union[slice, torch.Tensor, Sequence[int]]) -> "DetectionTargets":
        if isinstance(index, slice):
            return DetectionTargets(self.targets[index])
        if isinstance(index, torch.Tensor):
            index = index.tolist()
        return DetectionTargets([self.targets[int(i)] for i in index])

    def to(self, device, non_blocking: bool = False) -> "DetectionTargets":
        return DetectionTargets([{k: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v)
                                  for k, v in t.items()} for t in self.targets])

    def contiguous(self) -> "DetectionTargets":
        return self

    def __repr__(self) -> str:
        return f"DetectionTargets({len(self)} images, {sum(len(t['boxes']) for t in self.targets)} boxes)"


class Task:
    """Base: the task-specific half of a training step (see the module docstring)."""

    name = "task"
    needs_targets = True

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


class ClassificationTask(Task):
    """Class indices (or soft targets), summed cross-entropy, top-1 hits."""

    name = "classification"
    needs_targets = False  # the model's forward takes images only

    def check(self, images, targets) -> None:
        from fap.methods.base import check_images

        check_images(images, targets)

    def forward(self, model, x, targets):
        return model(x)

    def loss_sum(self, output, targets, label_smoothing: float = 0.0):
        from fap.methods.base import ce_sum

        return ce_sum(output, targets, label_smoothing)

    def metrics(self, prefix, loss_sum, output, targets):
        from fap.methods.base import branch_metrics

        return branch_metrics(prefix, loss_sum, output, targets)


class DetectionTask(Task):
    """Boxes and labels per image; the detector's per-image losses, summed (see the module docstring)."""

    name = "detection"
    needs_targets = True  # the model's forward takes images and targets (its loss is inside)

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


CLASSIFICATION = ClassificationTask()
