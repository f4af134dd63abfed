"""Checkpoints: Accelerate state saved atomically, resume, and the exported timm model.

A checkpoint is one ``accelerator.save_state`` directory (model, optimizer, the RNG states
of every process, and every object registered with ``register_for_checkpointing``: the
`TrainState` counters, the method's RNG streams, the LR scheduler and the EMA), written
under ``<run>/checkpoints/.tmp-step_XXXXXXXX`` and renamed to ``step_XXXXXXXX`` only
after every process has finished writing and the marker file `MARKER` (step, epoch,
world size and the resolved config) is on disk. A directory without the marker, or
with the ``.tmp-`` prefix, is never loaded, and an existing complete checkpoint is
never overwritten: a crash during a save leaves the previous checkpoints intact. Every
file is fsynced before the marker is written, so the rename publishes only data that is
on disk; old checkpoints are pruned by renaming them to ``.tmp-del-*`` first, so a kill
during the deletion never leaves a marked checkpoint with missing files. A save that
fails (disk full, read-only directory) is a `CheckpointError` on every process that
names the previous complete checkpoint.

Under FSDP2 the model and optimizer are not Accelerate's to save (fap shards them itself,
`fap.engine.distributed.shard_fsdp2`): they go in as distributed state dicts
(``torch.distributed.checkpoint``; every process writes its shards) under `FSDP2_MODEL`
and `FSDP2_OPTIMIZER` in the same directory, beside Accelerate's RNG states and
registered objects, and come back into the same sharding on resume (`load_sharded`).
`load_checkpoint_weights` consolidates `FSDP2_MODEL` in one process for ``fap export``.

What each process keeps for itself goes in per process too. Accelerate's model file, DeepSpeed
ZeRO-2's model states and FSDP2's distributed state dict hold one process's copy of the
model's buffers (ZeRO-3 alone writes model states per process), but the buffers -- BatchNorm
running statistics, of the model and of its EMA -- are each process's own (DDP does not
broadcast them: ``fap.engine.distributed``), so every process also writes its buffers to
`PROCESS_BUFFERS` (``process_buffers_<rank>.safetensors``), and a resume on the same number
of processes gives every process its own back (`save_process_buffers`,
`load_process_buffers`). On another number of processes every process keeps the main
process's, from the model file.

Loading is safe: `verify_checkpoint` opens every pickle-based file of a checkpoint with
``torch.load(weights_only=True)`` (tensors, containers, numbers and the numpy RNG state,
nothing else) *before* Accelerate or DeepSpeed touch it, so a crafted pickle is refused
instead of executed; weights themselves are safetensors. The marker records the fap
version and checkpoint `FORMAT`; another format or another fap minor version is refused
(`check_compatible`).

The export is what inference needs and nothing more: the main-branch weights with the
auxiliary norms stripped (`fap.norm.strip_aux`), loaded strictly into a plain
``timm.create_model`` to prove they fit, and written with timm's ``save_for_hf``
(``model.safetensors`` + ``config.json``), so that

    timm.create_model("local-dir:runs/x/export", pretrained=True)

gives the trained model. ``fap export CHECKPOINT`` does the same from a checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from fap.checks import CheckpointError, import_extra  # the error is defined torch-free, for `fap.cli`

__all__ = [
    "MARKER",
    "WRAPPER_PREFIXES",
    "bare_key",
    "FORMAT",
    "TrainState",
    "CheckpointError",
    "checkpoint_dir",
    "list_checkpoints",
    "resolve_resume",
    "read_marker",
    "check_compatible",
    "verify_checkpoint",
    "load_checkpoint",
    "safe_torch_load",
    "save_checkpoint",
    "save_sharded",
    "check_dcp_metadata",
    "load_sharded",
    "FSDP2_MODEL",
    "FSDP2_OPTIMIZER",
    "PROCESS_BUFFERS",
    "process_buffers",
    "save_process_buffers",
    "load_process_buffers",
    "prune_checkpoints",
    "remove_partial",
    "export_timm",
    "load_checkpoint_weights",
    "add_arguments",
    "run",
]

MARKER = "fap_checkpoint.json"
PROCESS_BUFFERS = "process_buffers_{rank}.safetensors"  # one per process: its own model buffers
FORMAT = 1  # the layout of a checkpoint directory and its marker; bump on incompatible change
_NAME = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_DEL_PREFIX = ".tmp-del-"
# Files that torch.load would unpickle (Accelerate: optimizer.bin, scheduler.bin,
# random_states_*.pkl, custom_checkpoint_*.pkl; DeepSpeed: *.pt in its tag folder).
_PICKLED = (".pkl", ".bin", ".pt", ".pth")


@dataclass
class TrainState:
    """Where the run is: saved in every checkpoint (``register_for_checkpointing``).

    Attributes:
        epoch: the epoch being trained (0-based).
        step: optimizer updates done so far (drives the LR schedule).
        batch_in_epoch: loader micro-batches of ``epoch`` already consumed (mid-epoch resume).
        images: loader images trained on so far (global).
        best_top1: best evaluation top-1 so far (main norms).
        nonfinite_skipped: updates skipped for a non-finite loss (``train.nonfinite=skip``).
    """
    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    images: int = 0
    best_top1: float = 0.0
    nonfinite_skipped: int = 0

    def state_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)


# ------------------------------------------------------------------------------------
# Finding checkpoints
# ------------------------------------------------------------------------------------

def checkpoint_dir(run_dir: os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def read_marker(path: os.PathLike, *, check: bool = True) -> Dict[str, Any]:
    """The marker of a complete checkpoint; CheckpointError if ``path`` is not one.

    With ``check`` (the default) the checkpoint must also be one this fap can load
    (`check_compatible`).
    """
    path = Path(path)
    marker = path / MARKER
    if path.name.startswith(_TMP_PREFIX) or not marker.is_file():
        raise CheckpointError(
            f"{path} is not a complete fap checkpoint (no {MARKER}: it was never finished, "
            "or it is not a checkpoint directory)"
        )
    try:
        with open(marker) as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{marker} cannot be read as JSON ({e}); the checkpoint is damaged") from e
    if not isinstance(info, dict):
        raise CheckpointError(f"{marker} is not a fap checkpoint marker (a JSON object with config, step, ...)")
    if check:
        check_compatible(info, path)
    return info


def _minor(version: str) -> Tuple[str, ...]:
    return tuple(str(version).split(".")[:2])


def check_compatible(marker: Dict[str, Any], path: os.PathLike) -> None:
    """Refuse a checkpoint of another `FORMAT` or another fap minor version (0.1.x vs 0.2.x).

    Raises:
        CheckpointError: naming both versions and what to do.
    """
    from fap import __version__

    fmt, version = marker.get("format"), marker.get("fap_version")
    if fmt != FORMAT or version is None:
        raise CheckpointError(
            f"{path} has checkpoint format {fmt!r} (fap {version or 'unknown'}); this fap {__version__} reads "
            f"format {FORMAT} only. Resume it with the fap version that wrote it, or start a new run directory"
        )
    if _minor(version) != _minor(__version__):
        raise CheckpointError(
            f"{path} was written by fap {version}; this is fap {__version__}. Checkpoints are compatible within "
            f"one minor version ({'.'.join(_minor(__version__))}.x): resume with fap {version}, or start a new "
            "run directory"
        )


def _safe_globals(deepspeed: bool = False) -> List[Any]:
    """What a fap checkpoint may contain besides tensors and containers: the numpy RNG
    state and, in DeepSpeed's optimizer shards, three plain records of its own (an int
    enum, the loss-scale settings and a (numel, start) dataclass; none defines how it is
    unpickled, so loading them sets attributes and runs nothing)."""
    import codecs

    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    allowed: List[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in ("UInt32DType", "Int64DType", "Float64DType") if hasattr(dtypes, n)]
    if deepspeed:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [ZeroStageEnum, LossScaler, fragment_address]
    return allowed


def safe_torch_load(path: os.PathLike, *, map_location: Any = "cpu", mmap: bool = False,
                    deepspeed: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` that also admits the numpy RNG state
    (and, with ``deepspeed``, the records in DeepSpeed's shards).

    Raises:
        CheckpointError: ``path`` holds a pickled object that is not plain data (a
            crafted file would run code under ``weights_only=False``), or cannot be read.
    """
    import pickle

    try:
        with torch.serialization.safe_globals(_safe_globals(deepspeed)):
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not mmap or "mmap" not in str(e):
                    raise
                return torch.load(path, map_location=map_location, weights_only=True)  # legacy format
    except pickle.UnpicklingError as e:
        text = str(e)
        m = re.search(r"(?:Unsupported global: |unsupported )GLOBAL ([^\s]+)", text)
        what = f" (it references {m.group(1)})" if m else ""
        raise CheckpointError(
            f"{path}: refused to load{what}: it contains a pickled object that is not plain tensor data, and "
            "fap never unpickles code (torch.load weights_only=True). The file was not written by fap; replace the "
            "checkpoint, or resume from another one"
        ) from e
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} vanished while it was being read: something else deleted it, such as "
                              "another run pruning its checkpoints in that directory") from e
    except (OSError, EOFError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} cannot be loaded ({type(e).__name__}: {e}); the checkpoint is damaged") from e


def verify_checkpoint(path: os.PathLike) -> Dict[str, Any]:
    """Check a checkpoint before anything loads it; return its marker.

    The marker must be complete and compatible, every pickle-based file (``.pkl``,
    ``.bin``, ``.pt``, ``.pth``, DeepSpeed's shards included) must load with
    ``weights_only=True`` (memory-mapped, so this reads headers, not the tensors), and
    every ``.safetensors`` file must have a readable header.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    from safetensors import safe_open

    path = Path(path)
    marker = read_marker(path)
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        if f.suffix in _PICKLED:  # DeepSpeed writes its shards into a tag folder
            safe_torch_load(f, mmap=True, deepspeed=f.parent != path)
        elif f.name == ".metadata":  # torch.distributed.checkpoint (FSDP2) unpickles it with plain pickle
            check_dcp_metadata(f)
        elif f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as sf:
                    sf.keys()
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{f} is not a readable safetensors file ({e}); the checkpoint is damaged") from e
    return marker


_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}


def check_dcp_metadata(path: os.PathLike) -> None:
    """Unpickle a distributed checkpoint's ``.metadata`` allowing only its own record types
    (and torch dtypes), before ``torch.distributed.checkpoint`` loads it with plain ``pickle``.

    Raises:
        CheckpointError: the file names anything else (a crafted pickle) or is unreadable.
    """
    import pickle

    class _Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) in _DCP_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
                return super().find_class(module, name)
            raise CheckpointError(f"{path} refers to {module}.{name}, which a distributed checkpoint's metadata "
                                  "never does: refusing to load it (a crafted or foreign file)")

    try:
        with open(path, "rb") as f:
            _Restricted(f).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise CheckpointError(f"{path} is not a readable distributed-checkpoint metadata file ({e}); "
                              "the checkpoint is damaged") from e


def register_state(accelerator, objects: Dict[str, Any]) -> Dict[str, str]:
    """Register ``objects`` (each with ``state_dict``/``load_state_dict``) for Accelerate's
    checkpoints; return each name's file in a checkpoint, for the marker.

    Accelerate names the files by registration order (``custom_checkpoint_<i>.pkl``): this
    is the one place that knows it, so readers look the file up by name
    (`load_checkpoint_weights` for ``"ema"``).
    """
    accelerator.register_for_checkpointing(*objects.values())
    return {name: f"custom_checkpoint_{i}.pkl" for i, name in enumerate(objects)}


def load_checkpoint(accelerator, path: os.PathLike, *, marker: Optional[Dict[str, Any]] = None,
                    sharded: Optional[Tuple[Any, Any]] = None,
                    buffers: Optional[Dict[str, torch.nn.Module]] = None) -> Dict[str, Any]:
    """`verify_checkpoint` (unless its ``marker`` is passed: already verified), then
    ``accelerator.load_state``, then this process's own buffers of ``buffers`` when the
    checkpoint was written by as many processes (`load_process_buffers`); return the marker.

    Raises:
        CheckpointError: the checkpoint is unsafe, damaged, incompatible, or its tensors do
            not fit this model / optimizer (another model's checkpoint).
    """
    if marker is None:
        marker = verify_checkpoint(path)
    if sharded is not None and not (Path(path) / FSDP2_MODEL).is_dir():
        raise CheckpointError(f"{path} has no {FSDP2_MODEL}/ folder: it was not written by an FSDP2 run "
                              f"(it says distributed_type={marker.get('distributed_type')!r}); resume it with the "
                              "launch that wrote it, or export it with fap export and start from the weights")
    try:
        accelerator.load_state(str(path))
        if sharded is not None:
            load_sharded(path, *sharded)
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        if not (Path(path) / MARKER).is_file():
            raise CheckpointError(f"{path} vanished while it was being loaded ({type(e).__name__}: {str(e)[:300]}): "
                                  "something else deleted it, such as another run pruning its checkpoints in "
                                  "that directory") from e
        raise CheckpointError(f"{path} does not fit this run's model or optimizer ({type(e).__name__}: "
                              f"{str(e)[:2000]})") from e
    if buffers and int(marker.get("world_size", 1)) == accelerator.num_processes:
        load_process_buffers(path, buffers, accelerator.process_index)
    return marker


def process_buffers(modules: Dict[str, torch.nn.Module]) -> Dict[str, torch.Tensor]:
    """The persistent buffers of ``modules`` (BatchNorm running statistics and batch counts),
    keyed ``<name>.<buffer>``: a model's state that is not a parameter, which no gradient
    reduction keeps equal across processes."""
    out: Dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for mod_name, mod in module.named_modules():
            for b_name, buf in mod._buffers.items():
                if buf is not None and b_name not in mod._non_persistent_buffers_set:
                    out[".".join(p for p in (prefix, mod_name, b_name) if p)] = buf
    return out


def save_process_buffers(path: os.PathLike, modules: Dict[str, torch.nn.Module], rank: int) -> None:
    """Write this process's `process_buffers` of ``modules`` as ``path/process_buffers_<rank>.safetensors``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in process_buffers(modules).items()}
    save_file(tensors, str(Path(path) / PROCESS_BUFFERS.format(rank=rank)))


def load_process_buffers(path: os.PathLike, modules: Dict[str, torch.nn.Module], rank: int) -> bool:
    """Copy this process's saved buffers into ``modules``; False when the checkpoint has none
    (written before fap kept them per process: every process keeps the model file's).

    Raises:
        CheckpointError: the saved buffers are not those of ``modules`` (another model).
    """
    from safetensors.torch import load_file

    file = Path(path) / PROCESS_BUFFERS.format(rank=rank)
    if not file.is_file():
        return False
    saved, mine = load_file(str(file)), process_buffers(modules)
    if saved.keys() != mine.keys():
        missing, extra = sorted(mine.keys() - saved.keys()), sorted(saved.keys() - mine.keys())
        raise CheckpointError(f"{file} does not fit this run's model (missing {missing[:3]}, unexpected "
                              f"{extra[:3]}); resume with the config that wrote it")
    with torch.no_grad():
        for key, buf in mine.items():
            if saved[key].shape != buf.shape:
                raise CheckpointError(f"{file}: {key} has shape {tuple(saved[key].shape)}, this run's model "
                                      f"{tuple(buf.shape)}; resume with the config that wrote it")
            buf.copy_(saved[key])
    return True


FSDP2_MODEL, FSDP2_OPTIMIZER = "fsdp2_model", "fsdp2_optimizer"


def save_sharded(path: os.PathLike, model, optimizer) -> None:
    """Write an FSDP2 model's and optimizer's distributed state dicts (all processes call this)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save(model_sd, checkpoint_id=str(Path(path) / FSDP2_MODEL))
    dcp.save(optim_sd, checkpoint_id=str(Path(path) / FSDP2_OPTIMIZER))


def load_sharded(path: os.PathLike, model, optimizer) -> None:
    """Load `save_sharded`'s state dicts into the sharded ``model`` and ``optimizer`` in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)  # the layout to load into
    dcp.load(model_sd, checkpoint_id=str(Path(path) / FSDP2_MODEL))
    dcp.load(optim_sd, checkpoint_id=str(Path(path) / FSDP2_OPTIMIZER))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


def _consolidate_sharded(path: Path) -> Dict[str, torch.Tensor]:
    """The full model state dict of an FSDP2 checkpoint, in one process (no process group)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.pt"
        dcp_to_torch_save(str(path / FSDP2_MODEL), str(out))
        return safe_torch_load(out)


#: What wrappers put before a network's own parameter names: DDP's ``module.``, torch.compile's
#: ``_orig_mod.`` and `fap.models.PixelModel`'s (and the detector's) ``net.``.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.")


def bare_key(key: str) -> str:
    """``key`` without the wrappers' leading `WRAPPER_PREFIXES`, in any order and number."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def list_checkpoints(run_dir: os.PathLike) -> List[Path]:
    """Complete checkpoints of a run directory, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _partial(run_dir: os.PathLike) -> List[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and (p.name.startswith(_TMP_PREFIX) or not (p / MARKER).is_file()))


def resolve_resume(resume: str, run_dir: os.PathLike, *, resume_key: str = "checkpoint.resume",
                   out_key: str = "log.output_dir") -> Optional[Path]:
    """The checkpoint to load for ``checkpoint.resume``, or None to start fresh.

    Args:
        resume: ``""`` (fresh), ``"auto"`` (newest complete checkpoint of ``run_dir`` if
            any), or a path to a checkpoint directory or to a run directory.
        run_dir: this run's output directory.
        resume_key, out_key: the names of those two settings in the caller's config (for the errors).

    Raises:
        CheckpointError: a fresh start in a directory that already holds checkpoints (it
            would be mixed with them), or a path that holds no complete checkpoint.
    """
    if resume == "":
        existing = list_checkpoints(run_dir)
        if existing:
            raise CheckpointError(
                f"{run_dir} already has checkpoints (newest: {existing[-1].name}); pass "
                f"--{resume_key}=auto to continue that run, or choose another --{out_key}"
            )
        return None
    if resume == "auto":
        existing = list_checkpoints(run_dir)
        return existing[-1] if existing else None
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"{resume_key}={resume!r}: no such file or directory")
    if (path / MARKER).is_file() and not path.name.startswith(_TMP_PREFIX):
        return path
    existing = list_checkpoints(path)
    if existing:
        return existing[-1]
    partial = _partial(path) or ([path] if _NAME.match(path.name) or path.name.startswith(_TMP_PREFIX) else [])
    hint = (f"; found only unfinished ones: {', '.join(p.name for p in partial)}" if partial else "")
    raise CheckpointError(
        f"{resume_key}={resume!r} holds no complete checkpoint (a directory with {MARKER}, "
        f"or a run directory with checkpoints/step_*/{MARKER}){hint}"
    )


# ------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------

def remove_partial(accelerator, run_dir: os.PathLike) -> None:
    """Delete unfinished saves and interrupted prunes left by a crash (main process)."""
    if accelerator.is_main_process:
        for p in _partial(run_dir):
            if p.name.startswith(_TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()


def _agree(accelerator, error: Optional[BaseException]) -> Optional[str]:
    """The first process's error message, on every process (None when all succeeded)."""
    message = None if error is None else f"{type(error).__name__}: {error}"
    if accelerator.num_processes == 1:
        return message
    from accelerate.utils import gather_object

    failed = [m for m in gather_object([message]) if m is not None]
    return failed[0] if failed else None


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def save_checkpoint(accelerator, run_dir: os.PathLike, state: TrainState, marker: Dict[str, Any], *,
                    sharded: Optional[Tuple[Any, Any]] = None, buffers: Optional[Dict[str, torch.nn.Module]] = None,
                    resume_key: str = "checkpoint.resume") -> Path:
    """Save the Accelerate state as ``checkpoints/step_<state.step>``, atomically.

    Every process writes its part into a temporary directory and fsyncs it; after all
    have succeeded the main process writes the marker, fsyncs it and renames the
    directory. If the final directory exists already (the same update saved twice, e.g.
    at an epoch end that is also an every-N-steps point), nothing is written.

    Args:
        accelerator: the run's Accelerator (all processes call this).
        run_dir: the run directory.
        state: the training counters (names the checkpoint by ``state.step``).
        marker: extra facts for the marker file (config, world size, ...).
        sharded: ``(model, optimizer)`` of an FSDP2 run, saved as distributed state dicts.
        buffers: modules whose buffers every process saves as its own (`save_process_buffers`).
        resume_key: the caller's name for the resume setting (for the error).

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError: on every process, if any process could not write (disk full,
            read-only or vanished directory); it names the previous complete checkpoint,
            which is untouched. The unfinished directory is removed where possible.
    """
    from fap import __version__

    root = checkpoint_dir(run_dir)
    final = root / f"step_{state.step:08d}"
    if (final / MARKER).is_file():
        return final
    tmp = root / f"{_TMP_PREFIX}{final.name}"

    def fail(message: str) -> CheckpointError:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(run_dir)
        kept = (f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists")
        return CheckpointError(
            f"could not write checkpoint {final} ({message}); {kept}. Free space or fix the permissions of "
            f"{root}, then continue with --{resume_key}=auto"
        )

    error: Optional[BaseException] = None
    if accelerator.is_main_process:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        except OSError as e:
            error = e
    failed = _agree(accelerator, error)  # also the barrier before anyone writes
    if failed:
        raise fail(failed)
    failed = _agree(accelerator, _write_parts(accelerator, tmp, sharded=sharded, buffers=buffers))
    if failed:
        raise fail(failed)
    if accelerator.is_main_process:
        try:
            info = {**marker, **state.state_dict(), "format": FORMAT, "fap_version": __version__,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            with open(tmp / MARKER, "w") as f:
                json.dump(info, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(root)
        except OSError as e:
            error = e
    failed = _agree(accelerator, error)
    if failed:
        raise fail(failed)
    return final


def _write_parts(accelerator, tmp: Path, *, sharded: Optional[Tuple[Any, Any]],
                 buffers: Optional[Dict[str, torch.nn.Module]]) -> Optional[BaseException]:
    """This process's part of a checkpoint in ``tmp``, fsynced; the error, if writing failed."""
    try:
        accelerator.save_state(str(tmp))
        if sharded is not None:
            save_sharded(tmp, *sharded)
        if buffers:
            save_process_buffers(tmp, buffers, accelerator.process_index)
        _fsync_tree(tmp)
    except Exception as e:  # OSError, torch.save's RuntimeError, safetensors' own error type
        return e
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune_checkpoints(accelerator, run_dir: os.PathLike, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints (0 keeps all); main process deletes.

    Each old checkpoint is first renamed to ``.tmp-del-step_*`` (atomic), then deleted:
    a kill in between leaves a directory that is never loaded and is removed at the next
    start, never a marked checkpoint with files missing.
    """
    if keep > 0 and accelerator.is_main_process:
        for p in list_checkpoints(run_dir)[:-keep]:
            doomed = p.with_name(f"{_DEL_PREFIX}{p.name}")
            try:
                os.replace(p, doomed)
            except OSError:
                continue  # e.g. a read-only directory: keeping an old checkpoint is harmless
            shutil.rmtree(doomed, ignore_errors=True)
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------

def _timm_kwargs(model_cfg: Dict[str, Any]) -> Dict[str, Any]:
    kwargs = dict(model_cfg.get("kwargs") or {})
    if model_cfg.get("img_size") is not None:
        kwargs["img_size"] = model_cfg["img_size"]
    return kwargs


def export_timm(
        state_dict: Dict[str, torch.Tensor],
        out_dir: os.PathLike,
        *,
        model_cfg: Dict[str, Any],
        num_classes: int,
        data_cfg: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``state_dict`` as a plain timm model: ``model.safetensors`` + ``config.json``.

    Args:
        state_dict: weights of a `fap.models.PixelModel` (keys ``net.*``) or of its net;
            auxiliary norms are stripped here.
        out_dir: the export directory; replaced atomically if it exists.
        model_cfg: the ``model`` section as a dict (name, kwargs, img_size, mean, std).
        num_classes: classifier width.
        data_cfg: the ``data`` section as a dict, for the preprocessing recorded in
            ``config.json`` (input size, crop, interpolation).

    Returns:
        ``out_dir``.

    Raises:
        CheckpointError: the stripped weights do not load strictly into the timm model.
    """
    import timm
    from timm.models import save_for_hf

    from fap.norm import strip_aux

    sd = {k[len("net."):] if k.startswith("net.") else k: v for k, v in state_dict.items()}
    sd = strip_aux(sd)
    sd = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in sd.items()}
    kwargs = _timm_kwargs(model_cfg)
    net = timm.create_model(model_cfg["name"], pretrained=False, num_classes=num_classes, **kwargs)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"the exported weights do not load strictly into timm.create_model({model_cfg['name']!r}, "
            f"num_classes={num_classes}, **{kwargs}): {e}"
        ) from e
    data_config: Dict[str, Any] = {}
    if data_cfg:
        size = int(data_cfg.get("image_size", 224))
        data_config = {"input_size": (3, size, size), "crop_pct": data_cfg.get("crop_pct"),
                       "interpolation": data_cfg.get("interpolation")}
    mean, std = model_cfg.get("mean"), model_cfg.get("std")
    if mean is not None and std is not None:
        data_config.update(mean=tuple(mean), std=tuple(std))
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{_TMP_PREFIX}{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_for_hf(net, str(tmp), model_args=kwargs, safe_serialization=True,
                data_config={k: v for k, v in data_config.items() if v is not None} or None)
    old = out_dir.with_name(f"{_TMP_PREFIX}old-{out_dir.name}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old.exists():
        shutil.rmtree(old)
    return out_dir


def load_checkpoint_weights(path: os.PathLike, *, ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model (or EMA) weights stored in a complete checkpoint, as one fp32 state dict.

    Works for plain/DDP checkpoints (``model.safetensors``), DeepSpeed ZeRO-2/3 ones
    (consolidated from the shards with DeepSpeed's ``zero_to_fp32``) and FSDP2 ones
    (consolidated with ``torch.distributed.checkpoint``'s ``dcp_to_torch_save``), in one process.
    Nothing is unpickled beyond plain data (`safe_torch_load`, `verify_checkpoint`).
    """
    path = Path(path)
    marker = read_marker(path)
    if ema:
        name = (marker.get("state_files") or {}).get("ema")
        if name is None:
            raise CheckpointError(f"{path} has no EMA (the run had ema.enabled=False)")
        state = safe_torch_load(path / name)
        return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file
                return load_file(str(path / name))
            return safe_torch_load(path / name)
    if (path / FSDP2_MODEL).is_dir():
        verify_checkpoint(path)  # torch.distributed.checkpoint unpickles .metadata without restrictions
        return _consolidate_sharded(path)
    if (path / "pytorch_model").is_dir():
        verify_checkpoint(path)  # DeepSpeed's loader unpickles without weights_only
        zero_to_fp32 = import_extra("deepspeed.utils.zero_to_fp32", "deepspeed",
                                    f"{path} (a DeepSpeed ZeRO checkpoint)")
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(path), tag="pytorch_model")
    raise CheckpointError(f"{path}: no model weights found (model.safetensors, pytorch_model.bin, "
                          f"a DeepSpeed pytorch_model/ folder or an FSDP2 {FSDP2_MODEL}/ folder)")


# ------------------------------------------------------------------------------------
# `fap export`
# ------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint directory (checkpoints/step_*) or a run directory "
                                           "(its newest complete checkpoint is used)")
    parser.add_argument("--out", default=None, help="export directory (default: <run>/export, or export_ema)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the model's")


def run(args: argparse.Namespace) -> int:
    ckpt = resolve_resume(str(args.checkpoint), Path(args.checkpoint))
    marker = read_marker(ckpt)
    cfg = marker["config"]
    out = Path(args.out) if args.out else ckpt.parent.parent / ("export_ema" if args.ema else "export")
    sd = load_checkpoint_weights(ckpt, ema=args.ema)
    if cfg.get("task") == "detection":  # dispatch on the task the run recorded: a torchvision RetinaNet
        from fap.detection.train import detection_arch, export_detector

        export_detector(sd, out, arch=detection_arch(cfg["detection"], int(marker["num_classes"])))
        print(f"exported {ckpt} ({'EMA' if args.ema else 'model'}, step {marker.get('step')}) to {out}; load it "
              "with fap.detection.evaluate.load_detector or torchvision's retinanet_*_fpn")
        return 0
    export_timm(sd, out, model_cfg=cfg["model"], num_classes=int(marker["num_classes"]), data_cfg=cfg.get("data"))
    print(f"exported {ckpt} ({'EMA' if args.ema else 'model'}, step {marker.get('step')}) to {out}; load it with "
          f"timm.create_model('local-dir:{out}', pretrained=True)")
    return 0
