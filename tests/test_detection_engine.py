"""A detection run end to end (issue #17, stage 4): train, COCO mAP clean and corrupted, export, `fap eval`.

Toy size: a ResNet-18 RetinaNet on a handful of 48-px demo-det images, one or two updates.
The 2-process DDP comparison is marked slow.
"""
import json
import sys

import pytest
import torch

from fap.checks import ConfigError
from fap.cli import main as fap_main
from fap.data.corrupt import make_corrupted
from fap.data.demo_det import make_demo_det
from fap.detection.train import DetectionConfig, GlobalBatches, load_detector, parse_overrides, train_detection

SIZE = 48


@pytest.fixture(scope="module")
def det_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    data = make_demo_det(str(root / "demo"), image_size=SIZE, train_images=10, val_images=3, num_classes=3,
                         max_objects=3)
    corrupt = make_corrupted(f"{data}/val", str(root / "demo-c"), corruptions=["brightness", "contrast"],
                             severities=[1], num_workers=0, progress=False)
    return data, corrupt


def tiny(data, corrupt, out, **kw):
    base = dict(data_path=data, corrupt_path=corrupt, backbone="resnet18", min_size=SIZE, max_size=SIZE,
                epochs=1, milestones=(), batch_size=5, warmup_iters=1, eval_batch_size=3, output_dir=str(out),
                method_options={"p_adv": 0.2, "shuffle": False})
    return DetectionConfig(**{**base, **kw})


def test_fast_advprop_trains_evaluates_and_exports(det_data, tmp_path, capsys):
    data, corrupt = det_data
    summary = train_detection(tiny(data, corrupt, tmp_path / "run"))
    assert summary["method"] == "fast_advprop" and summary["steps"] == 2 and summary["epochs"] == 1
    assert summary["cost_ratio_per_step"] == pytest.approx(1.2)
    assert 0.0 <= summary["map"] <= 100.0 and summary["count"] == 3
    assert set(summary) >= {"map/brightness/1", "map/contrast", "map_corrupted"}
    assert summary["map_corrupted"] == pytest.approx((summary["map/brightness"] + summary["map/contrast"]) / 2)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["type"] == "train"]
    assert len(train) == 2 and all(r["loss_adversarial"] > 0 and r["loss_noisy"] > 0 for r in train)
    model = load_detector(str(tmp_path / "run"))  # a plain torchvision RetinaNet: no aux norms
    assert not any("aux_norm" in k for k in model.state_dict())
    capsys.readouterr()
    assert fap_main(["eval", str(tmp_path / "run"), "--suite", "clean", f"c={corrupt}", "--data", data,
                     "--out", str(tmp_path / "eval"), "--batch-size", "3"]) == 0
    again = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert again["map"] == pytest.approx(summary["map"]) and again["map_corrupted"] == pytest.approx(
        summary["map_corrupted"])


def test_resume_at_an_epoch_end_continues_bitwise(det_data, tmp_path):
    """1 epoch, then resumed to 2 (checkpoint of model, optimizer, schedule, counters and RNG)
    = 2 epochs straight: the same weights to the bit, random starts and flips included."""
    data, _ = det_data
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise comparisons need the same reduction order in every run
    try:
        _resume_bitwise(data, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _resume_bitwise(data, tmp_path):
    from safetensors.torch import load_file

    from fap.checkpoint import CheckpointError, list_checkpoints

    kw = dict(method_options={"p_adv": 0.2}, milestones=(1,), flip_prob=0.5, checkpoint_keep=1)
    straight = train_detection(tiny(data, "", tmp_path / "straight", epochs=2, **kw))
    train_detection(tiny(data, "", tmp_path / "split", epochs=1, **kw))
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step_00000002"]
    with pytest.raises(CheckpointError, match="already has checkpoints .* pass --resume=auto"):
        train_detection(tiny(data, "", tmp_path / "split", epochs=2, **kw))
    with pytest.raises(ConfigError, match="lr: checkpoint has 0.01, this run has 0.02"):
        train_detection(tiny(data, "", tmp_path / "split", epochs=2, lr=0.02, resume="auto", **kw))
    resumed = train_detection(tiny(data, "", tmp_path / "split", epochs=2, resume="auto", **kw))
    assert resumed["steps"] == straight["steps"] == 4
    a, b = (load_file(str(tmp_path / d / "export" / "model.safetensors")) for d in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step_00000004"]  # keep=1 pruned the first
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 2, 3, 4]
    assert [r.get("start_epoch") for r in log if r["type"] == "config"] == [None, 1]


def test_bf16_from_the_launcher(det_data, tmp_path):
    """``accelerate launch --mixed_precision bf16`` (its environment variable) runs the detector
    under autocast; the losses stay finite. (At 48 px RetinaNet's P7 level is 1x1 and CPU bf16
    made its weight non-finite in one update; the test resizes to 96 px, as the demo trains.)
    A process of its own: Accelerate keeps one precision per process."""
    import os
    import subprocess

    data, _ = det_data
    out = tmp_path / "bf16"
    args = ["--backbone=resnet18", "--min_size=96", "--max_size=96", "--epochs=1", "--milestones=()", "--batch_size=5",
            "--warmup_iters=1", "--export=False", "--checkpoint_every_epochs=0", "--method.p_adv=0.2",
            f"--data_path={data}", f"--output_dir={out}"]
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fap.detection.train", *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["steps"] == 2
    train = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][1:3]
    assert all(r["type"] == "train" and 0 < r["loss_clean"] < 10 and 0 < r["loss_adversarial"] < 10 for r in train)


def test_vanilla_and_advprop_run(det_data, tmp_path):
    data, _ = det_data
    for method, options in (("vanilla", {}), ("advprop", {"attack_steps": 1})):
        summary = train_detection(tiny(data, "", tmp_path / method, method=method, method_options=options,
                                       export=False, batch_size=4))
        assert summary["method"] == method and summary["steps"] == 2 and "map_corrupted" not in summary


def test_overrides_and_user_errors(capsys):
    cfg = parse_overrides(DetectionConfig(), ["--epochs=24", "--milestones=16,22", "--method.p_adv=0.25",
                                              "--backbone=resnet18"])
    assert (cfg.epochs, cfg.milestones, cfg.method_options, cfg.backbone) == (24, (16, 22), {"p_adv": 0.25},
                                                                               "resnet18")
    with pytest.raises(ConfigError, match="--epoch: unknown key"):
        parse_overrides(cfg, ["--epoch=3"])
    from fap.detection.train import build_method
    with pytest.raises(ConfigError, match="method.p_adversarial: not a switch of fast_advprop"):
        build_method(DetectionConfig(method_options={"p_adversarial": 0.2}))
    from fap.detection.train import main
    assert main(DetectionConfig(), []) == 2
    assert "data_path is empty" in capsys.readouterr().err
    assert main(DetectionConfig(data_path="data/demo-det"), ["--optimizer=adam"]) == 2
    assert "optimizer='adam'; expected one of sgd, adamw" in capsys.readouterr().err


def test_optimizers_and_their_schedule():
    import torch.nn as nn

    from fap.detection.train import make_optimizer

    model = nn.Linear(2, 2)
    sgd, sched = make_optimizer(DetectionConfig(lr=0.1, warmup_iters=2, warmup_factor=0.5), model, 10, (1, 2))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    lrs = []
    for _ in range(25):
        lrs.append(sched.get_last_lr()[0])
        sgd.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.075) and lrs[2:10] == [pytest.approx(0.1)] * 8
    assert lrs[10:20] == [pytest.approx(0.01)] * 10 and lrs[20] == pytest.approx(0.001)
    adamw, _ = make_optimizer(DetectionConfig(optimizer="adamw", lr=3e-4, weight_decay=0.05), model, 10, ())
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05


def test_global_batches_one_process_with_accumulation_sees_what_two_processes_see():
    one = list(GlobalBatches(12, 6, world=1, accum_steps=2, seed=3))
    two = [list(GlobalBatches(12, 6, world=2, rank=r, seed=3)) for r in (0, 1)]
    assert len(one) == 4 and [one[0], one[1], one[2], one[3]] == [two[0][0], two[1][0], two[0][1], two[1][1]]
    assert sorted(i for b in one for i in b) == list(range(12))
    with pytest.raises(ConfigError, match="batch_size=5 must divide"):
        GlobalBatches(12, 5, world=2)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one(det_data, tmp_path):
    """Fast AdvProp (no random start, no shuffle: both draw per process) on 2 DDP processes makes the
    update that 1 process makes with 2 accumulated micro-batches of the same images."""
    from helpers_engine import accelerate_cmd, run

    data, _ = det_data
    args = [f"--data_path={data}", "--backbone=resnet18", f"--min_size={SIZE}", f"--max_size={SIZE}",
            "--epochs=1", "--milestones=()", "--batch_size=10", "--warmup_iters=0", "--export=True",
            "--method.random_init_prob=0.0", "--method.shuffle=False", "--method.p_adv=0.2"]
    outs = {}
    for processes, accum in ((1, 2), (2, 1)):
        out = tmp_path / f"p{processes}"
        cmd = accelerate_cmd("-m", [], processes=processes)[:-1] + ["-m", "fap.detection.train", *args,
                                                                    f"--accum_steps={accum}", f"--output_dir={out}"]
        run(cmd, timeout=900)
        from safetensors.torch import load_file
        outs[processes] = load_file(str(out / "export" / "model.safetensors"))
    from accelerate.utils import set_seed

    from fap.detection.train import build_model
    set_seed(0)  # what train_detection does before building the model: the initial weights
    init = build_model(parse_overrides(DetectionConfig(), args), 4).export_state_dict()
    params = [k for k in outs[1] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    num = sum(((outs[2][k].double() - outs[1][k].double()) ** 2).sum() for k in params)
    den = sum(((outs[1][k].double() - init[k].double()) ** 2).sum() for k in params)
    assert den > 0 and float((num / den).sqrt()) < 1e-4, float((num / den).sqrt())


def test_retinanet_r50_recipe_is_the_papers_setting():
    import importlib.util

    from fap.detection.train import build_method, schedule

    from helpers_engine import REPO

    spec = importlib.util.spec_from_file_location("retinanet_r50", REPO / "recipes" / "retinanet_r50.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    fast, vanilla = recipe.config("fast_advprop"), recipe.config("vanilla")
    assert (fast.backbone, fast.min_size, fast.max_size, fast.lr, fast.batch_size, vanilla.batch_size) == (
        "resnet50", 800, 1333, 0.01, 20, 16)
    assert schedule(fast, build_method(fast)) == (10, [7, 9])  # 12 epochs, (8, 11) divided by 1.2
    assert schedule(vanilla, build_method(vanilla)) == (12, [8, 11])
    assert build_method(fast).split(5) == (4, 1)  # 5 per process: 4 clean + 1 adversarial


def test_demo_det_table_pairs_arms_by_seed():
    import importlib.util

    from helpers_engine import REPO

    spec = importlib.util.spec_from_file_location("demo_det", REPO / "recipes" / "demo_det.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    runs = lambda *pairs: [{"map": a, "map_corrupted": b} for a, b in pairs]  # noqa: E731
    text = recipe.table({"vanilla": runs((1.0, 0.5), (2.0, 0.7)), "fast_advprop": runs((1.5, 0.9), (2.2, 1.0)),
                         "fast_advprop_eps0": runs((1.1, 0.4), (2.1, 0.6))})
    assert "| vanilla | 1.50 ± 0.71 | 0.60 ± 0.14 | 1.00 / 0.50, 2.00 / 0.70 |" in text
    assert "| fast_advprop − vanilla | 0.35 ± 0.21 | 0.35 ± 0.07 |" in text
    assert "| fast_advprop − fast_advprop_eps0 | 0.25 ± 0.21 | 0.45 ± 0.07 |" in text
    assert "paired" not in recipe.table({"vanilla": runs((1.0, 0.5)), "fast_advprop": runs((1.5, 0.9))})


@pytest.mark.slow
def test_demo_det_recipe_smoke(tmp_path):
    from helpers_engine import REPO, run

    proc = run([sys.executable, str(REPO / "recipes" / "demo_det.py"), "--smoke", "--seeds", "0",
                "--out", str(tmp_path / "out"), "--data", str(tmp_path / "demo-det")], timeout=1800)
    assert "| fast_advprop |" in proc.stdout and "| vanilla |" in proc.stdout
    assert (tmp_path / "out" / "results.md").is_file()
