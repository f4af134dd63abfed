"""Set-up of a run: everything `fap.engine.loop.train` needs, built from the config into one `Run`.

Whatever can be checked before processes and DeepSpeed start is checked first (batch
divisibility, the DeepSpeed file). Then the Accelerator, the run directory's lock (one
writer per directory: `fap.engine.lock`), the checkpoint to resume and its config, the
task's data and model (`fap.tasks`, picked by ``cfg.task``) and, unless resuming, its
starting weights (``model.init_from``: `fap.finetune`), the method, a timm optimizer
(no weight decay on norms and biases), a timm schedule driven by the global update count
(never ``prepare``-d, which would step it once per process), a timm ``ModelEmaV3``, the
state saved with every checkpoint, and the update that matches the gradient-reduction path
(`fap.engine.step`).
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from fap.checkpoint import TrainState, load_checkpoint, register_state, remove_partial, resolve_resume, \
    verify_checkpoint
from fap.config import ConfigError, TrainConfig, diff, method_name, to_dict, validate
from fap.engine.compiled import CompileWatch, check_compile, compile_network
from fap.engine.distributed import configure_deepspeed, deepspeed_preflight, main_process_first, \
    make_accelerator, shard_fsdp2, using_deepspeed, using_fsdp2, warn_oversubscribed
from fap.engine.lock import RunDirLock, hold_run_dir
from fap.engine.state import MethodRNG
from fap.engine.step import Update, make_update
from fap.finetune import init_model, resolve_init
from fap.methods import build_method
from fap.methods.base import Method, StepCost
from fap.tasks import Task, get_task

__all__ = ["Run", "build_run", "resume", "RESUME_MAY_CHANGE"]

# Keys that may differ between a checkpoint's config and the run that resumes it; any
# other difference would make the resumed run a different experiment, and is an error.
RESUME_MAY_CHANGE = (
    "train.name", "train.max_steps", "train.eval_every", "train.eval_batch_size", "train.nonfinite",
    "train.dist_timeout_s",
    "data.path", "data.num_workers", "data.skip_corrupt",
    "checkpoint.", "log.", "final_eval.", "detection.corrupt_path", "detection.corrupt_severities",
)


@dataclass
class Run:
    """What set-up built; the loop reads it and advances ``state``.

    ``model`` and ``optimizer`` are as ``accelerator.prepare`` returned them (DDP or
    DeepSpeed wrapped), or, under FSDP2, the ``fully_shard``-ed model and a plain torch
    optimizer over its shards; ``unwrapped`` is the `fap.models.PixelModel` inside. A loader is
    ``prepared`` when Accelerate sharded it (FFCV's shard themselves). ``marker`` holds the
    facts saved with every checkpoint.
    """
    cfg: TrainConfig
    task: Task
    run_dir: Path
    accelerator: Any
    precision: str
    world: int
    micro: int
    zero_stage: Optional[int]
    model: Any
    unwrapped: torch.nn.Module
    method: Method
    cost: StepCost
    optimizer: Any
    lr: float
    scheduler: Any
    ema: Any
    train_loader: Any
    eval_loader: Any
    prepared_train: bool
    prepared_eval: bool
    num_classes: int
    updates_per_epoch: int
    update: Update
    state: TrainState
    rng: MethodRNG
    marker: Dict[str, Any]
    resume_from: Optional[Path] = None
    resume_marker: Optional[Dict[str, Any]] = None
    compile_watch: Optional[CompileWatch] = None
    lock: Optional[RunDirLock] = None

    @property
    def sharded(self) -> Optional[Tuple[Any, Any]]:
        """``(model, optimizer)`` when they are FSDP2's, which checkpoints save as distributed state dicts."""
        return (self.model, self.optimizer) if self.marker.get("distributed_type") == "FSDP2" else None

    @property
    def per_process(self) -> Dict[str, torch.nn.Module]:
        """The modules whose buffers (BatchNorm statistics) each process keeps, and each checkpoint
        saves, per process: the model and its EMA."""
        return {"model": self.unwrapped, **({"ema": self.ema.module} if self.ema is not None else {})}

    @property
    def total_updates(self) -> int:
        t = self.cfg.train
        total = self.updates_per_epoch * t.epochs
        return total if t.max_steps is None else min(total, t.max_steps)

    def info(self) -> Dict[str, Any]:
        """The resolved facts of the run: processes, precision, batch split, cost per step."""
        t = self.cfg.train
        per_update = self.world * t.accum_steps
        return {
            "method": self.method.name, "processes": self.world,
            "distributed_type": str(self.accelerator.distributed_type), "zero_stage": self.zero_stage,
            "gradient_reduction": self.update.description, "precision": self.precision,
            "batch_size": t.batch_size, "accum_steps": t.accum_steps, "micro_batch_per_process": self.micro,
            "lr_scaled": self.lr, "updates_per_epoch": self.updates_per_epoch, "num_classes": self.num_classes,
            "image_passes_per_step": self.cost.image_passes * per_update,
            "vanilla_image_passes_per_step": self.cost.vanilla * per_update,
            "cost_ratio_per_step": self.cost.ratio,
            "cost_ratio_run": self.cost.ratio * t.epochs / (t.reference_epochs or t.epochs),
        }


def build_run(config: TrainConfig, *, held: Optional[contextlib.ExitStack] = None) -> Run:
    """Validate ``config`` and build everything the loop needs (see the module docstring).

    Args:
        config: the run's config.
        held: releases the run directory's lock (`fap.engine.lock`) when it closes, also when
            this raises; without it the caller releases ``Run.lock``.
    """
    from accelerate.utils import DistributedType, set_seed

    cfg = validate(config)
    task = get_task(cfg.task)
    task.check_config(cfg)
    run_dir = Path(cfg.output_dir)
    world, micro = _batch_split(cfg)
    deepspeed_preflight(cfg, micro, world)
    accelerator, precision = make_accelerator(cfg, run_dir)
    lock = hold_run_dir(accelerator, run_dir)  # one writer per run directory, before anything reads it
    if held is not None and lock is not None:
        held.callback(lock.release)
    resume_from, resume_marker = _checked_resume(cfg, run_dir, world)
    init = resolve_init(cfg.model.init_from) if resume_from is None else None  # a resumed run has its weights
    zero_stage = configure_deepspeed(accelerator, cfg, micro)
    check_compile(cfg.train.compile, zero_stage)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if using_fsdp2() and cfg.ema.enabled:
        raise ConfigError("ema.enabled=True under FSDP2: an EMA is a full replica of the weights on every rank, "
                          "which sharding exists to avoid; use DDP or ZeRO-2 for an EMA, or set --ema.enabled=false")
    if deepspeed and cfg.train.nonfinite == "skip":
        raise ConfigError("train.nonfinite='skip' is not available under DeepSpeed (its engine applies the update "
                          "inside its own step); use train.nonfinite=stop, which stops before the update is saved")
    set_seed(cfg.train.seed)  # identical on every rank: the model's initial weights must match
    build = functools.partial(task.build_data, cfg, micro=micro, world=world, rank=accelerator.process_index)
    data = main_process_first(accelerator, build)
    train_loader, eval_loader, num_classes = data.train, data.eval, data.num_classes
    warn_oversubscribed(accelerator, cfg.data.num_workers)
    model = _build_model(cfg, task, num_classes, init, accelerator.print)
    method, cost = _build_method(cfg, task, model, micro, num_classes)
    fsdp2 = using_fsdp2() and not deepspeed
    if fsdp2:  # before the optimizer: fully_shard replaces the parameters by sharded ones
        model = shard_fsdp2(accelerator, model, precision)
    optimizer, lr = build_optimizer(cfg, model)
    prepared = (data.prepare_train, data.prepare_eval)
    model, optimizer, train_loader, eval_loader = _prepare(accelerator, model, optimizer, train_loader, eval_loader,
                                                           prepared, fsdp2=fsdp2)
    updates_per_epoch = _updates_per_epoch(cfg, train_loader, micro)
    scheduler = build_scheduler(cfg, optimizer, updates_per_epoch)
    unwrapped = accelerator.unwrap_model(model)
    ema = _build_ema(cfg, unwrapped)
    state, rng = TrainState(), MethodRNG(cfg.train.seed, accelerator.process_index, world)
    saved = {"state": state, "rng": rng, "scheduler": scheduler, "ema": ema}
    state_files = register_state(accelerator, {k: v for k, v in saved.items() if v is not None})
    marker = {"config": to_dict(cfg), "task": cfg.task, "num_classes": num_classes, "world_size": world,
              "distributed_type": "FSDP2" if fsdp2 else str(accelerator.distributed_type), "precision": precision,
              "zero_stage": zero_stage, "state_files": state_files}
    update = make_update(accelerator, model, optimizer, method, deepspeed=deepspeed,
                         accum_steps=cfg.train.accum_steps, channels_last=cfg.train.channels_last,
                         clip_grad=cfg.optim.clip_grad, restore_on_skip=cfg.train.nonfinite == "skip")
    return Run(cfg=cfg, task=task, run_dir=run_dir, accelerator=accelerator, precision=precision, world=world, micro=micro,
               zero_stage=zero_stage, model=model, unwrapped=unwrapped, method=method, cost=cost,
               optimizer=optimizer, lr=lr, scheduler=scheduler, ema=ema, train_loader=train_loader,
               eval_loader=eval_loader, prepared_train=prepared[0], prepared_eval=prepared[1],
               num_classes=num_classes, updates_per_epoch=updates_per_epoch, update=update, state=state, rng=rng,
               marker=marker, resume_from=resume_from, resume_marker=resume_marker,
               compile_watch=CompileWatch(cfg.train.compile), lock=lock)


def resume(run: Run) -> None:
    """Remove what an interrupted save left; load the checkpoint to resume, if any."""
    remove_partial(run.accelerator, run.run_dir)
    if run.resume_from is None:
        return
    # verified in build_run
    load_checkpoint(run.accelerator, run.resume_from, marker=run.resume_marker, sharded=run.sharded,
                    buffers=run.per_process)
    run.accelerator.print(f"resumed from {run.resume_from} (epoch {run.state.epoch}, step {run.state.step})")
    if run.cfg.model.init_from:
        run.accelerator.print(f"model.init_from={run.cfg.model.init_from} not loaded: the resumed checkpoint holds "
                              "the run's weights")
    saved_world = int(run.resume_marker.get("world_size", run.world))
    if saved_world != run.world:
        run.accelerator.print(
            f"note: the checkpoint was written by {saved_world} processes, this run has {run.world}: the same "
            "images in the same updates, but spread over other processes (other BatchNorm batches; every "
            "process starts from the first process's BatchNorm statistics), and new random streams for the "
            "method: not bitwise the run it resumes")


# ------------------------------------------------------------------------------------
# The parts
# ------------------------------------------------------------------------------------

def _batch_split(cfg: TrainConfig) -> Tuple[int, int]:
    """(processes, images per process and micro-batch), from the launcher's WORLD_SIZE."""
    t = cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if t.batch_size % (world * t.accum_steps):
        example = world * t.accum_steps * max(1, t.batch_size // (world * t.accum_steps))
        raise ConfigError(f"train.batch_size={t.batch_size} (global) must be divisible by processes ({world}) x "
                          f"train.accum_steps ({t.accum_steps}); e.g. {example}")
    return world, t.batch_size // (world * t.accum_steps)


def _checked_resume(cfg: TrainConfig, run_dir: Path, world: int) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """The checkpoint to resume and its marker: safe to load, complete, of this fap version,
    and the same experiment; checked before anything is written."""
    path = resolve_resume(cfg.checkpoint.resume, run_dir)
    if path is None:
        return None, None
    marker = verify_checkpoint(path)
    check_resume_config(marker, cfg, path, world)
    return path, marker


def check_resume_config(marker: Dict[str, Any], cfg: TrainConfig, path: Path, world: int) -> None:
    """A resumed run must be the same experiment (only `RESUME_MAY_CHANGE` keys may differ)."""
    from fap.config import from_dict

    changed = {k: v for k, v in diff(from_dict(marker["config"]), cfg).items() if not k.startswith(RESUME_MAY_CHANGE)}
    if changed:
        lines = "; ".join(f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"cannot resume {path}: the run's config differs from the checkpoint's ({lines}). "
                          "Resume with the same recipe and overrides, or start a new run directory")
    saved_world = int(marker.get("world_size", world))
    if saved_world != world and ("DEEPSPEED" in str(marker.get("distributed_type", "")) or using_deepspeed()):
        raise ConfigError(f"cannot resume {path}: it was written by {saved_world} processes, this run has {world}, "
                          "and DeepSpeed ZeRO partitions its optimizer state by process; resume with "
                          f"{saved_world} processes")
    sharded = marker.get("distributed_type") == "FSDP2"
    if sharded != (using_fsdp2() and not using_deepspeed()):
        raise ConfigError(f"cannot resume {path}: it was written {'under' if sharded else 'without'} FSDP2 "
                          f"(distributed_type={marker.get('distributed_type')!r}) and this launch is "
                          f"{'not ' if sharded else ''}FSDP2, whose checkpoints are distributed state dicts; "
                          "resume with the launch that wrote it, or start from `fap export` of it")


def _build_model(cfg: TrainConfig, task: Task, num_classes: int, init: Optional[Path],
                 say: Callable[[str], None]) -> torch.nn.Module:
    """The task's model, its starting weights (``model.init_from``: `fap.finetune`, before the
    optimizer, ``prepare`` and the EMA see it), then what the engine does to any model
    (memory format, compile)."""
    t = cfg.train
    model = task.build_model(cfg, num_classes)
    if init is not None:
        say(init_model(model, init))
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if t.compile:
        compile_network(model, t.compile_backend)  # in place: state-dict keys unchanged
    return model


def _build_method(cfg: TrainConfig, task: Task, model, micro: int, num_classes: int) -> Tuple[Method, StepCost]:
    method = build_method(method_name(cfg.method), cfg.method, mixup_fn=build_mixup(cfg, num_classes), task=task)
    try:
        method.check_setup(model, micro)
        return method, method.cost(micro)
    except ValueError as e:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} gives {micro} images per process and "
                          f"micro-batch, which {method.name} cannot use: {e}") from e


def _prepare(accelerator, model, optimizer, train_loader, eval_loader, prepared: Tuple[bool, bool], *,
             fsdp2: bool = False):
    """``accelerator.prepare`` the model, optimizer and the loaders it should shard.

    Under FSDP2 the model is already sharded (`shard_fsdp2`) and the optimizer is plain
    torch over its shards: only the loaders go through Accelerate, which on CPU would
    otherwise wrap the model in DDP, and whose checkpointing fap replaces with
    distributed state dicts (`fap.checkpoint`).
    """
    loaders = [loader for loader, p in zip((train_loader, eval_loader), prepared) if p]
    if fsdp2:
        done = accelerator.prepare(*loaders) if loaders else ()
        out = [model, optimizer, *(done if isinstance(done, tuple) else (done,))]
    else:
        out = list(accelerator.prepare(model, optimizer, *loaders))
    model, optimizer, rest = out[0], out[1], out[2:]
    if prepared[0]:
        train_loader = rest.pop(0)
    if prepared[1]:
        eval_loader = rest.pop(0)
    return model, optimizer, train_loader, eval_loader


def _updates_per_epoch(cfg: TrainConfig, train_loader, micro: int) -> int:
    updates = len(train_loader) // cfg.train.accum_steps
    if updates < 1:
        raise ConfigError(f"the training split has {len(train_loader)} batches of {micro} per process, fewer than "
                          f"train.accum_steps={cfg.train.accum_steps}: lower train.batch_size or use more data")
    return updates


def build_optimizer(cfg: TrainConfig, model) -> Tuple[torch.optim.Optimizer, float]:
    """A timm optimizer over ``model.net`` and its learning rate after batch scaling."""
    from timm.optim import create_optimizer_v2

    o = cfg.optim
    lr = o.lr * cfg.train.batch_size / o.lr_base_size if o.lr_base_size else o.lr
    kwargs: Dict[str, Any] = {}
    if o.betas is not None:
        kwargs["betas"] = tuple(o.betas)
    if o.eps is not None:
        kwargs["eps"] = o.eps
    # The timm network, not the PixelModel wrapper: timm reads `no_weight_decay()` (ViT's
    # pos_embed / cls_token) and the layer groups for layer decay from it.
    optimizer = create_optimizer_v2(
        model.net, opt=o.opt, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum,
        filter_bias_and_bn=o.no_decay_norm_bias, layer_decay=o.layer_decay, **kwargs,
    )
    return optimizer, lr


def build_scheduler(cfg: TrainConfig, optimizer, updates_per_epoch: int):
    """A timm schedule stepped per update (``step_update(num_updates)``)."""
    from timm.scheduler import create_scheduler_v2

    s = cfg.sched
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=s.sched, num_epochs=cfg.train.epochs, decay_epochs=s.decay_epochs,
        decay_milestones=list(s.milestones), cooldown_epochs=s.cooldown_epochs, decay_rate=s.decay_rate,
        min_lr=s.min_lr, warmup_lr=s.warmup_lr, warmup_epochs=s.warmup_epochs, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def build_mixup(cfg: TrainConfig, num_classes: int):
    """timm's Mixup/CutMix, or None; the method applies it to the clean part only."""
    if not cfg.mixup.enabled:
        return None
    from timm.data import Mixup

    m = cfg.mixup
    return Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob, switch_prob=m.switch_prob,
                 mode=m.mode, label_smoothing=m.label_smoothing, num_classes=num_classes)


def _build_ema(cfg: TrainConfig, unwrapped):
    if not cfg.ema.enabled:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(unwrapped, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup,
                      dtype=torch.float32 if cfg.ema.fp32 else None)
