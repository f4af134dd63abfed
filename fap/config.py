"""Typed configuration of a training run, and ``--section.key=value`` command-line overrides.

A run is described by one `TrainConfig`: its ``task`` (``classification`` or
``detection``, `fap.tasks`) and a handful of plain dataclass sections (``train``, ``data``,
``model``, ``method``, ``optim``, ``sched``, ``mixup``, ``ema``, ``checkpoint``, ``log``,
``final_eval``, ``detection``). Recipes are plain Python that build one and call `fap.train`
(the nanoGPT / accelerate-examples style); `parse_args` applies command-line overrides
on top, with types taken from the dataclass annotations:

    python recipes/resnet50.py --train.batch_size=512 --optim.lr=0.2 --method vanilla
    python recipes/resnet50.py --method.p_adv=0.25 --sched.milestones=25,50,75,83

The ``data`` section is `fap.data.DataConfig` and the ``method`` section is the chosen
method's own dataclass (`fap.methods.CONFIGS`), so neither is duplicated here: ``--method
NAME`` swaps the section for ``CONFIGS[NAME]()`` and ``--method.KEY=VALUE`` sets one of its
fields; ``--task=detection`` picks the task. Unknown sections and keys, values of the wrong type, and choices outside a
``Literal`` are errors that name the key and what would be valid.

This module imports only the sections' schema modules (`fap.data.config`,
`fap.evaluation.config`, `fap.detection.config`, `fap.methods.config`) and `fap.checks`,
none of which imports torch: ``--help`` and config errors answer without loading it.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

from fap.checks import ConfigError, choices_text, literal_choices
from fap.data.config import DETECTION_SOURCES, DataConfig
from fap.detection.config import DetectionSection
from fap.evaluation.config import SuiteConfig
from fap.methods.config import CONFIGS as METHOD_CONFIGS

__all__ = [
    "ConfigError",
    "RunSection",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "MixupConfig",
    "EMAConfig",
    "CheckpointConfig",
    "LogConfig",
    "TrainConfig",
    "TASKS",
    "method_name",
    "apply_overrides",
    "parse_args",
    "peek_method",
    "to_dict",
    "from_dict",
    "validate",
    "diff",
]


Precision = Literal["auto", "fp32", "bf16"]


@dataclass
class RunSection:
    """The ``train`` section: batch, length, precision and the switches of the loop.

    Args:
        name: run name, used for trackers and the default output directory.
        seed: seeds model initialisation (identical on every rank), data order and the
            method's randomness (one stream per rank).
        epochs: length of the run and of the LR schedule.
        batch_size: **global** loader batch per optimizer update, summed over processes
            and accumulation micro-batches (Fast AdvProp's 320 = 256 clean + 64
            adversarial). Each process loads ``batch_size / (processes * accum_steps)``.
        accum_steps: micro-batches per optimizer update (gradient accumulation).
        eval_batch_size: global evaluation batch; None = ``batch_size``.
        precision: ``"fp32"``, ``"bf16"`` (autocast; DeepSpeed: its bf16 mode) or
            ``"auto"`` (what ``accelerate launch`` was told).
        channels_last: NHWC memory format for model and images (faster convs on GPU).
        compile: ``torch.compile`` the network in place (``nn.Module.compile``).
        compile_backend: the torch.compile backend (``"inductor"``; ``"eager"`` to debug).
        max_steps: stop after this many optimizer updates (smoke runs); the LR schedule
            still spans ``epochs``. None runs all epochs.
        eval_every: evaluate every N epochs (and always at the end); 0 only at the end.
        reference_epochs: the vanilla budget this run is compared with (e.g. 105 for
            ResNet-50), for the whole-run cost ratio in the summary; None = ``epochs``.
        nonfinite: what a NaN/Inf loss does: ``"stop"`` the run with an error naming the
            update, the branch (clean / noisy / adversarial) and the last good checkpoint,
            before the update is applied; or ``"skip"`` the update (weights, optimizer,
            norm statistics and EMA untouched), counted in the log and summary. Not
            available under DeepSpeed, whose engine steps inside its own call.
        dist_timeout_s: seconds a collective may wait for another process before this
            one fails (a dead rank ends the run instead of hanging it).
    """
    name: str = "run"
    seed: int = 0
    epochs: int = 100
    batch_size: int = 256
    accum_steps: int = 1
    eval_batch_size: Optional[int] = None
    precision: Precision = "auto"
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    max_steps: Optional[int] = None
    eval_every: int = 1
    reference_epochs: Optional[int] = None
    nonfinite: Literal["stop", "skip"] = "stop"
    dist_timeout_s: int = 1800


@dataclass
class ModelConfig:
    """The ``model`` section: a timm model that takes [0, 1] pixels (`fap.models.create_model`).

    Args:
        name: timm model name (``resnet50``, ``efficientnet_b0``, ``vit_base_patch16_224``).
        num_classes: classifier width; None reads it from the data.
        dual_norm: auxiliary norms for the adversarial branch (AdvProp / Fast AdvProp).
        aux_group_size: ghost-batch size of auxiliary BatchNorm statistics (emulates
            per-GPU BN groups on fewer devices, needed by Shuffling BN).
        mean, std: input normalisation in [0, 1] units; None = the timm pretrained config.
        img_size: input size for models that need it (ViT); None = the model's default.
        drop_path_rate: stochastic depth.
        kwargs: more ``timm.create_model`` arguments, e.g. ``{"depth": 2, "patch_size": 8}``.
        init_from: start from converged weights instead of random ones (fine-tuning, as
            AdvProp does from vanilla models): a run directory (its newest complete
            checkpoint), a checkpoint directory (``checkpoints/step_*``) or a ``.safetensors``
            file (``fap export``'s). Weights without auxiliary norms give a dual-norm model
            auxiliary norms copied from the main ones; a dual-norm run's go in as stored
            (`fap.finetune`). A resumed run loads its checkpoint instead. None = random weights.
    """
    name: str = "resnet50"
    num_classes: Optional[int] = None
    dual_norm: bool = True
    aux_group_size: Optional[int] = None
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    img_size: Optional[int] = None
    drop_path_rate: float = 0.0
    kwargs: Dict[str, Any] = field(default_factory=dict)
    init_from: Optional[str] = None


@dataclass
class OptimConfig:
    """The ``optim`` section: a timm optimizer (`timm.optim.create_optimizer_v2`).

    Args:
        opt: timm optimizer name (``"sgd"`` is Nesterov in timm, ``"momentum"`` is plain
            SGD with momentum, ``"adamw"``, ``"lamb"``, ...).
        lr: learning rate at ``lr_base_size`` images per update.
        lr_base_size: the LR is scaled linearly by ``train.batch_size / lr_base_size``
            (Goyal et al. 2017); 0 uses ``lr`` as given.
        weight_decay: decoupled for AdamW, L2 for SGD.
        no_decay_norm_bias: no weight decay on norm parameters, biases and the model's
            ``no_weight_decay()`` set (timm ``filter_bias_and_bn``).
        momentum: for SGD-type optimizers.
        betas: for Adam-type optimizers; None = the optimizer's default.
        eps: optimizer epsilon; None = default.
        clip_grad: clip the global gradient norm to this value; None = no clipping.
        layer_decay: layer-wise LR decay (timm, for ViT fine-tuning); None = off.
    """
    opt: str = "momentum"
    lr: float = 0.1
    lr_base_size: int = 256
    weight_decay: float = 1e-4
    no_decay_norm_bias: bool = True
    momentum: float = 0.9
    betas: Optional[Tuple[float, float]] = None
    eps: Optional[float] = None
    clip_grad: Optional[float] = None
    layer_decay: Optional[float] = None


@dataclass
class ScheduleConfig:
    """The ``sched`` section: a timm LR schedule stepped per optimizer update.

    Args:
        sched: ``"cosine"``, ``"multistep"`` (``milestones``), ``"step"``, ``"constant"``
            or ``"none"`` (timm scheduler names).
        warmup_epochs: linear warm-up length (epochs, may be fractional).
        warmup_lr: LR at the start of warm-up.
        min_lr: floor of the cosine schedule.
        milestones: epochs at which ``multistep`` multiplies the LR by ``decay_rate``.
        decay_rate: multiplier at each milestone / step.
        decay_epochs: interval of the ``step`` schedule.
        cooldown_epochs: epochs at ``min_lr`` after the schedule (added to ``train.epochs``
            by timm; keep 0 unless you mean it).
    """
    sched: Literal["cosine", "multistep", "step", "constant", "none"] = "cosine"
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    milestones: Tuple[int, ...] = ()
    decay_rate: float = 0.1
    decay_epochs: Optional[float] = None
    cooldown_epochs: int = 0


@dataclass
class MixupConfig:
    """The ``mixup`` section: timm Mixup/CutMix, applied by the method to the clean part only.

    Enabled when ``mixup_alpha > 0`` or ``cutmix_alpha > 0``.
    """
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = 0.1

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@dataclass
class EMAConfig:
    """The ``ema`` section: timm ``ModelEmaV3`` of the weights, evaluated each epoch.

    Under DeepSpeed ZeRO-3 and FSDP2 an EMA is refused: it needs a full replica of the
    weights on every rank, which is what sharding exists to avoid (use DDP or ZeRO-2, or no EMA).

    Args:
        enabled: keep an EMA.
        decay: EMA decay per update.
        warmup: timm's decay warm-up (``use_warmup``).
        fp32: keep the EMA in fp32 even when the model runs in bf16 (DeepSpeed bf16).
    """
    enabled: bool = False
    decay: float = 0.9998
    warmup: bool = False
    fp32: bool = True


@dataclass
class CheckpointConfig:
    """The ``checkpoint`` section: Accelerate state saved atomically, resume, export.

    Args:
        every_steps: also save every N optimizer updates (0: at epoch ends only).
        every_epochs: save at the end of every N epochs (0: never at epoch ends).
        keep: keep the newest N complete checkpoints (0 keeps all).
        resume: ``""`` starts fresh (and refuses an output directory that already has
            checkpoints), ``"auto"`` continues from the newest complete checkpoint of this
            run if there is one, or a path to a checkpoint or run directory.
        export: write the aux-stripped timm model (safetensors) at the end.
        on_signal: on SIGTERM or SIGUSR1 (a scheduler pre-empting the job) finish the
            update in flight, save a checkpoint and exit with status 143, instead of dying
            with up to ``every_steps`` updates lost.
    """
    every_steps: int = 0
    every_epochs: int = 1
    keep: int = 2
    resume: str = ""
    export: bool = True
    on_signal: bool = True


@dataclass
class LogConfig:
    """The ``log`` section: where the run writes, and how it reports.

    Args:
        output_dir: the run directory (config, JSON-lines log, checkpoints, export,
            tracker files); None = ``runs/<train.name>``.
        trackers: accelerate trackers (``"tensorboard"``, ``"wandb"``, ...); () for none.
        every_steps: log training metrics every N updates.
        progress: a progress bar on the main process.
    """
    output_dir: Optional[str] = None
    trackers: Tuple[str, ...] = ("tensorboard",)
    every_steps: int = 10
    progress: bool = True


MethodConfig = Any  # one of fap.methods.CONFIGS' dataclasses

Task = Literal["classification", "detection"]
TASKS = typing.get_args(Task)


@dataclass
class TrainConfig:
    """A whole run. ``method`` is an instance of one of `fap.methods.CONFIGS`.

    ``task`` picks what the run trains (`fap.tasks`): a timm classifier (``model``) on
    class-labelled images, or a RetinaNet (``detection``) on COCO-format boxes
    (``data.source`` ``coco`` or ``demo-det``). Every other section means the same for both.
    """
    task: Task = "classification"
    train: RunSection = field(default_factory=RunSection)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=lambda: METHOD_CONFIGS["fast_advprop"]())
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: ScheduleConfig = field(default_factory=ScheduleConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # The robustness suite run once on the final weights (`fap.evaluation.suite.run_suite`); off
    # unless a set or PGD is named, e.g. --final_eval.imagenet_c=/data/imagenet-c.
    final_eval: SuiteConfig = field(default_factory=lambda: SuiteConfig(clean=False))
    detection: DetectionSection = field(default_factory=DetectionSection)

    @property
    def output_dir(self) -> str:
        return self.log.output_dir or f"runs/{self.train.name}"


SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "task")


def method_name(method_cfg: Any) -> str:
    """The `fap.methods` name of a method config instance (``"fast_advprop"``, ...)."""
    for name, cls in METHOD_CONFIGS.items():
        if type(method_cfg) is cls:
            return name
    raise ConfigError(
        f"method={method_cfg!r} is not a method config; expected an instance of one of "
        + ", ".join(f"{c.__name__} ({n})" for n, c in METHOD_CONFIGS.items())
    )


# ------------------------------------------------------------------------------------
# Types: parsing text into annotated types, and checking values against them
# ------------------------------------------------------------------------------------

def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    choices = literal_choices(tp)
    if choices is not None:
        return choices_text(choices)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or None" if len(args) < len(typing.get_args(tp)) else inner
    if origin in (tuple, list):
        args = typing.get_args(tp)
        item = _type_name(args[0]) if args else "value"
        return f"a list of {item} (e.g. 1,2,3)"
    if tp is tuple or tp is list:
        return "a list (e.g. 1,2,3)"
    if origin is dict or tp is dict:
        return 'a JSON object (e.g. {"depth": 2})'
    if tp is Any:
        return "any value"
    return {bool: "true or false", int: "an int", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _parse(text: str, tp: Any, key: str) -> Any:
    """Parse command-line ``text`` as type ``tp``; ConfigError naming ``key`` otherwise."""
    def bad() -> ConfigError:
        return ConfigError(f"--{key}={text!r}: expected {_type_name(tp)}")

    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _parse(text, arg, key)
            except ConfigError:
                continue
        raise bad()
    if origin is Literal:
        for choice in typing.get_args(tp):
            if str(choice) == text:
                return choice
        raise bad()
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise bad()
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise bad() from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise bad() from None
    if tp is str:
        return text
    if origin in (tuple, list) or tp in (tuple, list):
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                items = json.loads(stripped)
            except json.JSONDecodeError:
                raise bad() from None
            items = [str(i) if not isinstance(i, str) else i for i in items]
        else:
            items = [s.strip() for s in stripped.split(",") if s.strip()] if stripped else []
        try:
            values = [_parse(i, item_tp, key) for i in items]
        except ConfigError:
            raise bad() from None
        if origin is tuple and len(args) >= 2 and args[-1] is not Ellipsis and len(values) != len(args):
            raise ConfigError(f"--{key}={text!r}: expected {len(args)} values")
        return list(values) if (origin is list or tp is list) else tuple(values)
    if origin is dict or tp is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise bad() from None
        if not isinstance(value, dict):
            raise bad()
        return value
    if tp is Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    raise ConfigError(f"--{key}: cannot parse values of type {tp!r} from the command line")


def _conforms(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Union:
        return any(_conforms(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        args = typing.get_args(tp)
        if not args:
            return True
        if origin is tuple and len(args) >= 2 and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args))
        return all(_conforms(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _check_types(section: str, obj: Any) -> None:
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        tp = hints.get(f.name, Any)
        if not _conforms(value, tp):
            raise ConfigError(f"{section}.{f.name}={value!r}: expected {_type_name(tp)}")


# ------------------------------------------------------------------------------------
# Overrides
# ------------------------------------------------------------------------------------

def _section_fields(obj: Any) -> List[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _set(cfg: TrainConfig, dotted: str, text: str) -> TrainConfig:
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r} in --{dotted}; valid sections: {', '.join(SECTIONS)}")
    if not key:
        raise ConfigError(f"--{dotted} names a section, not a key; use --{section}.KEY=VALUE "
                          f"with KEY one of {', '.join(_section_fields(getattr(cfg, section)))}")
    obj = getattr(cfg, section)
    valid = _section_fields(obj)
    if key not in valid:
        where = f"method {method_name(obj)!r}" if section == "method" else f"section {section!r}"
        raise ConfigError(f"unknown key {key!r} in --{dotted}: {where} has {', '.join(valid)}")
    tp = _hints(type(obj)).get(key, Any)
    value = _parse(text, tp, dotted)
    new = dataclasses.replace(obj, **{key: value})  # re-runs __post_init__ checks (DataConfig)
    return dataclasses.replace(cfg, **{section: new})


def _set_method(cfg: TrainConfig, name: str) -> TrainConfig:
    if name not in METHOD_CONFIGS:
        raise ConfigError(f"--method={name!r}: choose one of {', '.join(sorted(METHOD_CONFIGS))}")
    if method_name(cfg.method) == name:
        return cfg
    return dataclasses.replace(cfg, method=METHOD_CONFIGS[name]())


def _split_args(argv: Sequence[str]) -> List[Tuple[str, Optional[str]]]:
    """``["--a.b=1", "--c.d", "2", "--smoke"]`` -> ``[("a.b", "1"), ("c.d", "2"), ("smoke", None)]``."""
    out: List[Tuple[str, Optional[str]]] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            k, v = body.split("=", 1)
            out.append((k, v))
        elif body in ("smoke", "help"):
            out.append((body, None))
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append((body, args[i + 1]))
            i += 1
        else:
            raise ConfigError(f"--{body} needs a value (--{body}=VALUE)")
        i += 1
    return out


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply ``--section.key=value`` (or ``--section.key value``) overrides.

    ``--method NAME`` is applied first, so ``--method vanilla --method.label_smoothing=0.1``
    works in either order. Returns a new config; ``cfg`` is not modified.
    """
    pairs = _split_args(overrides)
    for key, value in pairs:
        if key == "method":
            cfg = _set_method(cfg, value)
        elif key == "task":
            cfg = dataclasses.replace(cfg, task=_parse(value or "", Task, "task"))
    for key, value in pairs:
        if key in ("method", "task"):
            continue
        if value is None:
            raise ConfigError(f"--{key} is not an override; use --section.key=value")
        cfg = _set(cfg, key, value)
    return cfg


def describe(cfg: TrainConfig) -> str:
    """Every overridable key with its type and current value (for ``--help``)."""
    lines = ["Overrides: --section.key=value  (--method NAME picks the method: "
             + ", ".join(sorted(METHOD_CONFIGS)) + "; --task NAME the task: " + ", ".join(TASKS) + ")",
             f"  --task={cfg.task!r}"]
    for section in SECTIONS:
        obj = getattr(cfg, section)
        title = f"[{section}]" + (f"  ({method_name(obj)})" if section == "method" else "")
        lines.append(title)
        hints = _hints(type(obj))
        for f in dataclasses.fields(obj):
            lines.append(f"  --{section}.{f.name}={getattr(obj, f.name)!r}    ({_type_name(hints.get(f.name, Any))})")
    return "\n".join(lines)


def peek_method(argv: Optional[Sequence[str]] = None, default: str = "fast_advprop") -> str:
    """The method named by ``--method NAME`` / ``--method=NAME`` in ``argv`` (default ``sys.argv[1:]``).

    For recipes whose settings depend on the method (e.g. budget-matched epochs): read the
    method first, build the config for it, then `parse_args` the rest.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):
        if arg.startswith("--method="):
            name = arg.split("=", 1)[1]
        elif arg == "--method" and i + 1 < len(argv):
            name = argv[i + 1]
        else:
            continue
        if name not in METHOD_CONFIGS:
            raise ConfigError(f"--method={name!r}: choose one of {', '.join(sorted(METHOD_CONFIGS))}")
        return name
    return default


def parse_args(
        cfg: TrainConfig,
        argv: Optional[Sequence[str]] = None,
        *,
        smoke: Optional[Callable[[TrainConfig], TrainConfig]] = None,
) -> TrainConfig:
    """A recipe's command line: ``[--smoke] [--method NAME] [--section.key=value ...]``.

    Args:
        cfg: the recipe's config.
        argv: arguments (default ``sys.argv[1:]``).
        smoke: the recipe's smoke transformation (tiny model and data, a few steps),
            applied first when ``--smoke`` is given, so later overrides still win.

    Returns:
        The validated config. ``--help`` prints every key and exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pairs = _split_args(argv)
    if any(k == "help" for k, _ in pairs):
        print(describe(cfg))
        raise SystemExit(0)
    if any(k == "smoke" for k, _ in pairs):
        if smoke is None:
            raise ConfigError("--smoke: this recipe has no smoke mode")
        cfg = smoke(cfg)
    rest = [a for a in argv if a != "--smoke"]
    cfg = apply_overrides(cfg, rest)
    return validate(cfg)


# ------------------------------------------------------------------------------------
# Validation of the whole config (types, then consistency between sections)
# ------------------------------------------------------------------------------------

def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check types of every field and consistency between sections; return ``cfg``.

    Checks that need the world size (divisibility of the batch) happen in the engine.
    Every check but the last (``optim.opt`` against timm's registry) is pure Python, so a
    config error answers without loading torch.
    """
    _require(isinstance(cfg, TrainConfig), f"expected a TrainConfig, got {type(cfg).__name__}")
    _require(cfg.task in TASKS, f"task={cfg.task!r}: expected {choices_text(TASKS)}")
    for section in SECTIONS:
        obj = getattr(cfg, section)
        if section == "method":
            method_name(obj)
        elif section == "data":
            _require(isinstance(obj, DataConfig), f"data must be a fap.data.DataConfig, got {type(obj).__name__}")
            _section_validate(obj.validate)
            continue
        _check_types(section, obj)
    _check_values(cfg)
    _section_validate(cfg.detection.validate)
    _check_task(cfg)
    # Each method checks its own switches, and those that depend on the other sections.
    _section_validate(lambda: cfg.method.validate(model_dual_norm=cfg.model.dual_norm,
                                                  mixup_enabled=cfg.mixup.enabled))
    _check_optimizer(cfg.optim.opt)  # last: timm's registry loads torch, every other check does not
    return cfg


def _check_optimizer(opt: str) -> None:
    """``optim.opt`` names a timm optimizer (the registry imports timm, and so torch)."""
    from timm.optim import list_optimizers

    _require(opt.lower() in list_optimizers(),
             f"optim.opt={opt!r} is not a timm optimizer; e.g. sgd, momentum, adamw, lamb "
             "(timm.optim.list_optimizers() has them all)")


def _section_validate(check: Callable[[], Any]) -> None:
    """Run a section's own ``validate``; a plain ``ValueError`` it raises becomes a `ConfigError`."""
    try:
        check()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_task(cfg: TrainConfig) -> None:
    """The data source must be one of the task's."""
    source = cfg.data.source
    if cfg.task == "detection":
        _require(source in DETECTION_SOURCES,
                 f"data.source={source!r} with task='detection': a detector trains on boxes; use "
                 f"{choices_text(DETECTION_SOURCES)} (a COCO-format root at data.path)")
    else:
        _require(source not in DETECTION_SOURCES,
                 f"data.source={source!r} is a detection source; add --task=detection, or use a classification "
                 "source (folder, hf, ffcv, demo)")


def _check_values(cfg: TrainConfig) -> None:
    """Ranges of the sections `fap.config` defines, and consistency between them."""
    t, o, s, m, e, c, lg = cfg.train, cfg.optim, cfg.sched, cfg.mixup, cfg.ema, cfg.checkpoint, cfg.log
    _require(t.epochs >= 1, f"train.epochs={t.epochs}: expected an int >= 1")
    _require(t.batch_size >= 1, f"train.batch_size={t.batch_size}: expected an int >= 1")
    _require(t.accum_steps >= 1, f"train.accum_steps={t.accum_steps}: expected an int >= 1")
    _require(t.eval_batch_size is None or t.eval_batch_size >= 1,
             f"train.eval_batch_size={t.eval_batch_size}: expected None or an int >= 1")
    _require(t.max_steps is None or t.max_steps >= 1, f"train.max_steps={t.max_steps}: expected None or an int >= 1")
    _require(t.eval_every >= 0, f"train.eval_every={t.eval_every}: expected an int >= 0")
    _require(t.dist_timeout_s >= 1, f"train.dist_timeout_s={t.dist_timeout_s}: expected an int >= 1 (seconds)")
    _require(cfg.model.init_from is None or cfg.model.init_from.strip() != "",
             "model.init_from='': give a run directory, checkpoint directory or .safetensors file, or leave it "
             "unset (None) to start from random weights")
    _require(t.reference_epochs is None or t.reference_epochs >= 1,
             f"train.reference_epochs={t.reference_epochs}: expected None or an int >= 1")
    _require(o.lr > 0, f"optim.lr={o.lr}: expected a number > 0")
    _require(o.lr_base_size >= 0, f"optim.lr_base_size={o.lr_base_size}: expected an int >= 0 (0 = no scaling)")
    _require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay}: expected >= 0")
    _require(o.clip_grad is None or o.clip_grad > 0,
             f"optim.clip_grad={o.clip_grad}: expected None (no clipping) or a number > 0")
    if s.sched == "multistep":
        _require(len(s.milestones) > 0, "sched.milestones is empty but sched.sched='multistep'; give epochs, e.g. 30,60,90")
    if s.milestones:
        _require(list(s.milestones) == sorted(s.milestones) and s.milestones[0] > 0,
                 f"sched.milestones={list(s.milestones)}: expected increasing epochs > 0")
        _require(s.milestones[-1] < t.epochs,
                 f"sched.milestones={list(s.milestones)} reach past train.epochs={t.epochs}; "
                 "a milestone must fall inside the run (budget-matched runs scale both, see "
                 "fap.methods.budget_matched)")
        _require(s.sched == "multistep", f"sched.milestones={list(s.milestones)} only apply to sched.sched='multistep', "
                 f"not {s.sched!r}")
    _require(0 <= s.warmup_epochs < t.epochs,
             f"sched.warmup_epochs={s.warmup_epochs}: expected >= 0 and < train.epochs={t.epochs}")
    for key in ("mixup_alpha", "cutmix_alpha", "label_smoothing"):
        _require(getattr(m, key) >= 0, f"mixup.{key}={getattr(m, key)}: expected >= 0")
    _require(0 <= m.prob <= 1 and 0 <= m.switch_prob <= 1, "mixup.prob and mixup.switch_prob must be in [0, 1]")
    _require(0 < e.decay < 1, f"ema.decay={e.decay}: expected a number in (0, 1)")
    _require(c.every_steps >= 0 and c.every_epochs >= 0 and c.keep >= 0,
             "checkpoint.every_steps, checkpoint.every_epochs and checkpoint.keep must be >= 0")
    _require(lg.every_steps >= 1, f"log.every_steps={lg.every_steps}: expected an int >= 1")


# ------------------------------------------------------------------------------------
# Serialisation (the resolved config saved with each run) and comparison
# ------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(cfg: TrainConfig) -> Dict[str, Dict[str, Any]]:
    """A JSON-ready dict; ``method`` carries its ``name``; ``task`` is the one entry that is not a section."""
    out: Dict[str, Any] = {"task": cfg.task}
    for section in SECTIONS:
        obj = getattr(cfg, section)
        d = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if section == "method":
            d = {"name": method_name(obj), **d}
        out[section] = d
    return out


def _coerce(value: Any, tp: Any) -> Any:
    """JSON value back to the annotated type (lists to tuples where the field is a tuple)."""
    origin = typing.get_origin(tp)
    if origin is Union:
        for a in typing.get_args(tp):
            if a is type(None) and value is None:
                return None
        for a in typing.get_args(tp):
            if a is not type(None):
                return _coerce(value, a)
    if (origin is tuple or tp is tuple) and isinstance(value, list):
        return tuple(value)
    return value


def from_dict(d: Dict[str, Dict[str, Any]]) -> TrainConfig:
    """Rebuild a `TrainConfig` from `to_dict` output (e.g. a run's ``config.json``)."""
    unknown = sorted(set(d) - set(SECTIONS) - {"task"})
    _require(not unknown, f"unknown config sections {unknown}; valid: task, {', '.join(SECTIONS)}")
    kwargs: Dict[str, Any] = {"task": d["task"]} if "task" in d else {}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in d or f.name == "task":
            continue
        values = dict(d[f.name])
        if f.name == "method":
            name = values.pop("name", None)
            _require(name in METHOD_CONFIGS, f"method.name={name!r}: choose one of {', '.join(sorted(METHOD_CONFIGS))}")
            cls = METHOD_CONFIGS[name]
        else:
            cls = type(f.default_factory())
        hints = _hints(cls)
        valid = {x.name for x in dataclasses.fields(cls)}
        bad = sorted(set(values) - valid)
        _require(not bad, f"unknown keys {bad} in section {f.name!r}; valid: {', '.join(sorted(valid))}")
        kwargs[f.name] = cls(**{k: _coerce(v, hints.get(k, Any)) for k, v in values.items()})
    return TrainConfig(**kwargs)


def diff(a: TrainConfig, b: TrainConfig) -> Dict[str, Tuple[Any, Any]]:
    """``{"section.key": (value_in_a, value_in_b)}`` for every key that differs."""
    da, db = to_dict(a), to_dict(b)
    out: Dict[str, Tuple[Any, Any]] = {}
    if a.task != b.task:
        out["task"] = (a.task, b.task)
    for section in SECTIONS:
        sa, sb = da.get(section, {}), db.get(section, {})
        for key in sorted(set(sa) | set(sb)):
            if sa.get(key) != sb.get(key):
                out[f"{section}.{key}"] = (sa.get(key), sb.get(key))
    return out
