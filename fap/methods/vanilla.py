"""Vanilla training: every image through the main norms, mean cross-entropy.

The baseline of Mei et al. (ICLR 2022), Table 1. On a dual-norm model the auxiliary
norms are simply never used. For a detector (`fap.tasks.DetectionTask`) the loss is the
mean over images of the per-image detection losses: torchvision's own training loss.
"""
from __future__ import annotations

import contextlib

from fap.methods.base import Method, StepCost
from fap.methods.config import VanillaConfig
from fap.norm import route

__all__ = ["Vanilla", "VanillaConfig"]


class Vanilla(Method):
    name = "vanilla"
    config_cls = VanillaConfig

    def cost(self, batch_size: int) -> StepCost:
        return StepCost(forward=1, backward=1, image_passes=batch_size, vanilla=batch_size)

    def train_step(self, model, images, labels, backward, *, no_sync=contextlib.nullcontext, unwrapped_model=None):
        task = self.task
        task.check(images, labels)
        x, t = self._clean_targets(images, labels)
        with route(model, "main"):
            out = task.forward(model, x, t)
        loss = task.loss_sum(out, t, self.config.label_smoothing)
        backward(loss / x.shape[0])
        metrics = task.metrics("clean", loss, out, t)
        metrics.update(self.cost(x.shape[0]).as_metrics())
        return metrics
