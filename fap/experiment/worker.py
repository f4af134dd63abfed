"""One run of an experiment, in its own process: ``python -m fap.experiment.worker RUN_DIR``.

Reads ``RUN_DIR/experiment.json`` (`fap.experiment.runner.run_spec`), trains the run with
`fap.engine.train` (resuming from its last checkpoint if it has one), measures it and
writes ``RUN_DIR/measurements.json`` last, so that the file's presence means "finished".

The measurements of a classification run, beyond what its final evaluation reports:
clean top-1 on the validation split with each image's outcome (for paired per-image tests)
and top-1 on clean training images (eval transform, main norms), so that a reader knows
the regime: under- or over-fitting. Both score the exported weights (the final weights,
auxiliary norms stripped: what a user deploys).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict

from fap.experiment.metrics import METRIC_ALIASES

__all__ = ["main", "measure_run"]

SUMMARY_METRICS = ("top1", "top5", "ema_top1", "map", "map50", "map75", "ema_map")
RUN_FACTS = ("epochs", "epochs_run", "reference_epochs", "steps", "batch_size", "image_passes_per_step",
             "cost_ratio_per_step", "cost_ratio_run", "train_seconds", "output_dir")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_dir = Path(argv[0])
    spec = json.loads((run_dir / "experiment.json").read_text())
    threads = int(os.environ.get("FAP_EXPERIMENT_THREADS", "0"))
    import torch

    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)
    from fap.config import from_dict
    from fap.engine import train

    from fap.checkpoint import CheckpointError
    from fap.checks import ConfigError
    from fap.data import DataError

    cfg = from_dict(spec["config"])
    try:
        summary = train(cfg)
    except (ConfigError, DataError, CheckpointError) as e:  # the user's mistake: one line, status 2
        print(f"fap.experiment.worker {run_dir}: error: {e}", file=sys.stderr)
        return 2
    result = measure_run(cfg, summary, spec["measurements"])
    from accelerate import PartialState

    if PartialState().is_main_process:
        tmp = run_dir / "measurements.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, run_dir / "measurements.json")
    return 0


def measure_run(cfg, summary: Dict[str, Any], options: Dict[str, Any]) -> Dict[str, Any]:
    """``{"metrics": {name: number}, "per_image": {metric: "0101..."}, "run": facts, "curve": [...]}``."""
    metrics = {k: summary[k] for k in SUMMARY_METRICS if isinstance(summary.get(k), (int, float))}
    flat = summary.get("final_eval") or {}
    metrics.update({k: v for k, v in flat.items() if isinstance(v, (int, float))})
    metrics.update({alias: flat[key] for alias, key in METRIC_ALIASES.items() if key in flat})
    per_image: Dict[str, str] = {}
    if getattr(cfg, "task", "classification") == "classification":
        weights = (summary.get("export") or {}).get("model") or summary["output_dir"]
        clean = _score(weights, cfg, split=cfg.data.val_split, per_image=True, images=0)
        per_image["top1"] = clean["correct"]
        metrics["val_top1_export"] = clean["top1"]
        if options.get("train_images") is not None:
            train = _score(weights, cfg, split=cfg.data.train_split, per_image=False, images=options["train_images"])
            metrics["train_top1"] = train["top1"]
            metrics["train_images"] = train["images"]
    if options.get("measure"):
        module, _, name = options["measure"].partition(":")
        fn = getattr(importlib.import_module(module), name)
        metrics.update(fn(summary["output_dir"], cfg, summary))
    return {"metrics": metrics, "per_image": per_image, "run": {k: summary.get(k) for k in RUN_FACTS},
            "curve": _curve(Path(summary["output_dir"]))}


def _score(weights: str, cfg, *, split: str, per_image: bool, images: int) -> Dict[str, Any]:
    """Clean top-1 of the exported weights on ``split`` (the run's eval transform)."""
    from fap.evaluation.suite import evaluate_model
    from fap.evaluation.config import SuiteConfig

    suite = SuiteConfig(clean=True, per_image=per_image, clean_max_images=images,
                        batch_size=max(1, cfg.train.eval_batch_size or cfg.train.batch_size),
                        num_workers=cfg.data.num_workers)
    data = dataclasses.replace(cfg.data, val_split=split)
    return evaluate_model(weights, suite, data=data)["sets"]["clean"]


def _curve(run_dir: Path):
    """``[step, epoch, top1]`` of every evaluation the run logged (its validation curve)."""
    points = []
    log = run_dir / "log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if record.get("type") == "eval" and "top1" in record:
                points.append([record.get("step"), record.get("epoch"), record["top1"]])
    return points


if __name__ == "__main__":
    sys.exit(main())
