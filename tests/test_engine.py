"""fap.train in one process: exact resume, export, logs and cost, and clear errors on bad input.

Each run is a subprocess (``python -m fap.engine --...``): Accelerate keeps process-wide
state, so runs with different settings must not share a Python process.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers_engine import clean_env, load_export, read_log, run, tiny_vit_overrides

PY = sys.executable


def _train(data, out, check=True, **overrides):
    return run([PY, "-m", "fap.engine", *tiny_vit_overrides(data, out, **overrides)], check=check)


# Random start, Mixup, drop-path and an EMA: every random stream and every registered
# object must come back on resume. 48 training images / batch 20 = 2 updates per epoch,
# so step 3 stops in the middle of epoch 1.
RESUME = {"train.epochs": 3, "train.max_steps": 6, "method.random_init_prob": 1.0, "mixup.mixup_alpha": 0.8,
          "model.drop_path_rate": 0.1, "ema.enabled": "true", "ema.decay": 0.9, "checkpoint.every_steps": 3}


def test_resume_mid_epoch_is_bitwise_identical(tiny_folder, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _train(tiny_folder, straight, **RESUME)
    _train(tiny_folder, split, **{**RESUME, "train.max_steps": 3})
    ckpts = sorted(p.name for p in (split / "checkpoints").iterdir())
    assert ckpts == ["step_00000002", "step_00000003"]  # epoch 1's end, then the stop (newest)
    marker = json.loads((split / "checkpoints" / "step_00000003" / "fap_checkpoint.json").read_text())
    assert (marker["epoch"], marker["step"], marker["batch_in_epoch"]) == (1, 3, 1)

    out = _train(tiny_folder, split, **{**RESUME, "checkpoint.resume": "auto"})
    assert "resumed from" in out.stdout and "step 3" in out.stdout

    a, b = load_export(straight), load_export(split)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ after resume"
    ema_a, ema_b = load_export(straight, "export_ema"), load_export(split, "export_ema")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a), "EMA differs after resume"

    def steps(run_dir):
        return {r["step"]: r for r in read_log(run_dir) if r["type"] == "train"}
    sa, sb = steps(straight), steps(split)
    assert sorted(sa) == sorted(sb) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):  # same LR and same data (the losses depend on which images)
        for key in ("lr", "loss_clean", "loss_noisy", "loss_adversarial", "epoch"):
            assert sa[step][key] == sb[step][key], (step, key, sa[step][key], sb[step][key])
    assert sa[1]["lr"] < sa[2]["lr"]  # warm-up, then cosine
    evals_a = [r for r in read_log(straight) if r["type"] == "eval"]
    evals_b = [r for r in read_log(split) if r["type"] == "eval"]
    assert evals_a[-1]["top1"] == evals_b[-1]["top1"] and evals_a[-1]["ema_top1"] == evals_b[-1]["ema_top1"]

    # Resuming with a different experiment is refused, naming what differs.
    bad = _train(tiny_folder, split, check=False, **{**RESUME, "checkpoint.resume": "auto", "optim.lr": 0.5})
    assert bad.returncode != 0
    assert "optim.lr: checkpoint has 0.05, this run has 0.5" in bad.stderr
    # A fresh start in a directory with checkpoints is refused too (it would mix runs).
    fresh = _train(tiny_folder, split, check=False, **RESUME)
    assert fresh.returncode != 0 and "--checkpoint.resume=auto" in fresh.stderr


PLAIN = {"train.epochs": 2, "log.every_steps": 2}


@pytest.fixture(scope="module")
def plain_run(tiny_folder, tmp_path_factory):
    """4 Fast AdvProp updates (2 epochs) with TensorBoard logging."""
    out_dir = tmp_path_factory.mktemp("plain") / "run"
    proc = _train(tiny_folder, out_dir, **PLAIN, **{"log.trackers": "tensorboard"})
    return out_dir, proc


def test_run_outputs_logs_export_and_cost(plain_run, tmp_path):
    out_dir, proc = plain_run
    assert "fap summary: fast_advprop" in proc.stdout
    assert "24 image-passes per step vs 20 vanilla = 1.200x per step" in proc.stdout

    config = json.loads((out_dir / "config.json").read_text())
    assert config["model"]["name"] == "vit_tiny_patch16_224" and config["method"]["name"] == "fast_advprop"
    assert config["resolved"]["image_passes_per_step"] == 24 and config["resolved"]["cost_ratio_per_step"] == 1.2

    log = read_log(out_dir)
    train_lines = [r for r in log if r["type"] == "train"]
    assert [r["step"] for r in train_lines] == [2, 4]
    for r in train_lines:
        assert {"lr", "loss_clean", "loss_noisy", "loss_adversarial", "acc_clean", "images_per_s",
                "image_passes_per_step", "cost_ratio"} <= set(r)
        assert all(math.isfinite(r[k]) for k in ("loss_clean", "loss_noisy", "loss_adversarial"))
    evals = [r for r in log if r["type"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert all(r["count"] == 20 for r in evals)  # 4 classes x 5 val images, each counted once
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["cost_ratio_per_step"] == 1.2 and summary["top1"] == evals[-1]["top1"]
    assert summary["epochs_run"] == 2 and summary["cost_ratio_run"] == pytest.approx(1.2)
    assert list((out_dir / "tracking").rglob("events.out.tfevents.*")), "no TensorBoard event file"

    # The export loads into plain timm (strictly, by name) and is the checkpoint's main branch.
    import timm

    net = timm.create_model(f"local-dir:{out_dir / 'export'}", pretrained=True)
    exported = load_export(out_dir)
    assert not any("aux_norm" in k for k in exported)
    assert all(torch.equal(net.state_dict()[k], exported[k]) for k in exported)
    assert tuple(net.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(net.pretrained_cfg["input_size"]) == (3, 32, 32)

    # `fap export` makes the same files from the newest checkpoint.
    cli_out = tmp_path / "cli_export"
    run([PY, "-m", "fap.cli", "export", str(out_dir), "--out", str(cli_out)])
    again = load_export(cli_out.parent, cli_out.name)
    assert all(torch.equal(again[k], exported[k]) for k in exported)


def test_channels_last_and_compile_change_nothing_but_speed(plain_run, tiny_folder, tmp_path):
    """torch.compile must keep the per-branch routing (it guards on the norms' route)."""
    out_dir = tmp_path / "compiled"
    _train(tiny_folder, out_dir, **PLAIN, **{"train.channels_last": "true", "train.compile": "true",
                                             "train.compile_backend": "eager"})
    a, b = load_export(plain_run[0]), load_export(out_dir)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    la = [r for r in read_log(plain_run[0]) if r["type"] == "train"]
    lb = [r for r in read_log(out_dir) if r["type"] == "train"]
    assert [round(r["loss_adversarial"], 4) for r in la] == [round(r["loss_adversarial"], 4) for r in lb]
    # what dynamo compiled (fap.engine.compiled.CompileWatch): one graph per pass in the first
    # update (clean/main, noisy/aux with input gradient, adversarial/aux), one for evaluation
    compiled = json.loads((out_dir / "summary.json").read_text())["compile"]
    assert compiled["graphs"] == 4 and compiled["graph_breaks"] == 0, compiled
    assert [u["graphs"] for u in compiled["first_updates"]] == [3, 0, 0, 0] and compiled["late_compiling_updates"] == 0


def test_vanilla_with_accumulation_matches_one_big_batch(tiny_folder, tmp_path):
    """accum_steps=2 of 10 images = one update of 20 (vanilla, LayerNorm model: exact up to float order)."""
    common = {"method": "vanilla", "train.max_steps": 2, "checkpoint.export": "true"}
    _train(tiny_folder, tmp_path / "big", **common)
    _train(tiny_folder, tmp_path / "acc", **common, **{"train.accum_steps": 2})
    a, b = load_export(tmp_path / "big"), load_export(tmp_path / "acc")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


@pytest.mark.parametrize("overrides, words", [
    ({"data.path": "/nonexistent/imagenet"}, ["data.path='/nonexistent/imagenet'", "no such directory"]),
    ({"checkpoint.resume": "{out}"}, ["holds no complete checkpoint"]),
    ({"train.batch_size": 2}, ["train.batch_size=2", "fast_advprop cannot use", "at least 5 images"]),
    ({"model.name": "resnet18", "model.img_size": "None", "model.kwargs": "{{}}", "model.aux_group_size": 3},
     ["train.batch_size=20", "aux_group_size=3 must divide the 4 images", "among 2, 4"]),
    ({"model.name": "resnet18", "model.img_size": "None"},
     ["timm model 'resnet18' does not take the arguments", "patch_size", "model.kwargs"]),
])
def test_bad_input_is_a_clear_error(tiny_folder, tmp_path, overrides, words):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    overrides = {k: str(v).format(out=out_dir) for k, v in overrides.items()}
    proc = _train(tiny_folder, out_dir, check=False, **overrides)
    assert proc.returncode != 0
    for w in words:
        assert w in proc.stderr, (w, proc.stderr[-3000:])
    assert not (out_dir / "checkpoints").exists() or not any((out_dir / "checkpoints").iterdir())


def test_ffcv_loader_resumes_exactly_with_accumulation(tiny_folder, tmp_path):
    """An already-sharded FFCV loader is not prepared; a mid-epoch resume skips its first
    batches by iterating them, and its evaluation counts each image once."""
    pytest.importorskip("ffcv")
    from fap.data.ffcv import convert_to_betons

    betons = tmp_path / "betons"
    convert_to_betons(str(tiny_folder), str(betons), num_workers=1)
    common = {"data.source": "ffcv", "train.batch_size": 18, "train.accum_steps": 3, "train.epochs": 2,
              "train.max_steps": 4, "checkpoint.every_steps": 1}
    _train(betons, tmp_path / "straight", **common)
    _train(betons, tmp_path / "split", **{**common, "train.max_steps": 1})
    _train(betons, tmp_path / "split", **{**common, "checkpoint.resume": "auto"})
    a, b = load_export(tmp_path / "straight"), load_export(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [r["loss_clean"] for r in read_log(tmp_path / "straight") if r["type"] == "train"]
    lb = [r["loss_clean"] for r in read_log(tmp_path / "split") if r["type"] == "train"]
    assert la == lb and len(la) == 4
    assert [r["count"] for r in read_log(tmp_path / "straight") if r["type"] == "eval"] == [20, 20]
