"""`fap.engine.log`: the run's JSON-lines log, its metric window, and time kept out of images/s."""
import json
import time

import torch

from fap.engine.log import RunLog, flat_config, format_summary


def _log(tmp_path, branches=("clean", "adversarial")):
    from accelerate import Accelerator

    return RunLog(Accelerator(cpu=True), tmp_path / "run", branches, progress=False)


def test_log_writes_config_resume_and_records(tmp_path):
    log = _log(tmp_path)
    log.open({"train": {"epochs": 2}, "resolved": {"method": "vanilla"}}, "tiny",
             resume={"step": 3, "epoch": 1, "from": "ckpt"})
    log.write({"type": "train", "step": 4, "loss_clean": 1.5})
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert lines == [{"type": "resume", "step": 3, "epoch": 1, "from": "ckpt"},
                     {"type": "train", "step": 4, "loss_clean": 1.5}]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["resolved"] == {"method": "vanilla"}


def test_window_averages_per_branch_and_skipped_updates_add_no_metrics(tmp_path):
    log = _log(tmp_path)
    log.start_training(total=3, initial=0, desc="t")
    m = {"loss_clean": torch.tensor(2.0), "correct_clean": torch.tensor(3), "count_clean": 4,
         "loss_adversarial": torch.tensor(4.0), "correct_adversarial": torch.tensor(0), "count_adversarial": 1}
    log.add_update([m, {**m, "loss_clean": torch.tensor(4.0)}], applied=True)
    log.add_update([{**m, "loss_clean": torch.tensor(float("nan"))}], applied=False)
    record = log.window_record(images_per_update=10)
    assert record["loss_clean"] == 3.0 and record["acc_clean"] == 75.0
    assert record["loss_adversarial"] == 4.0 and record["acc_adversarial"] == 0.0
    assert log.window.updates == 0  # a new window started


def test_paused_time_is_not_training_time(tmp_path):
    log = _log(tmp_path)
    log.start_training(total=1, initial=0, desc="t")
    with log.paused("eval"):
        time.sleep(0.3)
    with log.paused("checkpoint"):
        time.sleep(0.2)
    log.add_update([], applied=True)
    record = log.window_record(images_per_update=100)
    assert log.paused_seconds["eval"] >= 0.3 and log.paused_seconds["checkpoint"] >= 0.2
    assert log.train_seconds() < 0.2
    assert record["images_per_s"] > 100 / 0.2  # the half second paused is not in the window


def test_flat_config_and_summary_text():
    assert flat_config({"a": {"x": None, "y": [1, 2], "z": 3}}) == {"a.x": "None", "a.y": "[1, 2]", "a.z": 3}
    text = format_summary({"method": "fast_advprop", "processes": 2, "precision": "bf16", "top1": 50.0,
                           "top5": 90.0, "best_top1": 51.0, "steps": 10, "images_seen": 100, "train_seconds": 2.0,
                           "images_per_s": 50.0, "image_passes_per_step": 28, "vanilla_image_passes_per_step": 20,
                           "cost_ratio_per_step": 1.4, "epochs_run": 1, "reference_epochs": 1,
                           "cost_ratio_run": 1.4, "output_dir": "runs/x", "export": {}})
    assert "1.400x per step" in text and "top-1 50.00" in text
