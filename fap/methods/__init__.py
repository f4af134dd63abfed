"""Training methods, interchangeable behind one `Method.train_step` interface.

The only place in fap that knows about adversarial examples.
"""
from typing import List, Sequence, Tuple

from fap.methods.advprop import AdvProp, AdvPropConfig
from fap.methods.base import Method, StepCost
from fap.methods.fast_advprop import FastAdvProp, FastAdvPropConfig, budget_matched
from fap.methods.vanilla import Vanilla, VanillaConfig

METHODS = {"vanilla": Vanilla, "advprop": AdvProp, "fast_advprop": FastAdvProp}
CONFIGS = {"vanilla": VanillaConfig, "advprop": AdvPropConfig, "fast_advprop": FastAdvPropConfig}


def matched_budget(name: str, config, epochs: int, milestones: Sequence[int] = ()) -> Tuple[int, List[int]]:
    """Epochs and LR milestones that spend ``epochs`` vanilla epochs of compute (the cost ledger).

    One epoch of a method costs its image-passes per loader image (`Method.cost`): 1 for
    vanilla, ``1 + p_adv·K`` for Fast AdvProp (`budget_matched`, with the reference code's
    rounding: 105 -> 87; Mei et al., ICLR 2022, Sec. 4.1), ``K + 2`` for AdvProp (K attack
    passes, the clean and the adversarial pass; Xie et al., CVPR 2020). The schedule is
    divided by that cost and rounded, never below one epoch.
    """
    if name == "fast_advprop":
        return budget_matched(epochs, milestones, p_adv=config.p_adv, attack_steps=config.attack_steps)
    scale = build_method(name, config).cost(1).ratio
    f = lambda e: max(1, int(round(e / scale)))  # noqa: E731
    return f(epochs), [f(m) for m in milestones]


def build_method(name: str, config=None, **kwargs) -> Method:
    """``build_method("fast_advprop", p_adv=0.2)`` -> a configured method."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](config, **kwargs)


__all__ = [
    "METHODS", "CONFIGS", "build_method", "Method", "StepCost",
    "Vanilla", "VanillaConfig", "AdvProp", "AdvPropConfig",
    "FastAdvProp", "FastAdvPropConfig", "budget_matched", "matched_budget",
]
