"""The training loop: ``train(cfg)`` = build -> resume -> epochs -> final evaluation -> export -> summary.

One loop for vanilla, AdvProp and Fast AdvProp (Mei et al., ICLR 2022): what an update
computes is the method's (`fap.methods`), how its gradients are reduced is
`fap.engine.step`'s, and this module only orders updates, evaluations, checkpoints
(`fap.checkpoint`), the export and the cost summary. What the evaluations, the final suite
and the export are is the task's (`fap.tasks`: top-1 or COCO mAP, a timm or a torchvision
export). The engine never imports `fap.attacks`: it knows nothing about adversarial examples.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch

from fap.checkpoint import TrainState, list_checkpoints, prune_checkpoints, save_checkpoint
from fap.config import CheckpointConfig, RunSection, TrainConfig, to_dict
from fap.engine.distributed import average_bn_stats, full_state_dict
from fap.engine.log import RunLog
from fap.engine.setup import Run, build_run, resume
from fap.engine.state import NonFiniteLossError, Preempted, StopSignals

__all__ = ["train", "train_one_epoch", "end_of_epoch", "epoch_cadence", "evaluate_run"]


def train(config: TrainConfig) -> Dict[str, Any]:
    """Run a whole training job described by ``config``.

    Launch it with ``accelerate launch`` for several processes or DeepSpeed, or call it
    from a plain ``python`` script for one process.

    Returns:
        The run summary (also written to ``<output_dir>/summary.json``): the task's final and
        best headline metric (top-1/top-5, or COCO mAP), cost per step and its ratio to
        vanilla, wall time, images/s, paths.

    Raises:
        Preempted: SIGTERM or SIGUSR1 arrived (``checkpoint.on_signal``); a checkpoint of
            the last update was saved first. It is a ``SystemExit`` with status 143.
        NonFiniteLossError: a NaN/Inf loss under ``train.nonfinite=stop``.
    """
    with StopSignals() as signals, contextlib.ExitStack() as held:
        run = build_run(config, held=held)  # the run directory is locked until `held` closes
        resume(run)
        log = open_log(run)
        signals.install(run.cfg.checkpoint.on_signal)
        log.start_training(run.total_updates, run.state.step, run.method.name)
        images_at_start = run.state.images
        last_eval: Dict[str, Any] = {}
        stop = run.state.step >= run.total_updates
        run.model.train()
        while run.state.epoch < run.cfg.train.epochs and not stop:
            stop = train_one_epoch(run, log, signals)
            last_eval = end_of_epoch(run, log, stopped=stop) or last_eval
        log.close_bar()
        train_seconds = log.train_seconds()
        if last_eval.get("step") != run.state.step:  # stopped mid-epoch: evaluate the final weights
            last_eval = evaluate_run(run, log)
        robustness = final_eval(run, log)
        exported = export(run)
        summary = summarize(run, log, last_eval, train_seconds=train_seconds,
                            images=run.state.images - images_at_start)
        summary.update({"export": exported, **({"final_eval": robustness} if robustness else {})})
        log.finish(summary)
        run.accelerator.wait_for_everyone()
        return summary


def open_log(run: Run) -> RunLog:
    """The run's `RunLog`, opened, with the one-line banner printed."""
    cfg, info = run.cfg, run.info()
    log = RunLog(run.accelerator, run.run_dir, run.method.branches, trackers=cfg.log.trackers,
                 progress=cfg.log.progress)
    resumed = None
    if run.resume_from is not None:
        resumed = {"step": run.state.step, "epoch": run.state.epoch, "from": str(run.resume_from)}
    log.open({**to_dict(cfg), "resolved": info}, cfg.train.name, resume=resumed)
    t = cfg.train
    fsdp2 = run.marker["distributed_type"] == "FSDP2"
    log.print(
        f"fap: {run.method.name} | {run.task.model_name(cfg)} | {run.world} process(es), "
        f"{'FSDP2' if fsdp2 else run.accelerator.distributed_type.value}"
        + (f" ZeRO-{run.zero_stage}" if run.zero_stage else "")
        + f", {run.precision} | batch {t.batch_size} ({run.micro}/process x {t.accum_steps} accum) | "
        f"lr {run.lr:.4g} | {run.updates_per_epoch} updates/epoch | cost {info['image_passes_per_step']} "
        f"image-passes/step = {run.cost.ratio:.3f}x vanilla | gradients: {run.update.description}")
    return log


def train_one_epoch(run: Run, log: RunLog, signals: StopSignals) -> bool:
    """Train the rest of epoch ``run.state.epoch``; True when the run reached its last update."""
    t = run.cfg.train
    pending: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for images, labels in loader_batches(run, run.state.epoch, run.state.batch_in_epoch):
        if not run.prepared_train and t.accum_steps > 1:
            # FFCV reuses its output buffers: a batch held for accumulation must be copied.
            images, labels = images.clone(), labels.clone()
        pending.append((images, labels))
        run.state.batch_in_epoch += 1
        if len(pending) < t.accum_steps:
            continue
        one_update(run, log, signals, pending)
        pending = []
        if run.state.step >= run.total_updates:
            return True
    return False


def one_update(run: Run, log: RunLog, signals: StopSignals, batches) -> None:
    """One optimizer update, then its log line, EMA, and any checkpoint due."""
    state, c = run.state, run.cfg.checkpoint
    if run.scheduler is not None:
        run.scheduler.step_update(num_updates=state.step)
    lr = max(g["lr"] for g in run.optimizer.param_groups)
    watch = run.compile_watch.update(state.step + 1) if run.compile_watch else contextlib.nullcontext()
    with run.rng.scope(), watch:
        result = run.update(batches, stop_requested=signals.received is not None)
    signals.stop = signals.stop or result.stop
    if result.nonfinite:
        _nonfinite(run, log, result.nonfinite)
    state.step += 1
    state.images += run.cfg.train.batch_size
    if run.ema is not None and not result.nonfinite:
        run.ema.update(run.unwrapped, step=state.step)
    log.add_update(result.metrics, applied=not result.nonfinite)
    if state.step % run.cfg.log.every_steps == 0 or state.step == run.total_updates:
        _log_train(run, log, lr, result.grad_norm)
    if signals.stop and state.step < run.total_updates:
        path = save(run, log, "preempted")
        log.print(f"fap: received {signals.name()}: saved {path} after update {state.step}; "
                  "continue with --checkpoint.resume=auto")
        log.write({"type": "preempted", "step": state.step, "signal": signals.name(), "path": str(path)})
        raise Preempted(f"stopped by {signals.name()} after update {state.step}; saved {path}")
    if c.every_steps and state.step % c.every_steps == 0 and state.step < run.total_updates:
        save(run, log, "every_steps")


def _nonfinite(run: Run, log: RunLog, bad: List[str]) -> None:
    """Stop (``train.nonfinite=stop``, naming the last good checkpoint) or count a skipped update."""
    state = run.state
    record = {"type": "nonfinite", "step": state.step + 1, "epoch": state.epoch, "branches": bad}
    if run.cfg.train.nonfinite == "stop":
        log.write({**record, "action": "stop"})
        good = list_checkpoints(run.run_dir)
        raise NonFiniteLossError(
            f"non-finite loss in update {state.step + 1} (epoch {state.epoch}, loader batch "
            f"{state.batch_in_epoch} of the epoch): the {' and '.join(bad)} "
            f"{'loss is' if bad != ['gradients'] else 'norm is'} NaN/Inf. The run stopped without "
            f"saving this update; the last good checkpoint is "
            f"{good[-1] if good else 'none (no checkpoint was written yet)'}. Resume it with "
            "--checkpoint.resume=auto (e.g. with a lower optim.lr or with optim.clip_grad), or "
            "pass --train.nonfinite=skip to skip such updates (counted in the log)")
    state.nonfinite_skipped += 1
    log.write({**record, "action": "skip", "skipped_total": state.nonfinite_skipped})
    log.print(f"warning: update {state.step + 1} skipped: non-finite {', '.join(bad)} "
              f"({state.nonfinite_skipped} skipped so far)")


def _log_train(run: Run, log: RunLog, lr: float, grad_norm: Optional[float]) -> None:
    state, info = run.state, run.info()
    window = log.window_record(run.cfg.train.batch_size)
    record = {"type": "train", "step": state.step, "epoch": state.epoch + state.batch_in_epoch / len(run.train_loader),
              "lr": lr, **window, "image_passes_per_step": info["image_passes_per_step"],
              "cost_ratio": run.cost.ratio}
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    log.write(record)
    log.set_postfix(loss=f"{window.get('loss_clean', float('nan')):.3f}", lr=f"{lr:.3g}",
                    img_s=f"{window['images_per_s']:.0f}")


def end_of_epoch(run: Run, log: RunLog, *, stopped: bool) -> Optional[Dict[str, Any]]:
    """Close the epoch if it was trained to its end; evaluate and checkpoint when due.

    Returns the evaluation, if one ran.
    """
    due = epoch_cadence(run.state, run.cfg.train, run.cfg.checkpoint, run.updates_per_epoch, stopped=stopped)
    if due.finished:
        run.state.epoch += 1
        run.state.batch_in_epoch = 0
    result = evaluate_run(run, log) if due.evaluate else None
    if due.checkpoint:
        save(run, log, due.checkpoint)
    return result


class EpochEnd(NamedTuple):
    """What the end of an epoch's loop does: ``finished`` (the epoch was trained to its end,
    so the counter moves on), ``evaluate``, and ``checkpoint`` (the reason, or None)."""
    finished: bool
    evaluate: bool
    checkpoint: Optional[str]


def epoch_cadence(state: TrainState, t: RunSection, c: CheckpointConfig, updates_per_epoch: int, *,
                  stopped: bool) -> EpochEnd:
    """What is due when the loop over an epoch's batches ends (``stopped``: at the last update).

    An epoch ends *finished* when all its batches were trained or the loop ran out of batches;
    a run stopped by ``train.max_steps`` mid-epoch is not finished. Evaluation is due every
    ``train.eval_every`` finished epochs and at the end of the run; a checkpoint every
    ``checkpoint.every_epochs`` finished epochs and at the end of a run that checkpoints at all.
    """
    finished = state.batch_in_epoch >= t.accum_steps * updates_per_epoch or not stopped
    epoch = state.epoch + 1 if finished else state.epoch
    last = epoch >= t.epochs or stopped
    evaluate = finished and ((t.eval_every and epoch % t.eval_every == 0) or last)
    checkpoint = None
    if (c.every_epochs and finished and epoch % c.every_epochs == 0) or (last and (c.every_epochs or c.every_steps)):
        checkpoint = "epoch_end" if finished else "stop"
    return EpochEnd(finished, bool(evaluate), checkpoint)


def loader_batches(run: Run, epoch: int, skip: int):
    """This epoch's batches, the first ``skip`` left out (mid-epoch resume).

    The epoch fixes the order and each sample's augmentation (``fap.data.seeding``), so the
    batches after the skipped ones are those the interrupted run would have seen.
    """
    from fap.data import set_epoch

    loader = run.train_loader
    set_epoch(loader, epoch)
    if skip <= 0:
        return loader
    if run.prepared_train:
        skipped = run.accelerator.skip_first_batches(loader, skip)
        skipped.set_epoch(epoch)
        return skipped
    return (batch for i, batch in enumerate(loader) if i >= skip)


def save(run: Run, log: RunLog, reason: str) -> Path:
    """An atomic checkpoint of the run (`fap.checkpoint.save_checkpoint`), then pruning."""
    with log.paused("checkpoint"):
        path = save_checkpoint(run.accelerator, run.run_dir, run.state, {**run.marker, "reason": reason},
                               sharded=run.sharded, buffers=run.per_process)
        prune_checkpoints(run.accelerator, run.run_dir, run.cfg.checkpoint.keep)
    log.write({"type": "checkpoint", "step": run.state.step, "epoch": run.state.epoch, "path": str(path)})
    return path


# ------------------------------------------------------------------------------------
# Evaluation, export, summary
# ------------------------------------------------------------------------------------

def evaluate_run(run: Run, log: RunLog) -> Dict[str, Any]:
    """Evaluate the model (and its EMA) with the task's headline evaluation; log and print it."""
    task, cfg = run.task, run.cfg
    with log.paused("eval"):
        average_bn_stats(run.unwrapped, run.world)
        result: Dict[str, Any] = task.evaluate(run.accelerator, run.unwrapped, run.eval_loader, cfg,
                                               prepared=run.prepared_eval)
        if run.ema is not None:
            average_bn_stats(run.ema.module, run.world)
            ema = task.evaluate(run.accelerator, run.ema.module, run.eval_loader, cfg, prepared=run.prepared_eval)
            result.update({f"ema_{k}": v for k, v in ema.items() if k != "count"})
    # TrainState.best_top1 holds the best headline metric (top-1, or mAP for a detector)
    run.state.best_top1 = max(run.state.best_top1, result[task.headline], result.get(f"ema_{task.headline}", 0.0))
    result["step"] = run.state.step
    log.write({"type": "eval", "epoch": run.state.epoch, **result})
    log.print(f"epoch {run.state.epoch}: {task.describe(result)}")
    return result


def final_eval(run: Run, log: RunLog) -> Dict[str, float]:
    """The task's final suite on the final weights (``final_eval`` for a classifier, the corrupted
    mAP for a detector); logged and reported. Returns the flat numbers, or {} when none was asked for."""
    flat, text = run.task.final_eval(run.accelerator, run.unwrapped, run.cfg, run.run_dir / "final_eval")
    if not flat:
        return {}
    log.write({"type": "final_eval", "step": run.state.step, **flat})
    log.print(text)
    return flat


def export(run: Run) -> Dict[str, str]:
    """The final weights (and EMA) in the task's plain format, aux norms stripped; paths by kind."""
    if not run.cfg.checkpoint.export:
        return {}
    sd = full_state_dict(run.accelerator, run.model)
    ema_sd = run.ema.module.state_dict() if run.ema is not None else None
    exported = {}
    if run.accelerator.is_main_process:
        kwargs = dict(num_classes=run.num_classes)
        exported["model"] = str(run.task.export(run.cfg, sd, run.run_dir / "export", **kwargs))
        if ema_sd is not None:
            exported["ema"] = str(run.task.export(run.cfg, ema_sd, run.run_dir / "export_ema", **kwargs))
    run.accelerator.wait_for_everyone()
    return exported


def summarize(run: Run, log: RunLog, last_eval: Dict[str, Any], *, train_seconds: float,
              images: int) -> Dict[str, Any]:
    """The run summary: accuracy, cost over the updates actually made, time, throughput."""
    state, t = run.state, run.cfg.train
    reference_epochs = t.reference_epochs or t.epochs
    epochs_run = state.step / run.updates_per_epoch  # a max_steps run stops early
    info = run.info()
    info["cost_ratio_run"] = run.cost.ratio * epochs_run / reference_epochs
    return {
        **info,
        "epochs": t.epochs, "epochs_run": epochs_run, "reference_epochs": reference_epochs, "steps": state.step,
        "images_seen": state.images, **_headline(run.task.headline, last_eval, state.best_top1),
        "train_seconds": train_seconds, "eval_seconds": log.paused_seconds["eval"],
        "checkpoint_seconds": log.paused_seconds["checkpoint"], "images_per_s": images / max(train_seconds, 1e-9),
        "nonfinite_skipped": state.nonfinite_skipped, "output_dir": str(run.run_dir),
        **({"compile": run.compile_watch.summary()} if run.compile_watch and run.compile_watch.enabled else {}),
    }


def _headline(headline: str, last_eval: Dict[str, Any], best: float) -> Dict[str, Any]:
    """The last evaluation's numbers for the summary: top-1/top-5 (and EMA) or the COCO APs."""
    if headline == "top1":
        return {"top1": last_eval.get("top1"), "top5": last_eval.get("top5"), "ema_top1": last_eval.get("ema_top1"),
                "best_top1": best}
    keep = {k: v for k, v in last_eval.items() if k.startswith(("map", "ema_map")) or k == "count"}
    return {"map": last_eval.get("map"), **keep, f"best_{headline}": best}
