"""What an experiment runs: arms, seeds, a protocol and contrasts, as one config per (arm, seed).

An arm is a name and a list of ``--section.key=value`` overrides on a base config (a
recipe's ``config``, or `fap.TrainConfig` plus common overrides). The protocol sets every
arm's length from one vanilla schedule:

* ``equal-epochs``: every arm trains the vanilla epochs and milestones (AdvProp's comparison,
  Xie et al., CVPR 2020);
* ``equal-compute``: each arm's epochs and milestones are the vanilla ones divided by its cost
  per loader image, from the methods' own ledger (`fap.methods.matched_budget`: 105 -> 87
  for Fast AdvProp at p_adv = 0.2; Mei et al., ICLR 2022, Sec. 4.1).

So the protocol owns ``train.epochs``, ``train.reference_epochs`` and ``sched.milestones``;
an override of them is refused. Contrasts (arm A - arm B on a metric, or the interaction
(A - B) - (C - D): does A's lead over B change from C's over D?) are declared with the plan,
primary or secondary, before anything runs.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

from fap.checks import ConfigError
from fap.config import TrainConfig, apply_overrides, method_name, peek_method, validate

__all__ = ["PROTOCOLS", "Arm", "Contrast", "Plan", "RunPlan", "make_plan", "PROTOCOL_KEYS"]

PROTOCOLS = ("equal-epochs", "equal-compute")
# Set by the protocol for every arm; an arm or common override of them is an error.
PROTOCOL_KEYS = ("train.epochs", "train.reference_epochs", "sched.milestones")

Base = Union[TrainConfig, Callable[[str], TrainConfig]]


@dataclass(frozen=True)
class Arm:
    """A named variant of the base config: ``Arm("fast-null", ("--method", "fast_advprop", "--method.epsilon=0"))``."""
    name: str
    overrides: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        ok = self.name and all(c.isalnum() or c in "-_." for c in self.name)
        if not ok:
            raise ConfigError(f"arm name {self.name!r}: use letters, digits, '-', '_' and '.' only "
                              "(it names the arm's run directories)")
        object.__setattr__(self, "overrides", tuple(self.overrides))

    @classmethod
    def parse(cls, text: str) -> "Arm":
        """``"NAME=--method fast_advprop --method.epsilon=0"`` (the ``fap compare --arm`` syntax)."""
        import shlex

        name, sep, rest = text.partition("=")
        if not sep:
            raise ConfigError(f"--arm {text!r}: write NAME=OVERRIDES, e.g. fast='--method fast_advprop'")
        return cls(name.strip(), tuple(shlex.split(rest)))


@dataclass(frozen=True)
class Contrast:
    """Arm ``a`` minus arm ``b`` on ``metric``, paired by seed; declared ``primary`` or secondary.

    With ``c`` and ``d`` (both or neither) it is the interaction (difference of differences)
    ``(a - b) - (c - d)``, per seed: e.g. whether dual - mixed grows from ε = 2 to ε = 24,
    ``Contrast("dual24", "mixed24", "top1", c="dual2", d="mixed2")``.
    """
    a: str
    b: str
    metric: str
    primary: bool = False
    c: Optional[str] = None
    d: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.c is None) != (self.d is None):
            raise ConfigError(f"contrast {self.spec}: give both c and d (the interaction (A − B) − (C − D)) "
                              "or neither (A − B)")

    @property
    def interaction(self) -> bool:
        """True for ``(a - b) - (c - d)``."""
        return self.c is not None

    @property
    def arms(self) -> Tuple[str, ...]:
        return (self.a, self.b, self.c, self.d) if self.interaction else (self.a, self.b)

    @property
    def label(self) -> str:
        if self.interaction:
            return f"({self.a} − {self.b}) − ({self.c} − {self.d})"
        return f"{self.a} − {self.b}"

    @property
    def spec(self) -> str:
        """The ``A:B[:C:D]:METRIC`` text it is parsed from."""
        return ":".join([a for a in (self.a, self.b, self.c, self.d) if a is not None] + [self.metric])

    @classmethod
    def parse(cls, text: str, *, primary: bool) -> "Contrast":
        """``"A:B:METRIC"`` or ``"A:B:C:D:METRIC"`` (the ``fap compare --primary/--secondary`` syntax)."""
        parts = [p.strip() for p in text.split(":")]
        if len(parts) not in (3, 5) or not all(parts):
            flag = "--primary" if primary else "--secondary"
            raise ConfigError(f"{flag} {text!r}: write ARM_A:ARM_B:METRIC (A minus B), e.g. fast:vanilla:top1, or "
                              "ARM_A:ARM_B:ARM_C:ARM_D:METRIC ((A − B) − (C − D), per seed), e.g. "
                              "dual24:mixed24:dual2:mixed2:top1")
        if len(parts) == 3:
            return cls(*parts, primary=primary)
        a, b, c, d, metric = parts
        return cls(a, b, metric, primary, c, d)


@dataclass(frozen=True)
class RunPlan:
    """One (arm, seed): its config and run directory."""
    arm: str
    seed: int
    config: TrainConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.config.log.output_dir)


@dataclass(frozen=True)
class Plan:
    """The whole experiment, fixed before any run starts."""
    out: Path
    protocol: str
    arms: Tuple[Arm, ...]
    seeds: Tuple[int, ...]
    contrasts: Tuple[Contrast, ...]
    vanilla_epochs: int
    vanilla_milestones: Tuple[int, ...]
    runs: Tuple[RunPlan, ...]

    def run(self, arm: str, seed: int) -> RunPlan:
        return next(r for r in self.runs if r.arm == arm and r.seed == seed)


def make_plan(
        base: Base,
        arms: Sequence[Arm],
        seeds: Sequence[int],
        *,
        out: Union[str, Path],
        protocol: str = "equal-compute",
        contrasts: Sequence[Contrast] = (),
        overrides: Sequence[str] = (),
        smoke: Optional[Callable[[TrainConfig], TrainConfig]] = None,
        epochs: Optional[int] = None,
) -> Plan:
    """Build and check every run's config; raise `ConfigError` naming what is wrong.

    Args:
        base: a `TrainConfig`, or a recipe's ``config(method_name) -> TrainConfig``.
        arms: the arms, with distinct names.
        seeds: the seeds; every arm runs every seed (``train.seed``).
        out: the experiment folder; runs go to ``out/runs/<arm>/seed<S>``.
        protocol: ``equal-epochs`` or ``equal-compute``.
        contrasts: the declared contrasts; their arms must exist, A ≠ B and C ≠ D.
        overrides: ``--section.key=value`` applied to every arm before its own.
        smoke: the recipe's smoke transformation, applied to the base first.
        epochs: vanilla's epochs; default the vanilla config's ``train.reference_epochs``
            (else its ``train.epochs``). Milestones are the vanilla config's, scaled to
            ``epochs`` when it is given.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol={protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    arms, seeds = tuple(arms), tuple(int(s) for s in seeds)
    _check_names(arms, seeds, contrasts)
    for text in list(overrides) + [o for a in arms for o in a.overrides]:
        key = text.lstrip("-").split("=", 1)[0]
        if key in PROTOCOL_KEYS:
            raise ConfigError(f"--{key} is set by the protocol ({protocol}) for every arm; give vanilla's length "
                              "with --epochs (fap compare) / epochs= (fap.experiment.run) instead")
    vanilla = _config(base, list(overrides) + ["--method", "vanilla"], smoke)
    v_epochs = vanilla.train.reference_epochs or vanilla.train.epochs
    v_milestones = tuple(vanilla.sched.milestones)
    if epochs is not None:
        v_milestones = tuple(max(1, round(m * epochs / v_epochs)) for m in v_milestones)
        v_epochs = int(epochs)
    out = Path(out)
    runs = []
    for arm in arms:
        cfg = _config(base, list(overrides) + list(arm.overrides), smoke)
        cfg = _budget(cfg, protocol, v_epochs, v_milestones)
        for seed in seeds:
            runs.append(RunPlan(arm.name, seed, _run_config(cfg, arm.name, seed, out)))
    return Plan(out, protocol, arms, seeds, tuple(contrasts), v_epochs, v_milestones, tuple(runs))


def _check_names(arms: Tuple[Arm, ...], seeds: Tuple[int, ...], contrasts: Sequence[Contrast]) -> None:
    names = [a.name for a in arms]
    if len(arms) < 1 or len(set(names)) != len(names):
        raise ConfigError(f"arms {names}: give at least one arm, each with its own name")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {list(seeds)}: give at least one seed, each once")
    for c in contrasts:
        for side in c.arms:
            if side not in names:
                raise ConfigError(f"contrast {c.spec}: no arm named {side!r}; the arms are {', '.join(names)}")
        if c.a == c.b or (c.interaction and c.c == c.d):
            raise ConfigError(f"contrast {c.spec}: an arm against itself")
        if c.interaction and (c.a, c.b) == (c.c, c.d):
            raise ConfigError(f"contrast {c.spec}: (A − B) − (C − D) with the same A − B twice is 0 on every seed; "
                              "name two different differences")


def _config(base: Base, argv: List[str], smoke) -> TrainConfig:
    """The base for the method named in ``argv``, smoke-transformed, with ``argv`` applied."""
    if callable(base) and not isinstance(base, TrainConfig):
        cfg = base(peek_method(argv))
    else:
        cfg = base
    if smoke is not None:
        cfg = smoke(cfg)
    return apply_overrides(cfg, argv)


def _budget(cfg: TrainConfig, protocol: str, epochs: int, milestones: Tuple[int, ...]) -> TrainConfig:
    """The arm's epochs and milestones under the protocol; the vanilla budget as its reference."""
    from fap.methods import build_method, matched_budget

    arm_epochs, arm_milestones = epochs, milestones
    if protocol == "equal-compute":
        name = method_name(cfg.method)
        arm_epochs, arm_milestones = matched_budget(name, cfg.method, epochs, milestones)
        ratio = build_method(name, cfg.method).cost(cfg.train.batch_size).ratio * arm_epochs / epochs
        if abs(ratio - 1.0) > 0.05:
            warnings.warn(f"equal-compute: {name} trains {arm_epochs} epochs, {ratio:.2f}x vanilla's compute over "
                          f"{epochs} vanilla epochs (whole epochs only); choose vanilla epochs that its cost per "
                          "image divides (e.g. a multiple of 6 for Fast AdvProp at p_adv 0.2)", stacklevel=3)
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, epochs=int(arm_epochs), reference_epochs=int(epochs)),
        sched=dataclasses.replace(cfg.sched, milestones=tuple(arm_milestones)))


def _run_config(cfg: TrainConfig, arm: str, seed: int, out: Path) -> TrainConfig:
    """The arm's config for one seed, in its own run directory, resumable."""
    c = cfg.checkpoint
    if not (c.every_epochs or c.every_steps):
        # a killed experiment must resume unfinished runs: checkpoint each epoch, keep the last
        c = dataclasses.replace(c, every_epochs=1, keep=1)
    return validate(dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, seed=seed, name=f"{arm}_seed{seed}"),
        checkpoint=dataclasses.replace(c, resume="auto"),
        log=dataclasses.replace(cfg.log, output_dir=str(out / "runs" / arm / f"seed{seed}"), progress=False),
    ))
