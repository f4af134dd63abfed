"""Every experiment of the Fast AdvProp paper (Mei et al., ICLR 2022), runnable by name.

    python recipes/paper.py --list                        # rows, budgets and the paper's numbers
    python recipes/paper.py table4/p_adv_0.33 --dry-run   # the resolved config and its counted cost
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml \\
        recipes/paper.py table4/p_adv_0.33 --data.path=/data/imagenet   # train one row
    python recipes/paper.py table6/mixup_fast_advprop --smoke --data.source=demo --data.path=data/demo

A row is the paper's ResNet-50 recipe (`recipes/resnet50.py`: SGD, LR 0.1 per 256 clean
images, 105 vanilla epochs with milestones [30, 60, 90, 100], mean = std = 0.5) with the
switches that make that row, written below as plain data. The usual ``--section.key=value``
overrides apply on top (``--help`` lists them), and ``--smoke`` trains two updates on tiny
images. Then ``fap eval runs/paper_<row>/export --suite ... --compare <row>`` puts the
evaluation beside what the paper reports for the row (`fap.evaluation.paper`, where every
number comes from, and which ones the paper does not give).

**Budgets.** Each row has the paper's vanilla schedule (105 epochs; Mixup 180, decay every 60;
CutMix 210, decay at 75/150/180) and is either run for it (``matched=False``: PGD-5 AdvProp
at 7x, PGD-1 AdvProp at 3x, Table 2's intermediate steps at 1.2x) or budget-matched: epochs
and milestones divided by the per-epoch cost, so the whole run costs what vanilla's does.
Fast AdvProp divides by 1 + p_adv*K with the reference code's arithmetic (105 -> 87, 79, 70
for p_adv = 0.2, 1/3, 0.5; `fap.methods.budget_matched`); AdvProp by K + 2 (105 -> 15 for
PGD-5, 35 for PGD-1). The clean part of the loader batch stays 256 (320, 384 and 512 images
for p_adv = 0.2, 1/3, 0.5), as in the reference code. Every run prints its counted cost
(`Method.cost`): image-passes per step against vanilla's, and over the run.

**What the rows assume where the paper is silent** (the digest of the paper does not say):
the PGD-5 AdvProp re-implementation uses fap's AdvProp defaults (targeted, ε = 1/255, step
1/255, random start p = 0.8, attack with the auxiliary norms' running statistics); Table 2's
intermediate rows are the lightening steps the paper names, built from the switches that
exist (K: ``method.attack_steps``; pairing: ``advprop`` pairs every image, ``fast_advprop``
takes a disjoint p_adv split; reuse of the attack's backward: ``method.reuse``), and keep
Fast AdvProp's untargeted, batch-statistics attack and Shuffling BN once decoupled; Table 5's
"re-balancing" is beta = 0.5 (each image weighs 1 in total) against beta = 1, its
"synchronisation" is ``method.per_group_normalization``; Mixup alpha = 0.2 and CutMix
alpha = 1.0 (the Mixup and CutMix papers' ImageNet settings), every batch, on the clean part
only, no label smoothing (the reference code's criterion).

None of these rows has been run on ImageNet by this project (its machines have no GPU);
`tests/test_paper_recipes.py` builds every row and trains each two updates at toy size.
"""
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import fap
import resnet50  # the base: the paper's ResNet-50 recipe, in this directory
from fap.cli import run_main
from fap.config import ConfigError, method_name, parse_args, to_dict
from fap.evaluation.paper import PaperResult, paper_result
from fap.methods import CONFIGS, StepCost, budget_matched, build_method

# The vanilla schedules the paper's budgets are measured against: (epochs, LR milestones).
STANDARD = (105, (30, 60, 90, 100))
MIXUP_SCHEDULE = (180, (60, 120))
CUTMIX_SCHEDULE = (210, (75, 150, 180))
# Table 6's augmentations (timm Mixup/CutMix on the clean part; alphas: see the docstring).
MIXUP = {"mixup_alpha": 0.2, "prob": 1.0, "label_smoothing": 0.0}
CUTMIX = {"cutmix_alpha": 1.0, "prob": 1.0, "label_smoothing": 0.0}


@dataclass(frozen=True)
class Row:
    """How to configure one row of the paper. What the paper reports for it: `fap.evaluation.paper`.

    Args:
        name: ``table<N>/<setting>``, the name `--compare` and ``--list`` use.
        method: ``vanilla``, ``advprop`` or ``fast_advprop`` (`fap.methods`).
        switches: that method's config fields, as ``--method.KEY=VALUE`` would set them.
        model: timm architecture.
        schedule: the vanilla (epochs, milestones) the row's budget is measured against.
        matched: divide epochs and milestones by the per-epoch cost (equal budget to vanilla).
        mixup: `fap.config.MixupConfig` fields (Table 6).
    """
    name: str
    method: str
    switches: Dict[str, Any] = field(default_factory=dict)
    model: str = "resnet50"
    schedule: Tuple[int, Tuple[int, ...]] = STANDARD
    matched: bool = True
    mixup: Dict[str, float] = field(default_factory=dict)

    @property
    def paper(self) -> PaperResult:
        return paper_result(self.name)


NO_REUSE = {"reuse": False}
ROWS = (
    # Table 1: ResNet-50, the cost of AdvProp and what an equal budget does to it.
    Row("table1/vanilla", "vanilla"),
    Row("table1/pgd5_advprop", "advprop", matched=False),
    Row("table1/pgd5_advprop_15ep", "advprop"),
    Row("table1/pgd1_advprop", "advprop", {"attack_steps": 1}, matched=False),
    Row("table1/pgd1_advprop_35ep", "advprop", {"attack_steps": 1}),
    Row("table1/fast_advprop", "fast_advprop"),
    # Table 2: lightening AdvProp into Fast AdvProp, one switch at a time.
    Row("table2/advprop", "advprop", matched=False),
    Row("table2/advprop_1_iter", "advprop", {"attack_steps": 1}, matched=False),
    Row("table2/decoupled", "fast_advprop", NO_REUSE, matched=False),
    Row("table2/decoupled_reuse", "fast_advprop", matched=False),
    Row("table2/fast_advprop", "fast_advprop"),
    # Table 3: deeper ResNets, the same recipe.
    Row("table3/resnet101_vanilla", "vanilla", model="resnet101"),
    Row("table3/resnet101_fast_advprop", "fast_advprop", model="resnet101"),
    Row("table3/resnet152_vanilla", "vanilla", model="resnet152"),
    Row("table3/resnet152_fast_advprop", "fast_advprop", model="resnet152"),
    # Table 4: the adversarial fraction, each at its budget-matched length.
    Row("table4/p_adv_0.2", "fast_advprop", {"p_adv": 0.2}),
    Row("table4/p_adv_0.33", "fast_advprop", {"p_adv": 1 / 3}),
    Row("table4/p_adv_0.5", "fast_advprop", {"p_adv": 0.5}),
    # Table 5: re-balancing (beta = 0.5 vs 1) and synchronisation (per-group gradient normalisation).
    Row("table5/neither", "fast_advprop", {"beta": 1.0, "per_group_normalization": False}),
    Row("table5/rebalancing", "fast_advprop", {"beta": 0.5, "per_group_normalization": False}),
    Row("table5/synchronisation", "fast_advprop", {"beta": 1.0, "per_group_normalization": True}),
    Row("table5/both", "fast_advprop", {"beta": 0.5, "per_group_normalization": True}),
    # Shuffling BN: regroup the adversarial images across BN groups between the two aux passes.
    Row("shuffling_bn/off", "fast_advprop", {"shuffle": False}),
    Row("shuffling_bn/on", "fast_advprop", {"shuffle": True}),
    # Table 6: with Mixup and CutMix, vanilla and Fast AdvProp on their longer schedules.
    Row("table6/cutmix", "vanilla", schedule=CUTMIX_SCHEDULE, mixup=CUTMIX),
    Row("table6/cutmix_fast_advprop", "fast_advprop", schedule=CUTMIX_SCHEDULE, mixup=CUTMIX),
    Row("table6/mixup", "vanilla", schedule=MIXUP_SCHEDULE, mixup=MIXUP),
    Row("table6/mixup_fast_advprop", "fast_advprop", schedule=MIXUP_SCHEDULE, mixup=MIXUP),
)


def row_named(name: Optional[str]) -> Row:
    """The row called ``name``; a `ConfigError` listing every name otherwise."""
    for row in ROWS:
        if row.name == name:
            return row
    what = f"{name!r} is not a row of the paper" if name else "name a row of the paper first"
    raise ConfigError(f"{what}: recipes/paper.py ROW [--dry-run] [--section.key=value ...] with ROW one of "
                      f"{', '.join(r.name for r in ROWS)} (--list shows them with the paper's numbers)")


def budget(row: Row, method_cfg: Any) -> Tuple[int, List[int]]:
    """The row's (epochs, milestones): its vanilla schedule, divided by the per-epoch cost if matched."""
    epochs, milestones = row.schedule
    if not row.matched or row.method == "vanilla":
        return epochs, list(milestones)
    if row.method == "fast_advprop":  # 1 + p_adv*K, with the reference code's rounding
        return budget_matched(epochs, milestones, p_adv=method_cfg.p_adv, attack_steps=method_cfg.attack_steps)
    scale = method_cfg.attack_steps + 2  # AdvProp: K attack passes + clean + adversarial
    return round(epochs / scale), [round(m / scale) for m in milestones]


def config(row: Row) -> fap.TrainConfig:
    """The row's full-size run: `resnet50.config` with the row's switches, model, budget and augmentation."""
    method_cfg = dataclasses.replace(CONFIGS[row.method](), **row.switches)
    cfg = resnet50.config(row.method, method_cfg)
    epochs, milestones = budget(row, method_cfg)
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, name="paper_" + row.name.replace("/", "_"), epochs=epochs,
                                  reference_epochs=row.schedule[0]),
        model=dataclasses.replace(cfg.model, name=row.model),
        sched=dataclasses.replace(cfg.sched, milestones=tuple(milestones)),
        mixup=dataclasses.replace(cfg.mixup, **row.mixup),
    )


SMOKE_CLEAN_BATCH = 16


def smoke(cfg: fap.TrainConfig) -> fap.TrainConfig:
    """`resnet50.smoke` (two updates, 32 px images, the row's model and method), with 16 clean
    images per update and the row's clean : adversarial split, so every p_adv splits evenly."""
    cfg = resnet50.smoke(cfg)
    p_adv = getattr(cfg.method, "p_adv", 0.0)
    batch = round(SMOKE_CLEAN_BATCH / (1 - p_adv))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))


def counted_cost(cfg: fap.TrainConfig) -> Tuple[StepCost, float]:
    """`Method.cost` of one update on the global loader batch, and the run's cost relative to
    ``train.reference_epochs`` of vanilla (the engine's ``cost_ratio_run``)."""
    cost = build_method(method_name(cfg.method), cfg.method).cost(cfg.train.batch_size)
    t = cfg.train
    return cost, cost.ratio * t.epochs / (t.reference_epochs or t.epochs)


def _num(value: Optional[float]) -> str:
    """A number as the paper prints it (one decimal, two where it gives two); – = not given."""
    if value is None:
        return "–"
    return f"{value:.1f}" if round(value, 1) == value else f"{value:.2f}"


def listing(rows: Sequence[Row] = ROWS) -> str:
    """``--list``: every row with its counted budget and the paper's numbers (– = not given)."""
    head = ("row", "paper's setting", "method", "epochs", "x/step", "x run", "top-1", "IN-C↓", "IN-R", "S-IN")
    lines = [head]
    for row in rows:
        cfg = config(row)
        cost, run = counted_cost(cfg)
        p = row.paper
        lines.append((row.name, p.setting, row.method, str(cfg.train.epochs), f"{cost.ratio:.3g}", f"{run:.3g}",
                      _num(p.top1), _num(p.imagenet_c), _num(p.imagenet_r), _num(p.stylized)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text + [
        "", "x/step: image-passes per update vs vanilla on the same loader batch (Method.cost); x run: over the run,",
        "vs the row's vanilla schedule. top-1, IN-C (unnormalised mean corruption error, lower is better), IN-R and",
        "Stylized-IN (S-IN) are the paper's numbers in %; – = the paper gives none (fap.evaluation.paper says why)."])


def dry_run(name: Optional[str], argv: List[str]) -> int:
    """``ROW --dry-run [overrides]``: print the resolved config, the counted cost and the paper's row."""
    row = row_named(name)
    cfg = parse_args(config(row), argv, smoke=smoke)
    cost, run = counted_cost(cfg)
    t, p = cfg.train, row.paper
    print(json.dumps(to_dict(cfg), indent=1))
    print(f"cost: {cost.image_passes} image-passes per update on a loader batch of {t.batch_size} vs "
          f"{cost.vanilla} vanilla = {cost.ratio:.3f}x per step; over the run {t.epochs} epochs vs "
          f"{t.reference_epochs or t.epochs} vanilla = {run:.3f}x")
    print(f"paper ({p.table}, {p.setting}): top-1 {_num(p.top1)}, IN-C {_num(p.imagenet_c)}, IN-R "
          f"{_num(p.imagenet_r)}, Stylized-IN {_num(p.stylized)}; epochs {p.epochs or '–'}, {p.cost:.3g}N per epoch"
          + (f"; {p.note}" if p.note else ""))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``--list``, ``ROW --dry-run [overrides]``, or ``ROW [overrides]`` (train, via `fap.train_cli`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--list" in argv:
        print(listing())
        return 0
    name, rest = (argv[0], argv[1:]) if argv and not argv[0].startswith("-") else (None, argv)
    if "--dry-run" in rest:
        return run_main(lambda args: dry_run(name, args), [a for a in rest if a != "--dry-run"],
                        prog="recipes/paper.py")
    return fap.train_cli(lambda _method: config(row_named(name)), rest, smoke=smoke,
                         prog=f"recipes/paper.py {name}" if name else "recipes/paper.py")


if __name__ == "__main__":
    sys.exit(main())
