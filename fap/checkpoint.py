"""Checkpoints: Accelerate state saved atomically, resume, and the exported timm model.

A checkpoint is one ``accelerator.save_state`` directory (model, optimizer, the RNG states
of every process, and every object registered with ``register_for_checkpointing``: the
`TrainState` counters, the method's RNG streams, the LR scheduler and the EMA), written
under ``<run>/checkpoints/.tmp-step_XXXXXXXX`` and renamed to ``step_XXXXXXXX`` only
after every process has finished writing and the marker file `MARKER` (step, epoch,
world size and the resolved config) is on disk. A directory without the marker, or
with the ``.tmp-`` prefix, is never loaded, and an existing complete checkpoint is
never overwritten: a crash during a save leaves the previous checkpoints intact.

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
from typing import Any, Dict, List, Optional

import torch

__all__ = [
    "MARKER",
    "TrainState",
    "CheckpointError",
    "checkpoint_dir",
    "list_checkpoints",
    "resolve_resume",
    "read_marker",
    "save_checkpoint",
    "prune_checkpoints",
    "remove_partial",
    "export_timm",
    "load_checkpoint_weights",
    "add_arguments",
    "run",
]

MARKER = "fap_checkpoint.json"
_NAME = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint or resume request that cannot be honoured; the message says why and what to do."""


@dataclass
class TrainState:
    """Where the run is: saved in every checkpoint (``register_for_checkpointing``).

    Attributes:
        epoch: the epoch being trained (0-based).
        step: optimizer updates done so far (drives the LR schedule).
        batch_in_epoch: loader micro-batches of ``epoch`` already consumed (mid-epoch resume).
        images: loader images trained on so far (global).
        best_top1: best evaluation top-1 so far (main norms).
    """
    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    images: int = 0
    best_top1: float = 0.0

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


def read_marker(path: os.PathLike) -> Dict[str, Any]:
    """The marker of a complete checkpoint; CheckpointError if ``path`` is not one."""
    path = Path(path)
    marker = path / MARKER
    if path.name.startswith(_TMP_PREFIX) or not marker.is_file():
        raise CheckpointError(
            f"{path} is not a complete fap checkpoint (no {MARKER}: it was never finished, "
            "or it is not a checkpoint directory)"
        )
    with open(marker) as f:
        return json.load(f)


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


def resolve_resume(resume: str, run_dir: os.PathLike) -> Optional[Path]:
    """The checkpoint to load for ``checkpoint.resume``, or None to start fresh.

    Args:
        resume: ``""`` (fresh), ``"auto"`` (newest complete checkpoint of ``run_dir`` if
            any), or a path to a checkpoint directory or to a run directory.
        run_dir: this run's output directory.

    Raises:
        CheckpointError: a fresh start in a directory that already holds checkpoints (it
            would be mixed with them), or a path that holds no complete checkpoint.
    """
    if resume == "":
        existing = list_checkpoints(run_dir)
        if existing:
            raise CheckpointError(
                f"{run_dir} already has checkpoints (newest: {existing[-1].name}); pass "
                "--checkpoint.resume=auto to continue that run, or choose another --log.output_dir"
            )
        return None
    if resume == "auto":
        existing = list_checkpoints(run_dir)
        return existing[-1] if existing else None
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"checkpoint.resume={resume!r}: no such file or directory")
    if (path / MARKER).is_file() and not path.name.startswith(_TMP_PREFIX):
        return path
    existing = list_checkpoints(path)
    if existing:
        return existing[-1]
    partial = _partial(path) or ([path] if _NAME.match(path.name) or path.name.startswith(_TMP_PREFIX) else [])
    hint = (f"; found only unfinished ones: {', '.join(p.name for p in partial)}" if partial else "")
    raise CheckpointError(
        f"checkpoint.resume={resume!r} holds no complete checkpoint (a directory with {MARKER}, "
        f"or a run directory with checkpoints/step_*/{MARKER}){hint}"
    )


# ------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------

def remove_partial(accelerator, run_dir: os.PathLike) -> None:
    """Delete unfinished checkpoint directories left by a crash (main process)."""
    if accelerator.is_main_process:
        for p in _partial(run_dir):
            if p.name.startswith(_TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator, run_dir: os.PathLike, state: TrainState, marker: Dict[str, Any]) -> Path:
    """Save the Accelerate state as ``checkpoints/step_<state.step>``, atomically.

    Every process writes its part into a temporary directory; after a barrier the main
    process writes the marker, fsyncs it and renames the directory. If the final
    directory exists already (the same update saved twice, e.g. at an epoch end that is
    also an every-N-steps point), nothing is written.

    Args:
        accelerator: the run's Accelerator (all processes call this).
        run_dir: the run directory.
        state: the training counters (names the checkpoint by ``state.step``).
        marker: extra facts for the marker file (config, world size, ...).

    Returns:
        The checkpoint directory.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"step_{state.step:08d}"
    if (final / MARKER).is_file():
        return final
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        info = {**marker, **state.state_dict(), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(tmp / MARKER, "w") as f:
            json.dump(info, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(root)
    accelerator.wait_for_everyone()
    return final


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
    """Keep the newest ``keep`` complete checkpoints (0 keeps all); main process deletes."""
    if keep > 0 and accelerator.is_main_process:
        for p in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
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

    Works for plain/DDP checkpoints (``model.safetensors``) and DeepSpeed ZeRO-2/3 ones
    (consolidated from the shards with DeepSpeed's ``zero_to_fp32``), in one process.
    """
    path = Path(path)
    marker = read_marker(path)
    if ema:
        index = marker.get("ema_index")
        if index is None:
            raise CheckpointError(f"{path} has no EMA (the run had ema.enabled=False)")
        state = torch.load(path / f"custom_checkpoint_{index}.pkl", map_location="cpu", weights_only=False)
        return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file
                return load_file(str(path / name))
            return torch.load(path / name, map_location="cpu", weights_only=True)
    if (path / "pytorch_model").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(path), tag="pytorch_model")
    raise CheckpointError(f"{path}: no model weights found (model.safetensors, pytorch_model.bin or "
                          "a DeepSpeed pytorch_model/ folder)")


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
    export_timm(sd, out, model_cfg=cfg["model"], num_classes=int(marker["num_classes"]), data_cfg=cfg.get("data"))
    print(f"exported {ckpt} ({'EMA' if args.ema else 'model'}, step {marker.get('step')}) to {out}; load it with "
          f"timm.create_model('local-dir:{out}', pretrained=True)")
    return 0
