"""Running an experiment's plan: run directories, reuse, N runs at a time.

Each (arm, seed) trains in its own process (``python -m fap.experiment.worker``, or under a
launcher such as ``accelerate launch --config_file ...``), with its output in the run's
``train.log``. Before anything starts, each run directory is checked against the plan:

* ``measurements.json`` present and ``experiment.json`` equal to the plan's: the run is
  finished and read back;
* ``experiment.json`` equal but no measurements: the run was interrupted; it trains again
  with ``checkpoint.resume=auto``, so it continues from its last checkpoint;
* ``experiment.json`` different: a `ConfigError` naming each key that differs (start a new
  ``--out``, or delete the run directory);
* no directory: the run is new.

``jobs`` runs go at a time, the cores split between them (``OMP_NUM_THREADS``: the share of
cores minus the run's loader workers, at least one).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from fap.checks import ConfigError
from fap.config import TrainConfig, to_dict
from fap.experiment.plan import Arm, Base, Contrast, Plan, RunPlan, make_plan

__all__ = ["ExperimentError", "run", "run_plan", "run_spec", "check_run_dir", "IGNORED_KEYS", "DEFAULT_TRAIN_IMAGES"]

# Settings that cannot change a run's numbers: a finished run made with other values is reused.
IGNORED_KEYS = ("checkpoint.resume", "checkpoint.keep", "log.progress", "log.trackers", "log.every_steps",
                "data.num_workers", "train.dist_timeout_s")
DEFAULT_TRAIN_IMAGES = 10000


class ExperimentError(RuntimeError):
    """A run of the experiment failed; the message names it and ends with its log's tail.
    ``status`` is the run's exit status (2: a mistake in its config, data or checkpoint)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def run(
        base: Base,
        arms: Sequence[Union[Arm, Tuple[str, Sequence[str]]]],
        seeds: Sequence[int],
        *,
        out: Union[str, Path],
        protocol: str = "equal-compute",
        contrasts: Sequence[Contrast] = (),
        overrides: Sequence[str] = (),
        smoke: Optional[Callable[[TrainConfig], TrainConfig]] = None,
        epochs: Optional[int] = None,
        jobs: int = 1,
        launcher: Sequence[str] = (),
        measure: Optional[Union[str, Callable]] = None,
        train_images: Optional[int] = DEFAULT_TRAIN_IMAGES,
        progress: bool = True,
        quiet: bool = False,
):
    """Run (or finish, or read back) an experiment and return its `fap.experiment.Results`.

    Args:
        base, arms, seeds, out, protocol, contrasts, overrides, smoke, epochs: the plan
            (`fap.experiment.make_plan`); an arm may be given as ``(name, overrides)``.
        jobs: runs at a time.
        launcher: a command that runs each worker instead of this Python, e.g.
            ``["accelerate", "launch", "--config_file", "accelerate_configs/multi_gpu.yaml"]``.
        measure: an extra per-run measurement, ``"module:function"`` or a module-level
            function, called as ``fn(run_dir, config, summary) -> {name: number}`` in the
            worker after training; its numbers become metrics.
        train_images: training accuracy on this many clean training images (evenly spaced,
            eval transform, main norms); 0 = all, None = not measured.
        progress: a bar that counts runs.
        quiet: do not print the headline table.
    """
    from fap.experiment.report import Results

    arms = [a if isinstance(a, Arm) else Arm(a[0], tuple(a[1])) for a in arms]
    plan = make_plan(base, arms, seeds, out=out, protocol=protocol, contrasts=contrasts, overrides=overrides,
                     smoke=smoke, epochs=epochs)
    options = {"train_images": train_images, "measure": _measure_name(measure)}
    extra_path = _measure_path(measure)
    run_plan(plan, options, jobs=jobs, launcher=launcher, progress=progress, extra_path=extra_path)
    results = Results.collect(plan)
    results.write()
    if not quiet:
        print(results.headline())
    return results


def run_spec(rp: RunPlan, options: Dict[str, Any]) -> Dict[str, Any]:
    """What defines a run and its measurements (``experiment.json``)."""
    return {"arm": rp.arm, "seed": rp.seed, "config": to_dict(rp.config), "measurements": dict(options)}


def check_run_dir(rp: RunPlan, spec: Dict[str, Any]) -> str:
    """``"new"``, ``"finished"`` or ``"unfinished"``; a `ConfigError` if the directory holds another run."""
    d = rp.run_dir
    recorded = d / "experiment.json"
    if not recorded.is_file():
        if d.is_dir() and any(d.iterdir()):
            raise ConfigError(f"{d} exists and holds no experiment.json: it is not a run of this experiment; "
                              "choose another --out or remove it")
        return "new"
    try:
        old = json.loads(recorded.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{recorded} is not valid JSON ({e}); remove the run directory to train it again") from None
    changed = _differences(old, spec)
    if changed:
        lines = "; ".join(f"{k}: the run has {a!r}, this experiment {b!r}" for k, (a, b) in changed[:5])
        raise ConfigError(f"{d} was made with another config ({lines}); give the experiment another --out, "
                          f"or remove {d} to train it again")
    return "finished" if (d / "measurements.json").is_file() else "unfinished"


def _differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[Tuple[str, Tuple[Any, Any]]]:
    from fap.config import from_dict

    # a key the recorded config lacks (a field added to fap since) counts as its default, as on resume
    old = dict(old, config=to_dict(from_dict(old.get("config", {}))))
    out = []
    for section in sorted(set(old["config"]) | set(new["config"])):
        a, b = old["config"].get(section), new["config"].get(section)
        if not (isinstance(a, dict) and isinstance(b, dict)):  # a top-level key (``task``)
            if a != b:
                out.append((section, (a, b)))
            continue
        for key in sorted(set(a) | set(b)):
            name = f"{section}.{key}"
            if a.get(key) != b.get(key) and not name.startswith(IGNORED_KEYS):
                out.append((name, (a.get(key), b.get(key))))
    for key in sorted(set(old.get("measurements", {})) | set(new["measurements"])):
        if old.get("measurements", {}).get(key) != new["measurements"].get(key):
            out.append((f"measurements.{key}", (old.get("measurements", {}).get(key), new["measurements"].get(key))))
    return out


def run_plan(plan: Plan, options: Dict[str, Any], *, jobs: int = 1, launcher: Sequence[str] = (),
             progress: bool = True, extra_path: Optional[str] = None) -> None:
    """Train every run of ``plan`` that is not finished, ``jobs`` at a time."""
    from tqdm.auto import tqdm

    if jobs < 1:
        raise ConfigError(f"jobs={jobs}: run at least one at a time")
    todo = []
    for rp in plan.runs:  # every directory is checked before anything trains
        spec = run_spec(rp, options)
        if check_run_dir(rp, spec) != "finished":
            todo.append((rp, spec))
    bar = tqdm(total=len(plan.runs), initial=len(plan.runs) - len(todo), desc=f"{plan.out} runs", unit="run",
               disable=not progress, dynamic_ncols=True)
    launcher = _resolve(launcher)
    threads = _threads(jobs)
    running: List[Tuple[RunPlan, subprocess.Popen, Any]] = []
    try:
        while todo or running:
            while todo and len(running) < jobs:
                rp, spec = todo.pop(0)
                running.append(_start(rp, spec, threads(rp.config), launcher, extra_path))
            time.sleep(0.2)
            for item in list(running):
                rp, proc, log = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                log.close()
                if proc.returncode != 0:
                    raise ExperimentError(_failure(rp, proc.returncode), proc.returncode)
                bar.update(1)
    finally:
        for rp, proc, log in running:  # stopped (error, Ctrl-C): the others save and stop too
            proc.terminate()
        for rp, proc, log in running:
            proc.wait()
            log.close()
        bar.close()


def _resolve(launcher: Sequence[str]) -> List[str]:
    """The launcher with its program found on PATH or beside this Python (a venv's ``accelerate``)."""
    import shutil

    if not launcher:
        return []
    found = shutil.which(launcher[0]) or shutil.which(launcher[0], path=str(Path(sys.executable).parent))
    if not found:
        raise ConfigError(f"--launcher {shlex.join(launcher)}: {launcher[0]!r} is neither on PATH nor beside "
                          f"{sys.executable}")
    return [found] + list(launcher[1:])


def _threads(jobs: int) -> Callable[[TrainConfig], int]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // jobs)
    return lambda cfg: max(1, share - cfg.data.num_workers)


def _start(rp: RunPlan, spec: Dict[str, Any], threads: int, launcher: Sequence[str], extra_path: Optional[str]):
    rp.run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(rp.run_dir / "experiment.json", spec)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), FAP_EXPERIMENT_THREADS=str(threads))
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([extra_path] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = (list(launcher) if launcher else [sys.executable]) + ["-m", "fap.experiment.worker", str(rp.run_dir)]
    log = open(rp.run_dir / "train.log", "a")
    log.write(f"\n$ {shlex.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
    return rp, proc, log


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM (it checkpoints and stops) if the experiment process dies."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _failure(rp: RunPlan, status: int) -> str:
    tail = (rp.run_dir / "train.log").read_text(errors="replace").splitlines()[-15:]
    return (f"run {rp.arm} seed {rp.seed} failed (exit status {status}); the end of {rp.run_dir / 'train.log'}:\n"
            + "\n".join("  " + line for line in tail) + "\nstart the experiment again to resume it once fixed")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _measure_name(measure) -> Optional[str]:
    if measure is None or isinstance(measure, str):
        return measure
    module, name = measure.__module__, measure.__qualname__
    if "<" in name or module == "__main__":
        raise ConfigError(f"measure={measure!r}: give a function defined at the top level of an importable module "
                          "(the runs call it in their own processes), or 'module:function'")
    return f"{module}:{name}"


def _measure_path(measure) -> Optional[str]:
    """The folder of a measure function's module, so that the worker can import it."""
    if measure is None or isinstance(measure, str):
        return None
    module = sys.modules.get(measure.__module__)
    file = getattr(module, "__file__", None)
    # the folder that holds the top-level package (``a.b.c`` in ``<folder>/a/b/c.py``)
    return str(Path(file).resolve().parents[measure.__module__.count(".")]) if file else None
