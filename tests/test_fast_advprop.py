"""Fast AdvProp's step equals the closed-form objective, gradient for gradient.

The reference gradients below are computed independently of fap.methods: plain autograd
on the three summed losses, grouped and normalised by hand, with the adversarial images
built from the noisy pass's own input gradient. Only the routing (tested in test_norm)
is shared. fp64 so that "equal" means equal to 1e-10.
"""
import copy
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fap.methods.fast_advprop as fa
from fap.methods import FastAdvProp, budget_matched
from fap.methods.fast_advprop import group_changing_permutation, split_sizes
from fap.models import PixelModel
from fap.norm import AUX_NAME, convert_dual_norm, norm_param_names, route

B, P_ADV, EPS = 20, 0.2, 4.0  # 16 clean + 4 adversarial-split images


def tiny_model(aux_group_size=None, dual=True):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )
    if dual:
        convert_dual_norm(net, aux_group_size=aux_group_size)
        with torch.no_grad():  # make main and aux differ so routing mistakes show
            for n, p in net.named_parameters():
                if AUX_NAME in n:
                    p.add_(0.3 * torch.randn_like(p))
    return PixelModel(net, mean=(0.5,) * 3, std=(0.5,) * 3).double().train()


def batch(n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


class Recorder:
    """Records each forward's input (the run's own noisy and adversarial images)."""

    def __init__(self, model):
        self.inputs = []
        model.register_forward_pre_hook(lambda m, a: self.inputs.append(a[0].detach().clone()))


def run_step(model, x, y, **cfg):
    method = FastAdvProp(**cfg)
    rec = Recorder(model)
    calls = []

    def backward(loss):
        calls.append(float(loss.detach()))
        loss.backward()

    perms = []
    real = fa.group_changing_permutation

    def recording_perm(*a, **k):  # the real permutation, recorded for the reference
        p = real(*a, **k)
        perms.append(p.clone())
        return p

    targets = []
    real_targets = fa.random_wrong_labels

    def recording_targets(*a, **k):  # the real random targets, recorded for the reference
        t = real_targets(*a, **k)
        targets.append(t.clone())
        return t

    fa.group_changing_permutation, fa.random_wrong_labels = recording_perm, recording_targets
    try:
        metrics = method.train_step(model, x, y, backward)
    finally:
        fa.group_changing_permutation, fa.random_wrong_labels = real, real_targets
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    run_step.targets = targets
    return method, metrics, grads, rec.inputs, calls, perms


def closed_form(model0, x, y, x_noisy, *, beta=0.5, steps=1, reuse=True, per_group=True, perm=None, eps=EPS,
                mixed=False, target=None, bn_eval=False):
    """The objective of DESIGN.md, with plain autograd and hand normalisation.

    ``mixed``: the clean and the adversarial losses come from one forward of
    ``[clean; adversarial]`` (one set of norms, one batch), made after the attack.
    ``target``: the noisy pass's loss is on these labels and the attack descends it (a
    targeted attack); None: the true labels, ascended. ``bn_eval``: the noisy pass runs the
    BatchNorm layers in eval mode (running statistics)."""
    m = copy.deepcopy(model0)
    params = dict(m.named_parameters())
    b_c = x.shape[0] - round(P_ADV * x.shape[0])
    b_a = x.shape[0] - b_c
    x_c, y_c, x_a, y_a = x[:b_c], y[:b_c], x[b_c:], y[b_c:]
    grad = lambda loss: dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True,
                                                             retain_graph=True)))
    if not mixed:
        with route(m, "main"):
            g_clean = grad(F.cross_entropy(m(x_c), y_c, reduction="sum"))
    noisy_terms, x_cur = [], x_noisy
    bns = [mod for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    for _ in range(steps):
        x_n = x_cur.clone().requires_grad_(True)
        for mod in bns:
            mod.training = not bn_eval
        with route(m, "aux"):
            loss_n = F.cross_entropy(m(x_n), y_a if target is None else target, reduction="sum")
        for mod in bns:
            mod.training = True
        noisy_terms.append(grad(loss_n))
        (g_x,) = torch.autograd.grad(loss_n, x_n)
        step = x_n.detach() + (1 if target is None else -1) * eps / 255 * g_x.sign()
        x_cur = torch.min(torch.max(step, x_a - eps / 255), x_a + eps / 255).clamp(0, 1)
    x_adv, y_adv = (x_cur, y_a) if perm is None else (x_cur[perm], y_a[perm])
    if mixed:
        logits = m(torch.cat([x_c, x_adv]))
        g_clean = grad(F.cross_entropy(logits[:b_c], y_c, reduction="sum"))
        g_adv = grad(F.cross_entropy(logits[b_c:], y_adv, reduction="sum"))
    else:
        with route(m, "aux"):
            g_adv = grad(F.cross_entropy(m(x_adv), y_adv, reduction="sum"))
    groups = norm_param_names(m)
    z = lambda g, n: g[n] if g[n] is not None else torch.zeros_like(params[n])
    w_aux = beta * b_a * ((steps if reuse else 0) + 1)
    w_shared = b_c + w_aux
    expected, unnormalised = {}, {}
    for n in params:
        noisy = sum(z(t, n) for t in noisy_terms) if reuse else torch.zeros_like(params[n])
        total = z(g_clean, n) + beta * noisy + beta * z(g_adv, n)
        unnormalised[n] = total
        if not per_group:
            expected[n] = total / w_shared
        elif n in groups["main"]:
            expected[n] = z(g_clean, n) / b_c
        elif n in groups["aux"]:
            expected[n] = beta * (noisy + z(g_adv, n)) / w_aux
        else:
            expected[n] = total / w_shared
    return expected, unnormalised, x_adv, {"noisy": [sum(z(t, n) for t in noisy_terms) for n in params]}


def assert_grads_equal(got, expected, tol=1e-10):
    for n, e in expected.items():
        torch.testing.assert_close(got[n], e, rtol=tol, atol=tol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("fused", [False, True])
def test_gradients_equal_the_closed_form(fused):
    model0 = tiny_model()
    x, y = batch()
    model = copy.deepcopy(model0)
    _, metrics, grads, inputs, calls, _ = run_step(
        model, x, y, p_adv=P_ADV, epsilon=EPS, shuffle=False, fused=fused)
    x_noisy = inputs[0][16:] if fused else inputs[1]
    delta0 = x_noisy - x[16:]
    assert delta0.abs().max() <= EPS / 255 + 1e-6 and delta0.abs().max() > 0  # a random start was taken
    expected, _, x_adv, _ = closed_form(model0, x, y, x_noisy)
    assert torch.equal(inputs[-1], x_adv.float())  # the run's adversarial images, to the bit
    assert_grads_equal(grads, expected)
    assert len(calls) == (2 if fused else 3)
    assert metrics["cost_ratio"] == pytest.approx(1.2)


@pytest.mark.parametrize("norms", ["shared", "mixed"])
def test_one_set_of_norms_gradients_equal_the_closed_form(norms):
    """``shared`` and ``mixed`` minimise the same objective with one set of norms; they
    differ only in which rows share batch statistics (mixed: clean and adversarial)."""
    model0 = tiny_model(dual=False)
    x, y = batch()
    model = copy.deepcopy(model0)
    _, metrics, grads, inputs, calls, _ = run_step(model, x, y, p_adv=P_ADV, epsilon=EPS, norms=norms,
                                                      shuffle=False)
    x_noisy = inputs[0] if norms == "mixed" else inputs[1]  # mixed runs the noisy pass first
    expected, _, x_adv, _ = closed_form(model0, x, y, x_noisy, mixed=norms == "mixed")
    if norms == "mixed":
        assert torch.equal(inputs[-1], torch.cat([x[:16], x_adv.float()]))
    else:
        assert torch.equal(inputs[-1], x_adv.float())
    assert_grads_equal(grads, expected)
    assert len(calls) == (2 if norms == "mixed" else 3)
    assert metrics["forward_passes"] == len(calls) and metrics["cost_ratio"] == pytest.approx(1.2)
    assert metrics["count_clean"] == 16 and metrics["count_adversarial"] == 4


def test_update_mix_is_80_10_10_for_shared_parameters():
    """Per-sample weights: a clean image weighs 1, an adversarial-split image 0.5 + 0.5."""
    method = FastAdvProp(p_adv=0.2)
    w = method.weights(*split_sizes(320, 0.2))
    assert w == {"main": 256.0, "aux": 64.0, "shared": 320.0}
    assert (w["main"] / w["shared"], 0.5 * 64 / w["shared"]) == (0.8, 0.1)


def test_shuffling_bn_regroups_and_gradients_still_match():
    model0 = tiny_model(aux_group_size=2)  # B_a = 4 -> two ghost BN groups of 2
    x, y = batch()
    model = copy.deepcopy(model0)
    _, _, grads, inputs, _, perms = run_step(model, x, y, p_adv=P_ADV, epsilon=EPS, shuffle=True)
    (perm,) = perms
    groups_before = torch.arange(4) // 2
    assert (groups_before[perm] != groups_before).all()  # every sample changed BN group
    expected, _, x_adv, _ = closed_form(model0, x, y, inputs[1], perm=perm)
    assert torch.equal(inputs[-1], x_adv.float())
    assert_grads_equal(grads, expected)


def test_reuse_off_differs_by_exactly_the_beta_weighted_noisy_term():
    model0 = tiny_model()
    x, y = batch()
    runs = {}
    for reuse in (True, False):
        model = copy.deepcopy(model0)
        torch.manual_seed(5)  # same random start in both runs
        method, _, grads, inputs, calls, _ = run_step(model, x, y, p_adv=P_ADV, epsilon=EPS, shuffle=False,
                                                      reuse=reuse)
        runs[reuse] = (method, grads, inputs, calls)
        expected, _, _, _ = closed_form(model0, x, y, inputs[1], reuse=reuse)
        assert_grads_equal(grads, expected)
    assert len(runs[True][3]) == 3 and len(runs[False][3]) == 2  # no training backward on the noisy pass
    assert torch.equal(runs[True][2][1], runs[False][2][1])
    _, _, _, parts = closed_form(model0, x, y, runs[True][2][1])
    shared = [n for n in runs[True][1] if n not in sum(norm_param_names(model0).values(), [])]
    w_on = runs[True][0].weights(16, 4)["shared"]
    w_off = runs[False][0].weights(16, 4)["shared"]
    names = list(dict(model0.named_parameters()))
    for n in shared:
        diff = runs[True][1][n] * w_on - runs[False][1][n] * w_off  # un-normalised sums
        torch.testing.assert_close(diff, 0.5 * parts["noisy"][names.index(n)], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("attack_target, attack_bn_mode, reuse", [
    ("random", "train", True), ("untargeted", "eval", True), ("random", "eval", False)])
def test_attack_target_and_bn_mode_gradients_equal_the_closed_form(attack_target, attack_bn_mode, reuse):
    """Sec. 3.2.2's two alternatives: a targeted attack (descend toward a random wrong label,
    whose loss the noisy pass then trains on) and an attack with running statistics."""
    model0 = tiny_model()
    x, y = batch()
    model = copy.deepcopy(model0)
    _, metrics, grads, inputs, calls, _ = run_step(
        model, x, y, p_adv=P_ADV, epsilon=EPS, shuffle=False, reuse=reuse, attack_target=attack_target,
        attack_bn_mode=attack_bn_mode)
    target = None
    if attack_target == "random":
        (target,) = run_step.targets  # drawn once, by the noisy pass
        assert (target != y[16:]).all() and ((0 <= target) & (target < 5)).all()
    else:
        assert run_step.targets == []
    expected, _, x_adv, _ = closed_form(model0, x, y, inputs[1], reuse=reuse, target=target,
                                        bn_eval=attack_bn_mode == "eval")
    assert torch.equal(inputs[-1], x_adv.float())  # the run's adversarial images, to the bit
    assert_grads_equal(grads, expected)
    assert len(calls) == (3 if reuse else 2)
    aux_counts = {int(b) for n, b in model.named_buffers() if AUX_NAME in n and n.endswith("num_batches_tracked")}
    assert aux_counts == {1 if attack_bn_mode == "eval" else 2}  # an eval-mode attack leaves the statistics alone
    assert all(m.training for m in model.modules())  # the modes are restored


def test_attack_switches_differ_from_the_default_step():
    """The closed forms above are not vacuous: each switch changes the gradients."""
    model0 = tiny_model()
    x, y = batch()
    runs = {}
    for kw in ({}, {"attack_target": "random"}, {"attack_bn_mode": "eval"}):
        torch.manual_seed(3)
        runs[tuple(kw.items())] = run_step(copy.deepcopy(model0), x, y, p_adv=P_ADV, epsilon=EPS, shuffle=False,
                                           **kw)[2]
    base = runs[()]
    for key, grads in runs.items():
        if key:
            assert any(not torch.allclose(grads[n], base[n]) for n in base), key


def test_per_group_normalisation_off_divides_every_group_by_the_shared_count():
    model0 = tiny_model()
    x, y = batch()
    model = copy.deepcopy(model0)
    _, _, grads, inputs, _, _ = run_step(model, x, y, p_adv=P_ADV, epsilon=EPS, shuffle=False,
                                         per_group_normalization=False)
    expected, _, _, _ = closed_form(model0, x, y, inputs[1], per_group=False)
    assert_grads_equal(grads, expected)


def test_k_steps_add_a_beta_weighted_term_per_attack_iteration():
    model0 = tiny_model()
    x, y = batch()
    model = copy.deepcopy(model0)
    _, metrics, grads, inputs, calls, _ = run_step(model, x, y, p_adv=P_ADV, epsilon=EPS, step=2.0,
                                                   shuffle=False, attack_steps=2)
    assert len(calls) == 4 and metrics["image_passes"] == 16 + 4 * 3
    # closed form with step 2/255 (the reference loop takes ε-steps; rebuild with eps for the ball only)
    m = copy.deepcopy(model0)
    params = dict(m.named_parameters())
    x_a, y_a = x[16:], y[16:]
    grad = lambda loss: torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
    with route(m, "main"):
        gc = grad(F.cross_entropy(m(x[:16]), y[:16], reduction="sum"))
    x_cur, g_noisy = inputs[1], []
    for i in range(2):
        assert torch.equal(inputs[1 + i], x_cur.float())
        x_n = x_cur.clone().requires_grad_(True)
        with route(m, "aux"):
            loss = F.cross_entropy(m(x_n), y_a, reduction="sum")
        g_noisy.append(grad(loss))
        (gx,) = torch.autograd.grad(loss, x_n)
        x_cur = torch.min(torch.max(x_n.detach() + 2.0 / 255 * gx.sign(), x_a - EPS / 255), x_a + EPS / 255).clamp(0, 1)
    with route(m, "aux"):
        ga = grad(F.cross_entropy(m(x_cur), y_a, reduction="sum"))
    groups = norm_param_names(m)
    for i, n in enumerate(params):
        z = lambda g: g[i] if g[i] is not None else torch.zeros_like(params[n])
        aux_sum = 0.5 * (z(g_noisy[0]) + z(g_noisy[1]) + z(ga))
        if n in groups["main"]:
            e = z(gc) / 16
        elif n in groups["aux"]:
            e = aux_sum / (0.5 * 4 * 3)
        else:
            e = (z(gc) + aux_sum) / (16 + 0.5 * 4 * 3)
        torch.testing.assert_close(grads[n], e, rtol=1e-10, atol=1e-10)


def test_statistics_clean_pass_main_only_noisy_and_adversarial_aux_only():
    model0 = tiny_model()
    x, y = batch()
    model = copy.deepcopy(model0)
    run_step(model, x, y, p_adv=P_ADV, epsilon=EPS, shuffle=False)
    ref = copy.deepcopy(model0)
    with torch.no_grad(), route(ref, "main"):
        ref(x[:16])  # exactly one clean-split update of the main statistics
    bufs, ref_bufs = dict(model.named_buffers()), dict(ref.named_buffers())
    for n, b in bufs.items():
        if AUX_NAME in n:
            if n.endswith("num_batches_tracked"):
                assert int(b) == 2, n  # noisy + adversarial
            else:
                assert not torch.equal(b, dict(model0.named_buffers())[n]), n
        else:
            torch.testing.assert_close(b, ref_bufs[n], rtol=0, atol=0, msg=n)


def test_pass_counts_per_method():
    from fap.methods import build_method
    x, y = batch(20)
    cases = {
        ("vanilla", ()): (1, 1),
        ("advprop", (("attack_steps", 1), ("num_classes", 5))): (2, 1),
        ("advprop", (("attack_steps", 5), ("num_classes", 5))): (6, 1),
        ("fast_advprop", ()): (3, 3),
        ("fast_advprop", (("fused", True),)): (2, 2),
    }
    for (name, kw), (n_fwd, n_bwd) in cases.items():
        model = tiny_model().float()
        fwd = Counter()
        model.register_forward_hook(lambda *a: fwd.update(["f"]))
        bwd = []
        method = build_method(name, **dict(kw))
        metrics = method.train_step(model, x, y, lambda loss: (bwd.append(1), loss.backward()))
        assert (fwd["f"], len(bwd)) == (n_fwd, n_bwd), (name, kw)
        assert metrics["forward_passes"] == n_fwd
        cost = method.cost(20)
        assert metrics["image_passes"] == cost.image_passes
    assert build_method("advprop", attack_steps=5).cost(256).ratio == 7.0
    assert build_method("fast_advprop").cost(320).ratio == pytest.approx(1.2)


def test_group_changing_permutation_moves_every_sample():
    for groups, size in [(2, 1), (2, 8), (4, 16), (5, 3)]:
        for seed in range(5):
            perm = group_changing_permutation(groups, size, torch.Generator().manual_seed(seed))
            assert sorted(perm.tolist()) == list(range(groups * size))
            old = perm // size
            new = torch.arange(groups * size) // size
            assert (old != new).all()


def test_budget_matching_matches_the_paper():
    assert budget_matched(105, [30, 60, 90, 100]) == (87, [25, 50, 75, 83])
    assert budget_matched(180)[0] == 150 and budget_matched(210, [75, 150, 180]) == (175, [62, 125, 150])
    # Table 4's epochs after budget matching: 87, 79, 70 for p_adv = 0.2, 0.33, 0.5
    assert [budget_matched(105, p_adv=p)[0] for p in (0.2, 0.33, 1 / 3, 0.5)] == [87, 79, 79, 70]
    # the reference's 2:1 arithmetic: 90 / (2/3 + 1/3 * 2) = 67.5 rounds to 68 (1 - 1/3 in floats gives 67.4999...)
    assert budget_matched(105, [30, 60, 90, 100], p_adv=1 / 3) == (79, [22, 45, 68, 75])
    assert budget_matched(105, [30, 60, 90, 100], p_adv=0.5) == (70, [20, 40, 60, 67])
    assert budget_matched(24)[0] == 20  # detection, RetinaNet


def test_shared_norms_mode_uses_one_set_of_norms():
    model = tiny_model(dual=False).float()
    x, y = batch()
    metrics = FastAdvProp(p_adv=P_ADV, norms="shared").train_step(model, x, y, lambda l: l.backward())
    assert metrics["count_adversarial"] == 4
    with pytest.raises(ValueError, match="norms='dual' but the model has no auxiliary norms"):
        FastAdvProp().train_step(model, x, y, lambda l: l.backward())
    for norms in ("shared", "mixed"):
        with pytest.raises(ValueError, match=f"norms='{norms}' \\(one set of norms\\) but the model has auxiliary"):
            FastAdvProp(norms=norms).train_step(tiny_model().float(), x, y, lambda l: l.backward())


def test_bad_configuration_is_a_clear_error():
    for p in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"method.p_adv=.* expected a number in \(0, 1\)"):
            FastAdvProp(p_adv=p)
    with pytest.raises(ValueError, match="epsilon must be a number >= 0"):
        FastAdvProp(epsilon=-1.0)
    with pytest.raises(ValueError, match="unknown option"):
        FastAdvProp(eps=1.0)
    with pytest.raises(ValueError, match="fused=True needs method.norms='dual'"):
        FastAdvProp(fused=True, norms="mixed")
    with pytest.raises(ValueError, match="attack_target='random' with attack_bn_mode='train' needs method.fused=false"):
        FastAdvProp(fused=True, attack_target="random")
    with pytest.raises(ValueError, match="method.attack_bn_mode='frozen' is not valid: expected one of 'train'"):
        FastAdvProp(attack_bn_mode="frozen")
    with pytest.raises(ValueError, match="method.attack_target='true' is not valid: expected one of 'untargeted'"):
        FastAdvProp(attack_target="true")
    from fap.tasks import DetectionTask
    with pytest.raises(ValueError, match="attack_target='random': a detector has no single label"):
        FastAdvProp(attack_target="random", task=DetectionTask())
    with pytest.raises(ValueError, match="method.norms='split' is not valid: expected one of 'dual', 'shared', 'mixed'"):
        FastAdvProp(norms="split")
    x, y = batch(4)
    with pytest.raises(ValueError, match="a batch of 4 cannot be split with p_adv=0.1"):
        FastAdvProp(p_adv=0.1).train_step(tiny_model().float(), x, y, lambda l: l.backward())
    with pytest.raises(ValueError, match="images must be float"):
        FastAdvProp().train_step(tiny_model().float(), (x * 255).to(torch.uint8), y, lambda l: l.backward())


def ln_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Flatten(), nn.LayerNorm(6 * 8 * 8), nn.Linear(6 * 8 * 8, 5))
    return PixelModel(convert_dual_norm(net), mean=(0.5,) * 3, std=(0.5,) * 3).double().train()


def test_shuffling_bn_leaves_per_sample_norms_alone_silently():
    """LayerNorm has no batch statistics: Shuffling BN changes nothing and says nothing."""
    x, y = torch.rand(4, 3, 8, 8).double(), torch.arange(4)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x_new, y_new = FastAdvProp()._shuffle(ln_model(), x, y)
    assert x_new is x and y_new is y


def test_check_setup_names_ghost_groups_that_do_not_divide_the_adversarial_split():
    method = FastAdvProp(p_adv=0.2)
    method.check_setup(tiny_model(aux_group_size=4), 20)  # B_a = 4: one group
    method.check_setup(tiny_model(aux_group_size=4), 40)  # B_a = 8: two groups
    with pytest.raises(ValueError, match=r"aux_group_size=4 must divide the 10 images .*loader batch 50.*among 2, 5, 10,"):
        method.check_setup(tiny_model(aux_group_size=4), 50)
    with pytest.raises(ValueError, match="at least 5 images"):
        method.check_setup(tiny_model(), 2)
    with pytest.raises(ValueError, match="norms='dual' but the model has no auxiliary norms"):
        method.check_setup(tiny_model(dual=False), 20)


def test_check_setup_refuses_an_odd_clean_batch_under_mixup():
    method = FastAdvProp(p_adv=0.2, mixup_fn=lambda x, y: (x, y))
    method.check_setup(tiny_model(), 20)  # 16 clean
    with pytest.raises(ValueError, match="gives 21 clean images"):
        method.check_setup(tiny_model(), 26)  # 21 clean + 5 adversarial
