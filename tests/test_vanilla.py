"""Vanilla: mean cross-entropy through the main norms; Mixup on the whole batch."""
import copy

import torch
import torch.nn.functional as F
from timm.data import Mixup

from fap.methods import FastAdvProp, Vanilla
from fap.norm import AUX_NAME
from test_fast_advprop import batch, tiny_model


def test_gradient_is_mean_cross_entropy_and_aux_is_untouched():
    model0 = tiny_model()
    x, y = batch(10)
    model = copy.deepcopy(model0)
    metrics = Vanilla().train_step(model, x, y, lambda l: l.backward())
    ref = copy.deepcopy(model0)
    F.cross_entropy(ref(x), y).backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if AUX_NAME in n:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)
    assert metrics["cost_ratio"] == 1.0 and metrics["count_clean"] == 10
    for n, b in model.named_buffers():
        if AUX_NAME in n:
            assert torch.equal(b, dict(model0.named_buffers())[n])


def test_mixup_applies_to_the_clean_part_only_in_fast_advprop():
    model = tiny_model().float()
    x, y = batch(20)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, num_classes=5, label_smoothing=0.0)
    torch.manual_seed(0)
    metrics = FastAdvProp(mixup_fn=mixup).train_step(model, x, y, lambda l: l.backward())
    assert not torch.equal(seen[0], x[:16])  # clean pass saw mixed images
    assert (seen[1] - x[16:]).abs().max() <= 1 / 255 + 1e-6  # noisy pass: the raw split + δ0
    assert torch.equal(x, batch(20)[0])  # the caller's batch was not mixed in place
    assert metrics["count_clean"] == 16
