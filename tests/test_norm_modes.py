"""Norm modes say what is normalised together, for both methods (`fap.methods.base.NORM_MODES`).

A forward hook on the first BatchNorm of the network (it sees the normalised pixels, so
each row can be told clean or perturbed) records every call. The rows a call normalises
*together* are the whole input of a plain BatchNorm, and each routed part of a dual one
(split routing normalises its main and aux rows separately). In ``mixed`` mode one
normalisation batch holds clean and adversarial rows; in ``shared`` and ``dual`` none does.
"""
import pytest
import torch
import torch.nn as nn

from fap.methods import AdvProp, FastAdvProp
from fap.models import PixelModel
from fap.norm import DualNorm, convert_dual_norm

B = 20  # Fast AdvProp: 16 clean + 4 adversarial-split images


def model_with_pixel_bn(dual: bool):
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    if dual:
        convert_dual_norm(net)
    return PixelModel(net, mean=(0.5,) * 3, std=(0.5,) * 3).train()


def normalisation_batches(model, x_clean):
    """Hook the first norm; return, per call, the clean/perturbed tags of each batch it normalises."""
    bn = model.net[0]
    clean_rows = (x_clean - 0.5) / 0.5
    batches = []

    def tag(rows):
        is_clean = [(row == clean_rows).flatten(1).all(1).any().item() for row in rows]
        return {"clean" if c else "perturbed" for c in is_clean}

    def hook(module, args):
        (x,) = args
        route = module.route_to if isinstance(module, DualNorm) else "main"
        if isinstance(route, int) and 0 < route < x.shape[0]:
            batches.extend([tag(x[:route]), tag(x[route:])])
        else:
            batches.append(tag(x))

    bn.register_forward_pre_hook(hook)
    return batches


def step(method, dual):
    model = model_with_pixel_bn(dual)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(B, 3, 6, 6, generator=g), torch.randint(0, 5, (B,), generator=g)
    batches = normalisation_batches(model, x)
    method.train_step(model, x, y, lambda loss: loss.backward())
    return batches


CASES = [
    (lambda norms: FastAdvProp(norms=norms, epsilon=4.0, shuffle=False), "fast_advprop"),
    (lambda norms: AdvProp(norms=norms, epsilon=4.0, attack_steps=2, num_classes=5, random_init_prob=1.0), "advprop"),
]


@pytest.mark.parametrize("make, name", CASES, ids=[c[1] for c in CASES])
@pytest.mark.parametrize("norms", ["dual", "shared", "mixed"])
def test_only_mixed_normalises_clean_and_adversarial_rows_together(make, name, norms):
    batches = step(make(norms), dual=norms == "dual")
    together = [b for b in batches if b == {"clean", "perturbed"}]
    assert any(b == {"clean"} for b in batches) or together  # the clean rows were normalised
    if norms == "mixed":
        assert len(together) == 1, batches  # exactly the training forward of [clean; adversarial]
    else:
        assert not together, batches
