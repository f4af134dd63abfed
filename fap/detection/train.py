"""A detection run: RetinaNet with vanilla, AdvProp or Fast AdvProp (Mei et al., ICLR 2022, Table 7).

``train_detection(cfg)`` = data -> model -> method -> updates -> COCO mAP (clean and
corrupted) -> export. The step is the methods' one ``train_step`` with a
`fap.tasks.DetectionTask`, and each update is `fap.engine.step`'s (``no_sync`` for every
pass but the last under DDP, one all-reduce), so the gradients are those the
classification engine's tests pin down. What differs from `fap.engine.train` is what a
detector needs around the step: COCO data in batches of `DetectionTargets`, SGD (or AdamW)
with linear warm-up and step decay (the 1x RetinaNet schedule), COCO mAP instead of top-1,
and a torchvision export. Checkpoints are `fap.checkpoint`'s (atomic, verified before
loading), taken at epoch ends; ``resume=auto`` continues a run bitwise (tested). Launch it
like the classification engine (``python`` for one process, ``accelerate launch`` for several).

Sharding: every process reads its own slice of the same global batch (`GlobalBatches`):
micro-batch ``j`` of process ``r`` is slice ``j·world + r`` of it. One process with
``accum_steps = 2`` therefore sees exactly the micro-batches that two processes see, each
normalised by its own BatchNorm batch, and the update is the same (tested).
"""
from __future__ import annotations

import ast
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from fap.checks import ConfigError

__all__ = ["DetectionConfig", "GlobalBatches", "parse_overrides", "train_detection", "main", "load_detector",
           "is_detection_model", "evaluate_cli"]


OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class DetectionConfig:
    """Every setting of a detection run (``--key=value`` on the command line; ``--method.KEY=value``
    for the method's own switches, e.g. ``--method.p_adv=0.2``).

    Args:
        data_path: root in the demo-det layout (``fap.data.coco.split_paths``).
        corrupt_path: a ``fap data corrupt DATA/val OUT`` copy for the corrupted mAP ("" = none).
        corrupt_severities: severities of it to score (() = every one the copy has).
        backbone: ``resnet50`` (the paper) or ``resnet18``.
        backbone_weights: a local state dict (``.safetensors``/``.pt``, e.g. a timm ResNet-50
            export of a classification run) loaded into the ResNet trunk ("" = random init).
        min_size, max_size: RetinaNet's resize (800 / 1333 on COCO).
        dual_norm, aux_group_size: auxiliary BatchNorm and its ghost groups.
        method, method_options: a `fap.methods` name and its config's switches.
        budget_matched: divide epochs and milestones by ``1 + p_adv·K`` (Fast AdvProp, Sec. 4.1).
        optimizer: ``sgd`` (momentum; the 1x RetinaNet recipe) or ``adamw`` (decoupled weight
            decay; ``momentum`` unused), with weight decay on every parameter either way.
        epochs, milestones, batch_size, accum_steps, lr, momentum, weight_decay, warmup_iters,
        warmup_factor, clip_grad: the schedule (global batch; lr for that batch).
        flip_prob: horizontal flips of training images.
        eval_batch_size, num_workers, seed, output_dir, export: as their names say.
        checkpoint_every_epochs: save a checkpoint (`fap.checkpoint`: model, optimizer, LR
            schedule, counters, every process's RNG) after every N epochs and after the last (0 = never).
        checkpoint_keep: keep the newest N checkpoints (0 = all).
        resume: ``""`` (fresh; refused if ``output_dir`` has checkpoints), ``"auto"`` (the newest
            checkpoint of ``output_dir``, if any) or a checkpoint / run directory. Only the keys in
            `RESUME_MAY_CHANGE` may differ from the checkpoint's config (e.g. more ``epochs``).
    """
    data_path: str = ""
    corrupt_path: str = ""
    corrupt_severities: Tuple[int, ...] = ()
    backbone: str = "resnet50"
    backbone_weights: str = ""
    min_size: int = 800
    max_size: int = 1333
    dual_norm: bool = True
    aux_group_size: Optional[int] = None
    method: str = "fast_advprop"
    method_options: Dict[str, Any] = field(default_factory=dict)
    budget_matched: bool = True
    epochs: int = 12
    milestones: Tuple[int, ...] = (8, 11)
    batch_size: int = 16
    accum_steps: int = 1
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    clip_grad: Optional[float] = None
    flip_prob: float = 0.5
    eval_batch_size: int = 8
    num_workers: int = 0
    seed: int = 0
    output_dir: str = "runs/detection"
    export: bool = True
    checkpoint_every_epochs: int = 1
    checkpoint_keep: int = 2
    resume: str = ""


# What a resumed run may set differently from its checkpoint: where and how it is scored, saved
# and continued. Anything else (data, model, method, optimizer, batch, seed) would train another run.
RESUME_MAY_CHANGE = ("epochs", "milestones", "corrupt_path", "corrupt_severities", "eval_batch_size", "num_workers",
                     "output_dir", "export", "checkpoint_every_epochs", "checkpoint_keep", "resume")


def parse_overrides(cfg: DetectionConfig, argv: Sequence[str]) -> DetectionConfig:
    """``--key=value`` / ``--method.KEY=value`` onto ``cfg``; values are Python literals or strings.

    Raises:
        ConfigError: an argument that is not ``--key=value``, or an unknown key (valid ones named).
    """
    valid = {f.name for f in fields(DetectionConfig)}
    changes: Dict[str, Any] = {}
    options = dict(cfg.method_options)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"{arg!r}: expected --key=value (keys: {', '.join(sorted(valid))})")
        key, raw = arg[2:].split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if key.startswith("method."):
            options[key[len("method."):]] = value
        elif key in valid:
            changes[key] = tuple(value) if isinstance(value, list) else value
        else:
            raise ConfigError(f"--{key}: unknown key; valid: {', '.join(sorted(valid))} and method.KEY")
    return replace(cfg, **changes, method_options=options)


def build_method(cfg: DetectionConfig):
    """The configured method with a `DetectionTask`; config mistakes become `ConfigError`."""
    from fap.methods import CONFIGS, build_method as _build
    from fap.tasks import DetectionTask

    if cfg.method not in CONFIGS:
        raise ConfigError(f"method={cfg.method!r}; expected one of {', '.join(CONFIGS)}")
    valid = {f.name for f in fields(CONFIGS[cfg.method])}
    unknown = sorted(set(cfg.method_options) - valid)
    if unknown:
        raise ConfigError(f"method.{unknown[0]}: not a switch of {cfg.method}; valid: {', '.join(sorted(valid))}")
    options = dict(cfg.method_options)
    if cfg.method == "advprop":
        options.setdefault("targeted", False)  # a detector has no single label to target
    if cfg.method != "vanilla":
        options.setdefault("norms", "dual" if cfg.dual_norm else "shared")
    try:
        return _build(cfg.method, CONFIGS[cfg.method](**options), task=DetectionTask())
    except ValueError as e:
        raise ConfigError(str(e)) from e


def schedule(cfg: DetectionConfig, method) -> Tuple[int, List[int]]:
    """Epochs and LR milestones, divided by ``1 + p_adv·K`` for a budget-matched Fast AdvProp."""
    from fap.methods import budget_matched

    if cfg.budget_matched and method.name == "fast_advprop":
        c = method.config
        return budget_matched(cfg.epochs, cfg.milestones, p_adv=c.p_adv, attack_steps=c.attack_steps)
    return cfg.epochs, list(cfg.milestones)


class GlobalBatches:
    """This process's micro-batches of each global batch (see the module docstring).

    Args:
        n: dataset size.
        batch_size: the global batch (all processes, all micro-batches); the last partial one is dropped.
        world, rank, accum_steps: processes, this process, micro-batches per update.
        seed: the order of epoch ``e`` is ``randperm(n)`` seeded with ``(seed, e)``.
    """

    def __init__(self, n: int, batch_size: int, *, world: int = 1, rank: int = 0, accum_steps: int = 1,
                 seed: int = 0):
        if batch_size % (world * accum_steps) or batch_size > n:
            raise ConfigError(f"batch_size={batch_size} must divide into processes ({world}) x accum_steps "
                              f"({accum_steps}) and not exceed the {n} training images")
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world, rank
        self.accum, self.seed, self.epoch = accum_steps, seed, 0
        self.micro = batch_size // (world * accum_steps)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return (self.n // self.batch_size) * self.accum

    def __iter__(self) -> Iterator[List[int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for start in range(0, self.n - self.batch_size + 1, self.batch_size):
            batch = order[start:start + self.batch_size]
            for j in range(self.accum):
                k = j * self.world + self.rank
                yield batch[k * self.micro:(k + 1) * self.micro]


def build_model(cfg: DetectionConfig, num_classes: int):
    """The `Detector`: RetinaNet, optional local trunk weights, dual BatchNorm."""
    from fap.detection.model import Detector, plain_retinanet
    from fap.norm import convert_dual_norm

    net = plain_retinanet(num_classes, backbone=cfg.backbone, min_size=cfg.min_size, max_size=cfg.max_size)
    if cfg.backbone_weights:
        _load_trunk(net, cfg.backbone_weights)
    if cfg.dual_norm:
        convert_dual_norm(net, aux_group_size=cfg.aux_group_size)
    return Detector(net, {"backbone": cfg.backbone, "num_classes": num_classes, "min_size": cfg.min_size,
                          "max_size": cfg.max_size})


def _load_trunk(net, path: str) -> None:
    """Load a ResNet state dict (timm and torchvision share the names) into the FPN's trunk; fc is dropped."""
    if not os.path.isfile(path):
        raise ConfigError(f"backbone_weights={path!r}: no such file (a .safetensors or .pt ResNet state dict)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    missing, unexpected = net.backbone.body.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(f"backbone_weights={path}: not a {type(net.backbone.body).__name__} ResNet trunk "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def make_optimizer(cfg: DetectionConfig, model, updates_per_epoch: int, milestones: Sequence[int]):
    """SGD or AdamW with linear warm-up from ``warmup_factor·lr`` over ``warmup_iters`` updates, then
    ×0.1 at each milestone."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = [m * updates_per_epoch for m in milestones]

    def factor(update: int) -> float:
        warm = 1.0
        if update < cfg.warmup_iters:
            alpha = update / cfg.warmup_iters
            warm = cfg.warmup_factor * (1 - alpha) + alpha
        return warm * 0.1 ** sum(update >= s for s in steps)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_detection(cfg: DetectionConfig) -> Dict[str, Any]:
    """Train, evaluate and export one detector; returns (and writes ``summary.json``) the results."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    from fap.checkpoint import TrainState, prune_checkpoints, register_state, save_checkpoint
    from fap.data.coco import dataset_for, num_classes_of
    from fap.engine.step import make_update

    if not cfg.data_path:
        raise ConfigError("data_path is empty: point the run at a COCO-format root (DIR/<split>/images, "
                          "DIR/annotations/instances_<split>.json), e.g. `fap data demo-det --out data/demo-det`")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer={cfg.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[  # as fap.engine: CPU DDP
        DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)])
    world, rank = accelerator.num_processes, accelerator.process_index
    if world != int(os.environ.get("WORLD_SIZE", "1")):
        raise ConfigError(f"the launcher started {os.environ['WORLD_SIZE']} processes but Accelerate sees {world}: "
                          "on a machine without GPUs launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu")
    train_set = dataset_for(cfg.data_path, "train", flip_prob=cfg.flip_prob, seed=cfg.seed)
    val_set = dataset_for(cfg.data_path, "val")
    method = build_method(cfg)
    epochs, milestones = schedule(cfg, method)
    set_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, num_classes_of(train_set.coco))
    sampler = GlobalBatches(len(train_set), cfg.batch_size, world=world, rank=rank, accum_steps=cfg.accum_steps,
                            seed=cfg.seed)
    try:
        method.check_setup(model, sampler.micro)
    except ValueError as e:
        raise ConfigError(f"batch_size={cfg.batch_size} gives {sampler.micro} images per micro-batch: {e}") from e
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         collate_fn=_collate())
    updates_per_epoch = len(sampler) // cfg.accum_steps
    optimizer, scheduler = make_optimizer(cfg, model, updates_per_epoch, milestones)
    model, optimizer = accelerator.prepare(model, optimizer)
    update = make_update(accelerator, model, optimizer, method, deepspeed=False, accum_steps=cfg.accum_steps,
                         clip_grad=cfg.clip_grad)
    run_dir = Path(cfg.output_dir)
    state = TrainState()
    register_state(accelerator, {"state": state, "scheduler": scheduler})
    resumed = _resume(accelerator, cfg, run_dir)  # restores weights, optimizer, schedule, counters, RNG
    log = _Log(run_dir, accelerator.is_main_process, append=resumed is not None)
    log.write({"type": "config", **asdict(cfg), "epochs_run": epochs, "milestones_run": milestones,
               "processes": world, "precision": accelerator.mixed_precision,
               "cost_ratio_per_step": method.cost(sampler.micro).ratio,
               **({"resumed_from": str(resumed), "start_epoch": state.epoch} if resumed else {})})

    def checkpoint() -> None:
        every, last = cfg.checkpoint_every_epochs, state.epoch == epochs
        if every > 0 and (state.epoch % every == 0 or last):
            path = save_checkpoint(accelerator, run_dir, state, {"config": asdict(cfg), "world_size": world,
                                                                 "task": "detection"}, resume_key="resume")
            prune_checkpoints(accelerator, run_dir, cfg.checkpoint_keep)
            log.write({"type": "checkpoint", "epoch": state.epoch, "step": state.step, "path": str(path)})

    start = time.time()
    step = _epochs(model, loader, sampler, update, scheduler, log, epochs, cfg.accum_steps, method.branches,
                   state, checkpoint)
    train_seconds = time.time() - start
    unwrapped = accelerator.unwrap_model(model)
    summary = {"method": method.name, "epochs": epochs, "milestones": milestones, "steps": step,
               "processes": world, "precision": accelerator.mixed_precision, "train_seconds": train_seconds,
               "cost_ratio_per_step": method.cost(sampler.micro).ratio}
    if accelerator.is_main_process:
        summary.update(evaluate_detector(unwrapped, cfg, val_set, device=accelerator.device))
        if cfg.export:
            summary["export"] = str(export_detector(unwrapped, run_dir / "export"))
        log.write({"type": "summary", **summary})
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"fap detection: {method.name} | map {summary['map']:.2f}"
              + (f" | map_corrupted {summary['map_corrupted']:.2f}" if "map_corrupted" in summary else ""))
    accelerator.wait_for_everyone()
    return summary


def _collate():
    from fap.data.coco import detection_collate

    return detection_collate


def _epochs(model, loader, sampler, update, scheduler, log, epochs: int, accum: int, branches, state,
            checkpoint) -> int:
    """The training epochs from ``state.epoch`` on: ``accum`` micro-batches per update, then
    ``checkpoint()`` after each epoch; returns the number of updates so far."""
    model.train()
    for epoch in range(state.epoch, epochs):
        sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        pending = []
        for batch in loader:
            pending.append(batch)
            if len(pending) < accum:
                continue
            result = update(pending)
            pending = []
            scheduler.step()
            state.step += 1
            state.images += sampler.batch_size
            if result.nonfinite:
                raise FloatingPointError(f"non-finite {', '.join(result.nonfinite)} in update {state.step} (epoch "
                                         f"{epoch}); lower lr or set clip_grad")
            losses = {f"loss_{b}": float(sum(m[f"loss_{b}"] * m[f"count_{b}"] for m in result.metrics)
                                         / sum(m[f"count_{b}"] for m in result.metrics))
                      for b in branches if result.metrics[0].get(f"count_{b}")}
            log.write({"type": "train", "step": state.step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                       **losses})
        state.epoch = epoch + 1
        checkpoint()
    return state.step


def _resume(accelerator, cfg: DetectionConfig, run_dir: Path) -> Optional[Path]:
    """Load the checkpoint ``cfg.resume`` names (see `DetectionConfig`); None for a fresh start.

    Raises:
        ConfigError: the checkpoint is of another experiment (a key outside `RESUME_MAY_CHANGE`
            differs, named with both values) or of another number of processes.
        CheckpointError: no such checkpoint, or one that is unsafe, damaged or of another fap.
    """
    from fap.checkpoint import load_checkpoint, remove_partial, resolve_resume, verify_checkpoint

    remove_partial(accelerator, run_dir)
    path = resolve_resume(cfg.resume, run_dir, resume_key="resume", out_key="output_dir")
    if path is None:
        return None
    marker = verify_checkpoint(path)
    if marker.get("task") != "detection":
        raise ConfigError(f"cannot resume {path}: it is not a detection checkpoint (a classification run's? "
                          "resume it with fap train)")
    saved = marker["config"]
    now = json.loads(json.dumps(asdict(cfg)))
    changed = {k: (saved.get(k), now[k]) for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k]}
    if changed:
        lines = "; ".join(f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"cannot resume {path}: the run's config differs from the checkpoint's ({lines}); resume "
                          "with the same settings, or start a new output_dir")
    if marker.get("world_size") != accelerator.num_processes:
        raise ConfigError(f"cannot resume {path}: it was written by {marker.get('world_size')} process(es), this "
                          f"run has {accelerator.num_processes}; each process's random state is in it: resume "
                          "with the same number")
    load_checkpoint(accelerator, path, marker=marker)
    return path


def evaluate_detector(model, cfg: DetectionConfig, val_set, *, device="cpu") -> Dict[str, float]:
    """Clean mAP and, when ``cfg.corrupt_path`` is set, the corrupted mAP (mean over corruptions)."""
    from fap.detection.evaluate import coco_map, corrupted_map

    out = coco_map(model, val_set, batch_size=cfg.eval_batch_size, device=device)
    if cfg.corrupt_path:
        out.update(corrupted_map(model, cfg.corrupt_path, val_set, severities=cfg.corrupt_severities or None,
                                 batch_size=cfg.eval_batch_size, device=device))
    return out


def export_detector(model, out_dir: Path) -> Path:
    """``model.safetensors`` (aux norms stripped: a plain torchvision RetinaNet) and ``config.json``."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.export_state_dict().items()}
    save_file(sd, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps({"task": "detection", "arch": model.arch}, indent=1))
    return out_dir / "model.safetensors"


class _Log:
    """``log.jsonl`` in the run directory (main process only); a resumed run appends to it."""

    def __init__(self, run_dir: Path, main: bool, *, append: bool = False):
        self.path = run_dir / "log.jsonl"
        self.main = main
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not append:
                self.path.write_text("")

    def write(self, record: Dict[str, Any]) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")


# ------------------------------------------------------------------------------------
# Loading an export; `fap eval` of a detection run
# ------------------------------------------------------------------------------------

def _export_dir(path: str) -> Optional[Path]:
    p = Path(path)
    for d in (p, p / "export"):
        cfg = d / "config.json"
        if cfg.is_file():
            try:
                if json.loads(cfg.read_text()).get("task") == "detection":
                    return d
            except ValueError:
                return None
    return None


def is_detection_model(path: str) -> bool:
    """Whether ``path`` is a detection export, or a run directory holding one."""
    return _export_dir(path) is not None


def load_detector(path: str):
    """A `Detector` (plain norms) from a detection export or run directory."""
    from safetensors.torch import load_file

    from fap.detection.model import Detector, plain_retinanet

    d = _export_dir(path)
    if d is None:
        raise ConfigError(f"{path}: not a detection export (no config.json with task 'detection')")
    arch = json.loads((d / "config.json").read_text())["arch"]
    net = plain_retinanet(arch["num_classes"], backbone=arch["backbone"], min_size=arch["min_size"],
                          max_size=arch["max_size"])
    net.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    return Detector(net, arch)


def evaluate_cli(args) -> int:
    """``fap eval RUN_OR_EXPORT --suite clean [c=CORRUPT_DIR] --data DIR`` for a detector."""
    from fap.data.coco import dataset_for
    from fap.evaluation.paper import compare, paper_result
    from fap.evaluation.report import paper_lines

    compare_row = getattr(args, "compare", None)
    if compare_row:  # an unknown row, or a classification one, fails before any evaluation
        try:
            paper_result(compare_row, task="detection")
        except ConfigError as e:
            raise ConfigError(f"--compare {compare_row}: {e}") from None
    if not args.data:
        raise ConfigError("a detection eval scores the validation split's annotations: give --data DIR")
    corrupt = [s.split("=", 1)[1] for s in args.suite if "=" in s]
    if "clean" not in args.suite and not corrupt:
        raise ConfigError(f"--suite {' '.join(args.suite)}: a detector is scored on 'clean' and/or c=CORRUPT_DIR")
    model = load_detector(args.model)
    val_set = dataset_for(args.data, args.val_split)
    cfg = DetectionConfig(data_path=args.data, corrupt_path=corrupt[0] if corrupt else "",
                          eval_batch_size=args.batch_size)
    results: Dict[str, Any] = evaluate_detector(model, cfg, val_set)
    if compare_row:
        results["paper"] = compare(results, compare_row)
    out = Path(args.out or f"eval-{Path(args.model).name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(" | ".join(f"{k} {v:.2f}" for k, v in results.items() if k in ("map", "map50", "map_corrupted")))
    if compare_row:
        print("\n" + "\n".join(paper_lines(results["paper"])))
    return 0


def main(config: DetectionConfig = DetectionConfig(), argv: Optional[Sequence[str]] = None) -> int:
    """The recipes' entry point: ``--key=value`` overrides onto ``config``, then `train_detection`."""
    import sys

    from fap.cli import run_main

    return run_main(lambda args: _train_from_args(config, args), list(sys.argv[1:] if argv is None else argv))


def _train_from_args(config: DetectionConfig, args: List[str]) -> int:
    train_detection(parse_overrides(config, args))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
