"""The engine runs the robustness suite on the final weights when the config names one."""
import json

import fap
from fap.data.corrupt import make_corrupted
from helpers_engine import tiny_vit_overrides


def test_final_eval_runs_the_suite_logs_and_reports(tiny_folder, tmp_path):
    corrupted = make_corrupted(str(tiny_folder / "val"), str(tmp_path / "tiny-c"), corruptions=("contrast",),
                               severities=(1, 2, 3, 4, 5), num_workers=0, progress=False)
    out = tmp_path / "run"
    cfg = fap.parse_args(fap.TrainConfig(), tiny_vit_overrides(
        tiny_folder, out, **{"train.epochs": 1, "train.max_steps": 2, "checkpoint.every_epochs": 0,
                             "final_eval.pgd_steps": 2, "final_eval.pgd_epsilon": 2.0,
                             "final_eval.imagenet_c": str(corrupted), "final_eval.num_workers": 0}))
    summary = fap.train(cfg)
    flat = summary["final_eval"]
    assert 0.0 <= flat["eval/adversarial/top1"] <= 100.0
    assert 0.0 <= flat["eval/imagenet_c/contrast/error"] <= 100.0  # one corruption, five severities
    assert flat["eval/imagenet_c/mean_error_all"] == flat["eval/imagenet_c/contrast/error"]
    report = json.loads((out / "final_eval" / "results.json").read_text())
    assert report["sets"]["adversarial"]["top1"] == flat["eval/adversarial/top1"]
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(r["type"] == "final_eval" and r["eval/adversarial/top1"] == flat["eval/adversarial/top1"]
               for r in logged)


def test_final_eval_is_off_by_default(tiny_folder, tmp_path):
    cfg = fap.parse_args(fap.TrainConfig(), tiny_vit_overrides(
        tiny_folder, tmp_path / "run", **{"train.epochs": 1, "train.max_steps": 1, "checkpoint.every_epochs": 0}))
    summary = fap.train(cfg)
    assert "final_eval" not in summary and not (tmp_path / "run" / "final_eval").exists()
