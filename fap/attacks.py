"""L∞ attacks in [0, 1] pixel space: FGSM with a random start, and PGD-K.

Units: ``epsilon`` and ``step`` are in 1/255 of the [0, 1] pixel range, as in the papers
(Fast AdvProp, Mei et al., ICLR 2022: ε = step = 1/255; AdvProp, Xie et al., CVPR 2020:
ε ∈ {1..4}). All arithmetic on images and perturbations is fp32, whatever precision the
model runs in; the model normalises internally (`fap.models.PixelModel`).

Random start (``random_init_prob``): the probability that δ0 ~ U(-ε, ε) is added before
the first step; otherwise the attack starts from the clean image.

* 1.0 — the Fast AdvProp paper's Algorithm 1 (always a random start); the default.
* 0.42 — the reference code's *effective* value: it draws one normal scalar per batch
  and starts from noise when it exceeds 0.2, i.e. P(Z > 0.2) = 0.42.
* 0.8 — AdvProp's tensorpack attacker (uniform draw > 0.2).

Fast AdvProp uses the primitives (`random_start`, `sign_step`) directly, because its
attack gradient comes from a training backward it shares with the weights; AdvProp and
evaluation use `pgd`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fap.checks import check_epsilon  # the budget check is pure Python, shared with the config sections

__all__ = [
    "check_epsilon",
    "random_start",
    "sign_step",
    "project",
    "random_wrong_labels",
    "pgd",
    "fgsm",
]

def _check_prob(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_init_prob must be in [0, 1], got {p}")
    return float(p)


def project(x_adv: torch.Tensor, x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Clip ``x_adv`` to the ε-ball around ``x`` (ε in 1/255 units) and to [0, 1]."""
    eps = check_epsilon(epsilon) / 255.0
    x = x.float()
    return torch.min(torch.max(x_adv.float(), x - eps), x + eps).clamp_(0.0, 1.0)


def random_start(
        x: torch.Tensor,
        epsilon: float,
        *,
        random_init_prob: float = 1.0,
        per: str = "sample",
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``x + δ0`` clipped to [0, 1]: δ0 ~ U(-ε, ε) with probability ``random_init_prob``.

    Args:
        x: images in [0, 1].
        epsilon: in 1/255 units.
        random_init_prob: probability of starting from noise (see module docstring).
        per: ``"sample"`` draws the coin per image; ``"batch"`` draws one coin per batch,
            as the reference code does.
        generator: optional torch generator (on ``x``'s device).

    The start is clipped to [0, 1] (the reference code leaves it up to ε outside): images
    outside the model are always valid pixels in fap.
    """
    eps = check_epsilon(epsilon) / 255.0
    p = _check_prob(random_init_prob)
    x = x.detach().float()
    if p == 0.0 or eps == 0.0:
        return x.clone()
    noise = (torch.rand(x.shape, device=x.device, generator=generator) * 2 - 1) * eps
    if per == "sample":
        coin = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, generator=generator) < p
    elif per == "batch":
        coin = torch.rand((), device=x.device, generator=generator) < p
    else:
        raise ValueError(f"per must be 'sample' or 'batch', got {per!r}")
    return (x + noise * coin).clamp_(0.0, 1.0)


def sign_step(
        x: torch.Tensor,
        x_cur: torch.Tensor,
        grad: torch.Tensor,
        *,
        epsilon: float,
        step: float,
        ascend: bool = True,
) -> torch.Tensor:
    """One signed-gradient step from ``x_cur``, projected to the ε-ball of ``x`` ∩ [0, 1]."""
    if grad is None:
        raise RuntimeError("no input gradient: the attack pass did not reach the images")
    s = check_epsilon(step, "step") / 255.0
    direction = grad.float().sign()
    x_next = x_cur.detach().float() + (s if ascend else -s) * direction
    return project(x_next, x, epsilon).detach()


def random_wrong_labels(
        labels: torch.Tensor, num_classes: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """A uniformly random label different from the true one (AdvProp's target)."""
    if num_classes < 2:
        raise ValueError("targeted attacks need at least 2 classes")
    offset = torch.randint(1, num_classes, labels.shape, device=labels.device, generator=generator)
    return (labels + offset) % num_classes


def pgd(
        model: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        labels: torch.Tensor,
        *,
        epsilon: float,
        steps: int = 1,
        step: Optional[float] = None,
        targeted: bool = False,
        num_classes: Optional[int] = None,
        random_init_prob: float = 1.0,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """PGD-K under L∞ in pixel space; only input gradients are computed.

    Untargeted: ascend CE on the true label. Targeted (AdvProp): descend CE toward a
    random *wrong* label.

    Args:
        model: maps [0, 1] images to logits (route/mode are the caller's business).
        x: clean images in [0, 1].
        labels: true labels.
        epsilon: ε in 1/255 units.
        steps: K, the number of gradient steps (>= 1).
        step: step size in 1/255 units; default ``max(1, ε / K)`` as in the AdvProp and
            Fast AdvProp reference attackers, capped at ε.
        targeted: attack toward a random wrong label.
        num_classes: required when ``targeted``.
        random_init_prob: probability of a random start.
        generator: optional torch generator.

    Returns:
        Detached fp32 adversarial images with ``‖x_adv − x‖∞ ≤ ε`` and values in [0, 1].
    """
    check_epsilon(epsilon)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps (K) must be an int >= 1, got {steps!r}")
    if step is None:
        step = min(max(1.0, epsilon / steps), epsilon) if epsilon > 0 else 0.0
    if targeted:
        if num_classes is None:
            raise ValueError("targeted PGD needs num_classes")
        target = random_wrong_labels(labels, num_classes, generator)
    else:
        target = labels
    x = x.detach().float()
    x_adv = random_start(x, epsilon, random_init_prob=random_init_prob, generator=generator)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv).float(), target, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = sign_step(x, x_adv, grad, epsilon=epsilon, step=step, ascend=not targeted)
    return x_adv


def fgsm(model, x, labels, *, epsilon: float, random_init_prob: float = 1.0, generator=None):
    """One step of size ε from a random start (PGD-1 with step = ε): Fast AdvProp's attack."""
    return pgd(model, x, labels, epsilon=epsilon, steps=1, step=epsilon,
               random_init_prob=random_init_prob, generator=generator)
