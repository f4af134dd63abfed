"""The training loop: one `train(config)` for vanilla, AdvProp and Fast AdvProp, through Accelerate.

Everything about *what* a step computes lives in the method (`fap.methods`): it runs all
forward and backward passes of one loader batch, calling the ``backward`` it is handed.
This module only decides *how* those passes run on the hardware, and everything around
them:

* processes and precision through Accelerate: one process, DDP over processes and nodes,
  DeepSpeed ZeRO-2/3 (gloo on CPU, so all of it runs in CI), fp32 or bf16;
* the step: the method's 2-3 backward passes (Fast AdvProp; Mei et al., ICLR 2022) make
  one optimizer update. Under DDP all but the last run inside ``no_sync`` and the last
  one all-reduces once (``find_unused_parameters=True``, because the main-norm parameters
  get no gradient in the last pass). Under DeepSpeed ZeRO the whole update runs inside
  ``engine.coalesce_grad_reduction()`` — one reduction per update — then one
  ``engine.step()``; without it (older DeepSpeed, or optimizers it does not cover) the
  ``sync_gradients`` toggle keeps the update exact at 3x the gradient traffic.
  Gradient accumulation is more micro-batches inside the same block. See
  ``reference/step_patterns.md`` for why each setting is needed;
* a timm optimizer (no weight decay on norms and biases) and a timm schedule driven by
  the global update count (``scheduler.step_update(step)``; the scheduler is never
  ``prepare``-d, which would step it once per process), gradient clipping, Mixup/CutMix
  (applied by the method to the clean part only), a timm ``ModelEmaV3``;
* evaluation with the main norms (top-1/top-5, duplicates of uneven sharding removed by
  ``gather_for_metrics``), atomic checkpoints and resume (`fap.checkpoint`), the exported
  timm model, a progress bar, a JSON-lines log, Accelerate trackers and a cost summary.

The engine never imports `fap.attacks`: it knows nothing about adversarial examples.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from fap.checkpoint import (
    TrainState,
    export_timm,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_partial,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)
from fap.config import ConfigError, TrainConfig, diff, method_name, to_dict, validate
from fap.methods import build_method
from fap.models import create_model
from fap.norm import route

__all__ = ["train", "evaluate", "MethodRNG", "NonFiniteLossError", "Preempted", "RESUME_MAY_CHANGE"]

BRANCHES = ("clean", "noisy", "adversarial")

# Keys that may differ between a checkpoint's config and the run that resumes it; any
# other difference would make the resumed run a different experiment, and is an error.
RESUME_MAY_CHANGE = (
    "train.name", "train.max_steps", "train.eval_every", "train.eval_batch_size", "train.nonfinite",
    "train.dist_timeout_s",
    "data.path", "data.num_workers", "data.skip_corrupt",
    "checkpoint.", "log.", "final_eval.",
)


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss with ``train.nonfinite=stop``; the message names the update, the
    branch and the last good checkpoint."""


class Preempted(SystemExit):
    """The run was asked to stop (SIGTERM, SIGUSR1) and saved a checkpoint first; a
    script that does not catch it exits with status 143, as if killed by SIGTERM."""

    def __init__(self, message: str):
        super().__init__(143)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _StopSignals:
    """SIGTERM / SIGUSR1 set a flag instead of killing the process: the loop finishes the
    update in flight, all processes agree on it (the flag rides on the per-update
    all-reduce), save a checkpoint and leave (`Preempted`). Schedulers send SIGTERM before
    SIGKILL (``torchrun`` forwards it to every worker; SLURM: ``--signal=USR1@120`` warns
    earlier). Handlers are only installed from the main thread, and restored on exit.
    """
    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: Optional[int] = None
        self.stop = False
        self._previous: Dict[int, Any] = {}

    def install(self, enabled: bool) -> None:
        import signal
        import threading

        if not enabled or threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def name(self) -> str:
        import signal

        return signal.Signals(self.received).name if self.received else "a stop request from another process"

    def __enter__(self) -> "_StopSignals":
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ------------------------------------------------------------------------------------
# The method's random streams, apart from the data pipeline's
# ------------------------------------------------------------------------------------

def _capture_rng() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seeded_state(stream: int) -> Dict[str, Any]:
    """The global generators' states after seeding them all with ``stream`` (they are left as they were)."""
    outer = _capture_rng()
    torch.manual_seed(stream)
    np.random.seed(stream)
    random.seed(stream)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(stream)
    state = _capture_rng()
    _restore_rng(outer)
    return state


class MethodRNG:
    """The random streams the training step draws from (random starts, Shuffling BN's
    permutation, Mixup/CutMix, drop-path).

    Running each update inside `scope` swaps in this object's own state (one stream per
    rank), which is saved with every checkpoint, so the method's randomness resumes exactly
    wherever the checkpoint was taken. (The data pipeline seeds each sample's augmentation
    itself, from ``(seed, epoch, index)``: ``fap.data.seeding``.) A checkpoint written by
    another number of processes has streams that do not map onto this run's ranks: then each
    rank starts a new stream, derived from the checkpoint and the rank, so the resumed run is
    reproducible but not bitwise equal to one that kept its process count.

    Args:
        seed: the run's seed.
        rank: this process's index (each rank gets its own stream).
        world: number of processes.
    """

    def __init__(self, seed: int, rank: int, world: int):
        self.seed, self.rank, self.world = seed, rank, world
        self._state = _seeded_state((seed * 1_000_003 + 7_919 * (rank + 1)) % (2 ** 32))

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        outer = _capture_rng()
        _restore_rng(self._state)
        try:
            yield
        finally:
            self._state = _capture_rng()
            _restore_rng(outer)

    def state_dict(self) -> Dict[str, Any]:
        # Called on every rank by save_state; only the main process writes, so gather all.
        states = [self._state]
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, self._state)
        return {"world": self.world, "states": states}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("world") == self.world:
            self._state = state["states"][self.rank]
            return
        saved = state["states"][0]["torch"].numpy().tobytes()
        digest = hashlib.sha256(saved + self.rank.to_bytes(4, "little")).digest()
        self._state = _seeded_state(int.from_bytes(digest[:4], "little"))


# ------------------------------------------------------------------------------------
# Accelerator and DeepSpeed set-up
# ------------------------------------------------------------------------------------

def _using_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def _make_accelerator(cfg: TrainConfig, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
        ProjectConfiguration,
    )

    deepspeed = _using_deepspeed()
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = not torch.cuda.is_available()
    handlers: List[Any] = [
        # find_unused_parameters: the last (synced) backward of Fast AdvProp does not reach
        # the main-norm parameters, whose gradients were accumulated under no_sync.
        # broadcast_buffers=False: BN statistics stay per rank and are averaged before
        # evaluation (`_average_bn_stats`), as under DeepSpeed, which never syncs buffers.
        DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False),
    ]
    if world_env > 1 or (deepspeed and "MASTER_ADDR" in os.environ):
        # Only when distributed: with a backend set, Accelerate would query a process group
        # that a plain `python recipe.py` never creates. gloo on CPU; the timeout bounds how
        # long a collective waits for a process that died.
        from datetime import timedelta

        timeout = timedelta(seconds=cfg.train.dist_timeout_s)
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timeout) if on_cpu
                        else InitProcessGroupKwargs(timeout=timeout))
    for tracker in cfg.log.trackers:
        _check_tracker(tracker)
    accelerator = Accelerator(
        # cpu=True makes `accelerate launch --multi_gpu` on a GPU-less machine real
        # multi-process CPU DDP instead of N independent single-process runs.
        cpu=on_cpu and not deepspeed,
        mixed_precision={"auto": None, "fp32": "no", "bf16": "bf16"}[cfg.train.precision],
        log_with=list(cfg.log.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tracking")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )
    if accelerator.num_processes != world_env:
        raise ConfigError(
            f"the launcher started {world_env} processes (WORLD_SIZE) but Accelerate sees "
            f"{accelerator.num_processes}: they would train independently. On a machine without GPUs "
            "launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ..., or "
            "--config_file accelerate_configs/cpu_multiprocess.yaml"
        )
    precision = {"no": "fp32", "bf16": "bf16"}.get(accelerator.mixed_precision)
    if precision is None:
        raise ConfigError(f"mixed precision {accelerator.mixed_precision!r} is not supported; "
                          "launch with --mixed_precision no or bf16 (train.precision=fp32 or bf16)")
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if launched in ("bf16", "fp16", "fp8") and launched != accelerator.mixed_precision:
        # `--mixed_precision no` is also the launcher's default, so only an explicit
        # low-precision request can be told apart from "not said".
        src = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        why = (f"{src} says bf16.enabled={precision == 'bf16'}" if src
               else f"train.precision={cfg.train.precision!r}")
        raise ConfigError(f"accelerate was launched with --mixed_precision {launched} but {why}, so the run "
                          f"would silently train in {precision}; make them agree")
    if cfg.train.precision != "auto" and precision != cfg.train.precision:
        src = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the launch configuration")
        raise ConfigError(
            f"train.precision={cfg.train.precision!r} but {src} runs {precision} "
            f"(DeepSpeed: bf16.enabled); make them agree, or set train.precision=auto"
        )
    return accelerator, precision


def _check_tracker(name: str) -> None:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if name in available and not available[name]():
        raise ConfigError(f"log.trackers includes {name!r} but it is not installed: pip install {name}, "
                          "or set --log.trackers= (none)")


def _check_deepspeed_dict(ds: Dict[str, Any], cfg: TrainConfig, src: str, micro_batch: int, world: int, *,
                          fill: bool) -> None:
    """Contradictions between a DeepSpeed config dict and the fap config; ``fill`` resolves "auto"s.

    fap owns the optimizer, the schedule, accumulation and clipping; a DeepSpeed config
    that says otherwise is an error naming the file and key rather than a silent
    override (e.g. Accelerate fills ``gradient_clipping: "auto"`` with 1.0).
    """
    def bad(key: str, value: Any, want: str) -> ConfigError:
        return ConfigError(f"{src}: {key}={value!r} contradicts the fap config: {want}")

    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise bad(key, ds[key], f"fap builds the {key} with timm (optim.*, sched.*); remove {key!r} from the file")
    gas = ds.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", 1):
        raise bad("gradient_accumulation_steps", gas,
                  f"fap accumulates micro-batches itself (train.accum_steps={cfg.train.accum_steps}); set it to 1")
    clip = ds.get("gradient_clipping", "auto")
    want_clip = float(cfg.optim.clip_grad or 0.0)
    if clip != "auto" and float(clip) != want_clip:
        raise bad("gradient_clipping", clip, f"optim.clip_grad={cfg.optim.clip_grad} (0.0 means none); "
                                             "set the same value in both")
    for key, want in (("train_micro_batch_size_per_gpu", micro_batch), ("train_batch_size", micro_batch * world)):
        value = ds.get(key, "auto")
        if value != "auto" and int(value) != want:
            raise bad(key, value, f"train.batch_size={cfg.train.batch_size} over {world} processes and "
                                  f"{cfg.train.accum_steps} accumulation steps gives {want}; set it to \"auto\"")
        if fill:
            ds[key] = want
    if (ds.get("fp16") or {}).get("enabled") is True:
        raise bad("fp16.enabled", True, "fap supports fp32 and bf16; use \"bf16\": {\"enabled\": true}")
    bf16 = (ds.get("bf16") or {}).get("enabled", "auto")
    if bf16 is True and cfg.train.precision == "fp32" or bf16 is False and cfg.train.precision == "bf16":
        raise bad("bf16.enabled", bf16, f"train.precision={cfg.train.precision!r}; make them agree, or set "
                                        "train.precision=auto to follow the file")
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if bf16 is False and launched == "bf16":
        raise ConfigError(f"accelerate was launched with --mixed_precision bf16 but {src} says bf16.enabled=false, "
                          "so the run would silently train in fp32; make them agree")
    stage = int((ds.get("zero_optimization") or {}).get("stage", os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 0)))
    if stage == 3 and cfg.ema.enabled:
        raise ConfigError(
            "ema.enabled=True under DeepSpeed ZeRO-3: an EMA is a full replica of the weights on every rank, "
            "which is what ZeRO-3 exists to avoid. Use ZeRO-2 (parameters replicated, optimizer state and "
            "gradients sharded) for an EMA, or set --ema.enabled=false"
        )
    if fill:
        ds["gradient_accumulation_steps"] = 1
        ds["gradient_clipping"] = want_clip
        ds.setdefault("zero_allow_untested_optimizer", True)  # timm's SGD/LAMB/... are not on DeepSpeed's list
        ds.setdefault("steps_per_print", 10 ** 9)


def _deepspeed_preflight(cfg: TrainConfig, micro_batch: int, world: int) -> None:
    """Check the DeepSpeed JSON file before anything starts (DeepSpeed's set-up is slow)."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not _using_deepspeed() or not path or not os.path.isfile(path):
        return
    with open(path) as f:
        try:
            ds = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
    _check_deepspeed_dict(ds, cfg, path, micro_batch, world, fill=False)


def _configure_deepspeed(accelerator, cfg: TrainConfig, micro_batch: int) -> Optional[int]:
    """Fill the "auto"s of Accelerate's resolved DeepSpeed config and re-check it; return the ZeRO stage."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    src = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "the accelerate config's deepspeed_config"
    _check_deepspeed_dict(ds, cfg, src, micro_batch, accelerator.num_processes, fill=True)
    if accelerator.mixed_precision == "bf16":
        # DeepSpeed casts parameters, not buffers: BatchNorm needs its buffers in bf16 too.
        ds.setdefault("data_types", {}).setdefault("buffer_dtype", "bf16")
    return int(plugin.zero_stage)


def _can_coalesce(engine) -> bool:
    """DeepSpeed >= 0.19.2 with a ZeRO optimizer that supports one reduction per update."""
    if not hasattr(engine, "coalesce_grad_reduction"):
        return False
    try:
        stage = int(engine.zero_optimization_stage())
    except Exception:
        return False
    return stage in (1, 2, 3) and hasattr(engine.optimizer, "_coalesce_grad_reduction")


# ------------------------------------------------------------------------------------
# Optimizer, schedule, EMA
# ------------------------------------------------------------------------------------

def _build_optimizer(cfg: TrainConfig, model) -> Tuple[torch.optim.Optimizer, float]:
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


def _build_scheduler(cfg: TrainConfig, optimizer, updates_per_epoch: int):
    from timm.scheduler import create_scheduler_v2

    s = cfg.sched
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=s.sched,
        num_epochs=cfg.train.epochs,
        decay_epochs=s.decay_epochs,
        decay_milestones=list(s.milestones),
        cooldown_epochs=s.cooldown_epochs,
        decay_rate=s.decay_rate,
        min_lr=s.min_lr,
        warmup_lr=s.warmup_lr,
        warmup_epochs=s.warmup_epochs,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def _build_mixup(cfg: TrainConfig, num_classes: int):
    if not cfg.mixup.enabled:
        return None
    from timm.data import Mixup

    m = cfg.mixup
    return Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob, switch_prob=m.switch_prob,
                 mode=m.mode, label_smoothing=m.label_smoothing, num_classes=num_classes)


@torch.no_grad()
def _average_bn_stats(module: torch.nn.Module, world: int) -> None:
    """Average BatchNorm running statistics over ranks (timm's ``distribute_bn(reduce=True)``).

    Reduced in fp32 (gloo has no bf16 sum), so it also works for DeepSpeed bf16 buffers.
    """
    if world < 2 or not (dist.is_available() and dist.is_initialized()):
        return
    for name, buf in module.named_buffers():
        if ("running_mean" in name or "running_var" in name) and buf is not None:
            tmp = buf.detach().float().clone()
            dist.all_reduce(tmp, op=dist.ReduceOp.SUM)
            buf.copy_(tmp / world)


# ------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(accelerator, model: torch.nn.Module, loader, *, prepared: bool = True,
             channels_last: bool = False) -> Dict[str, float]:
    """Top-1 / top-5 accuracy and mean loss through the **main** norms, over all processes.

    Args:
        accelerator: the run's Accelerator.
        model: the unwrapped model (or an EMA copy); it is put in eval mode and back.
        loader: evaluation batches of ``(uint8 images, labels)``.
        prepared: the loader was ``accelerator.prepare``-d; then the duplicates that
            even sharding appends to the last batch are removed (``gather_for_metrics``).
            An already-sharded loader (FFCV) is de-duplicated with its ``num_padded``
            (its last samples repeat other shards'), when it has one.
        channels_last: feed NHWC images.
    """
    from fap.data import to_unit_float

    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # top1, top5, loss, count
    keep = None  # samples of this shard that are not padding (unprepared loaders)
    if not prepared and all(hasattr(loader, a) for a in ("num_padded", "num_samples", "num_processes")):
        keep = -(-loader.num_samples // loader.num_processes) - loader.num_padded
    seen = 0
    try:
        with route(model, "main"):
            for images, labels in loader:
                x = to_unit_float(images.to(accelerator.device, non_blocking=True))
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                labels = labels.to(accelerator.device)
                with accelerator.autocast():
                    logits = model(x)
                logits = logits.float()
                k = min(5, logits.shape[1])
                top = logits.topk(k, dim=1).indices
                hit1 = top[:, 0] == labels
                hit5 = (top == labels[:, None]).any(dim=1)
                loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                if prepared:
                    hit1, hit5, loss = accelerator.gather_for_metrics((hit1, hit5, loss))
                elif keep is not None:
                    n_keep = max(0, min(hit1.numel(), keep - seen))
                    seen += hit1.numel()
                    hit1, hit5, loss = hit1[:n_keep], hit5[:n_keep], loss[:n_keep]
                totals += torch.stack([hit1.sum().double(), hit5.sum().double(), loss.double().sum(),
                                       torch.tensor(float(hit1.numel()), dtype=torch.float64, device=totals.device)])
    finally:
        model.train(was_training)
    if not prepared:
        totals = accelerator.reduce(totals, reduction="sum")
    n = max(totals[3].item(), 1.0)
    return {"top1": 100.0 * totals[0].item() / n, "top5": 100.0 * totals[1].item() / n,
            "loss": totals[2].item() / n, "count": int(totals[3].item())}


# ------------------------------------------------------------------------------------
# Metrics over a logging window
# ------------------------------------------------------------------------------------

class _Window:
    """Per-branch loss sums, hits and counts over the updates since the last log line."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.values = torch.zeros(3 * len(BRANCHES), dtype=torch.float64, device=self.device)
        self.updates = 0
        self.start = time.perf_counter()

    def add(self, metrics: Dict[str, Any]) -> None:
        for i, branch in enumerate(BRANCHES):
            n = metrics.get(f"count_{branch}")
            if not n:
                continue
            self.values[3 * i] += metrics[f"loss_{branch}"].detach().double() * n
            self.values[3 * i + 1] += metrics[f"correct_{branch}"].detach().double()
            self.values[3 * i + 2] += n

    def summary(self, accelerator) -> Dict[str, float]:
        values = accelerator.reduce(self.values.clone(), reduction="sum").tolist()
        out: Dict[str, float] = {}
        for i, branch in enumerate(BRANCHES):
            n = values[3 * i + 2]
            if n:
                out[f"loss_{branch}"] = values[3 * i] / n
                out[f"acc_{branch}"] = 100.0 * values[3 * i + 1] / n
        return out


# ------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------

def _flat(d: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    out = {}
    for section, values in d.items():
        for k, v in values.items():
            out[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return {k: ("None" if v is None else v) for k, v in out.items()}


def _check_resume_config(marker: Dict[str, Any], cfg: TrainConfig, path: Path, world: int) -> None:
    from fap.config import from_dict

    saved = from_dict(marker["config"])
    changed = {k: v for k, v in diff(saved, cfg).items() if not k.startswith(RESUME_MAY_CHANGE)}
    if changed:
        lines = "; ".join(f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"cannot resume {path}: the run's config differs from the checkpoint's ({lines}). "
                          "Resume with the same recipe and overrides, or start a new run directory")
    saved_world = int(marker.get("world_size", world))
    if saved_world != world and ("DEEPSPEED" in str(marker.get("distributed_type", "")) or _using_deepspeed()):
        raise ConfigError(f"cannot resume {path}: it was written by {saved_world} processes, this run has {world}, "
                          "and DeepSpeed ZeRO partitions its optimizer state by process; resume with "
                          f"{saved_world} processes")


def _main_process_first(accelerator, fn):
    """``fn()`` on the main process, then on the others (e.g. the demo set is generated once).

    Unlike ``accelerator.main_process_first()``, an error on the main process (a missing
    data path, say) is raised on every process instead of leaving the others waiting at
    a barrier forever.
    """
    from accelerate.utils import gather_object

    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as e:  # re-raised below, after telling the other ranks
            error = e
    if accelerator.num_processes > 1:
        failed = gather_object([None if error is None else f"{type(error).__name__}: {error}"])[0]
    else:
        failed = None
    if error is not None:
        raise error
    if failed is not None:
        raise RuntimeError(f"the main process failed to set up the data: {failed}")
    return result if accelerator.is_main_process else fn()


def _warn_oversubscribed(accelerator, num_workers: int) -> None:
    """On CPU, more busy threads than cores makes OpenMP threads wait on each other: say so."""
    if accelerator.device.type != "cpu" or not accelerator.is_local_main_process:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    busy = local * (torch.get_num_threads() + num_workers)
    if busy > cores:
        warnings.warn(
            f"{local} process(es) x ({torch.get_num_threads()} torch threads + {num_workers} loader workers) = "
            f"{busy} busy threads on {cores} cores: CPU training slows down sharply when threads outnumber "
            "cores; lower torch.set_num_threads / OMP_NUM_THREADS or data.num_workers", stacklevel=3)


def _loader_batches(accelerator, loader, prepared: bool, epoch: int, skip: int):
    """This epoch's batches, the first ``skip`` left out (mid-epoch resume).

    The epoch fixes the order and each sample's augmentation (``fap.data.seeding``), so the
    batches after the skipped ones are those the interrupted run would have seen.
    """
    from fap.data import set_epoch

    set_epoch(loader, epoch)
    if skip <= 0:
        return loader
    if prepared:
        skipped = accelerator.skip_first_batches(loader, skip)
        skipped.set_epoch(epoch)
        return skipped

    def rest():
        for i, batch in enumerate(loader):
            if i >= skip:
                yield batch
    return rest()


def train(config: TrainConfig) -> Dict[str, Any]:
    """Run a whole training job described by ``config``; see the module docstring.

    Launch it with ``accelerate launch`` for several processes or DeepSpeed, or call it
    from a plain ``python`` script for one process.

    Returns:
        The run summary (also written to ``<output_dir>/summary.json``): final and best
        top-1/top-5, cost per step and its ratio to vanilla, wall time, images/s, paths.

    Raises:
        Preempted: SIGTERM or SIGUSR1 arrived (``checkpoint.on_signal``); a checkpoint of
            the last update was saved first. It is a ``SystemExit`` with status 143.
        NonFiniteLossError: a NaN/Inf loss under ``train.nonfinite=stop``.
    """
    with _StopSignals() as signals:
        return _train(config, signals)


def _train(config: TrainConfig, signals: "_StopSignals") -> Dict[str, Any]:
    from accelerate.utils import DistributedType, set_seed, tqdm

    import fap.data as fdata

    cfg = validate(config)
    run_dir = Path(cfg.output_dir)
    t, c = cfg.train, cfg.checkpoint
    # Everything that can be checked before processes and DeepSpeed start, is.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if t.batch_size % (world * t.accum_steps):
        raise ConfigError(
            f"train.batch_size={t.batch_size} (global) must be divisible by processes ({world}) x "
            f"train.accum_steps ({t.accum_steps}); e.g. {world * t.accum_steps * max(1, t.batch_size // (world * t.accum_steps))}"
        )
    micro = t.batch_size // (world * t.accum_steps)
    resume_from = resolve_resume(cfg.checkpoint.resume, run_dir)
    if resume_from is not None:
        # Safe (nothing but plain data is unpickled), complete, of this fap version, and
        # the same experiment: checked before anything is written.
        resume_marker = verify_checkpoint(resume_from)
        _check_resume_config(resume_marker, cfg, resume_from, world)
    _deepspeed_preflight(cfg, micro, world)
    accelerator, precision = _make_accelerator(cfg, run_dir)
    rank = accelerator.process_index
    eval_micro = max(1, math.ceil((t.eval_batch_size or t.batch_size) / world))
    zero_stage = _configure_deepspeed(accelerator, cfg, micro)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed and t.nonfinite == "skip":
        raise ConfigError("train.nonfinite='skip' is not available under DeepSpeed (its engine applies the update "
                          "inside its own step); use train.nonfinite=stop, which stops before the update is saved")

    # ---- data ---------------------------------------------------------------------
    set_seed(t.seed)  # identical on every rank: the model's initial weights must match

    def build_data():
        return (fdata.build_loader(cfg.data, "train", batch_size=micro, train=True, seed=t.seed,
                                   num_processes=world, process_index=rank),
                fdata.build_loader(cfg.data, "val", batch_size=eval_micro, train=False, seed=t.seed,
                                   num_processes=world, process_index=rank),
                cfg.model.num_classes or fdata.num_classes(cfg.data))

    train_loader, eval_loader, num_classes = _main_process_first(accelerator, build_data)
    _warn_oversubscribed(accelerator, cfg.data.num_workers)

    # ---- model, method, optimizer ---------------------------------------------------
    m = cfg.model
    timm_kwargs = dict(m.kwargs)
    if m.drop_path_rate:
        timm_kwargs["drop_path_rate"] = m.drop_path_rate
    try:
        model = create_model(m.name, num_classes=num_classes, dual_norm=m.dual_norm, aux_group_size=m.aux_group_size,
                             mean=m.mean, std=m.std, img_size=m.img_size, **timm_kwargs)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if t.compile:
        model.net.compile(backend=t.compile_backend)  # in place: state-dict keys unchanged
    method = build_method(method_name(cfg.method), cfg.method, mixup_fn=_build_mixup(cfg, num_classes))
    try:
        method.check_setup(model, micro)
        cost = method.cost(micro)
    except ValueError as e:
        raise ConfigError(f"train.batch_size={t.batch_size} gives {micro} images per process and micro-batch, "
                          f"which {method.name} cannot use: {e}") from e
    optimizer, lr = _build_optimizer(cfg, model)

    prepared_train = isinstance(train_loader, torch.utils.data.DataLoader)
    prepared_eval = isinstance(eval_loader, torch.utils.data.DataLoader)
    to_prepare = [model, optimizer] + ([train_loader] if prepared_train else []) + ([eval_loader] if prepared_eval else [])
    out = accelerator.prepare(*to_prepare)
    model, optimizer = out[0], out[1]
    rest = list(out[2:])
    if prepared_train:
        train_loader = rest.pop(0)
    if prepared_eval:
        eval_loader = rest.pop(0)
    unwrapped = accelerator.unwrap_model(model)
    updates_per_epoch = len(train_loader) // t.accum_steps
    if updates_per_epoch < 1:
        raise ConfigError(f"the training split has {len(train_loader)} batches of {micro} per process, fewer than "
                          f"train.accum_steps={t.accum_steps}: lower train.batch_size or use more data")
    scheduler = _build_scheduler(cfg, optimizer, updates_per_epoch)

    ema = None
    if cfg.ema.enabled:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(unwrapped, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup,
                         dtype=torch.float32 if cfg.ema.fp32 else None)

    # ---- state, checkpointing --------------------------------------------------------
    state = TrainState()
    rng = MethodRNG(t.seed, rank, world)
    registered: List[Any] = [state, rng] + ([scheduler] if scheduler is not None else [])
    ema_index = len(registered) if ema is not None else None
    if ema is not None:
        registered.append(ema)
    accelerator.register_for_checkpointing(*registered)
    marker = {"config": to_dict(cfg), "num_classes": num_classes, "world_size": world,
              "distributed_type": str(accelerator.distributed_type), "precision": precision,
              "zero_stage": zero_stage, "ema_index": ema_index}
    remove_partial(accelerator, run_dir)
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, marker=resume_marker)  # verified above
        accelerator.print(f"resumed from {resume_from} (epoch {state.epoch}, step {state.step})")
        if int(resume_marker.get("world_size", world)) != world:
            accelerator.print(f"note: the checkpoint was written by {resume_marker['world_size']} processes, this run has "
                              f"{world}: the same images in the same updates, but spread over other processes (other "
                              "BatchNorm batches), and new random streams for the method: not bitwise the run it resumes")

    # How the gradients of one update's backward passes are reduced across processes.
    coalesce = deepspeed and _can_coalesce(model)
    reduction = ("coalesced (one reduction per update)" if coalesce else
                 "per backward (DeepSpeed without coalesce_grad_reduction)" if deepspeed else
                 "no_sync (one all-reduce per update)" if world > 1 else "local")

    # ---- logging -------------------------------------------------------------------
    images_per_update = t.batch_size
    step_passes = cost.image_passes * world * t.accum_steps
    vanilla_passes = cost.vanilla * world * t.accum_steps
    ratio = cost.ratio
    reference_epochs = t.reference_epochs or t.epochs
    run_info = {
        "method": method.name, "processes": world, "distributed_type": str(accelerator.distributed_type),
        "zero_stage": zero_stage, "gradient_reduction": reduction, "precision": precision,
        "batch_size": t.batch_size, "accum_steps": t.accum_steps, "micro_batch_per_process": micro,
        "lr_scaled": lr, "updates_per_epoch": updates_per_epoch, "num_classes": num_classes,
        "image_passes_per_step": step_passes, "vanilla_image_passes_per_step": vanilla_passes,
        "cost_ratio_per_step": ratio, "cost_ratio_run": ratio * t.epochs / reference_epochs,
    }
    log_file = None
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "config.json", "w") as f:
            json.dump({**to_dict(cfg), "resolved": run_info}, f, indent=1)
        log_file = open(run_dir / "log.jsonl", "a")
    if cfg.log.trackers:
        accelerator.init_trackers(cfg.train.name, config=_flat(to_dict(cfg)))
    if resume_from is not None and log_file is not None:
        # The log is append-only: records after this line repeat the steps after the checkpoint.
        log_file.write(json.dumps({"type": "resume", "step": state.step, "epoch": state.epoch,
                                   "from": str(resume_from)}) + "\n")
        log_file.flush()

    def log(record: Dict[str, Any]) -> None:
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if cfg.log.trackers:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step",)}
            accelerator.log(scalars, step=record["step"])

    accelerator.print(
        f"fap: {method.name} | {m.name} | {world} process(es), {accelerator.distributed_type.value}"
        + (f" ZeRO-{zero_stage}" if zero_stage else "") + f", {precision} | batch {t.batch_size} "
        f"({micro}/process x {t.accum_steps} accum) | lr {lr:.4g} | {updates_per_epoch} updates/epoch | "
        f"cost {step_passes} image-passes/step = {ratio:.3f}x vanilla | gradients: {reduction}"
    )

    # ---- one optimizer update ------------------------------------------------------
    def backward_scaled(loss: torch.Tensor) -> None:
        accelerator.backward(loss / t.accum_steps if t.accum_steps > 1 else loss)


    @contextlib.contextmanager
    def ds_no_sync():
        """DeepSpeed without coalescing: no accumulation boundary (and no engine.step) inside."""
        previous = accelerator.sync_gradients
        accelerator.sync_gradients = False
        try:
            yield
        finally:
            accelerator.sync_gradients = previous

    def run_micro(x, y, no_sync) -> Dict[str, Any]:
        x = to_float(x)
        return method.train_step(model, x, y.to(accelerator.device), backward_scaled,
                                 no_sync=no_sync, unwrapped_model=unwrapped)

    def to_float(images: torch.Tensor) -> torch.Tensor:
        x = fdata.to_unit_float(images.to(accelerator.device, non_blocking=True))
        return x.contiguous(memory_format=torch.channels_last) if t.channels_last else x

    def nonfinite(metrics: List[Dict[str, Any]], grad_norm=None) -> List[str]:
        """Branches whose loss is NaN/Inf on any process, in one small all-reduce that also
        tells every process whether any of them was asked to stop (SIGTERM/SIGUSR1)."""
        flags = torch.zeros(len(BRANCHES) + 2, dtype=torch.float32, device=accelerator.device)
        for mt in metrics:
            for i, branch in enumerate(BRANCHES):
                if mt.get(f"count_{branch}"):
                    flags[i] += (~torch.isfinite(mt[f"loss_{branch}"].detach().float())).sum()
        if grad_norm is not None:
            flags[-2] += (~torch.isfinite(torch.as_tensor(grad_norm, dtype=torch.float32))).sum().to(flags.device)
        flags[-1] = float(bool(signals.received))
        if world > 1:
            flags = accelerator.reduce(flags, reduction="sum")
        flags = flags.tolist()
        signals.stop = signals.stop or flags[-1] > 0
        return [name for name, f in zip(BRANCHES + ("gradients",), flags[:-1]) if f > 0]

    def update(batches: List[Tuple[torch.Tensor, torch.Tensor]], window: _Window):
        """One optimizer update; returns ``(grad_norm, bad)``, where ``bad`` lists the
        branches with a non-finite loss (then the update was not applied, except under
        DeepSpeed without coalescing, whose last backward already stepped)."""
        n = len(batches)
        grad_norm = None
        metrics: List[Dict[str, Any]] = []
        buffers = ([b.detach().clone() for b in unwrapped.buffers()] if t.nonfinite == "skip" else None)
        if deepspeed and coalesce:
            accelerator.sync_gradients = False
            try:
                with model.coalesce_grad_reduction():
                    for x, y in batches:
                        metrics.append(run_micro(x, y, contextlib.nullcontext))
            finally:
                accelerator.sync_gradients = True
            bad = nonfinite(metrics)
            if bad:
                return None, bad
            model.set_gradient_accumulation_boundary(True)
            model.step()  # clipping (gradient_clipping) + optimizer step + zero_grad
            grad_norm = model.get_global_grad_norm()
        elif deepspeed:
            for i, (x, y) in enumerate(batches):
                outer = contextlib.nullcontext() if i == n - 1 else ds_no_sync()
                with outer:  # the last backward of the last micro-batch steps the engine
                    metrics.append(run_micro(x, y, ds_no_sync))
            bad = nonfinite(metrics)
            if bad:
                return None, bad
            grad_norm = model.get_global_grad_norm()
        else:
            no_sync = lambda: accelerator.no_sync(model)  # noqa: E731
            for i, (x, y) in enumerate(batches):
                outer = contextlib.nullcontext() if i == n - 1 else accelerator.no_sync(model)
                with outer:
                    metrics.append(run_micro(x, y, no_sync))
            if cfg.optim.clip_grad:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            bad = nonfinite(metrics, grad_norm)
            if bad:
                optimizer.zero_grad(set_to_none=True)
                if buffers is not None:  # the forward passes updated the norm statistics
                    with torch.no_grad():
                        for b, saved in zip(unwrapped.buffers(), buffers):
                            b.copy_(saved)
                return None, bad
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for mt in metrics:
            window.add(mt)
        if grad_norm is not None and hasattr(grad_norm, "item"):
            grad_norm = grad_norm.item()
        return grad_norm, []

    side_seconds = {"eval": 0.0, "checkpoint": 0.0}  # time outside training, kept out of images/s

    def checkpoint(reason: str) -> Path:
        start = time.perf_counter()
        path = save_checkpoint(accelerator, run_dir, state, {**marker, "reason": reason})
        prune_checkpoints(accelerator, run_dir, c.keep)
        log({"type": "checkpoint", "step": state.step, "epoch": state.epoch, "path": str(path)})
        side_seconds["checkpoint"] += time.perf_counter() - start
        window.start += time.perf_counter() - start
        return path

    def run_eval() -> Dict[str, float]:
        start = time.perf_counter()
        try:
            return _run_eval()
        finally:
            side_seconds["eval"] += time.perf_counter() - start
            window.start += time.perf_counter() - start

    def _run_eval() -> Dict[str, float]:
        _average_bn_stats(unwrapped, world)
        result = evaluate(accelerator, unwrapped, eval_loader, prepared=prepared_eval, channels_last=t.channels_last)
        if ema is not None:
            _average_bn_stats(ema.module, world)
            ema_result = evaluate(accelerator, ema.module, eval_loader, prepared=prepared_eval,
                                  channels_last=t.channels_last)
            result.update({f"ema_{k}": v for k, v in ema_result.items() if k != "count"})
        state.best_top1 = max(state.best_top1, result["top1"], result.get("ema_top1", 0.0))
        return result

    # ---- the loop ------------------------------------------------------------------
    signals.install(c.on_signal)
    total_updates = updates_per_epoch * t.epochs
    if t.max_steps is not None:
        total_updates = min(total_updates, t.max_steps)
    bar = tqdm(total=total_updates, initial=min(state.step, total_updates), dynamic_ncols=True, mininterval=1.0,
               disable=not (cfg.log.progress and accelerator.is_main_process), desc=method.name, file=sys.stdout)
    window = _Window(accelerator.device)
    train_start = time.perf_counter()
    images_at_start = state.images
    last_eval: Dict[str, float] = {}
    last_eval_step = -1
    stop = state.step >= total_updates
    model.train()
    while state.epoch < t.epochs and not stop:
        epoch = state.epoch
        batches = _loader_batches(accelerator, train_loader, prepared_train, epoch, state.batch_in_epoch)
        pending: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for images, labels in batches:
            if not prepared_train and t.accum_steps > 1:
                # FFCV reuses its output buffers: a batch held for accumulation must be copied.
                images, labels = images.clone(), labels.clone()
            pending.append((images, labels))
            state.batch_in_epoch += 1
            if len(pending) < t.accum_steps:
                continue
            if scheduler is not None:
                scheduler.step_update(num_updates=state.step)
            lr_now = max(g["lr"] for g in optimizer.param_groups)
            with rng.scope():
                grad_norm, bad = update(pending, window)
            pending = []
            if bad:
                record = {"type": "nonfinite", "step": state.step + 1, "epoch": epoch, "branches": bad}
                if t.nonfinite == "stop":
                    log({**record, "action": "stop"})
                    good = list_checkpoints(run_dir)
                    raise NonFiniteLossError(
                        f"non-finite loss in update {state.step + 1} (epoch {epoch}, loader batch "
                        f"{state.batch_in_epoch} of the epoch): the {' and '.join(bad)} "
                        f"{'loss is' if bad != ['gradients'] else 'norm is'} NaN/Inf. The run stopped without "
                        f"saving this update; the last good checkpoint is "
                        f"{good[-1] if good else 'none (no checkpoint was written yet)'}. Resume it with "
                        "--checkpoint.resume=auto (e.g. with a lower optim.lr or with optim.clip_grad), or "
                        "pass --train.nonfinite=skip to skip such updates (counted in the log)")
                state.nonfinite_skipped += 1
                log({**record, "action": "skip", "skipped_total": state.nonfinite_skipped})
                accelerator.print(f"warning: update {state.step + 1} skipped: non-finite {', '.join(bad)} "
                                  f"({state.nonfinite_skipped} skipped so far)")
            state.step += 1
            state.images += images_per_update
            window.updates += 1
            if ema is not None and not bad:
                ema.update(unwrapped, step=state.step)
            bar.update(1)
            if state.step % cfg.log.every_steps == 0 or state.step == total_updates:
                metrics = window.summary(accelerator)
                elapsed = time.perf_counter() - window.start
                record = {"type": "train", "step": state.step, "epoch": epoch + state.batch_in_epoch / len(train_loader),
                          "lr": lr_now, **metrics, "images_per_s": window.updates * images_per_update / max(elapsed, 1e-9),
                          "image_passes_per_step": step_passes, "cost_ratio": ratio}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                log(record)
                bar.set_postfix(loss=f"{metrics.get('loss_clean', float('nan')):.3f}", lr=f"{lr_now:.3g}",
                                img_s=f"{record['images_per_s']:.0f}", refresh=False)
                window.reset()
            if signals.stop and state.step < total_updates:
                path = checkpoint("preempted")
                accelerator.print(f"fap: received {signals.name()}: saved {path} after update {state.step}; "
                                  "continue with --checkpoint.resume=auto")
                log({"type": "preempted", "step": state.step, "signal": signals.name(), "path": str(path)})
                raise Preempted(f"stopped by {signals.name()} after update {state.step}; saved {path}")
            if c.every_steps and state.step % c.every_steps == 0 and state.step < total_updates:
                checkpoint("every_steps")
            if state.step >= total_updates:
                stop = True
                break
        finished_epoch = state.batch_in_epoch >= t.accum_steps * updates_per_epoch or not stop
        if finished_epoch:
            state.epoch += 1
            state.batch_in_epoch = 0
        last = state.epoch >= t.epochs or stop
        if finished_epoch and ((t.eval_every and state.epoch % t.eval_every == 0) or last):
            last_eval = run_eval()
            last_eval_step = state.step
            log({"type": "eval", "step": state.step, "epoch": state.epoch, **last_eval})
            accelerator.print(f"epoch {state.epoch}: top1 {last_eval['top1']:.2f} top5 {last_eval['top5']:.2f}"
                              + (f" | EMA top1 {last_eval['ema_top1']:.2f}" if "ema_top1" in last_eval else ""))
        if (c.every_epochs and finished_epoch and state.epoch % c.every_epochs == 0) or \
                (last and (c.every_epochs or c.every_steps)):
            checkpoint("epoch_end" if finished_epoch else "stop")
    bar.close()
    train_time = time.perf_counter() - train_start - side_seconds["eval"] - side_seconds["checkpoint"]
    if not last_eval or last_eval_step != state.step:  # stopped mid-epoch: evaluate the final weights
        last_eval = run_eval()
        last_eval_step = state.step
        log({"type": "eval", "step": state.step, "epoch": state.epoch, **last_eval})

    robustness = _final_eval(accelerator, cfg, unwrapped, run_dir, log, state.step)

    # ---- export and summary --------------------------------------------------------
    exported = {}
    if c.export:
        sd = _full_state_dict(accelerator, model)
        ema_sd = ema.module.state_dict() if ema is not None else None
        if accelerator.is_main_process:
            d = to_dict(cfg)
            exported["model"] = str(export_timm(sd, run_dir / "export", model_cfg=d["model"],
                                                num_classes=num_classes, data_cfg=d["data"]))
            if ema_sd is not None:
                exported["ema"] = str(export_timm(ema_sd, run_dir / "export_ema", model_cfg=d["model"],
                                                  num_classes=num_classes, data_cfg=d["data"]))
        accelerator.wait_for_everyone()
    images_trained = state.images - images_at_start
    # The whole-run ratio from the updates actually made (a max_steps run stops early):
    # this run's image-passes over those of `reference_epochs` vanilla epochs of the same data.
    epochs_run = state.step / updates_per_epoch
    run_info["cost_ratio_run"] = ratio * epochs_run / reference_epochs
    summary = {
        **run_info,
        "epochs": t.epochs, "epochs_run": epochs_run, "reference_epochs": reference_epochs, "steps": state.step,
        "images_seen": state.images, "top1": last_eval.get("top1"), "top5": last_eval.get("top5"),
        "ema_top1": last_eval.get("ema_top1"), "best_top1": state.best_top1,
        "train_seconds": train_time, "eval_seconds": side_seconds["eval"],
        "checkpoint_seconds": side_seconds["checkpoint"], "images_per_s": images_trained / max(train_time, 1e-9),
        "nonfinite_skipped": state.nonfinite_skipped,
        "output_dir": str(run_dir), "export": exported,
    }
    if robustness:
        summary["final_eval"] = robustness
    if accelerator.is_main_process:
        with open(run_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=1)
        log({"type": "summary", "step": state.step, **{k: v for k, v in summary.items() if k != "export"}})
        log_file.close()
    accelerator.print(_format_summary(summary))
    if cfg.log.trackers:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return summary


def _final_eval(accelerator, cfg: TrainConfig, model, run_dir: Path, log, step: int) -> Dict[str, float]:
    """Run ``cfg.final_eval`` (robustness sets, PGD) on the final weights; log and report it.

    Returns the flat ``{"eval/<set>/<metric>": value}`` numbers, or {} when no set is named.
    """
    suite = cfg.final_eval
    named = suite.pgd_steps or suite.clean or any(
        getattr(suite, k) for k in ("imagenet_c", "imagenet_r", "imagenet_a", "sketch", "stylized", "v2"))
    if not named:
        return {}
    from fap.data import class_names
    from fap.evaluate import flatten, format_markdown, run_suite, write_report

    results = run_suite(accelerator, model, suite, data=cfg.data, classes=class_names(cfg.data))
    flat = flatten(results)
    log({"type": "final_eval", "step": step, **flat})
    if accelerator.is_main_process:
        write_report(results, str(run_dir / "final_eval"))
    accelerator.print(format_markdown(results))
    return flat


def _full_state_dict(accelerator, model) -> Dict[str, torch.Tensor]:
    """The full fp32 weights on every rank (DeepSpeed: gathered from the fp32 master
    partitions with ``safe_get_full_fp32_param``, a collective under ZeRO-3)."""
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return {k: v.detach().cpu() for k, v in unwrapped.state_dict().items()}
    from deepspeed.utils import safe_get_full_fp32_param

    sd: Dict[str, torch.Tensor] = {}
    for name, p in unwrapped.named_parameters():
        full = safe_get_full_fp32_param(p)
        sd[name] = (full if full is not None else p).detach().float().cpu()
    for mod_name, mod in unwrapped.named_modules():
        for b_name, buf in mod._buffers.items():
            if buf is not None and b_name not in mod._non_persistent_buffers_set:
                key = f"{mod_name}.{b_name}" if mod_name else b_name
                sd[key] = (buf.float() if buf.is_floating_point() else buf).detach().cpu()
    return sd


def _format_summary(s: Dict[str, Any]) -> str:
    def pct(v):
        return "-" if v is None else f"{v:.2f}"
    lines = [
        "=" * 72,
        f"fap summary: {s['method']} on {s['processes']} process(es), {s['precision']}",
        f"  top-1 {pct(s['top1'])}  top-5 {pct(s['top5'])}  best top-1 {pct(s['best_top1'])}"
        + (f"  EMA top-1 {pct(s['ema_top1'])}" if s.get("ema_top1") is not None else ""),
        f"  steps {s['steps']}  images {s['images_seen']}  wall {s['train_seconds']:.1f}s  "
        f"{s['images_per_s']:.1f} images/s",
        f"  cost: {s['image_passes_per_step']} image-passes per step vs {s['vanilla_image_passes_per_step']} vanilla "
        f"= {s['cost_ratio_per_step']:.3f}x per step; over the run {s['epochs_run']:.4g} epochs vs "
        f"{s['reference_epochs']} vanilla = {s['cost_ratio_run']:.3f}x",
        f"  output: {s['output_dir']}" + (f"  export: {s['export'].get('model')}" if s.get("export") else ""),
        "=" * 72,
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m fap.engine --section.key=value ...``: train from the default config plus overrides.

    Recipes (``recipes/*.py``) are the usual entry point; this runs any config without one,
    e.g. ``accelerate launch -m fap.engine --data.source=demo --data.path=data/demo``.
    """
    from fap.config import parse_args

    train(parse_args(TrainConfig(), argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
