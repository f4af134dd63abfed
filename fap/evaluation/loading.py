"""Load what ``fap eval`` is pointed at: an export, a checkpoint, or a safetensors file.

* an **export** directory (``fap export`` / the engine's end of training): timm's
  ``save_for_hf`` layout, ``model.safetensors`` + ``config.json`` (``architecture``,
  ``num_classes``, ``pretrained_cfg`` with mean/std and the eval crop, ``model_args``,
  optional ``label_names``);
* a **checkpoint** directory (``checkpoints/step_*`` with ``fap_checkpoint.json``) or a
  run directory (its newest complete checkpoint), read with `fap.checkpoint`;
* a single ``.safetensors`` **file** of timm weights whose metadata (or a ``config.json``
  beside it) names the architecture (``architecture`` or ``model_name``) and
  ``num_classes``.

The weights go into `fap.models.create_model` with one set of norms, those of the chosen
branch (`fap.norm.select_branch`: the main norms by default; a checkpoint's auxiliary
norms with ``branch="aux"``, which exports do not have), and are loaded strictly, after a comparison of
keys and shapes that turns "weights of another architecture" into an error naming the
file, the keys and the shapes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["LoadedModel", "WeightsError", "load_model", "recorded_task", "wrap_module"]

EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"


class WeightsError(ValueError):
    """Weights that do not fit the model they are said to be. The message names file, keys and shapes."""


@dataclass
class LoadedModel:
    """A model ready for evaluation and what is known about it.

    Attributes:
        model: a `fap.models.PixelModel` (takes [0, 1] pixels).
        name: the timm architecture.
        num_classes: number of outputs.
        classes: class names in label order, if recorded (export ``label_names``, checkpoint data).
        image_size, crop_pct, interpolation: the eval preprocessing recorded with the
            weights, if any.
        source: where the weights came from.
        branch: which norms the model carries: ``"main"``, or a checkpoint's ``"aux"``.
    """
    model: nn.Module
    name: str
    num_classes: int
    classes: Optional[List[str]] = None
    image_size: Optional[int] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    source: str = ""
    branch: str = "main"
    extra: Dict[str, Any] = field(default_factory=dict)


def load_model(path: str, *, model_name: Optional[str] = None, ema: bool = False, branch: str = "main") -> LoadedModel:
    """Load an export directory, a checkpoint or run directory, or a ``.safetensors`` file.

    Args:
        path: see the module docstring.
        model_name: the timm architecture, overriding what the files record.
        ema: for a checkpoint, load its EMA weights.
        branch: ``"main"`` norms, or ``"aux"``: a dual-norm checkpoint's auxiliary norms
            in their place (`fap.norm.select_branch`); an export has none.

    Raises:
        FileNotFoundError: nothing at ``path``, or nothing fap can read there.
        WeightsError: the weights do not fit the architecture (names keys and shapes).
    """
    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if p.is_dir():
        if (p / EXPORT_CONFIG).is_file() and (p / EXPORT_WEIGHTS).is_file():
            return _load_export(p / EXPORT_WEIGHTS, _read_json(p / EXPORT_CONFIG), model_name=model_name,
                                config_file=p / EXPORT_CONFIG, branch=branch)
        return _load_checkpoint(p, model_name=model_name, ema=ema, branch=branch)
    if p.suffix == ".safetensors":
        return _load_safetensors_file(p, model_name=model_name, branch=branch)
    raise FileNotFoundError(
        f"{path}: not something fap eval reads; pass an export directory ({EXPORT_WEIGHTS} + {EXPORT_CONFIG}), "
        f"a checkpoint or run directory, or a .safetensors file"
    )


def recorded_task(path: str) -> str:
    """The task a run, export or checkpoint at ``path`` was trained for: ``"classification"`` or ``"detection"``.

    Read from data, not guessed from the weights: an export's ``config.json`` (``task``), the
    ``export/`` of a run directory, or the newest checkpoint's marker (``config.task``).
    Anything that records no task (a timm export, a plain ``.safetensors`` file) is a classifier.
    """
    p = Path(os.path.expanduser(path))
    for d in (p, p / "export"):
        if (d / EXPORT_CONFIG).is_file():
            try:
                return str(_read_json(d / EXPORT_CONFIG).get("task") or "classification")
            except (FileNotFoundError, ValueError):
                return "classification"
    if p.is_dir():
        from fap.checkpoint import CheckpointError, read_marker, resolve_resume

        try:
            marker = read_marker(resolve_resume(str(p), p), check=False)
        except CheckpointError:
            return "classification"
        return str((marker.get("config") or {}).get("task") or marker.get("task") or "classification")
    return "classification"


def wrap_module(module: nn.Module) -> nn.Module:
    """A module that takes [0, 1] pixels: a PixelModel as is, a bare timm model wrapped with
    the mean/std of its ``pretrained_cfg``; anything else is assumed to take pixels already."""
    from fap.models import PixelModel

    if isinstance(module, PixelModel):
        return module
    cfg = getattr(module, "pretrained_cfg", None)
    if cfg:
        return PixelModel(module, cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225)),
                          model_name=cfg.get("architecture", type(module).__name__))
    return module


# --------------------------------------------------------------------------------------
# Kinds of input
# --------------------------------------------------------------------------------------

def _read_json(path: Path) -> Dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from e


def _load_export(weights: Path, config: Dict[str, Any], *, model_name: Optional[str], config_file: Path,
                 branch: str = "main") -> LoadedModel:
    from safetensors.torch import load_file

    name = model_name or config.get("architecture") or config.get("model_name")
    if not name:
        raise WeightsError(f"{config_file}: no 'architecture' key naming the timm model; add it or pass model_name")
    if "num_classes" not in config:
        raise WeightsError(f"{config_file}: no 'num_classes' key; add it (the classifier width)")
    pcfg = config.get("pretrained_cfg") or {}
    size = pcfg.get("test_input_size") or pcfg.get("input_size")
    loaded = _build(
        name, int(config["num_classes"]), load_file(str(weights)), file=str(weights),
        recorded=(config.get("architecture") or config.get("model_name"), str(config_file)),
        mean=pcfg.get("mean"), std=pcfg.get("std"), model_args=config.get("model_args") or {}, branch=branch,
    )
    loaded.classes = _label_names(config.get("label_names"), loaded.num_classes, where=str(config_file))
    loaded.image_size = int(size[-1]) if size else None
    loaded.crop_pct = pcfg.get("test_crop_pct") or pcfg.get("crop_pct")
    loaded.interpolation = pcfg.get("interpolation")
    return loaded


def _load_safetensors_file(path: Path, *, model_name: Optional[str], branch: str = "main") -> LoadedModel:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    sibling = path.parent / EXPORT_CONFIG
    if not (meta.get("architecture") or meta.get("model_name")) and sibling.is_file():
        return _load_export(path, _read_json(sibling), model_name=model_name, config_file=sibling, branch=branch)
    config: Dict[str, Any] = {k: v for k, v in meta.items()}
    for key in ("label_names", "pretrained_cfg", "model_args"):
        if isinstance(config.get(key), str):
            try:
                config[key] = json.loads(config[key])
            except ValueError as e:
                raise WeightsError(f"{path}: metadata key {key!r} is not JSON ({e})") from e
    if model_name is None and not (config.get("architecture") or config.get("model_name")):
        raise WeightsError(f"{path}: its metadata names no architecture (keys 'architecture' or 'model_name') "
                           f"and there is no {EXPORT_CONFIG} beside it; pass model_name (--model-name)")
    if "num_classes" not in config:
        raise WeightsError(f"{path}: its metadata has no 'num_classes' and there is no {EXPORT_CONFIG} beside it")
    return _load_export(path, config, model_name=model_name, config_file=path, branch=branch)


def _load_checkpoint(path: Path, *, model_name: Optional[str], ema: bool, branch: str = "main") -> LoadedModel:
    from fap.checkpoint import CheckpointError, load_checkpoint_weights, read_marker, resolve_resume

    try:
        ckpt = resolve_resume(str(path), path)
    except CheckpointError as e:
        raise FileNotFoundError(
            f"{path}: neither an export directory ({EXPORT_WEIGHTS} + {EXPORT_CONFIG}) nor a complete checkpoint or "
            f"run directory ({e})") from e
    marker = read_marker(ckpt)
    cfg = marker.get("config") or {}
    model_cfg = cfg.get("model") or {}
    name = model_name or model_cfg.get("name")
    if not name or "num_classes" not in marker:
        raise WeightsError(f"{ckpt}: its marker names no model ('config.model.name') or 'num_classes'")
    sd = load_checkpoint_weights(ckpt, ema=ema)
    kwargs = dict(model_cfg.get("kwargs") or {})
    if model_cfg.get("img_size") is not None:
        kwargs["img_size"] = model_cfg["img_size"]
    loaded = _build(name, int(marker["num_classes"]), sd, file=str(ckpt), recorded=(model_cfg.get("name"), str(ckpt)),
                    mean=model_cfg.get("mean"), std=model_cfg.get("std"), model_args=kwargs, branch=branch)
    data = cfg.get("data") or {}
    loaded.classes = _label_names(marker.get("classes"), loaded.num_classes, where=str(ckpt)) or \
        _run_classes(data, loaded.num_classes)
    loaded.image_size = data.get("image_size")
    loaded.crop_pct = data.get("crop_pct")
    loaded.interpolation = data.get("interpolation")
    loaded.extra["data"] = data
    return loaded


def _run_classes(data: Dict[str, Any], num_classes: int) -> Optional[List[str]]:
    """The training split's class names, if the run's data is still where the run read it."""
    from fap.data import DataConfig, class_names

    try:
        names = class_names(DataConfig(**data))
    except Exception:  # the data may live on another machine; classes then come from elsewhere
        return None
    return names if len(names) == num_classes else None


def _label_names(names: Any, num_classes: int, *, where: str) -> Optional[List[str]]:
    if not names:
        return None
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    names = [str(n) for n in names]
    if len(names) != num_classes:
        raise WeightsError(f"{where}: label_names has {len(names)} entries but num_classes={num_classes}")
    return names


# --------------------------------------------------------------------------------------
# Building and the strict load
# --------------------------------------------------------------------------------------

def _build(
        name: str,
        num_classes: int,
        state_dict: Dict[str, torch.Tensor],
        *,
        file: str,
        recorded: Tuple[Optional[str], str],
        mean: Optional[Sequence[float]],
        std: Optional[Sequence[float]],
        model_args: Dict[str, Any],
        branch: str = "main",
) -> LoadedModel:
    from fap.models import create_model
    from fap.norm import select_branch

    model_args = {k: v for k, v in model_args.items() if k not in ("num_classes", "pretrained")}
    model = create_model(name, num_classes=num_classes, dual_norm=False, mean=mean, std=std, **model_args)
    try:
        sd = select_branch(_strip_prefixes(state_dict), branch)
    except ValueError as e:
        raise WeightsError(f"{file}: {e}") from e
    check_fits(model.net, sd, file=file, name=name, num_classes=num_classes, recorded=recorded)
    model.net.load_state_dict(sd, strict=True)
    model.eval()
    return LoadedModel(model=model, name=name, num_classes=num_classes, source=file, branch=branch)


def _strip_prefixes(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    from fap.checkpoint import bare_key

    return {bare_key(k): v for k, v in state_dict.items()}


def check_fits(
        net: nn.Module, state_dict: Dict[str, torch.Tensor], *, file: str, name: str, num_classes: int,
        recorded: Tuple[Optional[str], str] = (None, ""),
) -> None:
    """Raise `WeightsError` unless ``state_dict`` has exactly ``net``'s keys and shapes.

    The message names the file, up to three missing, unexpected and mis-shaped keys (with
    both shapes), what the files record as the architecture, and what would be right.
    """
    expected = net.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys the model needs are missing (e.g. {_keys(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} keys are not in the model (e.g. {_keys(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} keys have other shapes (e.g. " + ", ".join(
            f"{k!r}: file {a} vs model {b}" for k, a, b in shapes[:3]) + ")")
    recorded_name, recorded_where = recorded
    hint = ""
    if recorded_name and recorded_name != name:
        hint = f" {recorded_where} records architecture={recorded_name!r}; evaluate with that architecture."
    elif shapes and not missing and not unexpected and all(_is_classifier(k) for k, _, _ in shapes):
        hint = f" Only the classifier differs: the weights have {shapes[0][1][0]} classes, not num_classes={num_classes}."
    else:
        hint = (f" The weights were exported from another architecture than {name!r} (the name recorded with them "
                f"is wrong, or the files were mixed up): evaluate them with the timm architecture they were "
                f"trained as.")
    raise WeightsError(f"{file}: these weights do not fit timm {name!r} with num_classes={num_classes}: "
                       + "; ".join(problems) + "." + hint)


def _keys(keys: Sequence[str]) -> str:
    return ", ".join(repr(k) for k in keys[:3])


def _is_classifier(key: str) -> bool:
    return key.split(".")[0] in ("fc", "head", "classifier", "last_linear") or key.startswith("head.")
