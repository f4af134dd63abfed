"""One optimizer update over micro-batches, one class per gradient-reduction path.

A method's ``train_step`` runs several backward passes per loader batch (Fast AdvProp:
clean, noisy, adversarial; Mei et al., ICLR 2022), and gradient accumulation adds
micro-batches. All of them make *one* optimizer update whose gradients are reduced
across processes exactly once, or the update is not the closed-form one
(``reference/step_patterns.md``):

* `LocalUpdate`: one process, or DDP. Every pass but the very last runs inside
  ``no_sync``; the last backward all-reduces once. Then clipping and ``optimizer.step``.
* `CoalescedUpdate`: DeepSpeed ZeRO with ``engine.coalesce_grad_reduction()``: the whole
  update inside that block (one reduction), then ``engine.step()`` (clipping included).
* `PerBackwardUpdate`: DeepSpeed without it (older DeepSpeed, optimizers it does not
  cover): ``sync_gradients`` off for all but the last backward, which reduces and steps;
  exact at 3x the gradient traffic.
* `FSDPUpdate`: PyTorch FSDP2 (``fully_shard``): ``set_requires_gradient_sync(False)``
  for every pass but the last, whose backward reduce-scatters once (in fp32); then
  clipping on the sharded gradients and ``optimizer.step`` on the shards.

Each returns the metrics, the gradient norm and the branches that were non-finite on any
process. Counting non-finite values is a pure function (`nonfinite_counts`); agreeing on
them across processes is a separate call (`agree`), whose all-reduce also carries the
stop flag (SIGTERM/SIGUSR1), so every process stops after the same update.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch

from fap.data import to_unit_float

__all__ = ["UpdateResult", "Update", "LocalUpdate", "CoalescedUpdate", "PerBackwardUpdate", "FSDPUpdate",
           "make_update",
           "nonfinite_counts", "agree"]

Batch = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class UpdateResult:
    """What one update did.

    Attributes:
        metrics: the method's metrics of each micro-batch.
        grad_norm: the global gradient norm (before clipping), when it was computed.
        nonfinite: branches (and ``"gradients"``) that were NaN/Inf on some process; when
            non-empty the update was not applied (except by `PerBackwardUpdate`, whose
            last backward already stepped).
        stop: some process was asked to stop.
    """
    metrics: List[Dict[str, Any]]
    grad_norm: Optional[float]
    nonfinite: List[str]
    stop: bool


def nonfinite_counts(metrics: Sequence[Dict[str, Any]], branches: Sequence[str],
                     grad_norm: Optional[Any] = None) -> List[float]:
    """How many NaN/Inf losses each branch had in ``metrics``, then whether ``grad_norm`` is."""
    counts = [0.0] * (len(branches) + 1)
    for m in metrics:
        for i, branch in enumerate(branches):
            if m.get(f"count_{branch}"):
                counts[i] += float((~torch.isfinite(m[f"loss_{branch}"].detach().float())).sum())
    if grad_norm is not None:
        counts[-1] = float((~torch.isfinite(torch.as_tensor(grad_norm, dtype=torch.float32))).sum())
    return counts


def agree(accelerator, counts: Sequence[float], stop_requested: bool) -> Tuple[List[float], bool]:
    """Sum ``counts`` and the stop flag over processes, in one small all-reduce."""
    flags = torch.tensor([*counts, float(stop_requested)], dtype=torch.float32, device=accelerator.device)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    values = flags.tolist()
    return values[:-1], values[-1] > 0


class Update:
    """One optimizer update over the micro-batches of one global batch.

    Args:
        accelerator: the run's Accelerator.
        model: the prepared model (DDP- or DeepSpeed-wrapped, or plain).
        optimizer: the prepared optimizer.
        method: the training method (`fap.methods`); its ``branches`` name the losses.
        accum_steps: micro-batches per update (each loss is divided by it).
        channels_last: feed NHWC images.
        clip_grad: the gradient-norm clip (DeepSpeed clips inside ``engine.step()``).
        restore_on_skip: keep a copy of the buffers (norm statistics) to put back when a
            non-finite update is skipped.
    """
    description = ""

    def __init__(self, accelerator, model, optimizer, method, *, accum_steps: int = 1, channels_last: bool = False,
                 clip_grad: Optional[float] = None, restore_on_skip: bool = False):
        self.accelerator, self.model, self.optimizer, self.method = accelerator, model, optimizer, method
        self.unwrapped = accelerator.unwrap_model(model)
        self.accum_steps, self.channels_last = accum_steps, channels_last
        self.clip_grad, self.restore_on_skip = clip_grad, restore_on_skip

    def __call__(self, batches: Sequence[Batch], *, stop_requested: bool = False) -> UpdateResult:
        raise NotImplementedError

    def _micro_step(self, batch: Batch, no_sync: Callable[[], ContextManager]) -> Dict[str, Any]:
        images, labels = batch
        device = self.accelerator.device
        x = to_unit_float(images.to(device, non_blocking=True))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.method.train_step(self.model, x, labels.to(device), self._backward, no_sync=no_sync,
                                      unwrapped_model=self.unwrapped)

    def _backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss / self.accum_steps if self.accum_steps > 1 else loss)

    def _agree(self, metrics, grad_norm=None, stop_requested: bool = False) -> Tuple[List[str], bool]:
        names = list(self.method.branches) + ["gradients"]
        counts, stop = agree(self.accelerator, nonfinite_counts(metrics, self.method.branches, grad_norm),
                             stop_requested)
        return [name for name, n in zip(names, counts) if n > 0], stop


def _item(value) -> Optional[float]:
    return value.item() if hasattr(value, "item") else value


class LocalUpdate(Update):
    """One process or DDP: ``no_sync`` for every pass but the last; one all-reduce."""
    description = "local"

    def __call__(self, batches, *, stop_requested=False):
        saved = [b.detach().clone() for b in self.unwrapped.buffers()] if self.restore_on_skip else None
        metrics = []
        for i, batch in enumerate(batches):
            outer = contextlib.nullcontext() if i == len(batches) - 1 else self._no_sync()
            with outer:
                metrics.append(self._micro_step(batch, self._no_sync))
        grad_norm = self._clip() if self.clip_grad else None
        bad, stop = self._agree(metrics, grad_norm, stop_requested)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            if saved is not None:  # the forward passes updated the norm statistics
                with torch.no_grad():
                    for b, old in zip(self.unwrapped.buffers(), saved):
                        b.copy_(old)
            return UpdateResult(metrics, None, bad, stop)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return UpdateResult(metrics, _item(grad_norm), [], stop)

    def _no_sync(self) -> ContextManager:
        return self.accelerator.no_sync(self.model)

    def _clip(self):
        return self.accelerator.clip_grad_norm_(self.model.parameters(), self.clip_grad)


class CoalescedUpdate(Update):
    """DeepSpeed ZeRO: the whole update in ``coalesce_grad_reduction()``, then ``engine.step()``."""
    description = "coalesced (one reduction per update)"

    def __call__(self, batches, *, stop_requested=False):
        self.accelerator.sync_gradients = False
        try:
            with self.model.coalesce_grad_reduction():
                metrics = [self._micro_step(batch, contextlib.nullcontext) for batch in batches]
        finally:
            self.accelerator.sync_gradients = True
        bad, stop = self._agree(metrics, stop_requested=stop_requested)
        if bad:
            return UpdateResult(metrics, None, bad, stop)
        self.model.set_gradient_accumulation_boundary(True)
        self.model.step()  # clipping (gradient_clipping) + optimizer step + zero_grad
        return UpdateResult(metrics, _item(self.model.get_global_grad_norm()), [], stop)


class PerBackwardUpdate(Update):
    """DeepSpeed without coalescing: no accumulation boundary until the last backward,
    which reduces and steps the engine."""
    description = "per backward (DeepSpeed without coalesce_grad_reduction)"

    def __call__(self, batches, *, stop_requested=False):
        metrics = []
        for i, batch in enumerate(batches):
            outer = contextlib.nullcontext() if i == len(batches) - 1 else self._no_boundary()
            with outer:
                metrics.append(self._micro_step(batch, self._no_boundary))
        bad, stop = self._agree(metrics, stop_requested=stop_requested)
        if bad:
            return UpdateResult(metrics, None, bad, stop)
        return UpdateResult(metrics, _item(self.model.get_global_grad_norm()), [], stop)

    @contextlib.contextmanager
    def _no_boundary(self):
        previous = self.accelerator.sync_gradients
        self.accelerator.sync_gradients = False
        try:
            yield
        finally:
            self.accelerator.sync_gradients = previous


class FSDPUpdate(LocalUpdate):
    """PyTorch FSDP2: gradients stay unsharded and local (``set_requires_gradient_sync(False)``)
    for every pass but the last; the last backward reduce-scatters them once.

    Nested uses (the outer micro-batch loop and the method's own ``no_sync`` around its
    first passes) turn synchronisation back on only when the outermost one exits.
    Clipping uses ``torch.nn.utils.clip_grad_norm_``, which reduces the norm over shards.
    """
    description = "FSDP2 set_requires_gradient_sync (one reduce-scatter per update)"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._no_sync_depth = 0

    def _clip(self):
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @contextlib.contextmanager
    def _no_sync(self):
        if self._no_sync_depth == 0:
            self.model.set_requires_gradient_sync(False)
        self._no_sync_depth += 1
        try:
            yield
        finally:
            self._no_sync_depth -= 1
            if self._no_sync_depth == 0:
                self.model.set_requires_gradient_sync(True)


def make_update(accelerator, model, optimizer, method, *, deepspeed: bool, **kwargs) -> Update:
    """The update for this set-up: coalesced or per-backward under DeepSpeed, FSDP2's for a
    ``fully_shard``-ed model, else local (described as ``no_sync`` when several processes reduce)."""
    from fap.engine.distributed import can_coalesce, is_fsdp2

    if deepspeed:
        cls = CoalescedUpdate if can_coalesce(model) else PerBackwardUpdate
        return cls(accelerator, model, optimizer, method, **kwargs)
    if is_fsdp2(model):
        return FSDPUpdate(accelerator, model, optimizer, method, **kwargs)
    update = LocalUpdate(accelerator, model, optimizer, method, **kwargs)
    if accelerator.num_processes > 1:
        update.description = "no_sync (one all-reduce per update)"
    return update
