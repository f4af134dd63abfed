"""Evaluate a model the way the papers report it: clean accuracy, corruptions, renditions, attacks.

Fast AdvProp (Mei et al., ICLR 2022) and AdvProp (Xie et al., CVPR 2020) judge a model by
ImageNet top-1 and by robustness to distribution shift. One call scores any subset of:

* ``clean``: top-1/top-5 on a validation split (folder, HF ``datasets`` or FFCV ``.beton``);
* ``imagenet_c``: ImageNet-C (Hendrycks & Dietterich, ICLR 2019), layout
  ``<corruption>/<severity>/<class>/*.jpg``: per-corruption errors, the unnormalised mean
  error (the number the Fast AdvProp code reports), AlexNet-normalised mCE and relative
  mCE (see `fap.evaluation.metrics`);
* ``imagenet_r`` / ``imagenet_a``: ImageNet-R and ImageNet-A (Hendrycks et al., ICCV 2021 /
  CVPR 2021), 200-class subsets scored with the logits masked to the 200 classes
  (`fap.data.class_subsets`);
* ``sketch``: ImageNet-Sketch (Wang et al., NeurIPS 2019); ``stylized``: Stylized-ImageNet
  (Geirhos et al., ICLR 2019); ``v2``: ImageNet-V2 (Recht et al., ICML 2019; its folders are
  label indices) — ImageNet-layout folders;
* ``adversarial``: top-1 under untargeted PGD-k at ε (`fap.attacks.pgd`, ε in 1/255).

Everything runs through Accelerate on any number of processes: loaders are sharded by
``accelerator.prepare`` and per-sample results gathered with ``gather_for_metrics``, which
drops the duplicates that uneven sharding adds, so 1 and N processes give the same
numbers. Evaluation uses the main norms in eval mode (`fap.norm.route`).

Use it as ``fap eval MODEL --suite clean imagenet_c=PATH ...`` (`fap.evaluate`, which writes
``results.json`` and ``results.md``), as :func:`evaluate_model` in Python, or as
:func:`run_suite` from the training engine at the end of a run (the engine imports this
module, never the command's).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from fap.data.base import DataError, collate_uint8
from fap.data.class_subsets import SUBSETS, subset_indices
from fap.data.config import DataConfig
from fap.evaluation.config import FOLDER_SETS, SuiteConfig
from fap.evaluation.folders import ModelFolder, imagenet_c_layout, list_class_folders
from fap.evaluation.loading import LoadedModel, load_model, wrap_module
from fap.evaluation.loop import score_loader
from fap.evaluation.metrics import corruption_summary
from fap.evaluation.report import write_report

__all__ = ["FOLDER_SETS", "SuiteConfig", "evaluate_model", "run_suite", "DEFAULT_IMAGE_SIZE", "DEFAULT_CROP_PCT",
           "DEFAULT_INTERPOLATION"]

DEFAULT_IMAGE_SIZE, DEFAULT_CROP_PCT, DEFAULT_INTERPOLATION = 224, 0.875, "bilinear"
IMAGENET_CLASSES = 1000


# --------------------------------------------------------------------------------------
# The library's entry points (the training engine's final evaluation calls run_suite)
# --------------------------------------------------------------------------------------

def run_suite(
        accelerator,
        model: nn.Module,
        suite: SuiteConfig,
        *,
        data: Optional[DataConfig] = None,
        classes: Optional[Sequence[str]] = None,
        info: Optional[LoadedModel] = None,
        branch: str = "main",
) -> Dict[str, Any]:
    """Evaluate ``model`` on the sets of ``suite``; every process returns the same dict.

    Call it on every process. The model may be wrapped by ``accelerator.prepare`` (DDP,
    DeepSpeed); it is unwrapped, routed to ``branch``'s norms, put in eval mode for the
    duration and given back in the mode it was in.

    Args:
        accelerator: the run's ``Accelerator``.
        model: a `fap.models.PixelModel` (or any module taking [0, 1] pixels), on
            ``accelerator.device``.
        suite: what to evaluate.
        data: the data config whose ``val_split`` is the clean set (and the attacked
            images); required for ``suite.clean`` and ``suite.pgd_steps``.
        classes: the model's class names in label order; default: recorded with the
            weights (``info``), else the clean folder's classes, else ImageNet-1k's
            WordNet ids for a 1000-class model.
        info: what was loaded with the weights (`fap.evaluation.loading.load_model`).
        branch: ``"main"`` (what inference uses) or ``"aux"``: a dual-norm model's
            auxiliary norms, with their running statistics; the PGD attack is then made
            against that branch too.

    Returns:
        ``{"model": ..., "branch": ..., "preprocess": ..., "num_processes": N, "sets": {...}}``,
        numbers in percent (see `fap.evaluation.report` and `fap.evaluation.metrics`).
    """
    suite = suite.validate()
    if (suite.clean or suite.pgd_steps) and data is None:
        raise ValueError("suite.clean / suite.pgd_steps need the clean validation set: pass data=DataConfig(...) "
                         "(on the command line: --data PATH)")
    if data is not None and data.skip_corrupt:
        raise ValueError("data.skip_corrupt=True: evaluation counts every image, as published numbers do; "
                         "remove or repair the unreadable files instead")
    net = accelerator.unwrap_model(model)
    _check_branch(net, info, branch)
    num_classes = _num_classes(net, info)
    classes = _resolve_classes(classes, info, data, num_classes)
    prep = _preprocess(suite, data, info)
    results: Dict[str, Any] = {
        "model": {"name": (info.name if info else getattr(net, "model_name", "")) or type(net).__name__,
                  "num_classes": num_classes, "source": info.source if info else ""},
        "branch": branch, "preprocess": prep, "num_processes": accelerator.num_processes, "sets": {},
    }
    sets = results["sets"]
    context = _Context(accelerator, net, classes, num_classes, suite, prep)
    from fap.norm import route

    was_training = net.training
    net.eval()
    try:
        with route(net, branch):
            if suite.clean:
                sets["clean"] = _clean(context, data)
            if suite.pgd_steps:
                sets["adversarial"] = _adversarial(context, data)
            for key in FOLDER_SETS:
                if getattr(suite, key):
                    sets[key] = _folder_set(context, key, getattr(suite, key))
            if suite.imagenet_c:
                clean_error = None if "clean" not in sets else 1.0 - sets["clean"]["top1"] / 100.0
                sets["imagenet_c"] = _imagenet_c(context, suite.imagenet_c, clean_error)
    finally:
        net.train(was_training)
    return results


def _check_branch(net: nn.Module, info: Optional[LoadedModel], branch: str) -> None:
    """``branch`` must be one the model has: its auxiliary norms, or loaded in place of the main ones."""
    from fap.norm import NORM_BRANCHES, has_dual_norm

    if branch not in NORM_BRANCHES:
        raise ValueError(f"branch={branch!r}: expected one of {', '.join(NORM_BRANCHES)}")
    loaded = info.branch if info is not None else "main"
    if branch == "aux" and not has_dual_norm(net) and loaded != "aux":
        raise ValueError("branch='aux' needs a model with auxiliary norms (fap.models.create_model(..., "
                         "dual_norm=True)) or one loaded with load_model(..., branch='aux')")
    if branch == "main" and loaded == "aux":
        raise ValueError("the model was loaded with its auxiliary norms (branch='aux'); evaluate it with branch='aux'")


@dataclass
class _Context:
    accelerator: Any
    model: nn.Module
    classes: Optional[List[str]]
    num_classes: int
    suite: SuiteConfig
    prep: Dict[str, Any]


def _num_classes(net: nn.Module, info: Optional[LoadedModel]) -> int:
    if info is not None:
        return info.num_classes
    inner = getattr(net, "net", net)
    n = getattr(inner, "num_classes", None)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"cannot tell how many classes {type(inner).__name__} predicts (no num_classes attribute); "
                         "pass a timm model or a fap PixelModel")
    return n


def _resolve_classes(classes, info, data, num_classes) -> Optional[List[str]]:
    if isinstance(classes, str):
        with open(classes) as f:
            classes = [line.strip() for line in f if line.strip()]
    if classes is not None:
        classes = [str(c) for c in classes]
        if len(classes) != num_classes:
            raise ValueError(f"classes has {len(classes)} names but the model has {num_classes} outputs")
        return classes
    if info is not None and info.classes:
        return list(info.classes)
    if data is not None and data.source in ("folder", "demo") and data.path:
        folder = os.path.join(os.path.expanduser(data.path), data.val_split)
        if os.path.isdir(folder):
            names = list_class_folders(folder)
            if len(names) == num_classes:
                return names
    if num_classes == IMAGENET_CLASSES:
        from timm.data import ImageNetInfo

        return list(ImageNetInfo("imagenet-1k").label_names())
    return None


def _preprocess(suite: SuiteConfig, data: Optional[DataConfig], info: Optional[LoadedModel]) -> Dict[str, Any]:
    def pick(key, default):
        for value in (getattr(suite, key), getattr(data, key, None) if data is not None else None,
                      getattr(info, key, None) if info is not None else None):
            if value is not None:
                return value
        return default

    return {"image_size": int(pick("image_size", DEFAULT_IMAGE_SIZE)),
            "crop_pct": float(pick("crop_pct", DEFAULT_CROP_PCT)),
            "interpolation": str(pick("interpolation", DEFAULT_INTERPOLATION))}


# --------------------------------------------------------------------------------------
# Sets
# --------------------------------------------------------------------------------------

def _transform(prep: Dict[str, Any], *, crop_pct: Optional[float] = None):
    from fap.data.transforms import build_transform

    interpolation = prep["interpolation"] if prep["interpolation"] != "random" else "bilinear"
    cfg = DataConfig(image_size=prep["image_size"], crop_pct=prep["crop_pct"] if crop_pct is None else crop_pct,
                     interpolation=interpolation)
    return build_transform(cfg, train=False)


def _loader(context: _Context, dataset):
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=context.suite.batch_size, shuffle=False, drop_last=False,
        num_workers=context.suite.num_workers, collate_fn=collate_uint8,
        pin_memory=context.accelerator.device.type == "cuda",
    )
    return context.accelerator.prepare_data_loader(loader)


def _bar(context: _Context, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True,
                disable=not context.accelerator.is_local_main_process)


def _score(context: _Context, loader, desc: str, *, prepared: bool = True, **kwargs) -> Dict[str, int]:
    bar = _bar(context, len(loader), desc)
    try:
        return score_loader(context.accelerator, context.model, loader, prepared=prepared, progress=bar, **kwargs)
    finally:
        bar.close()


def _percent(counts: Dict[str, int], key: str) -> float:
    return 100.0 * counts[key] / counts["images"] if counts["images"] else float("nan")


def _clean_source(context: _Context, data: DataConfig) -> Tuple[Any, bool, str]:
    """The clean validation split as (loader, prepared?, path)."""
    data = dataclasses.replace(data, image_size=context.prep["image_size"], crop_pct=context.prep["crop_pct"],
                               interpolation=context.prep["interpolation"], num_workers=context.suite.num_workers)
    if data.source in ("folder", "demo"):
        from fap.data.folder import split_dir

        if data.source == "demo":
            from fap.data.demo import make_demo

            make_demo(data.path)
        folder = split_dir(os.path.expanduser(data.path), data.val_split)
        dataset = ModelFolder(folder, model_classes=context.classes, num_classes=context.num_classes,
                              transform=_transform(context.prep), name="the clean set")
        return dataset, True, folder
    if data.source == "hf":
        from fap.data import build_dataset

        dataset = build_dataset(data, "val", train=False)
        names = list(getattr(dataset, "classes", []) or [])
        if context.classes is not None and names and names != list(context.classes):
            raise DataError(f"{data.path} [{data.val_split}]: its class names ({names[:3]} ...) are not the model's "
                            f"({list(context.classes)[:3]} ...) in label order")
        return dataset, True, f"{data.path} [{data.val_split}]"
    from fap.data import build_loader

    acc = context.accelerator
    loader = build_loader(data, "val", batch_size=context.suite.batch_size, train=False,
                          num_processes=acc.num_processes, process_index=acc.process_index, drop_last=False)
    return loader, False, f"{data.path}/{data.val_split}.beton"


def _clean(context: _Context, data: DataConfig) -> Dict[str, Any]:
    suite = context.suite
    source, is_dataset, path = _clean_source(context, data)
    if is_dataset:
        source = _evenly_spaced(source, suite.clean_max_images)
        counts = _score(context, _loader(context, source), "clean", per_image=suite.per_image)
    else:
        if suite.clean_max_images:
            raise ValueError("suite.clean_max_images needs a folder or hf clean set (an FFCV loader cannot be subset)")
        counts = _score(context, source, "clean", prepared=False, per_image=suite.per_image)
    out = {"path": path, "images": counts["images"], "top1": _percent(counts, "top1"),
           "top5": _percent(counts, "top5")}
    if suite.per_image:
        out["correct"] = "".join(str(int(v)) for v in counts["correct"].tolist())
    return out


def _evenly_spaced(dataset, n: int):
    """At most ``n`` evenly spaced samples of ``dataset`` (all when ``n`` is 0 or covers it)."""
    if not n or n >= len(dataset):
        return dataset
    step = len(dataset) / n
    return torch.utils.data.Subset(dataset, [int(i * step) for i in range(n)])


def _adversarial(context: _Context, data: DataConfig) -> Dict[str, Any]:
    from fap.attacks import pgd

    suite = context.suite
    source, is_dataset, path = _clean_source(context, data)
    if suite.pgd_max_images:
        if not is_dataset:
            raise ValueError("suite.pgd_max_images needs a folder or hf clean set (an FFCV loader cannot be subset)")
        source = _evenly_spaced(source, suite.pgd_max_images)
    acc = context.accelerator
    generator = torch.Generator(device=acc.device).manual_seed(suite.seed + acc.process_index)
    attack = functools.partial(pgd, epsilon=suite.pgd_epsilon, steps=suite.pgd_steps, step=suite.pgd_step,
                               random_init_prob=suite.pgd_random_init_prob, generator=generator)
    desc = f"PGD-{suite.pgd_steps}"
    counts = (_score(context, _loader(context, source), desc, attack=attack) if is_dataset
              else _score(context, source, desc, attack=attack, prepared=False))
    eps = suite.pgd_epsilon
    step = suite.pgd_step if suite.pgd_step is not None else (min(max(1.0, eps / suite.pgd_steps), eps) if eps else 0.0)
    return {"path": path, "epsilon": eps, "steps": suite.pgd_steps, "step": step,
            "random_init_prob": suite.pgd_random_init_prob, "images": counts["images"],
            "clean_top1": _percent(counts, "top1"), "top1": _percent(counts, "adv_top1"),
            "top5": _percent(counts, "adv_top5")}


def _folder_set(context: _Context, key: str, root: str) -> Dict[str, Any]:
    title, subset_name = FOLDER_SETS[key]
    root = os.path.expanduser(root)
    subset = allowed = None
    if subset_name is not None:
        allowed = SUBSETS[subset_name]
        if context.classes is None:
            raise ValueError(f"{title} is scored with the logits masked to its 200 classes, which needs the model's "
                             f"class names (ImageNet-1k WordNet ids); pass classes=... / --classes FILE")
        subset = torch.tensor(subset_indices(context.classes, allowed, name=title), dtype=torch.long,
                              device=context.accelerator.device)
    dataset = ModelFolder(root, model_classes=context.classes, num_classes=context.num_classes,
                          transform=_transform(context.prep), allowed=allowed, name=title)
    counts = _score(context, _loader(context, dataset), title, subset=subset)
    return {"path": root, "images": counts["images"], "classes": len(dataset.classes),
            "masked_to": None if subset is None else len(allowed), "top1": _percent(counts, "top1"),
            "top5": _percent(counts, "top5")}


def _imagenet_c(context: _Context, root: str, clean_error: Optional[float]) -> Dict[str, Any]:
    root = os.path.expanduser(root)
    layout = imagenet_c_layout(root, context.suite.corruptions or None)
    transform = _transform(context.prep, crop_pct=1.0)
    folders = [(c, s, folder) for c, severities in layout.items() for s, folder in severities.items()]
    errors: Dict[str, List[float]] = {}
    images, bar = 0, None
    try:
        for corruption, severity, folder in folders:  # one folder listed at a time: ImageNet-C has 75 x 50k images
            dataset = ModelFolder(folder, model_classes=context.classes, num_classes=context.num_classes,
                                  transform=transform, name=f"ImageNet-C {corruption}/{severity}")
            loader = _loader(context, dataset)
            if bar is None:  # the sets are normally the same size: estimate, then correct as they come
                bar = _bar(context, len(loader) * len(folders), "ImageNet-C")
                expected = len(loader)
            elif len(loader) != expected:
                bar.total += len(loader) - expected
                bar.refresh()
            bar.set_postfix_str(f"{corruption} {severity}")
            counts = score_loader(context.accelerator, context.model, loader, progress=bar)
            errors.setdefault(corruption, []).append(1.0 - counts["top1"] / counts["images"])
            images += counts["images"]
    finally:
        if bar is not None:
            bar.close()
    # AlexNet's errors normalise ImageNet-C only: a model of ImageNet's 1000 classes
    normalised = context.num_classes == IMAGENET_CLASSES
    return {"path": root, "images": images, **corruption_summary(errors, clean_error, alexnet_normalised=normalised)}


# --------------------------------------------------------------------------------------
# Python entry point
# --------------------------------------------------------------------------------------

def evaluate_model(
        model: Union[str, nn.Module, LoadedModel],
        suite: Optional[SuiteConfig] = None,
        *,
        data: Optional[DataConfig] = None,
        classes: Optional[Union[str, Sequence[str]]] = None,
        model_name: Optional[str] = None,
        ema: bool = False,
        accelerator=None,
        out_dir: Optional[str] = None,
        branch: str = "main",
) -> Dict[str, Any]:
    """Load (if needed) and evaluate a model; optionally write ``results.json`` / ``results.md``.

    Args:
        model: an export or checkpoint path (`fap.evaluation.loading.load_model`), a
            `fap.models.PixelModel` / timm model, or a `LoadedModel`.
        suite: what to evaluate (default: clean top-1/top-5 only).
        data: the clean validation set's data config (``val_split`` of ``path``).
        classes: the model's class names in label order, or a file with one per line.
        model_name: timm architecture, overriding what the files record.
        ema: evaluate a checkpoint's EMA weights.
        accelerator: an ``Accelerator``; default a new one (``accelerate launch`` decides
            processes and precision).
        out_dir: if set, the main process writes the report there.
        branch: ``"main"`` norms, or ``"aux"``: the auxiliary norms of a dual-norm model or
            checkpoint (an export has none; that is an error).

    Returns:
        The results dict of :func:`run_suite`.
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator()
    if isinstance(model, (str, os.PathLike)):
        info = load_model(str(model), model_name=model_name, ema=ema, branch=branch)
    elif isinstance(model, LoadedModel):
        info = model
    else:
        info = None
    module = wrap_module(info.model if info else model)
    module = accelerator.prepare_model(module, evaluation_mode=True)
    results = run_suite(accelerator, module, suite or SuiteConfig(), data=data, classes=classes, info=info,
                        branch=branch)
    if out_dir and accelerator.is_main_process:
        write_report(results, out_dir)
    accelerator.wait_for_everyone()
    return results
