"""fap.checkpoint: finding and resolving checkpoints, atomic saves, the timm export."""
import json
import sys
import textwrap

import pytest
import torch

from fap.checkpoint import MARKER, CheckpointError, export_timm, list_checkpoints, resolve_resume
from helpers_engine import run


def _fake_checkpoint(run_dir, step, complete=True, tmp=False):
    d = run_dir / "checkpoints" / ((".tmp-" if tmp else "") + f"step_{step:08d}")
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    if complete:
        (d / MARKER).write_text(json.dumps({"step": step}))
    return d


def test_resolve_resume(tmp_path):
    run_dir = tmp_path / "run"
    assert resolve_resume("", run_dir) is None and resolve_resume("auto", run_dir) is None
    _fake_checkpoint(run_dir, 5, tmp=True)                   # a save that never finished
    _fake_checkpoint(run_dir, 7, complete=False)             # no marker: not complete either
    assert list_checkpoints(run_dir) == [] and resolve_resume("auto", run_dir) is None
    with pytest.raises(CheckpointError, match=r"holds no complete checkpoint.*\.tmp-step_00000005.*step_00000007"):
        resolve_resume(str(run_dir), run_dir)
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_resume(str(tmp_path / "missing"), run_dir)

    a, b = _fake_checkpoint(run_dir, 10), _fake_checkpoint(run_dir, 20)
    assert list_checkpoints(run_dir) == [a, b]
    assert resolve_resume("auto", run_dir) == b
    assert resolve_resume(str(run_dir), tmp_path / "elsewhere") == b   # a run directory: its newest
    assert resolve_resume(str(a), tmp_path / "elsewhere") == a         # a checkpoint directory itself
    with pytest.raises(CheckpointError, match="--checkpoint.resume=auto"):
        resolve_resume("", run_dir)                                    # a fresh start would mix runs


def test_export_refuses_weights_that_do_not_fit(tmp_path):
    from fap.models import create_model

    model = create_model("resnet18", num_classes=3, channels=[8, 16, 32, 64], mean=(0.5,) * 3, std=(0.5,) * 3)
    cfg = {"name": "resnet18", "kwargs": {"channels": [8, 16, 32, 64]}, "mean": [0.5] * 3, "std": [0.5] * 3}
    out = export_timm(model.state_dict(), tmp_path / "export", model_cfg=cfg, num_classes=3)
    import timm

    net = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.rand(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():  # the export is the main branch: same logits as the dual-norm model
        assert torch.equal(net((x - 0.5) / 0.5), model(x))
    broken = {k: v for k, v in model.state_dict().items() if not k.endswith("fc.weight")}
    with pytest.raises(CheckpointError, match=r"do not load strictly into timm.create_model\('resnet18'"):
        export_timm(broken, tmp_path / "export", model_cfg=cfg, num_classes=3)
    assert (out / "model.safetensors").is_file()  # the failed export left the good one in place


SAVE_SCRIPT = textwrap.dedent("""
    import hashlib, os, sys
    from pathlib import Path
    import torch
    from accelerate import Accelerator
    from fap.checkpoint import (CheckpointError, TrainState, list_checkpoints, remove_partial, resolve_resume,
                                save_checkpoint)

    run_dir = Path(sys.argv[1])
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(torch.nn.Linear(4, 2), torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=0.1))
    state = TrainState(step=1)
    acc.register_for_checkpointing(state)

    def digest(path):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}

    first = save_checkpoint(acc, run_dir, state, {"config": {}})
    before = digest(first)

    # A crash in the middle of the next save: some files written, then an error.
    real_save = acc.save_state
    def crashing_save(output_dir):
        os.makedirs(output_dir, exist_ok=True)
        Path(output_dir, "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")
    acc.save_state = crashing_save
    state.step = 2
    try:
        save_checkpoint(acc, run_dir, state, {"config": {}})
        raise SystemExit("the crash was not raised")
    except CheckpointError as e:  # names the failure and the checkpoint that is still good
        assert "disk full" in str(e) and f"the previous checkpoint {first} is intact" in str(e), e
    acc.save_state = real_save
    assert list_checkpoints(run_dir) == [first], list_checkpoints(run_dir)
    assert digest(first) == before, "the complete checkpoint changed"
    assert not (run_dir / "checkpoints" / ".tmp-step_00000002").exists()  # the failed save cleaned up
    assert resolve_resume("auto", run_dir) == first
    # A save killed before it could clean up leaves a .tmp- directory; the next start removes it.
    (run_dir / "checkpoints" / ".tmp-step_00000002").mkdir()
    remove_partial(acc, run_dir)
    assert not (run_dir / "checkpoints" / ".tmp-step_00000002").exists()

    # Saving the same step again never rewrites it.
    state.step = 1
    with torch.no_grad():
        model.weight.add_(1.0)
    assert save_checkpoint(acc, run_dir, state, {"config": {}}) == first and digest(first) == before

    # And the checkpoint loads back.
    state.step = 99
    acc.load_state(str(first))
    assert state.step == 1

    # A checkpoint that vanishes once it was chosen (another run pruned it) is named as such,
    # not as a checkpoint that does not fit the model (what Accelerate's ValueError suggested).
    from fap.checkpoint import load_checkpoint, read_marker
    import shutil
    marker = read_marker(first)
    shutil.rmtree(first)
    try:
        load_checkpoint(acc, first, marker=marker)
        raise SystemExit("no error for a vanished checkpoint")
    except CheckpointError as e:
        assert "vanished while it was being loaded" in str(e) and "does not fit" not in str(e), e
    print("OK")
""")


def test_a_crash_during_save_never_touches_complete_checkpoints(tmp_path):
    proc = run([sys.executable, "-c", SAVE_SCRIPT, str(tmp_path / "run")])
    assert proc.stdout.strip().endswith("OK")


class _Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_distributed_checkpoint_metadata_is_checked_before_it_is_unpickled(tmp_path):
    """FSDP2 checkpoints are torch.distributed.checkpoint folders, whose .metadata torch reads
    with plain pickle: fap's check admits only DCP's own records, and consolidation (fap export)
    gives the full state dict back in one process."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from fap.checkpoint import _consolidate_sharded, check_dcp_metadata

    state = {"net.weight": torch.arange(6.0).view(2, 3), "net.bias": torch.ones(2)}
    dcp.save(state, checkpoint_id=str(tmp_path / "fsdp2_model"))
    check_dcp_metadata(tmp_path / "fsdp2_model" / ".metadata")
    full = _consolidate_sharded(tmp_path)
    assert full.keys() == state.keys() and all(torch.equal(full[k], state[k]) for k in state)

    crafted = tmp_path / "crafted" / ".metadata"
    crafted.parent.mkdir()
    crafted.write_bytes(pickle.dumps(_Payload(tmp_path / "pwned")))
    with pytest.raises(CheckpointError, match="io.open"):
        check_dcp_metadata(crafted)
    assert not (tmp_path / "pwned").exists()


def test_process_buffers_round_trip_and_refuse_another_model(tmp_path):
    """Each process's BatchNorm statistics (of the model and its EMA) go to their own file and
    come back into that process's modules; another model's are refused by name."""
    from fap.checkpoint import PROCESS_BUFFERS, load_process_buffers, process_buffers, save_process_buffers

    def bn_model(channels=4):
        return torch.nn.Sequential(torch.nn.Conv2d(3, channels, 1), torch.nn.BatchNorm2d(channels))

    model, ema = bn_model(), bn_model()
    model.train()(torch.rand(2, 3, 5, 5))  # running statistics move away from their initial values
    assert sorted(process_buffers({"model": model, "ema": ema})) == [
        f"{m}.1.{b}" for m in ("ema", "model") for b in ("num_batches_tracked", "running_mean", "running_var")]
    save_process_buffers(tmp_path, {"model": model, "ema": ema}, rank=1)
    assert (tmp_path / PROCESS_BUFFERS.format(rank=1)).is_file()
    fresh, fresh_ema = bn_model(), bn_model()
    assert not load_process_buffers(tmp_path, {"model": fresh}, rank=0)  # no file for rank 0: nothing loaded
    assert load_process_buffers(tmp_path, {"model": fresh, "ema": fresh_ema}, rank=1)
    assert torch.equal(fresh[1].running_mean, model[1].running_mean) and int(fresh[1].num_batches_tracked) == 1
    assert torch.equal(fresh[1].running_var, model[1].running_var)
    with pytest.raises(CheckpointError, match=r"process_buffers_1\.safetensors does not fit this run's model"):
        load_process_buffers(tmp_path, {"model": bn_model()}, rank=1)
    with pytest.raises(CheckpointError, match=r"model\.1\.running_mean has shape \(4,\), this run's model \(8,\)"):
        load_process_buffers(tmp_path, {"model": bn_model(8), "ema": bn_model(8)}, rank=1)
