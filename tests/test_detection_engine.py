"""A detection run is an ordinary run of `fap.engine.train` (issue #26; Table 7 of Mei et al., ICLR 2022).

Toy size: a ResNet-18 RetinaNet on a handful of 48-px demo-det images, one to four updates.
What the engine gives every run is tested here on a detector: COCO mAP (clean and
corrupted), export and `fap eval` of it, EMA, resume at an epoch end and mid-epoch (bitwise),
SIGTERM pre-emption, the non-finite policy, and 2-process DDP, ZeRO-2 and FSDP2 runs (slow).
"""
import dataclasses
import json
import os
import signal
import sys
import threading
import time

import pytest
import torch

import fap
from fap.checks import ConfigError
from fap.cli import main as fap_main
from fap.config import apply_overrides, validate
from fap.data import DataConfig
from fap.data.corrupt import make_corrupted
from fap.data.demo_det import make_demo_det
from fap.detection.evaluate import load_detector
from fap.detection.train import GlobalBatches
from fap.engine import NonFiniteLossError, Preempted

SIZE = 48


@pytest.fixture(scope="module")
def det_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    data = make_demo_det(str(root / "demo"), image_size=SIZE, train_images=10, val_images=3, num_classes=3,
                         max_objects=3)
    corrupt = make_corrupted(f"{data}/val", str(root / "demo-c"), corruptions=["brightness", "contrast"],
                             severities=[1], num_workers=0, progress=False)
    return data, corrupt


def tiny(data, out, *overrides, corrupt="", backbone="resnet18"):
    """A 1-epoch Fast AdvProp RetinaNet run of batch 5 (2 updates), plus ``--section.key=value`` overrides."""
    cfg = fap.TrainConfig(
        task="detection",
        train=fap.RunSection(epochs=1, batch_size=5, eval_batch_size=3),
        data=DataConfig(source="coco", path=data, num_workers=0),
        detection=fap.DetectionSection(backbone=backbone, min_size=SIZE, max_size=SIZE, corrupt_path=corrupt),
        optim=fap.OptimConfig(opt="momentum", lr=0.01, lr_base_size=0, no_decay_norm_bias=False),
        sched=fap.ScheduleConfig(sched="constant"),
        log=fap.LogConfig(output_dir=str(out), trackers=(), progress=False, every_steps=1),
    )
    cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, p_adv=0.2, shuffle=False))
    return validate(apply_overrides(cfg, list(overrides)))


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def equal_exports(a, b, name="export"):
    from safetensors.torch import load_file

    x, y = (load_file(str(d / name / "model.safetensors")) for d in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture
def one_thread():
    """Bitwise comparisons need the same reduction order in every run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fast_advprop_trains_evaluates_and_exports_with_an_ema(det_data, tmp_path, capsys):
    data, corrupt = det_data
    out = tmp_path / "run"
    summary = fap.train(tiny(data, out, "--ema.enabled=true", "--ema.decay=0.5", corrupt=corrupt))
    assert summary["method"] == "fast_advprop" and summary["steps"] == 2 and summary["epochs"] == 1
    assert summary["cost_ratio_per_step"] == pytest.approx(1.2)
    assert 0.0 <= summary["map"] <= 100.0 and 0.0 <= summary["ema_map"] <= 100.0 and summary["count"] == 3
    final = summary["final_eval"]
    assert set(final) >= {"map/brightness/1", "map/contrast", "map_corrupted"}
    assert final["map_corrupted"] == pytest.approx((final["map/brightness"] + final["map/contrast"]) / 2)
    train = [r for r in read_log(out) if r["type"] == "train"]
    assert len(train) == 2 and all(r["loss_adversarial"] > 0 and r["loss_noisy"] > 0 for r in train)
    assert "acc_clean" not in train[0]  # a detector has no hits to count
    for name in ("export", "export_ema"):  # plain torchvision RetinaNets: no aux norms
        model = load_detector(str(out / name))
        assert not any("aux_norm" in k for k in model.state_dict())
    from safetensors.torch import load_file
    weights, ema = (load_file(str(out / n / "model.safetensors")) for n in ("export", "export_ema"))
    assert weights.keys() == ema.keys() and not all(torch.equal(weights[k], ema[k]) for k in weights)
    capsys.readouterr()
    assert fap_main(["eval", str(out), "--suite", "clean", f"c={corrupt}", "--data", data,
                     "--out", str(tmp_path / "eval"), "--batch-size", "3"]) == 0
    again = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert again["map"] == pytest.approx(summary["map"])
    assert again["map_corrupted"] == pytest.approx(final["map_corrupted"])
    # `fap export` of the last checkpoint dispatches on the recorded task: the run's own export, to the bit
    assert fap_main(["export", str(out), "--out", str(tmp_path / "again" / "export")]) == 0
    assert equal_exports(out, tmp_path / "again")


def test_resume_at_an_epoch_end_continues_bitwise(det_data, tmp_path, one_thread):
    """1 epoch, then resumed to 2 (model, optimizer, schedule, counters, the method's random
    streams) = 2 epochs straight: the same weights to the bit, random starts and flips included."""
    from fap.checkpoint import CheckpointError, list_checkpoints

    data, _ = det_data
    kw = ("--checkpoint.keep=1", "--sched.sched=multistep", "--sched.milestones=1")
    straight = fap.train(tiny(data, tmp_path / "straight", "--train.epochs=2", *kw))
    fap.train(tiny(data, tmp_path / "split", "--train.epochs=2", "--train.max_steps=2", *kw))
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step_00000002"]
    with pytest.raises(CheckpointError, match="already has checkpoints .* pass --checkpoint.resume=auto"):
        fap.train(tiny(data, tmp_path / "split", "--train.epochs=2", *kw))
    with pytest.raises(ConfigError, match="optim.lr: checkpoint has 0.01, this run has 0.02"):
        fap.train(tiny(data, tmp_path / "split", "--train.epochs=2", "--optim.lr=0.02", "--checkpoint.resume=auto",
                       *kw))
    resumed = fap.train(tiny(data, tmp_path / "split", "--train.epochs=2", "--checkpoint.resume=auto", *kw))
    assert resumed["steps"] == straight["steps"] == 4
    assert equal_exports(tmp_path / "straight", tmp_path / "split")
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step_00000004"]  # keep=1 pruned the first
    assert [r["step"] for r in read_log(tmp_path / "split") if r["type"] == "train"] == [1, 2, 3, 4]


def test_resume_mid_epoch_continues_bitwise(det_data, tmp_path, one_thread):
    """A checkpoint after update 1 of a 2-update epoch (``checkpoint.every_steps``), the run stopped
    there, then resumed: the rest of the epoch's batches are those the straight run saw."""
    data, _ = det_data
    kw = ("--checkpoint.every_steps=1", "--checkpoint.keep=1", "--train.epochs=2")
    fap.train(tiny(data, tmp_path / "straight", *kw))
    fap.train(tiny(data, tmp_path / "split", *kw, "--train.max_steps=1"))
    saved = [r for r in read_log(tmp_path / "split") if r["type"] == "checkpoint"]
    assert saved[-1]["step"] == 1 and saved[-1]["epoch"] == 0  # inside the first epoch
    resumed = fap.train(tiny(data, tmp_path / "split", *kw, "--checkpoint.resume=auto"))
    assert resumed["steps"] == 4 and equal_exports(tmp_path / "straight", tmp_path / "split")


def test_sigterm_saves_the_update_in_flight_and_resume_matches(det_data, tmp_path, one_thread):
    """SIGTERM during training: the update in flight finishes, a checkpoint is saved, the run
    exits with status 143 (`Preempted`); resuming it gives the straight run's weights."""
    data, _ = det_data
    kw = ("--train.epochs=2", "--checkpoint.keep=1")
    fap.train(tiny(data, tmp_path / "straight", *kw))
    out = tmp_path / "term"

    def send_when_training():
        deadline = time.time() + 120
        while time.time() < deadline:
            log = out / "log.jsonl"
            if log.is_file() and '"type": "train"' in log.read_text():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.005)

    sender = threading.Thread(target=send_when_training, daemon=True)
    sender.start()
    with pytest.raises(Preempted) as stopped:
        fap.train(tiny(data, out, *kw))
    sender.join()
    assert stopped.value.code == 143
    saved = [r for r in read_log(out) if r["type"] == "preempted"]
    assert len(saved) == 1 and saved[0]["signal"] == "SIGTERM" and saved[0]["step"] < 4
    resumed = fap.train(tiny(data, out, *kw, "--checkpoint.resume=auto"))
    assert resumed["steps"] == 4 and equal_exports(tmp_path / "straight", out)


def test_the_nonfinite_policy(det_data, tmp_path):
    """An lr of 1e30 makes the second update's losses non-finite: ``stop`` stops before applying it
    and names the update; ``skip`` leaves the weights as they were and counts it."""
    data, _ = det_data
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss in update 2 \(epoch 0"):
        fap.train(tiny(data, tmp_path / "stop", "--optim.lr=1e30", "--checkpoint.every_epochs=0"))
    summary = fap.train(tiny(data, tmp_path / "skip", "--optim.lr=1e30", "--train.nonfinite=skip"))
    skipped = [r for r in read_log(tmp_path / "skip") if r["type"] == "nonfinite"]
    assert summary["nonfinite_skipped"] == len(skipped) == 1 and skipped[0]["action"] == "skip"


def test_bf16_from_the_launcher(det_data, tmp_path):
    """``accelerate launch --mixed_precision bf16`` (its environment variable) runs the detector
    under autocast; the losses stay finite. (At 48 px RetinaNet's P7 level is 1x1 and CPU bf16
    made its weight non-finite in one update; the test resizes to 96 px, as the demo trains.)
    A process of its own: Accelerate keeps one precision per process."""
    import subprocess

    from helpers_engine import REPO, clean_env

    data, _ = det_data
    out = tmp_path / "bf16"
    args = _launch_args(data, out, "--detection.min_size=96", "--detection.max_size=96", "--train.batch_size=5",
                        "--checkpoint.export=false", "--checkpoint.every_epochs=0", "--log.every_steps=1")
    proc = subprocess.run([sys.executable, "-m", "fap.engine", *args], cwd=REPO, timeout=600, capture_output=True,
                          text=True, env=clean_env(ACCELERATE_MIXED_PRECISION="bf16"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["steps"] == 2
    train = [r for r in read_log(out) if r["type"] == "train"]
    assert len(train) == 2 and all(0 < r["loss_clean"] < 10 and 0 < r["loss_adversarial"] < 10 for r in train)


def test_vanilla_and_advprop_run(det_data, tmp_path):
    data, _ = det_data
    for method, extra in (("vanilla", ()), ("advprop", ("--method.attack_steps=1", "--method.targeted=false"))):
        summary = fap.train(tiny(data, tmp_path / method, f"--method={method}", "--train.batch_size=4",
                                 "--checkpoint.export=false", *extra))
        assert summary["method"] == method and summary["steps"] == 2 and "final_eval" not in summary


def test_config_mistakes_are_one_line(det_data, tmp_path, capsys):
    data, _ = det_data
    with pytest.raises(ConfigError, match="a detector has no single label to target"):
        fap.train(tiny(data, tmp_path / "a", "--method=advprop"))
    with pytest.raises(ConfigError, match="data.source='folder' with task='detection'"):
        tiny(data, tmp_path / "b", "--data.source=folder")
    with pytest.raises(ConfigError, match="data.source='coco' is a detection source; add --task=detection"):
        validate(dataclasses.replace(tiny(data, tmp_path / "c"), task="classification"))
    with pytest.raises(ConfigError, match="--task='segmentation'"):
        tiny(data, tmp_path / "d", "--task=segmentation")
    from fap.engine.__main__ import main
    assert main(["--task=detection", "--data.source=coco"]) == 2
    assert "data.path is empty: point the run at a COCO-format root" in capsys.readouterr().err


def test_global_batches_one_process_with_accumulation_sees_what_two_processes_see():
    one = list(GlobalBatches(12, 6, world=1, accum_steps=2, seed=3))
    two = [list(GlobalBatches(12, 6, world=2, rank=r, seed=3)) for r in (0, 1)]
    assert len(one) == 4 and [one[0], one[1], one[2], one[3]] == [two[0][0], two[1][0], two[0][1], two[1][1]]
    assert sorted(i for b in one for i in b) == list(range(12))
    with pytest.raises(ConfigError, match="batch_size=5 must divide"):
        GlobalBatches(12, 5, world=2)


def _launch_args(data, out, *extra):
    return ["--task=detection", "--data.source=coco", f"--data.path={data}", "--data.num_workers=0",
            "--detection.backbone=resnet18", f"--detection.min_size={SIZE}", f"--detection.max_size={SIZE}",
            "--train.epochs=1", "--train.batch_size=10", "--optim.lr=0.01", "--optim.lr_base_size=0",
            "--sched.sched=constant", "--method.random_init_prob=0.0", "--method.shuffle=false",
            "--log.trackers=", "--log.progress=false", f"--log.output_dir={out}", *extra]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one(det_data, tmp_path):
    """Fast AdvProp (no random start, no shuffle: both draw per process) on 2 DDP processes makes the
    update that 1 process makes with 2 accumulated micro-batches of the same images."""
    from helpers_engine import accelerate_cmd, load_export, run

    data, _ = det_data
    for processes, accum in ((1, 2), (2, 1)):
        run(accelerate_cmd("-m", ["fap.engine", *_launch_args(data, tmp_path / f"p{processes}",
                                                               f"--train.accum_steps={accum}")],
                           processes=processes), timeout=900)
    outs = {p: load_export(tmp_path / f"p{p}") for p in (1, 2)}
    from accelerate.utils import set_seed

    from fap.detection.train import build_model
    set_seed(0)  # what the engine does before building the model: the initial weights
    init = build_model(tiny(data, tmp_path / "x"), 4).export_state_dict()
    params = [k for k in outs[1] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    num = sum(((outs[2][k].double() - outs[1][k].double()) ** 2).sum() for k in params)
    den = sum(((outs[1][k].double() - init[k].double()) ** 2).sum() for k in params)
    assert den > 0 and float((num / den).sqrt()) < 1e-4, float((num / den).sqrt())


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["zero2", "fsdp2"])
def test_sharded_retinanet_r50_exports_what_torchvision_loads(det_data, tmp_path, backend):
    """A RetinaNet ResNet-50 under DeepSpeed ZeRO-2 or FSDP2, 2 CPU processes, two updates: finite
    losses, and the export loads strictly into torchvision's own ``retinanet_resnet50_fpn``."""
    from safetensors.torch import load_file
    from torchvision.models.detection import retinanet_resnet50_fpn

    from helpers_engine import REPO, accelerate_cmd, read_log, run

    data, _ = det_data
    out = tmp_path / backend
    args = _launch_args(data, out, "--detection.backbone=resnet50", "--checkpoint.every_epochs=0")
    if backend == "zero2":
        cmd = accelerate_cmd("-m", ["fap.engine", *args], processes=2,
                             deepspeed_config=REPO / "accelerate_configs" / "deepspeed_zero2.json")
    else:
        cmd = accelerate_cmd("-m", ["fap.engine", *args], processes=2, fsdp2=True)
    run(cmd, timeout=1200)
    train = [r for r in read_log(out) if r["type"] == "train"]
    assert [r["step"] for r in train] == [1] and all(
        torch.isfinite(torch.tensor(r[f"loss_{b}"])) for r in train for b in ("clean", "noisy", "adversarial"))
    arch = json.loads((out / "export" / "config.json").read_text())["arch"]
    net = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=arch["num_classes"])
    net.load_state_dict(load_file(str(out / "export" / "model.safetensors")), strict=True)


def test_retinanet_r50_recipe_is_the_papers_setting():
    import importlib.util

    from helpers_engine import REPO

    spec = importlib.util.spec_from_file_location("retinanet_r50", REPO / "recipes" / "retinanet_r50.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    fast, vanilla = recipe.config("fast_advprop"), recipe.config("vanilla")
    assert fast.task == vanilla.task == "detection"
    d = fast.detection
    assert (d.backbone, d.min_size, d.max_size, fast.optim.lr, fast.optim.lr_base_size) == (
        "resnet50", 800, 1333, 0.01, 0)
    assert (fast.train.batch_size, vanilla.train.batch_size) == (20, 16)  # 16 clean images either way
    assert (vanilla.train.epochs, vanilla.sched.milestones) == (24, (16, 22))  # Table 7's baseline
    assert (fast.train.epochs, fast.sched.milestones) == (20, (13, 18))  # 24 / 1.2 (Table 7)
    assert fast.method.p_adv == 0.2 and not vanilla.model.dual_norm
    assert recipe.config("advprop").method.targeted is False
    validate(dataclasses.replace(fast, data=dataclasses.replace(fast.data, path="coco")))


def test_retinanet_r50_smoke_trains_through_the_engine(tmp_path, monkeypatch):
    """``recipes/retinanet_r50.py --smoke``: two updates with the progress bar, a tracker, an EMA
    and a checkpoint after every update, on the demo detection set (made on first use)."""
    from helpers_engine import REPO, run

    out = tmp_path / "smoke"
    proc = run([sys.executable, str(REPO / "recipes" / "retinanet_r50.py"), "--smoke",
                f"--data.path={tmp_path / 'demo-det'}", "--log.trackers=tensorboard", f"--log.output_dir={out}"],
               timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["ema_map"] is not None and summary["method"] == "fast_advprop"
    saved = [r["step"] for r in read_log(out) if r["type"] == "checkpoint"]
    assert saved[:1] == [1] and (out / "tracking").is_dir() and "it/s" in proc.stderr + proc.stdout


def test_demo_det_is_an_experiment_at_equal_compute(tmp_path):
    import importlib.util

    from fap.experiment import make_plan
    from helpers_engine import REPO

    spec = importlib.util.spec_from_file_location("demo_det", REPO / "recipes" / "demo_det.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    plan = make_plan(recipe.config, recipe.ARMS, [0, 1], out=tmp_path, contrasts=recipe.CONTRASTS,
                     overrides=["--data.path=d"])
    fast, null, vanilla = (plan.run(a, 1).config for a in ("fast_advprop", "fast_advprop_eps0", "vanilla"))
    assert fast.task == "detection" and (fast.train.epochs, fast.sched.milestones) == (25, (17, 22))
    assert (vanilla.train.epochs, vanilla.sched.milestones, vanilla.train.batch_size) == (30, (20, 27), 8)
    assert (fast.method.epsilon, null.method.epsilon, fast.train.batch_size) == (1.0, 0.0, 10)
    assert [c.primary for c in recipe.CONTRASTS].count(True) == 2


@pytest.mark.slow
def test_demo_det_recipe_smoke_reuses_finished_runs(tmp_path):
    from helpers_engine import REPO, run

    cmd = [sys.executable, str(REPO / "recipes" / "demo_det.py"), "--smoke", "--seeds", "0",
           "--out", str(tmp_path / "out"), "--data", str(tmp_path / "demo-det")]
    proc = run(cmd, timeout=1800)
    assert "| fast_advprop |" in proc.stdout and "| vanilla |" in proc.stdout and "mAP" in proc.stdout
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "results.png").is_file()
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all({"map", "map_corrupted"} <= set(r["metrics"]) for r in data["runs"])
    again = run(cmd, timeout=600)  # every run finished: reused, nothing trains
    assert "fap summary" not in again.stdout and "| fast_advprop |" in again.stdout
