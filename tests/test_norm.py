"""fap.norm: dual normalisation is invisible on the main route and separable on export."""
import copy

import pytest
import timm
import torch
import torch.nn as nn

from fap.norm import (
    AUX_NAME,
    convert_dual_norm,
    dual_norm_modules,
    norm_param_names,
    route,
    set_grad_scale,
    split_route,
    strip_aux,
)

# Small members of the three families the users train; 32 px keeps them fast on CPU.
FAMILIES = {
    "resnet18": {},
    "efficientnet_b0": {},  # timm BatchNormAct2d everywhere
    "vit_tiny_patch16_224": dict(img_size=32, patch_size=8, depth=2),  # LayerNorm
}


def _pair(name):
    torch.manual_seed(0)
    ref = timm.create_model(name, num_classes=10, **FAMILIES[name])
    dual = convert_dual_norm(copy.deepcopy(ref))
    return ref, dual


def _run(model, x, train, seed=1):
    model.train(train)
    torch.manual_seed(seed)  # dropout / drop-path draw the same masks
    return model(x)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_main_route_is_bit_identical_to_unconverted_model(name):
    ref, dual = _pair(name)
    x = torch.rand(6, 3, 32, 32)
    for train in (True, False, True):
        a = _run(ref, x, train)
        with route(dual, "main"):
            b = _run(dual, x, train)
        assert torch.equal(a, b), f"{name} train={train}"
    # train-mode passes updated the same running statistics
    ref_sd = ref.state_dict()
    for k, v in strip_aux(dual.state_dict()).items():
        assert torch.equal(v, ref_sd[k]), k
    # default route (no context) is main as well
    assert torch.equal(_run(ref, x, False), _run(dual, x, False))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_stripped_checkpoint_loads_strictly_into_plain_timm(name):
    _, dual = _pair(name)
    x = torch.rand(4, 3, 32, 32)
    with route(dual, "aux"):
        _run(dual, x, True)  # make the aux branch differ from main
    plain = timm.create_model(name, num_classes=10, **FAMILIES[name])
    plain.load_state_dict(strip_aux(dual.state_dict()), strict=True)
    assert torch.equal(_run(plain, x, False), _run(dual, x, False))


def test_batchnormact_activation_runs_after_either_branch():
    from timm.layers import BatchNormAct2d
    bn = BatchNormAct2d(4, act_layer=nn.ReLU)
    model = nn.Sequential(bn)
    convert_dual_norm(model)
    x = torch.randn(8, 4, 5, 5)
    for branch in ("main", "aux"):
        with route(model, branch):
            assert (model(x) >= 0).all(), branch  # ReLU applied
    assert isinstance(getattr(model[0], AUX_NAME).act, nn.Identity)  # aux does not apply it twice
    with route(model, "aux"):
        out = model(x)
    ref = torch.relu(nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps))
    torch.testing.assert_close(out, ref)


def test_aux_is_a_copy_of_main_including_zero_init():
    torch.manual_seed(0)
    net = convert_dual_norm(timm.create_model("resnet18", num_classes=10))
    bn2 = net.layer1[0].bn2  # zero-initialised gamma in timm (zero_init_last)
    assert torch.equal(bn2.weight, getattr(bn2, AUX_NAME).weight)
    assert float(bn2.weight.detach().abs().sum()) == 0.0
    assert bn2.weight.data_ptr() != getattr(bn2, AUX_NAME).weight.data_ptr()


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_each_route_touches_only_its_own_statistics(name):
    _, dual = _pair(name)
    dual.train()
    x = torch.rand(6, 3, 32, 32)

    def buffers(kind):
        out = {}
        for n, b in dual.named_buffers():
            if "running" in n and ((f"{AUX_NAME}." in n) == (kind == "aux")):
                out[n] = b.clone()
        return out

    main0, aux0 = buffers("main"), buffers("aux")
    with route(dual, "main"):
        dual(x)
    assert all(torch.equal(v, aux0[k]) for k, v in buffers("aux").items())
    assert any(not torch.equal(v, main0[k]) for k, v in buffers("main").items())
    main1 = buffers("main")
    with route(dual, "aux"):
        dual(x)
    assert all(torch.equal(v, main1[k]) for k, v in buffers("main").items())
    assert any(not torch.equal(v, aux0[k]) for k, v in buffers("aux").items())


def test_eval_logits_ignore_aux_parameters():
    _, dual = _pair("resnet18")
    x = torch.rand(4, 3, 32, 32)
    before = _run(dual, x, False)
    with torch.no_grad():
        for n, p in dual.named_parameters():
            if f"{AUX_NAME}." in n:
                p.normal_()
    assert torch.equal(before, _run(dual, x, False))


def test_split_route_equals_separate_routes():
    _, dual = _pair("resnet18")
    x = torch.rand(10, 3, 32, 32)
    ref = copy.deepcopy(dual)
    with split_route(dual, 6):
        out = _run(dual, x, True)
    with route(ref, "main"):
        a = _run(ref, x[:6], True)
    with route(ref, "aux"):
        b = _run(ref, x[6:], True)
    torch.testing.assert_close(out, torch.cat([a, b]), rtol=1e-5, atol=1e-5)
    for (n, v), (_, w) in zip(dual.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(v, w, msg=n)


def test_route_restores_previous_route_and_rejects_unknown_branch():
    _, dual = _pair("resnet18")
    with route(dual, "aux"):
        with route(dual, "main"):
            assert all(m.route_to == "main" for m in dual_norm_modules(dual))
        assert all(m.route_to == "aux" for m in dual_norm_modules(dual))
    assert all(m.route_to == "main" for m in dual_norm_modules(dual))
    with pytest.raises(ValueError, match="unknown branch 'adv'"):
        with route(dual, "adv"):
            pass
    with pytest.raises(ValueError, match="n_main"):
        with split_route(dual, -1):
            pass


def test_ghost_batch_statistics_per_group():
    torch.manual_seed(0)
    model = convert_dual_norm(nn.Sequential(nn.BatchNorm2d(3)), aux_group_size=4)
    bn = model[0]
    x = torch.randn(8, 3, 2, 2) + torch.arange(8.0).view(8, 1, 1, 1)  # groups have different means
    with route(model, "aux"):
        out = model(x)
    aux = getattr(bn, AUX_NAME)
    expected = torch.cat([
        nn.functional.batch_norm(c, None, None, aux.weight, aux.bias, True, 0.0, aux.eps) for c in x.split(4)
    ])
    torch.testing.assert_close(out, expected)
    # running stats: one update with the mean of the groups' statistics (unbiased var)
    means = torch.stack([c.mean(dim=(0, 2, 3)) for c in x.split(4)]).mean(0)
    vars_ = torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in x.split(4)]).mean(0)
    torch.testing.assert_close(aux.running_mean, 0.1 * means)
    torch.testing.assert_close(aux.running_var, 0.9 + 0.1 * vars_)
    assert int(aux.num_batches_tracked) == 1
    # the main branch never uses ghost groups (bit-identical to the original)
    with route(model, "main"):
        torch.testing.assert_close(model(x), nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps))
    with pytest.raises(ValueError, match="aux_group_size=4 must divide"):
        with route(model, "aux"):
            model(torch.randn(10, 3, 2, 2))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bn_cls,shape", [(nn.BatchNorm1d, (12, 3)), (nn.BatchNorm2d, (12, 3, 2, 2))])
def test_ghost_running_statistics_match_the_groups_in_fp64(bn_cls, shape, momentum):
    """The groups' statistics taken from the kernel equal the textbook ones, over two
    steps (so both the decay and the cumulative average with momentum=None show)."""
    torch.manual_seed(0)
    model = convert_dual_norm(nn.Sequential(bn_cls(3, momentum=momentum)), aux_group_size=4).double()
    aux = getattr(model[0], AUX_NAME)
    mean_ref, var_ref = aux.running_mean.clone(), aux.running_var.clone()
    for step in (1, 2):
        x = torch.randn(*shape, dtype=torch.float64) * step + torch.arange(12.0, dtype=torch.float64).view(
            12, *([1] * (len(shape) - 1)))
        with route(model, "aux"):
            model(x)
        dims = [0] + list(range(2, x.dim()))
        means = torch.stack([c.mean(dim=dims) for c in x.split(4)]).mean(0)
        vars_ = torch.stack([c.var(dim=dims, unbiased=True) for c in x.split(4)]).mean(0)
        f = 0.1 if momentum is not None else 1.0 / step
        mean_ref = (1 - f) * mean_ref + f * means
        var_ref = (1 - f) * var_ref + f * vars_
        torch.testing.assert_close(aux.running_mean, mean_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(aux.running_var, var_ref, rtol=1e-12, atol=1e-12)
        assert int(aux.num_batches_tracked) == step


def test_grad_scale_with_a_missing_or_frozen_affine_parameter():
    torch.manual_seed(0)
    ln = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, bias=False))
    ref = copy.deepcopy(ln)
    convert_dual_norm(ln)
    x = torch.randn(3, 4)
    set_grad_scale(ln, main=3.0)
    with route(ln, "main"):
        ln(x).sum().backward()
    ref(x).sum().backward()
    assert ln[1].bias is None
    torch.testing.assert_close(ln[1].weight.grad, 3.0 * ref[1].weight.grad)
    torch.testing.assert_close(ln[0].weight.grad, ref[0].weight.grad)

    bn = convert_dual_norm(nn.Sequential(nn.BatchNorm2d(2)))
    bn[0].bias.requires_grad_(False)
    set_grad_scale(bn, main=2.0)
    with route(bn, "main"):
        bn(torch.randn(4, 2, 3, 3)).pow(2).sum().backward()
    assert bn[0].bias.grad is None and bn[0].weight.grad is not None


def test_grad_scale_multiplies_affine_gradients_only():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    net(torch.randn(2, 3, 5, 5))
    ref = copy.deepcopy(net)
    convert_dual_norm(net)
    x = torch.randn(6, 3, 5, 5)
    set_grad_scale(net, main=3.0, aux=5.0)
    with route(net, "main"):
        net(x).sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(net[1].weight.grad, 3.0 * ref[1].weight.grad)
    torch.testing.assert_close(net[1].bias.grad, 3.0 * ref[1].bias.grad)
    torch.testing.assert_close(net[0].weight.grad, ref[0].weight.grad)  # shared: unscaled
    net.zero_grad()
    with route(net, "aux"):
        net(x).sum().backward()
    torch.testing.assert_close(getattr(net[1], AUX_NAME).weight.grad, 5.0 * ref[1].weight.grad)
    assert net[1].weight.grad is None or float(net[1].weight.grad.abs().sum()) == 0.0


def test_norm_param_names_partition_norm_parameters():
    _, dual = _pair("vit_tiny_patch16_224")
    groups = norm_param_names(dual)
    names = dict(dual.named_parameters())
    assert groups["main"] and groups["aux"] and len(groups["main"]) == len(groups["aux"])
    assert set(groups["main"]).isdisjoint(groups["aux"])
    assert all(n in names for n in groups["main"] + groups["aux"])
    assert all(f"{AUX_NAME}." in n for n in groups["aux"])
    assert "norm.weight" in groups["main"]


def test_conversion_errors_are_clear():
    with pytest.raises(ValueError, match="no normalisation layer to convert"):
        convert_dual_norm(nn.Sequential(nn.Linear(3, 3)))
    model = convert_dual_norm(nn.Sequential(nn.BatchNorm2d(3)))
    with pytest.raises(ValueError, match="already converted"):
        convert_dual_norm(model)
    from timm.layers import GroupNormAct
    with pytest.raises(ValueError, match="GroupNormAct"):
        convert_dual_norm(nn.Sequential(GroupNormAct(4, num_groups=2)))
    with pytest.raises(ValueError, match="aux_group_size"):
        convert_dual_norm(nn.Sequential(nn.BatchNorm2d(3)), aux_group_size=1)


def test_layernorm2d_and_groupnorm_convert_exactly():
    from timm.layers import LayerNorm2d
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3), LayerNorm2d(8), nn.GroupNorm(2, 8))
    dual = convert_dual_norm(copy.deepcopy(ref))
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(ref(x), dual(x))
    with route(dual, "aux"):
        assert torch.equal(ref(x), dual(x))  # aux starts as an exact copy


def test_branch_distance_is_zero_after_conversion_and_grows_with_aux_training():
    from fap.norm import branch_distance
    _, dual = _pair("resnet18")
    rows = branch_distance(dual)
    assert len(rows) == 20 and rows[0]["layer"] == "bn1" and rows[0]["kind"] == "BatchNorm2d"
    assert all(r.get(k, 0.0) == 0.0 for r in rows for k in ("running_mean", "running_var", "weight", "bias"))
    dual.train()
    with route(dual, "aux"):
        dual(torch.rand(4, 3, 32, 32))
    rows = branch_distance(dual)
    m, a = dual.bn1, getattr(dual.bn1, AUX_NAME)
    expected = float((a.running_mean - m.running_mean).norm() / m.running_mean.norm().clamp_min(1e-12))
    assert rows[0]["running_mean"] == pytest.approx(expected)
    assert rows[0]["running_var"] > 0


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224"])
def test_copy_main_to_aux_makes_every_aux_norm_its_main_again(name):
    """After the main norms move (trained, or loaded from a vanilla model), each aux norm
    becomes a copy of its main one: affine parameters, running statistics, batch count."""
    from fap.norm import copy_main_to_aux
    _, dual = _pair(name)
    dual.train()
    with route(dual, "main"):
        dual(torch.rand(4, 3, 32, 32))
    with torch.no_grad():
        for m in dual_norm_modules(dual):
            m.weight.add_(1.0)
    sd = dual.state_dict()
    pairs = [(k, k.replace(f".{AUX_NAME}.", ".", 1)) for k in sd if f".{AUX_NAME}." in k]
    assert any(not torch.equal(sd[a], sd[m]) for a, m in pairs)
    assert copy_main_to_aux(dual) == len(dual_norm_modules(dual))
    sd = dual.state_dict()
    assert pairs and all(torch.equal(sd[a], sd[m]) for a, m in pairs)
    aux = getattr(dual_norm_modules(dual)[0], AUX_NAME)
    assert aux.weight.data_ptr() != dual_norm_modules(dual)[0].weight.data_ptr()  # copies, not shared
