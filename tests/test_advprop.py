"""AdvProp: paired PGD-K copies through the aux norms; loss = L(clean) + L(adv)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fap.methods import AdvProp
from fap.norm import AUX_NAME, route, split_route
from test_fast_advprop import batch, tiny_model


def test_gradient_is_clean_plus_adversarial_mean_loss():
    model0 = tiny_model()
    x, y = batch(12)
    model = copy.deepcopy(model0)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    AdvProp(epsilon=4.0, attack_steps=3, num_classes=5).train_step(model, x, y, lambda l: l.backward())
    x_adv = seen[-1][12:]
    assert torch.equal(seen[-1][:12], x)  # paired: the same images, clean and adversarial
    assert (x_adv - x).abs().max() <= 4 / 255 + 1e-6 and (x_adv != x).any()
    ref = copy.deepcopy(model0)
    with split_route(ref, 12):
        logits = ref(torch.cat([x, x_adv]))
    loss = (F.cross_entropy(logits[:12], y, reduction="sum") + F.cross_entropy(logits[12:], y, reduction="sum")) / 12
    loss.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("norms", ["shared", "mixed"])
def test_one_set_of_norms_gradient_is_the_same_objective(norms):
    """mixed: one forward of [clean; adversarial] (shared batch statistics); shared: one
    forward each. Both give the gradient of (Σ ℓ_clean + Σ ℓ_adv) / B under their norms."""
    model0 = tiny_model(dual=False)
    x, y = batch(12)
    model = copy.deepcopy(model0)
    seen, calls = [], []
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))

    def backward(loss):
        calls.append(loss)
        loss.backward()

    metrics = AdvProp(epsilon=4.0, attack_steps=3, num_classes=5, norms=norms).train_step(model, x, y, backward)
    ref = copy.deepcopy(model0)
    if norms == "mixed":
        x_adv = seen[-1][12:]
        assert torch.equal(seen[-1][:12], x)
        logits = ref(torch.cat([x, x_adv]))
        logits_c, logits_a = logits[:12], logits[12:]
    else:
        x_adv = seen[-1]
        assert torch.equal(seen[-2], x) and seen[-1].shape[0] == 12
        logits_c, logits_a = ref(x), ref(x_adv)
    assert (x_adv - x).abs().max() <= 4 / 255 + 1e-6 and (x_adv != x).any()
    loss = (F.cross_entropy(logits_c, y, reduction="sum") + F.cross_entropy(logits_a, y, reduction="sum")) / 12
    loss.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)
    assert len(calls) == (2 if norms == "shared" else 1)  # the attack's passes take input gradients only
    assert metrics["backward_passes"] == len(calls) + 3


def test_attack_uses_aux_running_statistics_and_leaves_them_alone():
    model = tiny_model()
    x, y = batch(12)
    aux0 = {n: b.clone() for n, b in model.named_buffers() if AUX_NAME in n}
    method = AdvProp(epsilon=4.0, attack_steps=2, num_classes=5)
    x_adv = method._attack(model, x, y)
    assert model.training  # restored after the eval-mode attack
    for n, b in model.named_buffers():
        if AUX_NAME in n:
            assert torch.equal(b, aux0[n]), n
    # the attack targets a wrong label: the loss toward the true label does not need to rise,
    # but the aux-route prediction moves away from the clean one
    model.eval()
    with route(model, "aux"), torch.no_grad():
        assert not torch.equal(model(x_adv), model(x))


def test_cost_is_k_plus_two():
    assert AdvProp(attack_steps=1).cost(256).ratio == 3.0
    assert AdvProp(attack_steps=5).cost(256).ratio == 7.0


def test_bad_configuration():
    with pytest.raises(ValueError, match="attack_bn_mode"):
        AdvProp(attack_bn_mode="frozen")
    with pytest.raises(ValueError, match="attack_steps"):
        AdvProp(attack_steps=0)
    with pytest.raises(ValueError, match="epsilon"):
        AdvProp(epsilon=-2)
