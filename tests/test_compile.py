"""torch.compile and the routing between main and auxiliary norms (issue #15).

Dynamo's tracing and guards are exercised with ``backend="eager"`` (and AOTAutograd with
``"aot_eager"``), not inductor, whose code generation would take minutes on a 2-core CPU;
which graphs exist and when they recompile is decided before the backend. Counts come
from ``torch._dynamo.utils.counters`` (`fap.engine.compiled.dynamo_counts`).
"""
import warnings

import pytest
import torch

from fap.engine.compiled import CompileWatch, dynamo_counts
from fap.methods import build_method
from fap.models import PixelModel
from fap.norm import convert_dual_norm, route

# Graphs compiled in the first step of each method on a dual-BatchNorm model: one per distinct
# pass (a pass differs by its route, whether its input needs a gradient, and grad mode).
FIRST_STEP = {
    "vanilla": ("vanilla", {}, 1),                                  # one forward
    "advprop": ("advprop", {"attack_steps": 1}, 2),                 # attack (eval, aux, input grad); split-routed pass
    "fast_advprop": ("fast_advprop", {}, 3),                        # clean/main; noisy/aux + input grad; adversarial/aux
    "fast_advprop_fused": ("fast_advprop", {"fused": True}, 2),     # clean+noisy split-routed; adversarial/aux
}


class ToyNet(torch.nn.Module):
    """Two conv-BatchNorm-ReLU blocks and a classifier: what routing needs, traced in a second."""

    num_classes = 4  # targeted AdvProp reads it

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _model(dual: bool):
    """A dual-norm (or plain) ToyNet taking [0, 1] pixels, wrapped as `fap.models.create_model` wraps timm models."""
    torch.manual_seed(0)
    net = ToyNet()
    return PixelModel(convert_dual_norm(net) if dual else net, mean=(0.5,) * 3, std=(0.5,) * 3)


def _steps(method, model, n, backend="eager", seed=0):
    """Compile ``model.net``, run ``n`` steps on fresh batches; graphs and graph breaks per step."""
    torch._dynamo.reset()
    model.net.compile(backend=backend)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(seed)
    per_step = []
    for _ in range(n):
        before = dynamo_counts()
        x, y = torch.rand(20, 3, 32, 32, generator=gen), torch.randint(0, 4, (20,), generator=gen)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Shuffling BN is a no-op")
            method.train_step(model, x, y, lambda loss: loss.backward())
        opt.step()
        opt.zero_grad(set_to_none=True)
        after = dynamo_counts()
        per_step.append((after["graphs"] - before["graphs"], after["graph_breaks"] - before["graph_breaks"]))
    return per_step


@pytest.mark.parametrize("label", list(FIRST_STEP))
def test_routing_compiles_once_per_pass_then_never_again(label):
    """The counts README's "torch.compile" quotes: graphs in step 1, none after, no graph breaks."""
    kind, kw, graphs = FIRST_STEP[label]
    per_step = _steps(build_method(kind, **kw), _model(dual=kind != "vanilla"), 4)
    assert per_step == [(graphs, 0), (0, 0), (0, 0), (0, 0)], per_step


def test_compiled_routing_takes_the_branch_it_is_routed_to():
    """Guards on the route: the same input through main and aux norms after compiling one of them."""
    model = _model(dual=True)
    with torch.no_grad():  # make the aux branch differ from the main one
        for m in model.modules():
            if hasattr(m, "aux_norm"):
                m.aux_norm.weight.mul_(2.0)
    model.eval()
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        eager = {b: _routed(model, b, x) for b in ("main", "aux")}
        torch._dynamo.reset()
        model.net.compile(backend="eager")
        compiled = {b: _routed(model, b, x) for b in ("main", "aux", "main")}
    assert not torch.allclose(eager["main"], eager["aux"])
    assert all(torch.allclose(compiled[b], eager[b], atol=1e-6) for b in eager)


def _routed(model, branch, x):
    with route(model, branch):
        return model(x)


def test_one_fast_advprop_step_through_aot_autograd_gives_the_eager_gradients():
    """The per-group gradient scale (a custom autograd Function) and the three backward passes
    survive AOTAutograd: the compiled step's gradients are the eager step's."""
    method = build_method("fast_advprop", random_init_prob=0.0)
    x, y = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(20) % 4
    grads = {}
    for backend in (None, "aot_eager"):
        model = _model(dual=True).train()
        if backend:
            torch._dynamo.reset()
            model.net.compile(backend=backend)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Shuffling BN is a no-op")
            method.train_step(model, x, y, lambda loss: loss.backward())
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[None].keys() == grads["aot_eager"].keys()
    for n, g in grads[None].items():
        assert torch.allclose(grads["aot_eager"][n], g, rtol=1e-4, atol=1e-6), n


def test_the_watch_names_an_update_that_compiles_after_the_warm_up():
    watch = CompileWatch(enabled=True, warmup=2)
    f = torch.compile(lambda t: t * 2, backend="eager")
    for step, size in ((1, 3), (2, 3), (3, 3)):
        with watch.update(step):
            f(torch.ones(size))
    with pytest.warns(UserWarning, match="update 4 compiled"):
        with watch.update(4):
            f(torch.ones(2, 2))  # a new rank: dynamo must compile again
    s = watch.summary()
    assert s["late_compiling_updates"] == 1 and s["late_compiling_first"] == [4] and s["graphs"] == 2
    assert [u["graphs"] for u in s["first_updates"]] == [1, 0, 0, 1]
    assert CompileWatch(enabled=False).summary() == {}


# ---- compile under DeepSpeed ZeRO-3 (ZeRO-2 and FSDP2: tests/test_distributed.py) -------------------

def test_compile_under_zero3_is_refused_at_start(tiny_folder, tmp_path):
    """ZeRO-3 + compile fails in the first backward (dynamo traces its empty parameter
    placeholders): the engine refuses the combination before it builds anything, in one line."""
    import json

    from helpers_engine import REPO, accelerate_cmd, run, tiny_vit_overrides

    ds = json.loads((REPO / "accelerate_configs" / "deepspeed_zero3.json").read_text())
    ds["bf16"] = {"enabled": False}
    ds.pop("data_types", None)
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    c = accelerate_cmd("-m", [], processes=1, deepspeed_config=tmp_path / "zero3.json")
    args = tiny_vit_overrides(tiny_folder, tmp_path / "run", **{"train.compile": "true",
                                                                "train.compile_backend": "eager"})
    proc = run(c[:-1] + ["-m", "fap.engine", *args], check=False, timeout=900)
    assert proc.returncode != 0
    assert "fap.engine: error: train.compile=true under DeepSpeed ZeRO-3" in proc.stderr, proc.stderr[-3000:]


def test_check_compile():
    from fap.config import ConfigError
    from fap.engine.compiled import check_compile

    for stage in (None, 0, 1, 2):
        check_compile(True, stage)
    check_compile(False, 3)
    with pytest.raises(ConfigError, match="ZeRO-3"):
        check_compile(True, 3)
