"""fap.attacks: budgets are exact in [0, 1] pixel space, also under bf16."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fap.attacks import (
    fgsm,
    pgd,
    project,
    random_start,
    random_wrong_labels,
    sign_step,
)
from fap.models import create_model

EPS_TOL = 1e-6  # fp32 rounding of x ± ε/255


def _model():
    torch.manual_seed(0)
    return create_model("resnet18", num_classes=10, dual_norm=False).eval()


@pytest.mark.parametrize("epsilon,steps", [(1.0, 1), (4.0, 5), (8.0, 3)])
def test_pgd_stays_in_budget_and_pixel_range(epsilon, steps):
    model = _model()
    x = torch.rand(8, 3, 32, 32)
    x[0] = 0.0  # corners of the pixel range exercise the [0, 1] clip
    x[1] = 1.0
    y = torch.randint(0, 10, (8,))
    for targeted in (False, True):
        x_adv = pgd(model, x, y, epsilon=epsilon, steps=steps, targeted=targeted, num_classes=10)
        assert x_adv.dtype == torch.float32 and not x_adv.requires_grad
        assert (x_adv - x).abs().max() <= epsilon / 255 + EPS_TOL
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_budget_is_exact_with_model_under_bf16_autocast():
    model = _model()
    x = torch.rand(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16  # the network really runs in bf16
        x_adv = fgsm(model, x, y, epsilon=2.0)
    assert x_adv.dtype == torch.float32
    delta = (x_adv - x).abs()
    assert delta.max() <= 2.0 / 255 + EPS_TOL
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert (delta > 0).float().mean() > 0.5  # it did move the pixels


def _trained_tiny_model():
    """A linear-ish classifier on two well-separated colour classes, trained to ~100%."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    from fap.models import PixelModel
    model = PixelModel(net, mean=(0.5,) * 3, std=(0.25,) * 3)
    x = torch.rand(256, 3, 8, 8) * 0.4
    y = torch.randint(0, 2, (256,))
    x[y == 1, 0] += 0.5  # class 1 is redder
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def test_attacks_raise_the_loss_of_a_trained_model():
    model, x, y = _trained_tiny_model()
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y).item()
    x_fgsm = fgsm(model, x, y, epsilon=8.0, random_init_prob=0.0)
    x_pgd = pgd(model, x, y, epsilon=8.0, steps=5, step=2.0)
    with torch.no_grad():
        loss_fgsm = F.cross_entropy(model(x_fgsm), y).item()
        loss_pgd = F.cross_entropy(model(x_pgd), y).item()
        # targeted: the loss toward the target falls
        target = random_wrong_labels(y, 2, torch.Generator().manual_seed(0))
    assert loss_fgsm > clean * 1.5 and loss_pgd > clean * 1.5
    torch.manual_seed(3)
    x_t = pgd(model, x, y, epsilon=8.0, steps=5, step=2.0, targeted=True, num_classes=2)
    torch.manual_seed(3)
    t = random_wrong_labels(y, 2)
    with torch.no_grad():
        assert F.cross_entropy(model(x_t), t).item() < F.cross_entropy(model(x), t).item()
    assert torch.equal(target, 1 - y)  # with 2 classes the wrong label is the other one


@pytest.mark.parametrize("p", [0.0, 0.42, 0.8, 1.0])
def test_random_start_rate_matches_probability(p):
    g = torch.Generator().manual_seed(0)
    x = torch.full((20000, 1, 2, 2), 0.5)
    start = random_start(x, 4.0, random_init_prob=p, generator=g)
    moved = (start != x).flatten(1).any(1).float().mean().item()
    assert abs(moved - p) < 0.015  # ~4.5 standard errors at n = 20000
    assert (start - x).abs().max() <= 4.0 / 255 + EPS_TOL
    # per-batch coin: all or nothing in one batch, rate p over batches
    hits = [bool((random_start(x[:8], 4.0, random_init_prob=p, per="batch", generator=g) != x[:8]).any())
            for _ in range(2000)]
    assert abs(sum(hits) / len(hits) - p) < 0.05


def test_random_start_is_uniform_in_the_ball():
    x = torch.full((4000, 3, 4, 4), 0.5)
    d = (random_start(x, 2.0, generator=torch.Generator().manual_seed(1)) - x) * 255 / 2.0
    assert d.min() >= -1 and d.max() <= 1
    assert abs(d.mean().item()) < 0.01 and abs(d.var().item() - 1 / 3) < 0.01  # U(-1, 1)


def test_sign_step_and_projection():
    x = torch.tensor([[[[0.0, 0.5, 1.0]]]])
    grad = torch.tensor([[[[-1.0, 1.0, 1.0]]]])
    out = sign_step(x, x, grad, epsilon=2.0, step=3.0)
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 0.5 + 2 / 255, 1.0]]]]))
    far = x + 1.0
    assert torch.equal(project(far, x, 0.0), x)
    with pytest.raises(RuntimeError, match="no input gradient"):
        sign_step(x, x, None, epsilon=1.0, step=1.0)


def test_bad_inputs_are_clear_errors():
    model = _model()
    x, y = torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="epsilon must be a number >= 0"):
        pgd(model, x, y, epsilon=-1.0)
    with pytest.raises(ValueError, match="steps"):
        pgd(model, x, y, epsilon=1.0, steps=0)
    with pytest.raises(ValueError, match="num_classes"):
        pgd(model, x, y, epsilon=1.0, targeted=True)
    with pytest.raises(ValueError, match="random_init_prob"):
        random_start(x, 1.0, random_init_prob=1.5)
    with pytest.raises(ValueError, match="1/255 units"):
        project(x, x, 300.0)
