"""Processes, precision and gradient reduction through Accelerate and DeepSpeed.

Everything here is about *where* the computation runs: building the ``Accelerator``
(one process, DDP over processes and nodes, DeepSpeed ZeRO-2/3; gloo on CPU so all of
it runs in CI), checking a DeepSpeed config against the fap config before DeepSpeed's
slow start, whether DeepSpeed can reduce one update's gradients once
(`can_coalesce`), averaging BatchNorm statistics over ranks, and gathering the full
weights. ``reference/step_patterns.md`` says why each setting is needed.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from fap.checks import import_extra
from fap.config import ConfigError, TrainConfig
from fap.engine.compiled import check_compile

__all__ = [
    "using_deepspeed", "make_accelerator", "check_deepspeed_dict", "deepspeed_preflight", "configure_deepspeed",
    "can_coalesce", "average_bn_stats", "full_state_dict", "main_process_first", "warn_oversubscribed",
    "using_fsdp2", "is_fsdp2", "fsdp2_plugin", "shard_fsdp2",
]


def using_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def using_fsdp2() -> bool:
    """The launch asked for FSDP (``accelerate launch --use_fsdp`` or ``distributed_type: FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def is_fsdp2(model) -> bool:
    """``model`` was sharded with PyTorch's ``fully_shard`` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def fsdp2_plugin(accelerator, precision: str):
    """Accelerate's FSDP plugin for this run (read from the launcher's ``FSDP_*`` variables),
    with fap's mixed-precision policy: bf16 parameters, fp32 gradient reduction and outputs.

    Accelerate >= 1.x sets FSDP up only on accelerators (``DistributedType.FSDP``); on CPU
    it silently falls back to DDP (``MULTI_CPU``). There fap shards the model itself through
    Accelerate's own ``fsdp2_prepare_model`` with this plugin (`shard_fsdp2`).

    Raises:
        ConfigError: FSDP1 was asked for (``fsdp_version: 1``); fap supports FSDP2 only.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ConfigError(f"FSDP_VERSION={version} (accelerate launch --fsdp_version / fsdp_version in the "
                              "config file): fap supports FSDP2 only; set fsdp_version: 2, see "
                              "accelerate_configs/fsdp2.yaml")
        plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError(f"fsdp_version={plugin.fsdp_version}: fap supports FSDP2 only; set fsdp_version: 2 "
                          "(accelerate_configs/fsdp2.yaml)")
    # Reductions in fp32 (Accelerate's default reduces in bf16), fp32 logits for the losses.
    plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if precision == "bf16" else None,
        reduce_dtype=torch.float32, output_dtype=torch.float32 if precision == "bf16" else None)
    # Every process builds the same initial weights from the run's seed: nothing to broadcast
    # (and Accelerate's meta-device loading expects every state-dict entry to be sharded,
    # which BatchNorm buffers are not).
    plugin.cpu_ram_efficient_loading = False
    accelerator.state.fsdp_plugin = plugin  # where fsdp2_prepare_model looks for it
    return plugin


def shard_fsdp2(accelerator, model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Shard ``model`` with FSDP2 (``fully_shard``) through Accelerate's ``fsdp2_prepare_model``.

    Call it before the optimizer is built: ``fully_shard`` replaces the parameters by
    sharded ``DTensor`` ones. The per-group gradient scales of the dual norms
    (`fap.norm.GradScale`) act on the unsharded parameters inside each forward, so they
    hold on sharded ones unchanged. BatchNorm buffers are not sharded (each process keeps
    its own statistics, as under DDP and DeepSpeed; `average_bn_stats` averages them).

    In bf16 each BatchNorm (with its auxiliary copy) is its own FSDP unit whose parameters
    stay fp32: FSDP2 casts parameters, not buffers, and BatchNorm wants its affine
    parameters in the dtype of its fp32 running statistics; the activations stay bf16.

    One process is refused (nothing to shard), except with ``FAP_FSDP2_ONE_PROCESS=1`` in a
    launch that has a process group (Accelerate sets one up on a GPU): how
    ``benchmarks/gpu_check.sh`` runs this path on a machine with one GPU.
    """
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    grouped = dist.is_available() and dist.is_initialized()
    if not grouped or (accelerator.num_processes < 2 and os.environ.get("FAP_FSDP2_ONE_PROCESS") != "1"):
        raise ConfigError(f"FSDP2 was asked for (ACCELERATE_USE_FSDP) but this launch has "
                          f"{accelerator.num_processes} process(es) and Accelerate set up no process group for "
                          "FSDP: sharding over one process gains nothing; launch without --use_fsdp, or with "
                          "--num_processes 2 or more")
    plugin = fsdp2_plugin(accelerator, precision)
    model = model.to(accelerator.device)
    if precision == "bf16":
        mesh = getattr(accelerator, "torch_device_mesh", None)
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
        for norm in _outermost_batch_norms(model):
            sub = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None
            fully_shard(norm, mesh=sub,
                        reshard_after_forward=plugin.reshard_after_forward, mp_policy=fp32)
    return fsdp2_prepare_model(accelerator, model)


def _outermost_batch_norms(model: torch.nn.Module) -> List[torch.nn.Module]:
    inside: set = set()
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not any(
                name.startswith(p + ".") for p in inside):
            inside.add(name)
            found.append(module)
    return found


def make_accelerator(cfg: TrainConfig, run_dir: Path):
    """The run's ``Accelerator`` and its precision (``"fp32"`` or ``"bf16"``).

    Raises:
        ConfigError: the launcher and Accelerate disagree on the process count, or the
            launch, the DeepSpeed file and ``train.precision`` disagree on precision.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    deepspeed = using_deepspeed()
    for tracker in cfg.log.trackers:
        check_tracker(tracker)
    accelerator = Accelerator(
        # cpu=True makes `accelerate launch --multi_gpu` on a GPU-less machine real
        # multi-process CPU DDP instead of N independent single-process runs.
        cpu=not torch.cuda.is_available() and not deepspeed,
        mixed_precision={"auto": None, "fp32": "no", "bf16": "bf16"}[cfg.train.precision],
        log_with=list(cfg.log.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tracking")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
        kwargs_handlers=_kwargs_handlers(cfg, deepspeed),
        step_scheduler_with_optimizer=False,
    )
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != world_env:
        raise ConfigError(
            f"the launcher started {world_env} processes (WORLD_SIZE) but Accelerate sees "
            f"{accelerator.num_processes}: they would train independently. On a machine without GPUs "
            "launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ..., or "
            "--config_file accelerate_configs/cpu_multiprocess.yaml"
        )
    return accelerator, _check_precision(accelerator, cfg)


def _kwargs_handlers(cfg: TrainConfig, deepspeed: bool) -> List[Any]:
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers: List[Any] = [
        # find_unused_parameters: the last (synced) backward of Fast AdvProp does not reach
        # the main-norm parameters, whose gradients were accumulated under no_sync.
        # broadcast_buffers=False: BN statistics stay per rank and are averaged before
        # evaluation (`average_bn_stats`), as under DeepSpeed, which never syncs buffers.
        DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False),
    ]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or (deepspeed and "MASTER_ADDR" in os.environ):
        # Only when distributed: with a backend set, Accelerate would query a process group
        # that a plain `python recipe.py` never creates. gloo on CPU; the timeout bounds how
        # long a collective waits for a process that died.
        from datetime import timedelta

        timeout = timedelta(seconds=cfg.train.dist_timeout_s)
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timeout) if not torch.cuda.is_available()
                        else InitProcessGroupKwargs(timeout=timeout))
    return handlers


def _check_precision(accelerator, cfg: TrainConfig) -> str:
    """The precision Accelerate runs, after checking that launch, DeepSpeed file and config agree."""
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
    return precision


def check_tracker(name: str) -> None:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if name in available and not available[name]():
        raise ConfigError(f"log.trackers includes {name!r} but it is not installed: pip install {name}, "
                          "or set --log.trackers= (none)")


def check_deepspeed_dict(ds: Dict[str, Any], cfg: TrainConfig, src: str, micro_batch: int, world: int, *,
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


def deepspeed_preflight(cfg: TrainConfig, micro_batch: int, world: int) -> None:
    """Check that DeepSpeed is installed and its JSON file fits, before anything starts (its set-up is slow).

    Raises:
        MissingExtra: deepspeed or transformers (which Accelerate's DeepSpeed support reads) is
            missing; both come with ``pip install 'fap[deepspeed]'``.
        ConfigError: the JSON file contradicts the config, or train.compile meets ZeRO-3
            (`fap.engine.compiled.check_compile`).
    """
    if not using_deepspeed():
        return
    for module in ("deepspeed", "transformers"):
        import_extra(module, "deepspeed", "a DeepSpeed launch (accelerate launch --use_deepspeed)")
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    ds = None
    if path and os.path.isfile(path):
        with open(path) as f:
            try:
                ds = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from e
    # the stage from the JSON file or `accelerate launch --zero_stage`; set-up checks it again
    stage = (ds or {}).get("zero_optimization", {}).get("stage", os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"))
    check_compile(cfg.train.compile, int(stage) if str(stage).isdigit() else None)
    if ds is not None:
        check_deepspeed_dict(ds, cfg, path, micro_batch, world, fill=False)


def configure_deepspeed(accelerator, cfg: TrainConfig, micro_batch: int) -> Optional[int]:
    """Fill the "auto"s of Accelerate's resolved DeepSpeed config and re-check it; return the ZeRO stage."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    src = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "the accelerate config's deepspeed_config"
    check_deepspeed_dict(ds, cfg, src, micro_batch, accelerator.num_processes, fill=True)
    if accelerator.mixed_precision == "bf16":
        # DeepSpeed casts parameters, not buffers: BatchNorm needs its buffers in bf16 too.
        ds.setdefault("data_types", {}).setdefault("buffer_dtype", "bf16")
    return int(plugin.zero_stage)


def can_coalesce(engine) -> bool:
    """DeepSpeed >= 0.19.2 with a ZeRO optimizer that supports one reduction per update."""
    if not hasattr(engine, "coalesce_grad_reduction"):
        return False
    try:
        stage = int(engine.zero_optimization_stage())
    except Exception:
        return False
    return stage in (1, 2, 3) and hasattr(engine.optimizer, "_coalesce_grad_reduction")


@torch.no_grad()
def average_bn_stats(module: torch.nn.Module, world: int) -> None:
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


def full_state_dict(accelerator, model) -> Dict[str, torch.Tensor]:
    """The full fp32 weights on every rank (DeepSpeed: gathered from the fp32 master
    partitions with ``safe_get_full_fp32_param``, a collective under ZeRO-3; FSDP2: each
    sharded ``DTensor`` gathered with ``full_tensor()``, a collective too)."""
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    if is_fsdp2(unwrapped):  # a collective: every process gathers each sharded tensor in the same order
        from torch.distributed.tensor import DTensor

        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
                for k, v in unwrapped.state_dict().items()}
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


def main_process_first(accelerator, fn):
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


def warn_oversubscribed(accelerator, num_workers: int) -> None:
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
