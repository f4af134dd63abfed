"""The detection step (issue #17, stages 2-3): the methods drive a RetinaNet through `train_step`.

The reference gradients use torchvision's own training forward (``net(images, targets)``
in train mode, whose loss is the mean over images of the per-image terms), not
`fap.detection.model.per_image_losses`; only the routing (tested in test_norm) is shared.
The network runs in fp64 (pixels stay fp32, as in the classification tests), so "equal"
means equal to 1e-9. A ResNet-18 RetinaNet on 64-px images keeps it cheap.
"""
import copy

import pytest
import torch
import torch.nn as nn

from fap.checks import ConfigError
from fap.detection.model import Detector, build_retinanet
from fap.methods import AdvProp, FastAdvProp, Vanilla
from fap.norm import DualNorm, norm_param_names, route
from fap.tasks import DetectionTargets, DetectionTask

B, P_ADV, EPS, SIZE, CLASSES = 5, 0.4, 4.0, 64, 4  # 3 clean + 2 adversarial-split images


def tiny_detector():
    torch.manual_seed(0)
    model = build_retinanet(CLASSES, backbone="resnet18", min_size=SIZE, max_size=SIZE)
    with torch.no_grad():  # main and aux differ, so that routing mistakes show
        for n, p in model.named_parameters():
            if "aux_norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model.double().train()


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, 3, SIZE, SIZE, generator=g)  # fp32 pixels, as the methods hand them over
    targets = []
    for i in range(B):
        xy = torch.rand(2, 2, generator=g, dtype=torch.float64) * 30
        wh = 8 + torch.rand(2, 2, generator=g, dtype=torch.float64) * 25
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.tensor([1 + i % 3, 2])})
    return x, DetectionTargets(targets)


def torchvision_sum(model, x, targets):
    """Σ_i ℓ_i from torchvision's own training forward (its loss is the mean over images)."""
    net = model.net
    assert net.training
    losses = net(list(x.double()), [dict(t) for t in targets.targets])
    return x.shape[0] * (losses["classification"] + losses["bbox_regression"])


def grads_of(model, loss):
    params = dict(model.named_parameters())
    got = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
    return {n: (g if g is not None else torch.zeros_like(params[n])) for n, g in zip(params, got)}


def run(method, model, x, targets):
    inputs = []
    model.register_forward_pre_hook(lambda m, a: inputs.append((a[0].detach().clone(), a[1])))
    metrics = method.train_step(model, x, targets, lambda loss: loss.backward())
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    return metrics, grads, inputs


def test_vanilla_detection_step_is_torchvision_loss():
    model0 = tiny_detector()
    x, t = batch()
    model = copy.deepcopy(model0)
    metrics, grads, _ = run(Vanilla(task=DetectionTask()), model, x, t)
    with route(model0, "main"):
        expected = grads_of(model0, torchvision_sum(model0, x, t) / B)
    for n, e in expected.items():
        torch.testing.assert_close(grads[n], e, rtol=1e-9, atol=1e-10, msg=lambda m: f"{n}: {m}")
    assert metrics["count_clean"] == B and metrics["loss_clean"] > 0


def test_fast_advprop_detection_gradients_equal_the_closed_form():
    model0 = tiny_detector()
    x, t = batch()
    model = copy.deepcopy(model0)
    method = FastAdvProp(task=DetectionTask(), p_adv=P_ADV, epsilon=EPS, shuffle=False)
    metrics, grads, inputs = run(method, model, x, t)
    assert len(inputs) == 3  # clean, noisy, adversarial
    b_c, b_a = 3, 2
    x_a, t_c, t_a = x[b_c:], t[:b_c], t[b_c:]
    x_noisy = inputs[1][0]
    assert 0 < (x_noisy - x_a).abs().max() <= EPS / 255 + 1e-6  # a random start was taken
    m = copy.deepcopy(model0)
    with route(m, "main"):
        g_clean = grads_of(m, torchvision_sum(m, x[:b_c], t_c))
    x_n = x_noisy.clone().requires_grad_(True)
    with route(m, "aux"):
        loss_n = torchvision_sum(m, x_n, t_a)
    g_noisy = grads_of(m, loss_n)
    (g_x,) = torch.autograd.grad(loss_n, x_n)
    x_adv = torch.min(torch.max(x_noisy + EPS / 255 * g_x.sign(), x_a - EPS / 255), x_a + EPS / 255).clamp(0, 1)
    assert torch.equal(inputs[2][0], x_adv)  # the run's adversarial images, to the bit
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(inputs[2][1], t_a.targets))  # boxes unchanged
    with route(m, "aux"):
        g_adv = grads_of(m, torchvision_sum(m, x_adv, t_a))
    groups, beta = norm_param_names(m), 0.5
    w_aux = beta * b_a * 2
    for n in g_clean:
        if n in groups["main"]:
            e = g_clean[n] / b_c
        elif n in groups["aux"]:
            e = beta * (g_noisy[n] + g_adv[n]) / w_aux
        else:
            e = (g_clean[n] + beta * g_noisy[n] + beta * g_adv[n]) / (b_c + w_aux)
        torch.testing.assert_close(grads[n], e, rtol=1e-9, atol=1e-10, msg=lambda msg: f"{n}: {msg}")
    assert metrics["count_clean"] == 3 and metrics["count_adversarial"] == 2 and "loss_noisy_box" in metrics


def test_detection_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="method.targeted=True: a detector"):
        AdvProp(task=DetectionTask())
    with pytest.raises(ConfigError, match="method.label_smoothing"):
        Vanilla(task=DetectionTask(), label_smoothing=0.1)
    AdvProp(task=DetectionTask(), targeted=False, attack_steps=1)
    x, t = batch()
    with pytest.raises(ValueError, match="5 images but 4 targets"):
        DetectionTask().check(x, t[:4])


def test_retinanet_r50_has_trainable_dual_batchnorm_and_exports_to_plain_torchvision():
    from torchvision.models.detection import retinanet_resnet50_fpn
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = build_retinanet(CLASSES, min_size=SIZE, max_size=SIZE)
    mods = list(model.modules())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in mods)
    bns = [m for m in model.net.backbone.body.modules() if isinstance(m, nn.BatchNorm2d) and isinstance(m, DualNorm)]
    assert len(bns) == 53 and all(p.requires_grad for m in bns for p in m.parameters())
    with torch.no_grad():  # make the statistics non-trivial, and the aux ones different
        for m in bns:
            m.running_mean.normal_(0, 0.1), m.aux_norm.running_mean.normal_(5, 1)
    exported = model.export_state_dict()
    assert not any("aux_norm" in k for k in exported)
    plain = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=CLASSES, min_size=SIZE,
                                   max_size=SIZE)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in plain.modules())
    plain.load_state_dict(exported, strict=True)
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    model.eval(), plain.eval()
    with torch.no_grad(), route(model, "main"):
        ours, theirs = model(x)[0], plain(list(x))[0]
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    assert isinstance(model, Detector) and model.arch["backbone"] == "resnet50"
