"""AdvProp (Xie et al., CVPR 2020): paired PGD-K adversarial copies through auxiliary norms.

Every image of the loader batch gets an adversarial copy made by a K-step PGD attack
toward a random wrong label (targeted, as in Xie's attacker), run through the auxiliary
norms with running statistics (eval mode) as the PyTorch re-implementations do. Then
one forward of ``[clean; adversarial]`` with split routing — clean rows through the
main norms, adversarial rows through the auxiliary ones — and one backward of
``(Σ_clean ℓ + Σ_adversarial ℓ) / B``, i.e. L(clean) + L(adv) with batch means.
Cost: K attack passes + 2 training passes per image, (K + 2)× vanilla.

``norms`` says what is normalised together (`fap.methods.config.NORM_MODES`): ``dual`` is
the above; ``mixed`` is the paper's "vanilla adversarial training" baseline, the same
forward of ``[clean; adversarial]`` through one set of norms, so both halves share batch
statistics; ``shared`` also uses one set of norms but runs the clean and the adversarial
half as two forward/backward passes (the first one without gradient reduction), each
normalised by its own batch. The objective, loss weights and cost are the same in all
three. The attack runs through the norms the adversarial images train with. A detector
(`fap.tasks.DetectionTask`) needs ``targeted=False``: PGD ascends its summed detection loss.
"""
from __future__ import annotations

import contextlib

import torch

from fap.attacks import pgd, random_start, sign_step
from fap.checks import ConfigError
from fap.methods.base import Method, StepCost, check_norms
from fap.methods.config import AdvPropConfig
from fap.norm import route, split_route

__all__ = ["AdvProp", "AdvPropConfig"]


class AdvProp(Method):
    name = "advprop"
    branches = ("clean", "adversarial")
    config_cls = AdvPropConfig

    def validate(self) -> None:
        """`Method.validate`; a detector has no single label to attack toward."""
        super().validate()
        if self.task.name == "detection" and self.config.targeted:
            raise ConfigError("method.targeted=True: a detector has no single label per image to target; set "
                              "method.targeted=false (untargeted PGD on the summed detection loss)")

    def split(self, batch_size: int):
        return batch_size, batch_size  # every image has an adversarial copy

    def cost(self, batch_size: int) -> StepCost:
        k = self.config.attack_steps
        passes = k + (2 if self.config.norms == "shared" else 1)
        return StepCost(forward=passes, backward=passes,
                        image_passes=(k + 2) * batch_size, vanilla=batch_size)

    def train_step(self, model, images, labels, backward, *, no_sync=contextlib.nullcontext, unwrapped_model=None):
        c, task = self.config, self.task
        task.check(images, labels)
        check_norms(model, c.norms, self.name)
        attacker = unwrapped_model if unwrapped_model is not None else model
        b = images.shape[0]
        x_adv = self._attack(attacker, images, labels)
        x_c, t_c = self._clean_targets(images, labels)
        if c.norms == "shared":
            with no_sync():
                logits_c = task.forward(model, x_c, t_c)
                loss_clean = task.loss_sum(logits_c, t_c, c.label_smoothing)
                backward(loss_clean / b)
            logits_a = task.forward(model, x_adv, labels)
            loss_adv = task.loss_sum(logits_a, labels)
            backward(loss_adv / b)
        else:  # dual: split routing; mixed: one set of norms, one batch
            with split_route(model, b):
                logits = task.forward(model, torch.cat([x_c, x_adv]),
                                      task.cat([t_c, labels]) if task.needs_targets else None)
            logits_c, logits_a = task.split(logits, b)
            loss_clean = task.loss_sum(logits_c, t_c, c.label_smoothing)
            loss_adv = task.loss_sum(logits_a, labels)
            backward((loss_clean + loss_adv) / b)
        metrics = task.metrics("clean", loss_clean, logits_c, t_c)
        metrics.update(task.metrics("adversarial", loss_adv, logits_a, labels))
        metrics.update(self.cost(b).as_metrics())
        return metrics

    def _attack(self, attacker, images, labels):
        c = self.config
        modes = [(m, m.training) for m in attacker.modules()]
        if c.attack_bn_mode == "eval":
            attacker.eval()
        try:
            with route(attacker, "aux"):
                if self.task.name != "classification":
                    return self._task_pgd(attacker, images, labels)
                num_classes = c.num_classes
                if c.targeted and num_classes is None:
                    num_classes = _num_classes(attacker)
                return pgd(attacker, images, labels, epsilon=c.epsilon, steps=c.attack_steps,
                           step=c.step, targeted=c.targeted, num_classes=num_classes,
                           random_init_prob=c.random_init_prob)
        finally:
            for m, training in modes:
                m.training = training


    def _task_pgd(self, attacker, images, targets):
        """Untargeted PGD-K on the task's summed loss (a detector: classification + box
        regression), in [0, 1] pixel space, with `fap.attacks.pgd`'s step, start and projection."""
        c, task = self.config, self.task
        step = c.step if c.step is not None else (min(max(1.0, c.epsilon / c.attack_steps), c.epsilon)
                                                  if c.epsilon > 0 else 0.0)
        x = images.detach().float()
        x_adv = random_start(x, c.epsilon, random_init_prob=c.random_init_prob)
        for _ in range(c.attack_steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                loss = task.loss_sum(task.forward(attacker, x_adv, targets), targets)
                (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = sign_step(x, x_adv, grad, epsilon=c.epsilon, step=step)
        return x_adv


def _num_classes(model) -> int:
    for m in model.modules():  # timm models carry `num_classes`
        n = getattr(m, "num_classes", None)
        if isinstance(n, int) and n > 1:
            return n
    raise ValueError("targeted AdvProp needs num_classes; set AdvPropConfig.num_classes")
