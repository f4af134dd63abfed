"""Resume is bitwise exact from every checkpoint, mid-epoch ones included, with the default
data pipeline (RandomResizedCrop + flip on).

Each training sample's augmentation depends on ``(seed, epoch, index)`` only (``fap.data.seeding``)
and the method's random streams (random start, Shuffling BN's permutation, Mixup/CutMix,
drop-path) are saved with every checkpoint (``fap.engine.MethodRNG``), so a run resumed from
any checkpoint ends with the very weights of the uninterrupted run.

The default case trains a small BatchNorm ResNet with Fast AdvProp (random start, Shuffling
BN over ghost groups), Mixup/CutMix and RandAugment, with one loader worker: 3 epochs of 2
updates, a checkpoint after every update, and resumes from each of them. The slow matrix
repeats one mid-epoch resume for the other sources and worker counts.
"""
import sys

import pytest
import torch

from fap.checkpoint import list_checkpoints
from helpers_engine import load_export, read_log, run, tiny_vit_overrides

PY = sys.executable

# 48 training images / batch 20 = 2 updates per epoch; a checkpoint after every update:
# steps 1, 3, 5 are mid-epoch, 2 and 4 at an epoch's end, 6 the run's end (nothing to resume).
EVERY = {"train.epochs": 3, "checkpoint.every_steps": 1, "checkpoint.keep": 0, "checkpoint.every_epochs": 0,
         "log.every_steps": 1}
RESNET_BN = {"model.name": "resnet18", "model.img_size": "None", "model.aux_group_size": 4,
             "model.kwargs": '{"channels": [8, 16, 32, 64]}'}
RANDOM = {"method.random_init_prob": 1.0, "mixup.mixup_alpha": 0.8, "mixup.cutmix_alpha": 1.0,
          "data.auto_augment": "rand-m9-mstd0.5-inc1", "data.num_workers": 1}


def _train(data, out, **overrides):
    return run([PY, "-m", "fap.engine", *tiny_vit_overrides(data, out, **overrides)])


def _same_export(a, b):
    ea, eb = load_export(a), load_export(b)
    return ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def _losses(run_dir):
    return {r["step"]: r["loss_clean"] for r in read_log(run_dir) if r["type"] == "train"}


def test_resume_from_every_checkpoint_is_bitwise_identical(tiny_folder, tmp_path):
    settings = {**EVERY, **RESNET_BN, **RANDOM}
    straight = tmp_path / "straight"
    _train(tiny_folder, straight, **settings)
    checkpoints = list_checkpoints(straight)
    assert [p.name for p in checkpoints] == [f"step_{s:08d}" for s in range(1, 7)]
    differs = []
    for ckpt in checkpoints[:-1]:
        resumed = tmp_path / f"from_{ckpt.name}"
        proc = _train(tiny_folder, resumed, **settings, **{"checkpoint.resume": str(ckpt)})
        assert f"resumed from {ckpt}" in proc.stdout
        step = int(ckpt.name.split("_")[1])
        after = {s: v for s, v in _losses(straight).items() if s > step}
        assert _losses(resumed) == after, f"{ckpt.name}: the losses after the resume differ (other images?)"
        if not _same_export(straight, resumed):
            differs.append(ckpt.name)
    assert not differs, f"resumed from {differs}: the final weights differ from the uninterrupted run"


# One mid-epoch resume (step 3 of 6) per source and worker count; the default case above is
# folder + 1 worker. FFCV compiles its pipeline (numba) once per loader, which makes those runs
# the slowest.
MATRIX = [
    pytest.param({"method": "vanilla", "data.num_workers": 0}, id="folder-w0-vanilla"),
    pytest.param({"data.num_workers": 2, "method.random_init_prob": 1.0}, id="folder-w2"),
    pytest.param({"data.source": "hf", "data.num_workers": 1, "method.random_init_prob": 1.0}, id="hf-w1"),
    pytest.param({"data.source": "ffcv", "data.num_workers": 2, "method.random_init_prob": 1.0}, id="ffcv-w2"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", MATRIX)
def test_mid_epoch_resume_for_each_source_and_worker_count(tiny_folder, tmp_path, case, data_hf_offline):
    data = tiny_folder
    if case.get("data.source") == "ffcv":
        pytest.importorskip("ffcv")
        from fap.data.ffcv import convert_to_betons

        data = tmp_path / "betons"
        convert_to_betons(str(tiny_folder), str(data), num_workers=1)
    settings = {**EVERY, "checkpoint.every_steps": 3, **case}
    straight = tmp_path / "straight"
    _train(data, straight, **settings)
    ckpt = straight / "checkpoints" / "step_00000003"  # epoch 1, after its first update
    _train(data, tmp_path / "resumed", **settings, **{"checkpoint.resume": str(ckpt)})
    assert _same_export(straight, tmp_path / "resumed")


@pytest.mark.distributed
def test_resume_on_another_number_of_processes_continues_the_same_run(tiny_folder, tmp_path):
    """A 2-process run's mid-epoch checkpoint resumed by 1 process: the same global batches
    (sample order and augmentation do not depend on the process count, and a process's k-th
    loader batch ends at the same place of the epoch for any count), so vanilla training of a
    LayerNorm model ends where the 2-process run does, up to float reduction order."""
    from helpers_engine import accelerate_cmd, clean_env

    settings = {**EVERY, "checkpoint.every_steps": 3, "method": "vanilla"}
    two = tmp_path / "two"
    args = tiny_vit_overrides(tiny_folder, two, **settings)
    cmd = accelerate_cmd("-m", [], processes=2)[:-1] + ["-m", "fap.engine", *args]
    run(cmd, env=clean_env())
    ckpt = two / "checkpoints" / "step_00000003"
    one = tmp_path / "one"
    proc = _train(tiny_folder, one, **settings, **{"checkpoint.resume": str(ckpt)})
    assert "written by 2 processes, this run has 1" in proc.stdout and "not bitwise" in proc.stdout
    a, b = load_export(two), load_export(one)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"resumed on 1 process, the weights differ by {worst}"
    la, lb = _losses(two), _losses(one)
    assert sorted(lb) == [4, 5, 6] and all(abs(la[s] - lb[s]) < 1e-5 for s in lb)  # the same images


def _deepspeed_json(tmp_path, stage):
    """The shipped ZeRO config in fp32."""
    import json

    from helpers_engine import REPO

    ds = json.loads((REPO / "accelerate_configs" / f"deepspeed_zero{stage}.json").read_text())
    ds["bf16"] = {"enabled": False}
    ds.pop("data_types", None)
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(ds))
    return path


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["ddp", pytest.param("zero2", marks=pytest.mark.slow),
                                     pytest.param("zero3", marks=pytest.mark.slow),
                                     pytest.param("fsdp2", marks=pytest.mark.slow)])
def test_two_process_batchnorm_mid_epoch_resume_is_bitwise(tiny_folder, tmp_path, backend):
    """2 processes, a BatchNorm ResNet, Fast AdvProp with the random start and the default
    crops and flips: each process keeps its own BatchNorm statistics (nothing broadcasts
    them), so a checkpoint must hold every process's, and a mid-epoch resume on 2 processes
    ends bitwise where the uninterrupted run ends (its export averages the statistics of both
    processes at the last evaluation, so a process that resumed another's would show).
    DDP in the default suite; ZeRO-2, ZeRO-3 and FSDP2 (fp32) in the slow one."""
    from helpers_engine import accelerate_cmd, clean_env

    settings = {**EVERY, **RESNET_BN, "train.epochs": 2, "model.aux_group_size": 2,
                "method.random_init_prob": 1.0}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ds = _deepspeed_json(tmp_path, int(backend[-1])) if backend.startswith("zero") else None

    def launch(out, **extra):
        args = tiny_vit_overrides(tiny_folder, out, **settings, **extra)
        cmd = accelerate_cmd("-m", [], processes=2, deepspeed_config=ds, fsdp2=backend == "fsdp2")
        return run(cmd[:-1] + ["-m", "fap.engine", *args], env=clean_env())

    launch(straight)
    ckpt = straight / "checkpoints" / "step_00000003"  # epoch 1, after its first update
    assert sorted(p.name for p in ckpt.glob("process_buffers_*.safetensors")) == \
        ["process_buffers_0.safetensors", "process_buffers_1.safetensors"]
    proc = launch(resumed, **{"checkpoint.resume": str(ckpt)})
    assert f"resumed from {ckpt}" in proc.stdout
    a, b = load_export(straight), load_export(resumed)
    differ = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert a.keys() == b.keys() and not differ, f"after a mid-epoch resume these differ: {differ[:6]}"
