"""Training methods, interchangeable behind one `Method.train_step` interface.

The only place in fap that knows about adversarial examples. The configs (``CONFIGS``,
`fap.methods.config`) and `budget_matched` are torch-free and imported at once; the methods
themselves, which need torch, are imported on first use (PEP 562), so ``fap.config`` can
read ``CONFIGS`` without loading torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, List, Sequence, Tuple

from fap.methods.config import CONFIGS, AdvPropConfig, FastAdvPropConfig, VanillaConfig, budget_matched

if TYPE_CHECKING:
    from fap.methods.base import Method

_LAZY = {
    "Method": "fap.methods.base",
    "StepCost": "fap.methods.base",
    "Vanilla": "fap.methods.vanilla",
    "AdvProp": "fap.methods.advprop",
    "FastAdvProp": "fap.methods.fast_advprop",
}
_CLASSES = {"vanilla": "Vanilla", "advprop": "AdvProp", "fast_advprop": "FastAdvProp"}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name == "METHODS":  # the method classes by name, as CONFIGS holds their configs
        value = {key: __getattr__(cls) for key, cls in _CLASSES.items()}
    else:
        raise AttributeError(f"module 'fap.methods' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | {"METHODS"})


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
    """``build_method("fast_advprop", p_adv=0.2)`` -> a configured `Method`."""
    if name not in _CLASSES:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(_CLASSES)}")
    return __getattr__(_CLASSES[name])(config, **kwargs)


__all__ = [
    "METHODS", "CONFIGS", "build_method", "Method", "StepCost",
    "Vanilla", "VanillaConfig", "AdvProp", "AdvPropConfig",
    "FastAdvProp", "FastAdvPropConfig", "budget_matched", "matched_budget",
]
