"""Everything a run writes about itself: the JSON-lines log, trackers, progress bar, banner, summary.

`RunLog` is the one owner of ``<output_dir>/log.jsonl`` (append-only; a resumed run adds a
``resume`` record and repeats the steps after its checkpoint), of Accelerate's trackers,
the progress bar and the per-branch metric `Window`. Time spent in evaluation and
checkpointing is kept out of images/s by running it inside `RunLog.paused`.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence

import torch

__all__ = ["Window", "RunLog", "format_summary", "flat_config"]


class Window:
    """Per-branch loss sums, hits and counts over the updates since the last log line."""

    def __init__(self, branches: Sequence[str], device):
        self.branches, self.device = tuple(branches), device
        self.accuracy = False  # whether the task reports hits (every process runs the same task)
        self.reset()

    def reset(self) -> None:
        self.values = torch.zeros(3 * len(self.branches), dtype=torch.float64, device=self.device)
        self.updates = 0

    def add(self, metrics: Dict[str, Any]) -> None:
        for i, branch in enumerate(self.branches):
            n = metrics.get(f"count_{branch}")
            if not n:
                continue
            self.values[3 * i] += metrics[f"loss_{branch}"].detach().double() * n
            if f"correct_{branch}" in metrics:  # a classifier's hits; a detector has none
                self.values[3 * i + 1] += metrics[f"correct_{branch}"].detach().double()
                self.accuracy = True
            self.values[3 * i + 2] += n

    def summary(self, accelerator) -> Dict[str, float]:
        """Mean loss and accuracy per branch over all processes (one all-reduce)."""
        values = accelerator.reduce(self.values.clone(), reduction="sum").tolist()
        out: Dict[str, float] = {}
        for i, branch in enumerate(self.branches):
            n = values[3 * i + 2]
            if n:
                out[f"loss_{branch}"] = values[3 * i] / n
                if self.accuracy:
                    out[f"acc_{branch}"] = 100.0 * values[3 * i + 1] / n
        return out


def flat_config(d: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """``{"section.key": value}`` with values trackers accept (lists as JSON, None as "None")."""
    out = {}
    for section, values in d.items():
        if not isinstance(values, dict):  # the config's one top-level entry, ``task``
            values, section = {section: values}, ""
        for k, v in values.items():
            plain = isinstance(v, (int, float, str, bool))
            out[f"{section}.{k}" if section else k] = "None" if v is None else v if plain else json.dumps(v)
    return out


class RunLog:
    """The run's log file, trackers, progress bar, metric window and timing.

    Args:
        accelerator: the run's Accelerator (only its main process writes files).
        run_dir: the run's output directory.
        branches: the method's branch names (`fap.methods.Method.branches`).
        trackers: Accelerate tracker names (``log.trackers``).
        progress: show a progress bar.
    """

    def __init__(self, accelerator, run_dir: Path, branches: Sequence[str], *, trackers: Sequence[str] = (),
                 progress: bool = True):
        self.accelerator, self.run_dir, self.trackers = accelerator, Path(run_dir), list(trackers)
        self.progress = progress and accelerator.is_main_process
        self.window = Window(branches, accelerator.device)
        self.paused_seconds = {"eval": 0.0, "checkpoint": 0.0}
        self._file = None
        self._bar = None
        self._start = self._window_start = time.perf_counter()
        self._window_paused = 0.0

    def open(self, config: Dict[str, Any], run_name: str, resume: Optional[Dict[str, Any]] = None) -> None:
        """Write ``config.json``, open ``log.jsonl`` for appending, start the trackers."""
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "config.json", "w") as f:
                json.dump(config, f, indent=1)
            self._file = open(self.run_dir / "log.jsonl", "a")
        if self.trackers:
            self.accelerator.init_trackers(run_name, config=flat_config(
                {k: v for k, v in config.items() if isinstance(v, dict) and k != "resolved"}))
        if resume is not None and self._file is not None:
            # Not sent to trackers: records after this line repeat the steps after the checkpoint.
            self._file.write(json.dumps({"type": "resume", **resume}) + "\n")
            self._file.flush()

    def write(self, record: Dict[str, Any]) -> None:
        """One JSON line (main process), and its numbers to the trackers."""
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self.trackers:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(scalars, step=record["step"])

    def print(self, text: str) -> None:
        self.accelerator.print(text)

    def start_training(self, total: int, initial: int, desc: str) -> None:
        """Start the progress bar and the clocks."""
        from accelerate.utils import tqdm

        self._bar = tqdm(total=total, initial=min(initial, total), dynamic_ncols=True, mininterval=1.0,
                         disable=not self.progress, desc=desc, file=sys.stdout)
        self._start = time.perf_counter()
        self.paused_seconds = {k: 0.0 for k in self.paused_seconds}
        self.window_reset()

    def add_update(self, metrics: Sequence[Dict[str, Any]], *, applied: bool) -> None:
        """Count one update (its metrics only when it was applied) and advance the bar."""
        if applied:
            for m in metrics:
                self.window.add(m)
        self.window.updates += 1
        if self._bar is not None:
            self._bar.update(1)

    def window_record(self, images_per_update: int) -> Dict[str, float]:
        """Per-branch metrics and images/s since the last call; starts a new window."""
        metrics = self.window.summary(self.accelerator)
        elapsed = time.perf_counter() - self._window_start - (self._paused_total() - self._window_paused)
        record = {**metrics, "images_per_s": self.window.updates * images_per_update / max(elapsed, 1e-9)}
        self.window_reset()
        return record

    def window_reset(self) -> None:
        self.window.reset()
        self._window_start = time.perf_counter()
        self._window_paused = self._paused_total()

    def set_postfix(self, **values: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix(refresh=False, **values)

    @contextlib.contextmanager
    def paused(self, kind: str) -> Iterator[None]:
        """Time inside is ``kind`` (``"eval"`` or ``"checkpoint"``), not training."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds[kind] += time.perf_counter() - start

    def train_seconds(self) -> float:
        """Wall time since `start_training`, less the paused time."""
        return time.perf_counter() - self._start - self._paused_total()

    def _paused_total(self) -> float:
        return sum(self.paused_seconds.values())

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def finish(self, summary: Dict[str, Any]) -> None:
        """Write ``summary.json`` and the summary record, print the summary, end the trackers."""
        if self.accelerator.is_main_process:
            with open(self.run_dir / "summary.json", "w") as f:
                json.dump(summary, f, indent=1)
            self.write({"type": "summary", "step": summary["steps"],
                        **{k: v for k, v in summary.items() if k != "export"}})
            self._file.close()
            self._file = None
        self.print(format_summary(summary))
        if self.trackers:
            self.accelerator.end_training()


def format_summary(s: Dict[str, Any]) -> str:
    """The summary block printed at the end of a run."""
    def pct(v):
        return "-" if v is None else f"{v:.2f}"
    lines = [
        "=" * 72,
        f"fap summary: {s['method']} on {s['processes']} process(es), {s['precision']}",
        (f"  mAP {pct(s['map'])}  mAP50 {pct(s.get('map50'))}  best mAP {pct(s.get('best_map'))}"
         + (f"  EMA mAP {pct(s['ema_map'])}" if s.get("ema_map") is not None else "")) if "map" in s else
        (f"  top-1 {pct(s['top1'])}  top-5 {pct(s['top5'])}  best top-1 {pct(s['best_top1'])}"
         + (f"  EMA top-1 {pct(s['ema_top1'])}" if s.get("ema_top1") is not None else "")),
        f"  steps {s['steps']}  images {s['images_seen']}  wall {s['train_seconds']:.1f}s  "
        f"{s['images_per_s']:.1f} images/s",
        f"  cost: {s['image_passes_per_step']} image-passes per step vs {s['vanilla_image_passes_per_step']} vanilla "
        f"= {s['cost_ratio_per_step']:.3f}x per step; over the run {s['epochs_run']:.4g} epochs vs "
        f"{s['reference_epochs']} vanilla = {s['cost_ratio_run']:.3f}x",
        f"  output: {s['output_dir']}" + (f"  export: {s['export'].get('model')}" if s.get("export") else ""),
        "=" * 72,
    ]
    c = s.get("compile")
    if c:
        lines.insert(-2, f"  compile: {c['graphs']} graphs, {c['graph_breaks']} graph breaks; "
                         f"{c['late_compiling_updates']} updates compiled after the first ones")
    return "\n".join(lines)
