"""Fine-tuning from a converged model: the weights ``model.init_from`` names, loaded into a new model.

AdvProp (Xie et al., CVPR 2020) fine-tunes converged models; the protocol "vanilla base,
then a short fine-tune with dual, mixed or shared norms" needs a run that starts from
another run's weights. ``model.init_from`` names them:

* a run directory: its newest complete checkpoint (`fap.checkpoint.list_checkpoints`);
* a checkpoint directory (``checkpoints/step_*``), read with `fap.checkpoint.load_checkpoint_weights`;
* a ``.safetensors`` file of plain weights (``fap export``'s ``model.safetensors``, a timm
  state dict), or an export directory holding one.

Keys are compared without the wrappers' prefixes (``net.`` of `fap.models.PixelModel` and the
detector, ``module.``, ``_orig_mod.``), so a checkpoint and an export of the same network both
fit. The norms:

* single-norm weights (a vanilla run, ``dual_norm=False``, or an export) into a dual-norm model:
  the main norms are loaded and every auxiliary norm starts as a copy of its main norm
  (`fap.norm.copy_main_to_aux`), as at conversion;
* dual-norm weights into a dual-norm model: everything as stored, auxiliary norms included;
* dual-norm weights into a single-norm model: the main norms (`fap.norm.strip_aux`), i.e. the export.

Anything else that does not fit (a missing or unexpected key, another shape, e.g. another
``num_classes``) is a `ConfigError` naming the key, the path and the first keys and shapes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from fap.checkpoint import MARKER, CheckpointError, bare_key, load_checkpoint_weights, resolve_resume
from fap.checks import ConfigError
from fap.norm import copy_main_to_aux, has_dual_norm, strip_aux

__all__ = ["INIT_KEY", "resolve_init", "read_init_weights", "init_model"]

INIT_KEY = "model.init_from"
_WEIGHTS = "model.safetensors"  # an export directory's weights (timm's save_for_hf)
_SHOW = 3  # offending keys named per kind of mismatch


def resolve_init(value: Optional[str], *, key: str = INIT_KEY) -> Optional[Path]:
    """The checkpoint directory or ``.safetensors`` file ``value`` names; None for None.

    Raises:
        ConfigError: nothing at ``value``, or nothing fap can start from there; it names ``key``.
    """
    if value is None:
        return None
    p = Path(os.path.expanduser(value))
    expected = ("a run directory, a checkpoint directory (checkpoints/step_*) or a .safetensors file "
                "(e.g. fap export's model.safetensors)")
    if not p.exists():
        raise ConfigError(f"{key}={value!r}: no such file or directory; expected {expected}")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ConfigError(f"{key}={value!r} is a file but not a .safetensors one; expected {expected}")
        return p
    if not (p / MARKER).is_file() and (p / _WEIGHTS).is_file():
        return p / _WEIGHTS  # an export directory
    try:
        return resolve_resume(str(p.absolute()), p, resume_key=key)  # absolute: never resume's "auto"
    except CheckpointError as e:
        raise ConfigError(f"{e}; expected {expected}") from None


def read_init_weights(path: Path, *, key: str = INIT_KEY) -> Dict[str, torch.Tensor]:
    """The weights at a `resolve_init` path, keys without the wrappers' prefixes."""
    try:
        if path.is_file():
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = load_checkpoint_weights(path)
    except CheckpointError as e:
        raise ConfigError(f"{key}: {e}") from None
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ConfigError(f"{key}: {path} cannot be read ({type(e).__name__}: {e}); is it damaged?") from None
    return {bare_key(k): v for k, v in sd.items()}


def init_model(model: nn.Module, path: Path, *, key: str = INIT_KEY) -> str:
    """Load the weights at ``path`` (from `resolve_init`) into ``model`` in place; return the
    line to print. See the module docstring for the norms.

    Call it on the freshly built model, before its optimizer, ``accelerator.prepare`` and EMA,
    so that all of them start from these weights.

    Raises:
        ConfigError: the weights do not fit ``model`` (names ``key``, ``path``, keys and shapes).
    """
    source = read_init_weights(path, key=key)
    own = model.state_dict()
    names = {bare_key(k): k for k in own}  # bare key -> the model's own key
    target = {b: own[k] for b, k in names.items()}
    source_dual, target_dual = _is_dual(source), has_dual_norm(model)
    if source_dual and not target_dual:
        source = strip_aux(source)
    copy_aux = target_dual and not source_dual
    expected = strip_aux(target) if copy_aux else target
    problems = _mismatch(expected, source)
    if problems:
        raise ConfigError(f"{key}: the weights in {path} do not fit the model: " + "; ".join(problems)
                          + ". Start from a run or export of the same model (model.name, model.kwargs, "
                          "model.num_classes), or leave model.init_from unset to start from random weights")
    # keys checked above: strict=False leaves out exactly the auxiliary norms, copied next
    model.load_state_dict({names[b]: v for b, v in source.items()}, strict=not copy_aux)
    if copy_aux:
        copy_main_to_aux(model)
    note = ("aux norms copied from main" if copy_aux else "aux norms as stored" if target_dual
            else "main norms; its aux norms left out" if source_dual else "")
    return f"initialised from {path}" + (f" ({note})" if note else "")


def _is_dual(state_dict: Dict[str, torch.Tensor]) -> bool:
    return len(strip_aux(state_dict)) != len(state_dict)


def _mismatch(expected: Dict[str, torch.Tensor], given: Dict[str, torch.Tensor]) -> List[str]:
    """What keeps ``given`` from loading strictly where ``expected`` is: missing keys,
    unexpected keys and other shapes, the first few of each; [] when it fits."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k!r}: file {tuple(given[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in given and tuple(given[k].shape) != tuple(v.shape)]
    out = []
    for what, items in (("keys the model needs are missing", [repr(k) for k in missing]),
                        ("keys are not in the model", [repr(k) for k in unexpected]),
                        ("keys have other shapes", shapes)):
        if items:
            out.append(f"{len(items)} {what} (e.g. {', '.join(items[:_SHOW])})")
    return out
