"""What every training method shares: the step interface, losses, metrics, cost.

A method turns ``(model, images, labels)`` into forward and backward passes; its task
(`fap.tasks`: classification by default, or detection) says how a batch's loss is computed
and how its targets are read, so the passes are the same for every task. It is handed
``backward`` (the engine binds it to ``accelerator.backward``) and ``no_sync`` (a context
factory in which forward + backward accumulate gradients locally without communication;
the engine binds it to DDP's ``no_sync``, or to a no-op when it coalesces the reduction
itself, as under DeepSpeed). The last backward of a step always runs outside ``no_sync``.
The caller steps the optimizer once afterwards. Methods know nothing else about the
engine, Accelerate or precision.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Callable, ContextManager, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from fap.checks import ConfigError, require
# The method configs are torch-free (`fap.config` reads them); re-exported here, where they were defined.
from fap.methods.config import NORM_MODES, MethodConfig, Norms, check_attack  # noqa: F401
from fap.norm import dual_norm_modules, ghost_groups_fit, has_dual_norm
# The loss and metrics of classification are the task's (the task sits below the methods);
# re-exported here for the code that has always imported them from this module.
from fap.tasks import CLASSIFICATION, Task, branch_metrics, ce_sum, check_images, correct

__all__ = [
    "Method",
    "MethodConfig",
    "StepCost",
    "ce_sum",
    "correct",
    "check_norms",
    "NORM_MODES",
    "Norms",
]

Backward = Callable[[torch.Tensor], None]
NoSync = Callable[[], ContextManager]
MixupFn = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]



@dataclass(frozen=True)
class StepCost:
    """Image-passes (one image through forward + backward) of one step, vs vanilla.

    ``vanilla`` is what plain training would spend on the same loader batch: one pass
    per image.
    """
    forward: int
    backward: int
    image_passes: int
    vanilla: int

    @property
    def ratio(self) -> float:
        return self.image_passes / self.vanilla

    def as_metrics(self) -> Dict[str, float]:
        return {
            "forward_passes": self.forward,
            "backward_passes": self.backward,
            "image_passes": self.image_passes,
            "cost_ratio": self.ratio,
        }


def check_norms(model: nn.Module, norms: str, method: str) -> None:
    """The method's ``norms`` mode must be known and match how the model was built:
    ``dual`` needs auxiliary norms, ``shared`` and ``mixed`` need a model without them."""
    if norms not in NORM_MODES:
        raise ValueError(f"{method}: norms={norms!r} is not a norm mode; expected one of {', '.join(NORM_MODES)}")
    has = has_dual_norm(model)
    if norms == "dual" and not has:
        raise ValueError(
            f"{method}: norms='dual' but the model has no auxiliary norms; build it with "
            "fap.models.create_model(..., dual_norm=True) or set the method's norms to 'shared' or 'mixed'"
        )
    if norms != "dual" and has:
        raise ValueError(
            f"{method}: norms={norms!r} (one set of norms) but the model has auxiliary norms; "
            "build it with create_model(..., dual_norm=False)"
        )


class Method:
    """Base class: one training method, configured by a dataclass of its switches."""

    name: str = "method"
    config_cls: type = object
    #: The passes whose losses `train_step` reports (``loss_<branch>`` etc.), in order.
    branches: Tuple[str, ...] = ("clean",)

    def __init__(self, config=None, *, mixup_fn: Optional[MixupFn] = None, task: Optional[Task] = None,
                 **overrides):
        self.task = task if task is not None else CLASSIFICATION
        cfg = config if config is not None else self.config_cls()
        if overrides:
            valid = {f.name for f in fields(self.config_cls)}
            unknown = sorted(set(overrides) - valid)
            if unknown:
                raise ValueError(
                    f"{self.name}: unknown option(s) {unknown}; valid: {sorted(valid)}"
                )
            cfg = type(cfg)(**{**cfg.__dict__, **overrides})
        self.config = cfg
        self.mixup_fn = mixup_fn
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` (a ``ValueError``) for inconsistent switches (`MethodConfig.validate`),
        and for switches the task has no use for (a detector: no Mixup, no label smoothing)."""
        self.config.validate(mixup_enabled=self.mixup_fn is not None)
        if self.task.name == "detection":
            if self.mixup_fn is not None:
                raise ConfigError(f"{self.name}: Mixup/CutMix is for classification; a detection run has no "
                                  "soft targets to mix (set mixup.enabled=false)")
            smoothing = getattr(self.config, "label_smoothing", 0.0)
            require(smoothing == 0.0, "method.label_smoothing", smoothing,
                    "0.0 for detection (the focal loss has no label smoothing)")

    def cost(self, batch_size: int) -> StepCost:
        """Forward/backward passes and image-passes of one step on a loader batch."""
        raise NotImplementedError

    def split(self, batch_size: int) -> Tuple[int, int]:
        """``(clean rows, rows per auxiliary-norm pass)`` of a loader batch."""
        return batch_size, 0

    def check_setup(self, model: nn.Module, batch_size: int) -> None:
        """Raise ValueError, naming the values, if this method cannot train ``model`` on
        loader batches of ``batch_size`` (per process and micro-batch).

        The engine calls it once before the first step, so that a batch that cannot be
        split, a model built with the wrong norms, ghost groups that do not divide the
        auxiliary batch or an odd clean batch under Mixup fail at set-up, not mid-run.
        """
        clean, aux = self.split(batch_size)
        norms = getattr(self.config, "norms", None)
        if norms is not None:
            check_norms(model, norms, self.name)
        groups = {m.aux_group_size for m in dual_norm_modules(model)} - {None}
        for g in groups:
            if not ghost_groups_fit(g, aux):
                raise ValueError(
                    f"{self.name}: aux_group_size={g} must divide the {aux} images of each auxiliary-norm "
                    f"pass (loader batch {batch_size}); choose a group size among "
                    f"{', '.join(str(d) for d in range(2, aux + 1) if aux % d == 0)}, or a batch whose "
                    f"auxiliary part is a multiple of {g}"
                )
        if self.mixup_fn is not None and clean % 2:
            raise ValueError(
                f"{self.name}: Mixup/CutMix needs an even clean batch, but a loader batch of {batch_size} "
                f"gives {clean} clean images; choose a batch whose clean part is even"
            )

    def train_step(
            self,
            model: nn.Module,
            images: torch.Tensor,
            labels: torch.Tensor,
            backward: Backward,
            *,
            no_sync: NoSync = contextlib.nullcontext,
            unwrapped_model: Optional[nn.Module] = None,
    ) -> Dict[str, Union[torch.Tensor, float, int]]:
        """Run the method's passes on one loader batch and return its metrics.

        Args:
            model: the (possibly DDP/DeepSpeed-wrapped) model, in train mode, taking
                [0, 1] fp32 images.
            images: (B, C, H, W) fp32 in [0, 1].
            labels: (B,) int64 class indices.
            backward: ``backward(loss)`` accumulates gradients of ``loss``.
            no_sync: context factory for passes whose gradients must not be reduced yet.
            unwrapped_model: the unwrapped module, for passes that only need input
                gradients (DeepSpeed ZeRO-2 cannot take ``autograd.grad`` through its
                engine); defaults to ``model``.

        Returns:
            Per-branch summed losses and hit counts as detached tensors (``loss_<branch>``
            is the mean, ``correct_<branch>`` / ``count_<branch>`` give accuracy), plus
            the step cost (`StepCost.as_metrics`).
        """
        raise NotImplementedError

    def _clean_targets(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mixup/CutMix on the clean images only (before anything requires grad)."""
        if self.mixup_fn is None:
            return x, y
        if x.shape[0] % 2:
            raise ValueError(
                f"Mixup/CutMix needs an even clean batch, got {x.shape[0]}; choose a batch size "
                "whose clean part (1 - p_adv) * B is even"
            )
        return self.mixup_fn(x.clone(), y)
