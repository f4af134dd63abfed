"""The evaluation loop: one pass over a loader, counts gathered exactly across processes.

Each process scores its shard; per-sample results are gathered every batch, so the counts
are integers summed on every process and do not depend on how many processes ran. A
loader prepared by Accelerate pads the last batches with samples from the start so that
every process has the same number of batches; ``accelerator.gather_for_metrics`` drops
those duplicates. A loader that is sharded already (FFCV's, sampled like a
``DistributedSampler``: shard ``r`` holds padded positions ``r, r + R, r + 2R, ...``) is
de-duplicated here with its ``num_samples``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from fap.data.base import to_unit_float
from fap.evaluation.metrics import topk_correct

__all__ = ["KS", "score_loader"]

KS = (1, 5)


def score_loader(
        accelerator,
        model: Callable[[torch.Tensor], torch.Tensor],
        loader,
        *,
        subset: Optional[torch.Tensor] = None,
        attack: Optional[Callable] = None,
        prepared: bool = True,
        progress=None,
        loss: bool = False,
        per_image: bool = False,
) -> Dict[str, float]:
    """Count top-1/top-5 hits of ``model`` over ``loader`` (and under ``attack`` if given).

    Args:
        accelerator: the run's ``Accelerator``.
        model: maps [0, 1] images to logits (eval mode, main norms: the caller's business).
        loader: yields ``(uint8 images, int64 model labels)``.
        subset: model label indices the logits are restricted to (ImageNet-R/A).
        attack: ``attack(model, x, labels) -> x_adv`` in [0, 1] pixels (e.g. PGD).
        prepared: True if ``accelerator.prepare`` sharded the loader; False for a loader
            sharded already (FFCV), which must expose ``num_samples``, ``num_processes``,
            ``process_index`` and ``batch_size``.
        progress: a tqdm bar to advance by one per batch, or None.
        loss: also sum the clean cross-entropy over the full logits (``"loss_sum"``).
        per_image: also return ``"correct"``: each image's clean top-1 hit (0/1, a long
            tensor), in the loader's order over all processes (a sequential loader prepared
            by Accelerate: dataset order), for paired per-image tests (`fap.experiment`).

    Returns:
        ``{"images": n, "top1": hits, "top5": hits}`` plus ``"adv_top1"``/``"adv_top5"``
        under an attack, and ``"loss_sum"`` (float) if asked, summed over every process.
    """
    hits = []
    device = accelerator.device
    names = ["top1", "top5"] + (["adv_top1", "adv_top5"] if attack is not None else [])
    totals = torch.zeros(1 + len(names), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for step, (images, labels) in enumerate(loader):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        x = to_unit_float(images)
        with torch.no_grad(), accelerator.autocast():
            logits = model(x)
        columns = [topk_correct(logits.float(), labels, KS, subset)]
        if attack is not None:
            with accelerator.autocast():
                x_adv = attack(model, x, labels)
            with torch.no_grad(), accelerator.autocast():
                columns.append(topk_correct(model(x_adv).float(), labels, KS, subset))
        keep = torch.ones(len(labels), 1, dtype=torch.long, device=device)
        if not prepared:
            keep = _keep_mask(loader, step, len(labels), device)
        rows = torch.cat([keep] + columns, dim=1) * keep
        if loss:
            losses = F.cross_entropy(logits.float(), labels, reduction="none").double() * keep.view(-1)
            rows, losses = _gather(accelerator, (rows, losses), prepared)
            loss_sum += losses.sum()
        else:
            rows = _gather(accelerator, rows, prepared)
        totals += rows.sum(dim=0)
        if per_image:
            hits.append(rows[rows[:, 0] > 0, 1].cpu())
        if progress is not None:
            progress.update(1)
    counts = totals.tolist()
    out: Dict[str, float] = {"images": counts[0], **dict(zip(names, counts[1:]))}
    if loss:
        out["loss_sum"] = loss_sum.item()
    if per_image:
        out["correct"] = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.long)
    return out


def _gather(accelerator, tensors, prepared: bool):
    """Every process's rows; a prepared loader's padding duplicates dropped."""
    return accelerator.gather_for_metrics(tensors) if prepared else accelerator.gather(tensors)


def _keep_mask(loader, step: int, batch: int, device) -> torch.Tensor:
    """1 for samples of a ``DistributedSampler``-style shard that are not padding duplicates."""
    local = step * loader.batch_size + torch.arange(batch, device=device)
    position = local * loader.num_processes + loader.process_index
    return (position < loader.num_samples).long().view(-1, 1)
