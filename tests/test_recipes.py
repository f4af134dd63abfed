"""Every recipe runs end to end in its smoke mode, through `accelerate launch`, on tiny data."""
import importlib.util
import json
import runpy
import sys

import pytest

from helpers_engine import ACCELERATE, REPO, free_port, read_log, run

RECIPES = sorted(p.name for p in (REPO / "recipes").glob("*.py") if not p.name.startswith("_"))


def test_every_recipe_is_covered():
    # paper.py (every row of the Fast AdvProp paper) has its own tests: tests/test_paper_recipes.py;
    # the detection recipes are covered in test_detection_engine.py
    assert RECIPES == ["demo.py", "demo_det.py", "efficientnet_b0.py", "paper.py", "resnet50.py", "retinanet_r50.py",
                       "vit_b.py", "vit_l.py"]


def _common(data, out):
    return ["--smoke", f"--data.path={data}", "--data.source=folder", f"--log.output_dir={out}",
            "--log.trackers=", "--log.progress=false"]


def _check_run(out, method="fast_advprop"):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == 2
    assert summary["top1"] is not None and 0 <= summary["top1"] <= 100
    expected = 1.2 if method == "fast_advprop" else 1.0
    assert summary["cost_ratio_per_step"] == pytest.approx(expected)
    assert (out / "export" / "model.safetensors").is_file()
    assert [r for r in read_log(out) if r["type"] == "train"]
    return summary


@pytest.mark.parametrize("recipe, launch", [
    ("resnet50.py", ["--num_processes", "1", "--mixed_precision", "no"]),
    ("vit_b.py", ["--num_processes", "1", "--mixed_precision", "bf16"]),
    ("efficientnet_b0.py", ["--num_processes", "1", "--mixed_precision", "no"]),
])
def test_single_process_recipe_smoke(recipe, launch, tiny_folder, tmp_path):
    out = tmp_path / "run"
    run([ACCELERATE, "launch", *launch, "--num_machines", "1", "--dynamo_backend", "no",
         f"recipes/{recipe}", *_common(tiny_folder, out)])
    summary = _check_run(out)
    if recipe == "vit_b.py":
        assert summary["precision"] == "bf16"
    if recipe == "efficientnet_b0.py":
        assert summary["ema_top1"] is not None and (out / "export_ema" / "model.safetensors").is_file()


@pytest.mark.distributed
def test_vit_l_recipe_smoke_under_zero3(tiny_folder, tmp_path):
    out = tmp_path / "run"
    proc = run([ACCELERATE, "launch", "--config_file", "accelerate_configs/deepspeed_zero3.yaml",
                "--num_processes", "2", "--main_process_port", str(free_port()),
                "recipes/vit_l.py", *_common(tiny_folder, out)])
    assert "2 process(es), DEEPSPEED ZeRO-3, bf16" in proc.stdout
    assert "gradients: coalesced" in proc.stdout
    _check_run(out)


def test_demo_recipe_smoke(tiny_folder, tmp_path):
    out = tmp_path / "demo"
    proc = run([sys.executable, "recipes/demo.py", "--smoke", "--seeds", "0", "--out", str(out),
                f"--data.path={tiny_folder}", "--data.source=folder"])
    _check_run(out / "runs" / "vanilla" / "seed0", "vanilla")
    _check_run(out / "runs" / "fast_advprop" / "seed0", "fast_advprop")
    assert "fast_advprop − vanilla" in proc.stdout and "compute vs vanilla" in proc.stdout
    assert "one seed: no interval" in proc.stdout and "(one seed)" in proc.stdout  # says so, plainly
    assert (out / "results.png").is_file() and (out / "results.png").stat().st_size > 1000
    result = json.loads((out / "results.json").read_text())
    assert {r["arm"] for r in result["runs"]} == {"vanilla", "fast_advprop"}
    # the corruption column: a corrupted copy of the validation split, made once and scored for both runs
    for r in result["runs"]:
        errors = {k for k in r["metrics"] if k.startswith("eval/imagenet_c/") and k.endswith("/error")}
        assert errors == {"eval/imagenet_c/gaussian_noise/error", "eval/imagenet_c/contrast/error"}
        assert 0 <= r["metrics"]["corruption_error"] <= 100 and 0 <= r["metrics"]["train_top1"] <= 100


def _recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_errors_are_clear(monkeypatch, capsys):
    from fap import ConfigError, parse_args

    resnet = _recipe("resnet50")
    with pytest.raises(ConfigError, match=r"method.norms='shared' but model.dual_norm=True"):
        parse_args(resnet.config(), ["--smoke", "--method.norms=shared"], smoke=resnet.smoke)
    with pytest.raises(ConfigError, match=r"sched.milestones=\[1, 2, 50\] reach past train.epochs=3"):
        parse_args(resnet.config(), ["--smoke", "--sched.milestones=1,2,50"], smoke=resnet.smoke)
    with pytest.raises(ConfigError, match="unknown key 'p_adv' in --method.p_adv: method 'vanilla'"):
        parse_args(resnet.config("vanilla"), ["--method", "vanilla", "--method.p_adv=0.3"])
    # The large-model recipe refuses to start without DeepSpeed, and says how to launch it.
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setattr(sys, "argv", ["recipes/vit_l.py", "--smoke"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "recipes" / "vit_l.py"), run_name="__main__")
    assert e.value.code == 2 and "deepspeed_zero3.yaml" in capsys.readouterr().err
