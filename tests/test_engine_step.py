"""`fap.engine.step`: each gradient-reduction path makes the closed-form update, on its own.

The paths run on real engines through ``tests/step_runner.py`` (one Fast AdvProp update
over two micro-batches, compared with plain autograd on an unwrapped copy):
`LocalUpdate` in one process, `CoalescedUpdate` and `PerBackwardUpdate` on a DeepSpeed
ZeRO-2 engine. (The DDP ``no_sync`` path across processes is
``tests/test_distributed.py::test_two_processes_match_one``.) The non-finite bookkeeping
is tested in-process.
"""
import json
import sys

import pytest
import torch

from helpers_engine import REPO, accelerate_cmd, clean_env, run

RUNNER = str(REPO / "tests" / "step_runner.py")


def _ds_config(tmp_path):
    ds = {"train_batch_size": 10, "train_micro_batch_size_per_gpu": 10, "gradient_accumulation_steps": 1,
          "gradient_clipping": 0.0, "bf16": {"enabled": False}, "zero_optimization": {"stage": 2},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    path = tmp_path / "zero2.json"
    path.write_text(json.dumps(ds))
    return path


@pytest.mark.parametrize("path", ["local", "coalesced", "per_backward"])
def test_each_reduction_path_makes_the_closed_form_update(path, tmp_path):
    out = tmp_path / "result.json"
    if path == "local":
        cmd = [sys.executable, RUNNER, path, "2", str(out)]
    else:
        cmd = accelerate_cmd(RUNNER, [path, "2", str(out)], deepspeed_config=_ds_config(tmp_path))
    run(cmd, timeout=300, env=clean_env())
    result = json.loads(out.read_text())
    assert result["nonfinite"] == [] and result["micro_batches"] == 2
    assert result["max_update"] > 1e-3, result  # the update moved the weights: the comparison means something
    assert result["max_abs_err"] < 1e-6, result
    if path != "local":
        assert result["grad_norm"] > 0


def test_nonfinite_counts_is_per_branch_then_gradients():
    from fap.engine.step import nonfinite_counts

    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    metrics = [{"loss_clean": one, "count_clean": 8, "loss_noisy": nan, "count_noisy": 2},
               {"loss_clean": torch.tensor(float("inf")), "count_clean": 8, "loss_noisy": one, "count_noisy": 2}]
    assert nonfinite_counts(metrics, ("clean", "noisy", "adversarial")) == [1.0, 1.0, 0.0, 0.0]
    assert nonfinite_counts(metrics[:0], ("clean",), grad_norm=torch.tensor(float("inf"))) == [0.0, 1.0]
    # a branch that did not run in a micro-batch (count 0) is not looked at
    assert nonfinite_counts([{"loss_clean": nan, "count_clean": 0}], ("clean",)) == [0.0, 0.0]


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_agree_carries_the_stop_flag_in_one_process():
    from fap.engine.step import agree

    counts, stop = agree(_accelerator(), [0.0, 2.0], stop_requested=True)
    assert counts == [0.0, 2.0] and stop is True


def test_local_update_skips_a_nonfinite_update_and_restores_the_norm_statistics():
    """A NaN image makes the clean loss NaN: weights unchanged, BN statistics put back, no gradients left."""
    from fap.engine.step import LocalUpdate
    from fap.methods import Vanilla
    from fap.models import create_model

    accelerator = _accelerator()
    torch.manual_seed(0)
    model = create_model("resnet10t", num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    images = torch.rand(4, 3, 32, 32)
    images[0, 0, 0, 0] = float("nan")
    update = LocalUpdate(accelerator, model, optimizer, Vanilla(), restore_on_skip=True)
    result = update([(images, torch.tensor([0, 1, 2, 0]))])
    assert result.nonfinite == ["clean"] and result.grad_norm is None
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())

    finite = update([(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))])
    assert finite.nonfinite == [] and len(finite.metrics) == 1
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if "weight" in k)
