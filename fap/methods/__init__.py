"""Training methods, interchangeable behind one `Method.train_step` interface.

The only place in fap that knows about adversarial examples.
"""
from fap.methods.advprop import AdvProp, AdvPropConfig
from fap.methods.base import Method, StepCost
from fap.methods.fast_advprop import FastAdvProp, FastAdvPropConfig, budget_matched
from fap.methods.vanilla import Vanilla, VanillaConfig

METHODS = {"vanilla": Vanilla, "advprop": AdvProp, "fast_advprop": FastAdvProp}
CONFIGS = {"vanilla": VanillaConfig, "advprop": AdvPropConfig, "fast_advprop": FastAdvPropConfig}


def build_method(name: str, config=None, **kwargs) -> Method:
    """``build_method("fast_advprop", p_adv=0.2)`` -> a configured method."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](config, **kwargs)


__all__ = [
    "METHODS", "CONFIGS", "build_method", "Method", "StepCost",
    "Vanilla", "VanillaConfig", "AdvProp", "AdvPropConfig",
    "FastAdvProp", "FastAdvPropConfig", "budget_matched",
]
