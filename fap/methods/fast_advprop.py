"""Fast AdvProp (Mei et al., ICLR 2022), with the reference code's exact step semantics.

A loader batch of B images is split into two disjoint parts: the first
``B_c = B - B_a`` images are clean, the last ``B_a = round(p_adv · B)`` form the
adversarial split. One step = K + 2 passes, one optimizer step:

1. clean: the clean part through the main norms, loss weight 1;
2. noisy: ``x_a + δ0`` through the auxiliary norms in train mode (batch statistics),
   loss weight β. Its single backward yields both the input gradient for the FGSM step
   and weight gradients that are kept (the "free" reuse). With K > 1 this repeats from
   the current adversarial point, each time adding a β-weighted term;
3. adversarial: ``x_adv = clip(x_a + δ0 + step·sign(∇x), x_a ± ε) ∩ [0, 1]``, regrouped
   across BN groups (Shuffling BN), through the auxiliary norms, loss weight β.

Sec. 3.2.2 of the paper argues for the untargeted, batch-statistics attack against two
alternatives; both are switches, so the argument can be run: ``attack_target="random"``
(AdvProp's attack toward a random wrong label; the noisy pass then trains on that label)
and ``attack_bn_mode="eval"`` (the attack normalises with running statistics).

``norms`` says what is normalised together (`fap.methods.config.NORM_MODES`): ``dual`` is
the above; ``shared`` runs the same passes through one set of norms, each pass with its
own batch statistics; ``mixed`` is the AdvProp paper's "vanilla adversarial training"
condition on the same passes: the noisy pass(es) run first and alone (they exist to find
the attack direction, before any adversarial image exists; the same as in ``shared``), then
*one* forward of ``[clean part; adversarial part]`` normalises the clean and the
adversarial images in one batch, with loss weights 1 and β and one backward. Loss weights,
gradient normalisation and image-passes are those of ``shared``; it makes one
forward/backward fewer.

Losses are per-sample sums, normalised per parameter group (the paper's "synchronised
update speed"): shared parameters by the total weight ``B_c + β·B_a·(K+1)`` (= B_c + B_a
for β = 0.5, K = 1, i.e. an 80/10/10 mix of split means at p_adv = 0.2), main-norm
affine parameters by ``B_c``, aux-norm affine parameters by ``β·B_a·(K+1)``. The
normalisation is done inside autograd (a loss factor plus `fap.norm.set_grad_scale`),
never by editing ``param.grad``, so it is exact under DDP and DeepSpeed ZeRO. The counts
are each process's own; the training loaders drop the last incomplete batch, so every
rank has the same ``B_c`` and ``B_a`` and the mean over ranks is the global normalisation
(Shuffling BN's exchange needs the equal ``B_a`` too).

A detector (`fap.tasks.DetectionTask`, Table 7) takes the same passes: the per-sample
loss of an image is its detection loss (focal classification + box regression), the attack
ascends the summed loss of the noisy images in [0, 1] pixel space, and boxes do not move
(FGSM changes pixels only; the attack cannot translate an object).

``fused=True`` runs the clean and the first noisy pass as one forward/backward with split
routing (first B_c rows main, rest aux); the gradients are the same as the three-pass form.
It is slower on a CPU: one batched pass computes the first layer's input gradient for
every row, not only the B_a the attack needs, and split routing costs each norm layer a
split and a concatenation (measurements: ``benchmarks/results/README.md``). Three-pass is
the default.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from fap.attacks import random_start, random_wrong_labels, sign_step
from fap.checks import ConfigError
from fap.methods.base import Method, StepCost, check_norms
from fap.methods.config import FastAdvPropConfig, budget_matched  # re-exported: torch-free, `fap.config` reads them
from fap.norm import dual_norm_modules, has_batch_norm, route, set_grad_scale, split_route

__all__ = [
    "FastAdvProp",
    "FastAdvPropConfig",
    "budget_matched",
    "split_sizes",
    "group_changing_permutation",
    "batch_norm_eval",
]


def split_sizes(batch_size: int, p_adv: float) -> Tuple[int, int]:
    """``(B_c, B_a)`` for a loader batch: B_a = round(p_adv · B), both at least 1."""
    b_a = int(round(p_adv * batch_size))
    b_c = batch_size - b_a
    if b_a < 1 or b_c < 1:
        raise ValueError(
            f"a batch of {batch_size} cannot be split with p_adv={p_adv}: it gives "
            f"{b_c} clean and {b_a} adversarial images; use a batch of at least "
            f"{math.ceil(1 / min(p_adv, 1 - p_adv))} images"
        )
    return b_c, b_a


def group_changing_permutation(
        num_groups: int, group_size: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """A permutation ``P`` of ``num_groups·group_size`` positions (``x_new = x[P]``)
    that moves every sample to a different group of ``group_size`` consecutive positions.

    Each sample's slot within its group is shuffled, then slot ``j`` of group ``a`` goes
    to group ``(a + 1 + j mod (G-1)) mod G``: a bijection in which no sample stays in its
    group and each new group mixes samples of up to G-1 old groups.
    """
    g, n = num_groups, group_size
    if g < 2:
        raise ValueError("need at least two BN groups to change a sample's group")
    src = torch.stack([torch.randperm(n, generator=generator) + a * n for a in range(g)])  # (G, n)
    perm = torch.empty(g * n, dtype=torch.long)
    for a in range(g):
        for j in range(n):
            b = (a + 1 + j % (g - 1)) % g
            perm[b * n + j] = src[a, j]
    # Shuffle slots inside each new group too (keeps group membership).
    within = torch.stack([torch.randperm(n, generator=generator) + b * n for b in range(g)]).flatten()
    return perm[within]


class FastAdvProp(Method):
    name = "fast_advprop"
    branches = ("clean", "noisy", "adversarial")
    config_cls = FastAdvPropConfig

    def validate(self) -> None:
        """`Method.validate`; a detector has no single label to target."""
        super().validate()
        if self.task.name == "detection" and self.config.attack_target != "untargeted":
            raise ConfigError(f"method.attack_target={self.config.attack_target!r}: a detector has no single label "
                              "per image to target; use 'untargeted' (the summed detection loss is ascended)")

    # -- bookkeeping -----------------------------------------------------------------
    def weights(self, b_c: int, b_a: int) -> Dict[str, float]:
        """Total loss weight per parameter group (the reference code's counters)."""
        c = self.config
        aux = c.beta * b_a * ((c.attack_steps if c.reuse else 0) + 1)
        return {"main": float(b_c), "aux": float(aux), "shared": float(b_c + aux)}

    def split(self, batch_size: int) -> Tuple[int, int]:
        return split_sizes(batch_size, self.config.p_adv)

    def cost(self, batch_size: int) -> StepCost:
        c = self.config
        b_c, b_a = split_sizes(batch_size, c.p_adv)
        k = c.attack_steps
        passes = k + 2 - (1 if (c.fused or c.norms == "mixed") else 0)
        return StepCost(forward=passes, backward=passes,
                        image_passes=b_c + b_a * (k + 1), vanilla=batch_size)

    # -- the step --------------------------------------------------------------------
    def train_step(self, model, images, labels, backward, *, no_sync=contextlib.nullcontext, unwrapped_model=None):
        c, task = self.config, self.task
        task.check(images, labels)
        check_norms(model, c.norms, self.name)
        b = images.shape[0]
        b_c, b_a = split_sizes(b, c.p_adv)
        w = self.weights(b_c, b_a)
        k = 1.0 / w["shared"]
        if c.per_group_normalization:
            set_grad_scale(model, main=w["shared"] / w["main"], aux=w["shared"] / w["aux"])
        else:
            set_grad_scale(model, main=1.0, aux=1.0)
        step = c.epsilon if c.step is None else c.step
        x_c, t_c = self._clean_targets(images[:b_c], labels[:b_c])
        x_a, y_a = images[b_c:], labels[b_c:]
        metrics: Dict = {}
        try:
            with no_sync():
                x_cur = random_start(x_a, c.epsilon, random_init_prob=c.random_init_prob, per=c.random_init_per)
                first = True
                if c.fused:
                    x_n = x_cur.requires_grad_(True)
                    metrics.update(self._joint_pass(model, x_c, t_c, x_n, y_a, "noisy", backward, k,
                                                    split_route(model, x_c.shape[0])))
                    x_cur = sign_step(x_a, x_n, x_n.grad, epsilon=c.epsilon, step=step)
                    first = False
                elif c.norms != "mixed":
                    with route(model, "main"):
                        logits_c = task.forward(model, x_c, t_c)
                    loss_c = task.loss_sum(logits_c, t_c, c.label_smoothing)
                    backward(k * loss_c)
                    metrics.update(task.metrics("clean", loss_c, logits_c, t_c))
                target = None  # the attack's labels, drawn by the first noisy pass
                for _ in range(c.attack_steps - (0 if first else 1)):
                    x_cur, target = self._noisy_pass(model, unwrapped_model, x_a, x_cur, y_a, target, backward, k,
                                                     step, metrics if first else None)
                    first = False
            metrics["perturbation_linf"] = (x_cur - x_a.float()).abs().amax() * 255.0
            x_adv, y_adv = self._shuffle(model, x_cur, y_a) if c.shuffle else (x_cur, y_a)
            if c.norms == "mixed":
                metrics.update(self._joint_pass(model, x_c, t_c, x_adv, y_adv, "adversarial", backward, k,
                                                contextlib.nullcontext()))
            else:
                with route(model, "aux"):
                    logits_a = task.forward(model, x_adv, y_adv)
                loss_a = task.loss_sum(logits_a, y_adv)
                backward(k * c.beta * loss_a)
                metrics.update(task.metrics("adversarial", loss_a, logits_a, y_adv))
        finally:
            set_grad_scale(model, main=1.0, aux=1.0)
        metrics.update(self.cost(b).as_metrics())
        return metrics

    def _joint_pass(self, model, x_c, t_c, x_other, y_other, other, backward, k, routing):
        """One forward/backward of ``[clean part; other rows]`` under ``routing``, loss weights
        1 and β: the fused clean + noisy pass (split routing) or, under ``norms="mixed"``, the
        clean + adversarial pass through one set of norms (one batch)."""
        c, task = self.config, self.task
        b_c = x_c.shape[0]
        with routing:
            logits = task.forward(model, torch.cat([x_c, x_other]),
                                  task.cat([t_c, y_other]) if task.needs_targets else None)
        out_c, out_o = task.split(logits, b_c)
        loss_c = task.loss_sum(out_c, t_c, c.label_smoothing)
        loss_o = task.loss_sum(out_o, y_other)
        backward(k * (loss_c + c.beta * loss_o))
        return {**task.metrics("clean", loss_c, out_c, t_c),
                **task.metrics(other, loss_o, out_o, y_other)}

    def _noisy_pass(self, model, unwrapped_model, x_a, x_cur, y_a, target, backward, k, step, metrics):
        """Forward the current point through the aux norms; return the next point and the attack's labels.

        The attack's labels are the true ones (``attack_target="untargeted"``) or random wrong
        ones, drawn on the first iteration and kept (``"random"``, AdvProp's target): the step
        ascends the loss on the former and descends it toward the latter. With ``reuse`` the
        pass's β-weighted loss on those labels is trained on; ``attack_bn_mode="eval"``
        normalises with the running statistics (which this pass then leaves unchanged).
        """
        c, task = self.config, self.task
        x_n = x_cur.detach().requires_grad_(True)
        net = model if c.reuse or unwrapped_model is None else unwrapped_model
        with route(net, "aux"), batch_norm_eval(net, c.attack_bn_mode == "eval"), torch.enable_grad():
            logits = task.forward(net, x_n, y_a)
            if target is None:
                target = y_a if c.attack_target == "untargeted" else random_wrong_labels(y_a, logits.shape[-1])
            loss = task.loss_sum(logits, target)
            if not c.reuse:
                (grad,) = torch.autograd.grad(loss, x_n)
        if c.reuse:
            backward(k * c.beta * loss)
            grad = x_n.grad
        if metrics is not None:
            metrics.update(task.metrics("noisy", loss, logits, target))
        x_next = sign_step(x_a, x_n, grad, epsilon=c.epsilon, step=step, ascend=c.attack_target == "untargeted")
        return x_next, target

    def _shuffle(self, model, x_adv: torch.Tensor, y: torch.Tensor):
        """Shuffling BN: move every adversarial image to another BN group (BatchNorm models).

        BN groups are the ranks of a distributed run times the ghost groups of the aux
        norms (``aux_group_size``). The permutation is drawn on rank 0 and broadcast, so
        every rank takes a disjoint slice of the same regrouped global batch.
        """
        if not has_batch_norm(model):
            # Per-sample norms (LayerNorm, GroupNorm): no batch statistics to decouple, and
            # with equal per-rank counts the summed gradient does not depend on which rank
            # holds which sample. Skip it, and its all-gather.
            return x_adv, y
        b_a = x_adv.shape[0]
        g = _aux_group_size(model)
        local_groups = b_a // g if (g is not None and b_a > g and b_a % g == 0) else 1
        group_size = b_a // local_groups
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        total_groups = world * local_groups
        if total_groups < 2:
            # Once per calling location and B_a: the warnings module's default filter.
            warnings.warn(
                "Shuffling BN is a no-op with a single BN group (one process, aux_group_size "
                f"None or >= B_a={b_a}); set aux_group_size (e.g. 16) to emulate per-GPU BN groups",
                stacklevel=3,
            )
            return x_adv, y
        if world == 1:
            perm = group_changing_permutation(total_groups, group_size).to(x_adv.device)
            return x_adv[perm], y[perm]
        xs = [torch.empty_like(x_adv) for _ in range(world)]
        dist.all_gather(xs, x_adv.contiguous())
        ys = self.task.all_gather(y, world)
        perm = group_changing_permutation(total_groups, group_size) if dist.get_rank() == 0 \
            else torch.empty(world * b_a, dtype=torch.long)
        perm = perm.to(x_adv.device)
        dist.broadcast(perm, src=0)
        rank = dist.get_rank()
        idx = perm[rank * b_a:(rank + 1) * b_a]
        return torch.cat(xs)[idx], self.task.cat(ys)[idx]


@contextlib.contextmanager
def batch_norm_eval(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside, the BatchNorm layers of ``model`` that train normalise with their running
    statistics and leave them unchanged (``attack_bn_mode="eval"``); other layers (dropout,
    drop-path) keep their mode. Each layer's own flag is set, not its children's."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training] if enabled else []
    for m in layers:
        m.training = False
    try:
        yield
    finally:
        for m in layers:
            m.training = True


def _aux_group_size(model) -> Optional[int]:
    mods = dual_norm_modules(model)
    return mods[0].aux_group_size if mods else None
