"""fap.train across processes on CPU (gloo): DDP, DeepSpeed ZeRO-2/3, FSDP2, two simulated nodes.

The reference is one process training the same global batch of 20 as two micro-batches
of 10 (``train.accum_steps=2``): the sampler gives micro-batch ``r`` of each update to rank
``r`` of a 2-process run, and each rank splits its 10 images into 8 clean + 2
adversarial, exactly like the reference's micro-batches. The model is a 2-block ViT
(LayerNorm only), so there are no per-rank batch statistics, and Shuffling BN's
exchange of adversarial images between ranks leaves the summed gradient unchanged.
The random start is off (``random_init_prob=0``) so that results do not depend on how
random draws fall on processes. Each run makes 3 Fast AdvProp updates (crossing an epoch).

fp32 runs must match the reference to float-reduction-order precision. bf16 is not
exact (see reference/step_patterns.md); those runs must train (finite, and moving the
weights the same way as the reference).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_engine import REPO, accelerate_cmd, clean_env, free_port, load_export, read_log, run, tiny_vit_overrides

pytestmark = pytest.mark.distributed

# An evaluation batch of 3 per process does not divide the 20 validation images: the last
# batch is padded with repeats, which the evaluation must not count.
STEPS = {"train.max_steps": 3, "checkpoint.every_epochs": 0, "train.eval_batch_size": 6}


def _module_cmd(args, **kw):
    cmd = accelerate_cmd("-m", [], **kw)
    return cmd[:-1] + ["-m", "fap.engine", *args]


def _initial_weights():
    """The weights every run starts from: the engine seeds with train.seed before building the model."""
    from accelerate.utils import set_seed

    from fap.models import create_model

    set_seed(0)
    model = create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8, depth=2,
                         mean=(0.5,) * 3, std=(0.5,) * 3)
    return {k: v.detach().clone() for k, v in model.export_state_dict().items()}


def _rel_error(run_weights, ref_weights, init):
    """||p_run - p_ref|| / ||p_ref - p_0|| over all parameters: 0 is exact, 1 is 'as big as the update'."""
    num = sum(((run_weights[k].double() - ref_weights[k].double()) ** 2).sum() for k in ref_weights)
    den = sum(((ref_weights[k].double() - init[k].double()) ** 2).sum() for k in ref_weights)
    return float((num / den).sqrt())


def _cosine(run_weights, ref_weights, init):
    a = torch.cat([(run_weights[k].double() - init[k].double()).flatten() for k in ref_weights])
    b = torch.cat([(ref_weights[k].double() - init[k].double()).flatten() for k in ref_weights])
    return float(a @ b / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def reference(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    run(_module_cmd(tiny_vit_overrides(tiny_folder, out, **STEPS, **{"train.accum_steps": 2})))
    init = _initial_weights()
    weights = load_export(out)
    assert _rel_error(weights, weights, init) == 0 and _cosine(weights, weights, init) > 0.999
    return {"weights": weights, "init": init, "log": read_log(out)}


def _ds_json(tmp_path, stage, bf16, **extra):
    """The shipped accelerate_configs JSON, with bf16 switched as the test needs."""
    ds = json.loads((REPO / "accelerate_configs" / f"deepspeed_zero{stage}.json").read_text())
    ds["bf16"] = {"enabled": bf16}
    if not bf16:
        ds.pop("data_types", None)
    ds.update(extra)
    path = tmp_path / f"zero{stage}_{'bf16' if bf16 else 'fp32'}.json"
    path.write_text(json.dumps(ds))
    return path


CASES = [
    pytest.param("ddp", "fp32", id="ddp-fp32"),
    pytest.param("ddp", "bf16", id="ddp-bf16"),
    pytest.param("zero2", "fp32", id="zero2-fp32"),
    pytest.param("zero2", "bf16", id="zero2-bf16"),
    pytest.param("zero3", "fp32", id="zero3-fp32"),
    pytest.param("zero3", "bf16", id="zero3-bf16"),
    pytest.param("fsdp2", "fp32", id="fsdp2-fp32"),
    pytest.param("fsdp2", "bf16", id="fsdp2-bf16"),
]
EXPECTED = {"ddp": ("MULTI_CPU", "no_sync (one all-reduce per update)"),
            "zero2": ("DEEPSPEED ZeRO-2", "coalesced (one reduction per update)"),
            "zero3": ("DEEPSPEED ZeRO-3", "coalesced (one reduction per update)"),
            "fsdp2": ("FSDP2", "FSDP2 set_requires_gradient_sync (one reduce-scatter per update)")}


@pytest.mark.parametrize("backend, precision", CASES)
def test_two_processes_match_one(backend, precision, reference, tiny_folder, tmp_path):
    out = tmp_path / "run"
    # ZeRO-3 and FSDP2 fp32 also write a (sharded) checkpoint, which `fap export` must consolidate.
    save = {"checkpoint.every_steps": 3} if precision == "fp32" and backend in ("zero3", "fsdp2") else {}
    args = tiny_vit_overrides(tiny_folder, out, **STEPS, **save, **{"train.precision": precision})
    ds = None if backend in ("ddp", "fsdp2") else _ds_json(tmp_path, int(backend[-1]), precision == "bf16")
    proc = run(_module_cmd(args, processes=2, deepspeed_config=ds, fsdp2=backend == "fsdp2",
                           mixed_precision="bf16" if precision == "bf16" else "no"))
    expected, reduction = EXPECTED[backend]
    assert f"2 process(es), {expected}, {precision}" in proc.stdout
    assert f"gradients: {reduction}" in proc.stdout
    weights = load_export(out)
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert [r["count"] for r in read_log(out) if r["type"] == "eval"] == [20, 20]
    rel = _rel_error(weights, reference["weights"], reference["init"])
    cos = _cosine(weights, reference["weights"], reference["init"])
    print(f"{backend} {precision}: relative error {rel:.2e}, cosine {cos:.6f}")
    if precision == "fp32":
        # DeepSpeed keeps fp32 masters and reduces in another order: exact up to fp32 rounding.
        assert rel < 1e-4, rel
        ref_log = [r for r in reference["log"] if r["type"] == "train"]
        got_log = [r for r in read_log(out) if r["type"] == "train"]
        assert [r["lr"] for r in got_log] == [r["lr"] for r in ref_log]
        for a, b in zip(got_log, ref_log):
            assert abs(a["loss_clean"] - b["loss_clean"]) < 1e-4 * max(1.0, abs(b["loss_clean"]))
    else:
        assert cos > 0.99 and rel < 0.2, (rel, cos)
    if save:
        run([sys.executable, "-m", "fap.cli", "export", str(out), "--out", str(tmp_path / "from_checkpoint")])
        again = load_export(tmp_path, "from_checkpoint")
        assert all(torch.equal(again[k], weights[k]) for k in weights)


@pytest.mark.parametrize("backend", ["zero2", "fsdp2"])
def test_compiled_runs_match_one_process(backend, reference, tiny_folder, tmp_path):
    """train.compile composes with ZeRO-2 and FSDP2 (fp32): through AOTAutograd (aot_eager) the
    gradient hooks both put on the parameters still fire, the weights are the reference's, and
    nothing compiles after the first update (ZeRO-3 is refused: tests/test_compile.py)."""
    out = tmp_path / "run"
    args = tiny_vit_overrides(tiny_folder, out, **STEPS, **{"train.compile": "true", "train.compile_backend": "aot_eager"})
    ds = _ds_json(tmp_path, 2, False) if backend == "zero2" else None
    run(_module_cmd(args, processes=2, deepspeed_config=ds, fsdp2=backend == "fsdp2"))
    assert _rel_error(load_export(out), reference["weights"], reference["init"]) < 1e-4
    compiled = json.loads((out / "summary.json").read_text())["compile"]
    assert compiled["graphs"] >= 3 and compiled["graph_breaks"] == 0 and compiled["late_compiling_updates"] == 0


def test_fsdp2_resumes_bitwise(tiny_folder, tmp_path):
    """An FSDP2 run resumed from its mid-epoch checkpoint (distributed state dicts: sharded
    weights and momentum) ends bitwise where the uninterrupted run ends."""
    steps = {"train.max_steps": 4, "checkpoint.every_steps": 2, "train.eval_batch_size": 6}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(_module_cmd(tiny_vit_overrides(tiny_folder, straight, **steps), processes=2, fsdp2=True))
    ckpt = straight / "checkpoints" / "step_00000002"
    assert (ckpt / "fsdp2_model").is_dir() and (ckpt / "fsdp2_optimizer").is_dir()
    proc = run(_module_cmd(tiny_vit_overrides(tiny_folder, resumed, **steps, **{"checkpoint.resume": str(ckpt)}),
                           processes=2, fsdp2=True))
    assert "resumed from" in proc.stdout
    a, b = load_export(straight), load_export(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    train = [r for r in read_log(resumed) if r["type"] == "train"]
    assert [r["step"] for r in train] == [3, 4]


@pytest.mark.parametrize("method", ["vanilla", "advprop"])
def test_fsdp2_trains_a_batchnorm_resnet_in_bf16(method, tiny_folder, tmp_path):
    """The other methods through fap.train under FSDP2 bf16 with BatchNorm (fp32 BatchNorm
    parameters beside bf16 ones), evaluation and export included."""
    out = tmp_path / "run"
    args = [a for a in tiny_vit_overrides(tiny_folder, out, method=method, **{"train.max_steps": 2,
                                                                              "train.eval_batch_size": 6})
            if not a.startswith(("--model.", "--method.random_init_prob"))]
    args += ["--model.name=test_resnet", "--model.mean=0.5,0.5,0.5", "--model.std=0.5,0.5,0.5", "--train.precision=bf16"]
    proc = run(_module_cmd(args, processes=2, fsdp2=True, mixed_precision="bf16"))
    assert "2 process(es), FSDP2, bf16" in proc.stdout and f"fap: {method} | test_resnet" in proc.stdout
    weights = load_export(out)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_two_nodes_on_localhost(tiny_folder, tmp_path):
    """Two launchers (machine ranks 0 and 1, one process each) form one 2-process job."""
    out = tmp_path / "run"
    port = str(free_port())
    args = tiny_vit_overrides(tiny_folder, out, **STEPS, **{"checkpoint.every_steps": 2})
    procs = []
    for machine_rank in (0, 1):
        cmd = [str(Path(accelerate_cmd("x", [])[0])), "launch", "--multi_gpu", "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "fap.engine", *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=clean_env(ACCELERATE_USE_CPU="1"),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-4000:]
    assert "2 process(es), MULTI_CPU" in outputs[0][0] and "fap summary" in outputs[0][0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000002", "step_00000003"]


@pytest.mark.parametrize("case", ["clipping", "precision"])
def test_deepspeed_config_contradicting_the_launch_is_an_error(case, tiny_folder, tmp_path):
    if case == "clipping":  # the JSON against the recipe: Accelerate would let the JSON win silently
        ds = _ds_json(tmp_path, 2, False, gradient_clipping=1.0)
        mp, words = "no", "gradient_clipping=1.0 contradicts the fap config: optim.clip_grad=None"
    else:  # the JSON against `accelerate launch --mixed_precision bf16`: Accelerate would train in fp32
        ds = _ds_json(tmp_path, 2, False)
        mp, words = "bf16", "launched with --mixed_precision bf16 but"
    proc = run(_module_cmd(tiny_vit_overrides(tiny_folder, tmp_path / "run", **STEPS), processes=1,
                           deepspeed_config=ds, mixed_precision=mp), check=False)
    assert proc.returncode != 0
    assert words in proc.stderr and str(ds) in proc.stderr, proc.stderr[-3000:]


MIXED = {"method.norms": "mixed", "model.dual_norm": "false", "method.shuffle": "false"}


@pytest.fixture(scope="module")
def mixed_reference(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed_reference") / "run"
    run(_module_cmd(tiny_vit_overrides(tiny_folder, out, **STEPS, **MIXED, **{"train.accum_steps": 2})))
    return load_export(out)


@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_mixed_norms_two_processes_match_one(backend, mixed_reference, tiny_folder, tmp_path):
    """norms='mixed' ends the step with one forward of [clean; adversarial] and the reducing
    backward: still one reduction per update, equal to one process (fp32)."""
    out = tmp_path / "run"
    ds = None if backend == "ddp" else _ds_json(tmp_path, 2, False)
    run(_module_cmd(tiny_vit_overrides(tiny_folder, out, **STEPS, **MIXED), processes=2, deepspeed_config=ds))
    rel = _rel_error(load_export(out), mixed_reference, _initial_weights())
    assert rel < 1e-4, rel
