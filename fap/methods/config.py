"""The ``method`` section of a run: each method's switches as a frozen dataclass, torch-free.

`fap.config` takes ``CONFIGS`` from here, so parsing and checking a config (and ``fap
--help``, and a config error's one line) loads no torch; the methods themselves
(`fap.methods.vanilla`, `fap.methods.advprop`, `fap.methods.fast_advprop`) import their
config from here and re-export it. `budget_matched` is the Fast AdvProp schedule
arithmetic (Mei et al., ICLR 2022, Sec. 4.1), pure Python, so recipes read it without torch.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Literal, Optional, Sequence, Tuple

from fap.checks import ConfigError, check_choices, check_epsilon, require

__all__ = [
    "ADVPROP_RANDOM_INIT_PROB",
    "AdvPropConfig",
    "CONFIGS",
    "FastAdvPropConfig",
    "MethodConfig",
    "NORM_MODES",
    "Norms",
    "VanillaConfig",
    "budget_matched",
    "check_attack",
]

Norms = Literal["dual", "shared", "mixed"]
NORM_MODES: Tuple[str, ...] = typing.get_args(Norms)
"""What is normalised together (AdvProp, Xie et al., Sec. 4.2, and its "vanilla
adversarial training" baseline):

* ``dual``: adversarial images go through auxiliary norms, clean ones through the main
  norms (disentangled learning);
* ``shared``: one set of norms; every pass normalises its own batch, so clean and
  adversarial images never share batch statistics;
* ``mixed``: one set of norms; clean and adversarial images are normalised together in
  one batch (the condition the disentangled-learning hypothesis says hurts).
"""


#: AdvProp's random-start probability: its tensorpack attacker starts from noise when a
#: uniform draw exceeds 0.2 (`fap.attacks` lists the other conventions).
ADVPROP_RANDOM_INIT_PROB = 0.8


class MethodConfig:
    """Base of the method configs (the ``method`` section of a run): a config checks itself.

    `fap.config.validate` calls ``cfg.method.validate(model_dual_norm=..., mixup_enabled=...)``
    for whichever method is set, so the rules of a method live with its switches; a method
    built on its own (`Method.__init__`) calls it without the run's other sections.
    Subclasses are frozen dataclasses; they extend `validate` with their own rules and call
    ``super().validate(...)`` first.
    """

    def validate(self, *, model_dual_norm: Optional[bool] = None, mixup_enabled: bool = False) -> "MethodConfig":
        """Check the switches, alone and against the run's other sections.

        Args:
            model_dual_norm: whether the model has auxiliary norms (``model.dual_norm``);
                None (a method built without a run) skips the check against ``norms``.
            mixup_enabled: whether the run applies Mixup/CutMix (``mixup.enabled``).

        Returns:
            ``self``.

        Raises:
            ConfigError: naming ``method.KEY``, the value and what is valid.
        """
        check_choices(self, "method")
        label_smoothing = getattr(self, "label_smoothing", 0.0)
        require(0.0 <= label_smoothing < 1.0, "method.label_smoothing", label_smoothing, "a number in [0, 1)")
        norms = getattr(self, "norms", None)
        if norms is not None and model_dual_norm is not None and (norms == "dual") != model_dual_norm:
            raise ConfigError(
                f"method.norms={norms!r} but model.dual_norm={model_dual_norm}: norms='dual' needs "
                "model.dual_norm=true, 'shared' and 'mixed' need model.dual_norm=false")
        return self


def check_attack(cfg: MethodConfig) -> None:
    """The attack switches AdvProp and Fast AdvProp share: ε, step, K and the random start."""
    for key in ("epsilon", "step"):
        value = getattr(cfg, key)
        if value is not None:
            try:
                check_epsilon(value, f"method.{key}")
            except ValueError as e:
                raise ConfigError(str(e)) from None
    require(isinstance(cfg.attack_steps, int) and cfg.attack_steps >= 1, "method.attack_steps",
            cfg.attack_steps, "an int >= 1 (K, attack iterations)")
    require(0.0 <= cfg.random_init_prob <= 1.0, "method.random_init_prob", cfg.random_init_prob,
            "a probability in [0, 1]")


@dataclass(frozen=True)
class VanillaConfig(MethodConfig):
    """Args:
        label_smoothing: label smoothing of the cross-entropy (ignored under Mixup,
            whose targets carry their own smoothing).
    """
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class AdvPropConfig(MethodConfig):
    """Args:
        epsilon: L∞ budget in 1/255 units (AdvProp uses 1–4 by model size).
        attack_steps: K, PGD iterations (the original implementation's default is 5).
        step: step size in 1/255 units; None gives max(1, ε/K) capped at ε.
        targeted: attack toward a random wrong label (AdvProp); False ascends the true label.
        random_init_prob: probability of a uniform random start (tensorpack AdvProp: 0.8).
        attack_bn_mode: ``"eval"`` attacks with the aux norms' running statistics (the
            re-implementations); ``"train"`` uses batch statistics.
        norms: ``"dual"``, ``"shared"`` or ``"mixed"``; see `fap.methods.advprop`.
        label_smoothing: on the clean loss (ignored under Mixup).
        num_classes: needed for targeted attacks; None reads it from the logits.
    """
    epsilon: float = 1.0
    attack_steps: int = 5
    step: Optional[float] = None
    targeted: bool = True
    random_init_prob: float = ADVPROP_RANDOM_INIT_PROB
    attack_bn_mode: Literal["eval", "train"] = "eval"
    norms: Norms = "dual"
    label_smoothing: float = 0.0
    num_classes: Optional[int] = None

    def validate(self, *, model_dual_norm: Optional[bool] = None, mixup_enabled: bool = False) -> "AdvPropConfig":
        """`MethodConfig.validate`, plus the attack's switches; Mixup is refused."""
        super().validate(model_dual_norm=model_dual_norm, mixup_enabled=mixup_enabled)
        check_attack(self)
        if mixup_enabled:
            raise ConfigError("mixup is enabled but method 'advprop' pairs each clean image with its "
                              "adversarial copy, which Mixup/CutMix would break; use fast_advprop or vanilla")
        return self


@dataclass(frozen=True)
class FastAdvPropConfig(MethodConfig):
    """The switches of the step: the paper's ablations, and fap's own ``norms`` and ``fused``.

    Args:
        p_adv: fraction of the loader batch used for the adversarial split (0.2).
        epsilon: L∞ budget in 1/255 units (1.0).
        step: FGSM step in 1/255 units; None = ε (the paper's step = ε).
        attack_steps: K, attack iterations (1; the budget formula assumes K = 1).
        beta: loss weight of the noisy and adversarial passes (0.5, "same importance").
        random_init_prob: probability of the random start δ0 ~ U(-ε, ε): 1.0 as in the
            paper's Algorithm 1; the reference code's effective value is 0.42.
        random_init_per: draw the random-start coin per ``"sample"`` or per ``"batch"``
            (the reference code draws one per batch).
        reuse: keep the noisy pass's weight gradients (the "free" part). False computes
            the attack gradient only.
        attack_target: ``"untargeted"`` ascends the loss on the true label (the paper's
            and the reference code's choice: its weight gradients train toward the true
            label, so they can be reused); ``"random"`` descends the loss toward a random
            wrong label (AdvProp's attack). With ``reuse`` the noisy pass then trains toward
            that wrong label, which the paper (Sec. 3.2.2) gives as the reason to attack
            untargeted; the adversarial pass trains on the true label either way.
        attack_bn_mode: the normalisation statistics of the noisy (attack) pass:
            ``"train"`` (batch statistics, the paper's and the reference code's
            ``--attack_in_train``) or ``"eval"`` (running statistics, as AdvProp attacks;
            the paper reports NaN losses when the reused gradients come from such an
            attack). Only BatchNorm layers switch; dropout and drop-path stay in train mode.
        per_group_normalization: normalise shared / main-norm / aux-norm gradients by
            their own counts ("synchronisation"); False divides all by the shared count.
        shuffle: Shuffling BN: regroup the adversarial images across BN groups (ranks,
            and ghost groups of ``aux_group_size``) between the noisy and adversarial pass.
        norms: ``"dual"`` (adversarial images through auxiliary norms), ``"shared"`` (one
            set of norms, each pass its own batch) or ``"mixed"`` (one set of norms, clean
            and adversarial images in one batch); see `fap.methods.fast_advprop`.
        fused: run the clean and first noisy pass as one forward/backward (``dual`` only).
        label_smoothing: on the clean loss (ignored under Mixup).
    """
    p_adv: float = 0.2
    epsilon: float = 1.0
    step: Optional[float] = None
    attack_steps: int = 1
    beta: float = 0.5
    random_init_prob: float = 1.0
    random_init_per: Literal["sample", "batch"] = "sample"
    reuse: bool = True
    attack_target: Literal["untargeted", "random"] = "untargeted"
    attack_bn_mode: Literal["train", "eval"] = "train"
    per_group_normalization: bool = True
    shuffle: bool = True
    norms: Norms = "dual"
    fused: bool = False
    label_smoothing: float = 0.0

    def validate(self, *, model_dual_norm: Optional[bool] = None,
                 mixup_enabled: bool = False) -> "FastAdvPropConfig":
        """`MethodConfig.validate`, plus the split, the attack and the fused pass."""
        super().validate(model_dual_norm=model_dual_norm, mixup_enabled=mixup_enabled)
        require(0.0 < self.p_adv < 1.0, "method.p_adv", self.p_adv,
                "a number in (0, 1), the adversarial fraction of the batch (e.g. 0.2)")
        check_attack(self)
        require(self.beta > 0, "method.beta", self.beta,
                "a number > 0 (the attack gradient comes from the beta-weighted loss)")
        if self.fused and self.norms != "dual":
            raise ConfigError(f"method.fused=True needs method.norms='dual', got norms={self.norms!r}: with one "
                              "set of BatchNorm the fused pass would mix clean and noisy batch statistics")
        if self.fused and not self.reuse:
            raise ConfigError("method.fused=True needs method.reuse=True: the fused backward trains on the noisy pass")
        if self.fused and (self.attack_target, self.attack_bn_mode) != ("untargeted", "train"):
            raise ConfigError(f"method.fused=True runs the noisy pass inside the clean pass's train-mode forward on "
                              f"the true labels (attack_target='untargeted', attack_bn_mode='train'); "
                              f"attack_target={self.attack_target!r} with attack_bn_mode={self.attack_bn_mode!r} "
                              "needs method.fused=false")
        return self


def budget_matched(
        epochs: int, milestones: Sequence[int] = (), *, p_adv: float = 0.2, attack_steps: int = 1
) -> Tuple[int, List[int]]:
    """Epochs and LR milestones divided by ``1 + p_adv·K`` (Mei et al., Sec. 4.1).

    With the reference code's arithmetic (``get_exact_same_budget``): p_adv is read as a
    clean : adversarial ratio of small integers (0.2 → 4:1, 1/3 → 2:1), the scale is computed
    as ``clean/(clean + adv) + adv/(clean + adv)·(K + 1)`` in floating point
    (1.2000000000000002 for 4:1, 1.3333333333333333 for 2:1) and the quotient rounded with
    Python's ``round``. That gives the paper's numbers: 105 → 87 and [30, 60, 90, 100] →
    [25, 50, 75, 83] at p_adv = 0.2; 79 epochs and [22, 45, 68, 75] at 1/3; 70 at 0.5
    (Table 4). Dividing by an exact 1.2 would round 87.5 to 88; computing ``1 - p_adv`` from
    the float 1/3 would give milestone 67 (67.4999...); flooring would give 78 epochs at 1/3.
    """
    share = Fraction(p_adv).limit_denominator(1000)  # adversarial : all, as the reference's integer ratio
    adv, total = share.numerator, share.denominator
    scale = (total - adv) / total + adv / total * (attack_steps + 1)
    f = lambda e: max(1, int(round(e / scale)))  # noqa: E731
    return f(epochs), [f(m) for m in milestones]


CONFIGS = {"vanilla": VanillaConfig, "advprop": AdvPropConfig, "fast_advprop": FastAdvPropConfig}
"""The method configs by name (the ``--method NAME`` of a command line)."""
