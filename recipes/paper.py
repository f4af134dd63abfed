"""Every row of Tables 1–7 of the Fast AdvProp paper (Mei et al., ICLR 2022), runnable by name.

    python recipes/paper.py --list                        # rows by table, budgets and the paper's numbers
    python recipes/paper.py table4/p_adv_0.33 --dry-run   # the resolved config and its counted cost
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes 4 \\
        recipes/paper.py table4/p_adv_0.33 --data.path=/data/imagenet   # train one row
    python recipes/paper.py table6/mixup_fast_advprop --smoke --data.source=demo --data.path=data/demo
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes 4 \\
        recipes/paper.py table7/fast_advprop --data.path=coco --detection.corrupt_path=coco-c   # Table 7

A classification row is the paper's ResNet-50 recipe (`recipes/resnet50.py`: SGD, LR 0.1 per
256 clean images, 105 vanilla epochs with milestones [30, 60, 90, 100], mean = std = 0.5, 64
clean images per GPU on 4 GPUs) with the switches that make that row, written below as plain
data. The usual ``--section.key=value`` overrides apply on top (``--help`` lists them), and
``--smoke`` trains two updates on tiny images. Table 7's two rows are the detection recipe
(`recipes/retinanet_r50.py`, the same overrides and ``--smoke``) at Table 7's 24-epoch budget.
Then ``fap eval runs/paper_<row>/export --suite ... --compare <row>`` puts
the evaluation beside what the paper reports for the row (`fap.evaluation.paper`: every
number as printed, and which ones the paper does not give).

**Budgets.** Each row has the paper's vanilla schedule (105 epochs; Mixup 180, decay every 60;
CutMix 210, decay at 75/150/180; detection 24) and is either run for it (``matched=False``:
PGD-5 AdvProp at 7x, PGD-1 AdvProp at 3x, Table 2's decoupled step at 1.2x) or budget-matched:
epochs and milestones divided by the per-epoch cost, so the whole run costs what vanilla's
does. Fast AdvProp divides by 1 + p_adv*K with the reference code's arithmetic (105 -> 87, 79,
70 for p_adv = 0.2, 1/3, 0.5; `fap.methods.budget_matched`); AdvProp by K + 2 (105 -> 15 for
PGD-5, 35 for PGD-1). The clean part of the loader batch stays 256 (320, 384 and 512 images
for p_adv = 0.2, 1/3, 0.5: 64 clean + 16, 32 or 64 adversarial images per GPU, the paper's
64/(1 - p_adv) per GPU), and the auxiliary BatchNorm groups are one GPU's adversarial images
(16, 32, 64), as in the reference code. Every run prints its counted cost (`Method.cost`).

**What the rows assume where the paper is silent** (labelled as ours):

* PGD-5 and PGD-1 AdvProp use fap's AdvProp defaults: targeted to a random wrong label,
  ε = 1/255, step 1/255, random start p = 0.8, the attack with the auxiliary norms' running
  statistics, loss = clean mean + adversarial mean.
* ``table2/decoupled`` (no gradient reuse, not budget-matched): the paper brings in the
  untargeted, batch-statistics attack, β = 0.5, synchronisation and Shuffling BN (Sec. 3.2.2)
  only to make gradient reuse work, so we take its decoupled row to keep AdvProp's PGD-1
  attack (as above) at weight 1 per adversarial image, on a disjoint p_adv = 0.2 split:
  Fast AdvProp with ``reuse=False, attack_target="random", attack_bn_mode="eval",
  random_init_prob=0.8, beta=1, per_group_normalization=False, shuffle=False`` (every group
  divided by the loader batch, AdvProp's batch mean). fap's own steps from there to Fast
  AdvProp are runnable under their own names (``fap/...``, not rows of the paper, with no
  paper numbers): Fast AdvProp's attack and weights without reuse, then with reuse, both at
  105 epochs; ``table1/fast_advprop`` adds budget matching. Two more, ``fap/targeted_attack``
  and ``fap/attack_running_stats``, are Fast AdvProp with the two attacks Sec. 3.2.2 argues
  against (toward a random wrong label; with running statistics), for which the paper prints
  no table.
* Table 5: "re-balancing" is β = 0.5 (an adversarial-split image weighs 0.5 + 0.5, a clean one
  1) against β = 1; "synchronisation" is ``method.per_group_normalization``. Without it every
  group is divided by the shared count, and the update speeds (the loss weight a group's
  parameters see, over the shared parameters') are 1 : 0.8 : 0.2 (shared : main : aux) at
  β = 0.5 and 1 : 0.67 : 0.33 at β = 1. The paper's text gives 1 : 0.8 : 0.2 for the
  unsynchronised case, which matches the first; whether its "neither" row (β = 1) ran at 0.8 :
  0.2 by another normalisation the paper does not say. The epochs are not printed: 87.
* Shuffling BN (a result of the text, in an unstated setting): Fast AdvProp with and without
  ``method.shuffle``.
* Table 6: Mixup alpha = 0.2 and CutMix alpha = 1.0 (the Mixup and CutMix papers' ImageNet
  settings), every batch, on the clean part only, no label smoothing (the reference code's
  criterion).
* Table 7: what `recipes/retinanet_r50.py` chose where the paper is silent (backbone, batch,
  lr, initialisation), at 24 epochs with the 2x schedule's milestones (16, 22) for vanilla,
  20 and (13, 18) budget-matched for Fast AdvProp.

None of these rows has been run on ImageNet or COCO by this project (its machines have no
GPU); `tests/test_paper_recipes.py` builds every row and trains each two updates at toy size.
"""
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import fap
import resnet50  # the base: the paper's ResNet-50 recipe, in this directory
import retinanet_r50  # Table 7's base: the detection recipe, in this directory
from fap.cli import run_main
from fap.config import ConfigError, method_name, parse_args, to_dict
from fap.evaluation.paper import PAPER_RESULTS, TABLES, PaperResult, paper_result
from fap.methods import CONFIGS, StepCost, build_method, matched_budget
from fap.methods.config import ADVPROP_RANDOM_INIT_PROB

# The vanilla schedules the paper's budgets are measured against: (epochs, LR milestones).
STANDARD = (105, (30, 60, 90, 100))
MIXUP_SCHEDULE = (180, (60, 120))
CUTMIX_SCHEDULE = (210, (75, 150, 180))
DETECTION_SCHEDULE = (24, (16, 22))  # Table 7's 24 epochs; the milestones are the 2x schedule's (ours)
# Table 6's augmentations (timm Mixup/CutMix on the clean part; alphas: see the docstring).
MIXUP = {"mixup_alpha": 0.2, "prob": 1.0, "label_smoothing": 0.0}
CUTMIX = {"cutmix_alpha": 1.0, "prob": 1.0, "label_smoothing": 0.0}


@dataclass(frozen=True)
class Row:
    """How to configure one row. What the paper reports for it: `fap.evaluation.paper`.

    Args:
        name: ``table<N>/<setting>`` for a row of the paper, the name `--compare` and
            ``--list`` use; ``fap/<step>`` for one of fap's own steps (no paper numbers).
        method: ``vanilla``, ``advprop`` or ``fast_advprop`` (`fap.methods`).
        switches: that method's config fields, as ``--method.KEY=VALUE`` would set them.
        model: timm architecture.
        schedule: the vanilla (epochs, milestones) the row's budget is measured against.
        matched: divide epochs and milestones by the per-epoch cost (equal budget to vanilla).
        mixup: `fap.config.MixupConfig` fields (Table 6).
        what: for fap's own steps, what the step is.
    """
    name: str
    method: str
    switches: Dict[str, Any] = field(default_factory=dict)
    model: str = "resnet50"
    schedule: Tuple[int, Tuple[int, ...]] = STANDARD
    matched: bool = True
    mixup: Dict[str, float] = field(default_factory=dict)
    what: str = ""

    @property
    def paper(self) -> Optional[PaperResult]:
        """The paper's row; None for fap's own steps."""
        return None if self.name.startswith("fap/") else paper_result(self.name)

    @property
    def detection(self) -> bool:
        return self.paper is not None and self.paper.task == "detection"


# Table 2's decoupled step with AdvProp's attack and loss (our reading; see the docstring).
ADVPROP_ATTACK_DECOUPLED = {"reuse": False, "attack_target": "random", "attack_bn_mode": "eval",
                            "random_init_prob": ADVPROP_RANDOM_INIT_PROB, "beta": 1.0,
                            "per_group_normalization": False, "shuffle": False}
ROWS = (
    # Table 1: ResNet-50, the cost of AdvProp and what an equal budget does to it.
    Row("table1/vanilla", "vanilla"),
    Row("table1/pgd5_advprop", "advprop", matched=False),
    Row("table1/pgd5_advprop_15ep", "advprop"),
    Row("table1/pgd1_advprop", "advprop", {"attack_steps": 1}, matched=False),
    Row("table1/pgd1_advprop_35ep", "advprop", {"attack_steps": 1}),
    Row("table1/fast_advprop", "fast_advprop"),
    # Table 2: lightening AdvProp, one step at a time, at 105 epochs (per-epoch budgets N, 7N, 3N, 1.2N).
    Row("table2/vanilla", "vanilla"),
    Row("table2/advprop", "advprop", matched=False),
    Row("table2/advprop_1_iter", "advprop", {"attack_steps": 1}, matched=False),
    Row("table2/decoupled", "fast_advprop", ADVPROP_ATTACK_DECOUPLED, matched=False),
    # Table 3: deeper ResNets, the same recipe.
    Row("table3/resnet50_vanilla", "vanilla"),
    Row("table3/resnet50_fast_advprop", "fast_advprop"),
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
    # Shuffling BN (the text): regroup the adversarial images across BN groups between the two aux passes.
    Row("shuffling_bn/off", "fast_advprop", {"shuffle": False}),
    Row("shuffling_bn/on", "fast_advprop", {"shuffle": True}),
    # Table 6: with Mixup and CutMix, vanilla and Fast AdvProp on their longer schedules.
    Row("table6/cutmix", "vanilla", schedule=CUTMIX_SCHEDULE, mixup=CUTMIX),
    Row("table6/cutmix_fast_advprop", "fast_advprop", schedule=CUTMIX_SCHEDULE, mixup=CUTMIX),
    Row("table6/mixup", "vanilla", schedule=MIXUP_SCHEDULE, mixup=MIXUP),
    Row("table6/mixup_fast_advprop", "fast_advprop", schedule=MIXUP_SCHEDULE, mixup=MIXUP),
    # Table 7: RetinaNet on COCO, through the detection recipe.
    Row("table7/vanilla", "vanilla", model="retinanet_resnet50_fpn", schedule=DETECTION_SCHEDULE),
    Row("table7/fast_advprop", "fast_advprop", model="retinanet_resnet50_fpn", schedule=DETECTION_SCHEDULE),
)
# fap's own steps between Table 2's decoupled row and Fast AdvProp: not rows of the paper.
FAP_ROWS = (
    # table2/decoupled with Fast AdvProp's attack and weights (untargeted, batch statistics, beta 0.5,
    # synchronisation, Shuffling BN), no reuse; then with reuse. Both 105 epochs, not budget-matched.
    Row("fap/decoupled_fast_attack", "fast_advprop", {"reuse": False}, matched=False,
        what="decoupled, Fast AdvProp's attack, no reuse"),
    Row("fap/reuse_105_epochs", "fast_advprop", matched=False, what="+ reuse, 105 epochs"),
    # Sec. 3.2.2's two alternatives to Fast AdvProp's attack, which the paper argues against without a table.
    Row("fap/targeted_attack", "fast_advprop", {"attack_target": "random"},
        what="Fast AdvProp attacking toward a random wrong label"),
    Row("fap/attack_running_stats", "fast_advprop", {"attack_bn_mode": "eval"},
        what="Fast AdvProp attacking with running statistics"),
)
ALL_ROWS = ROWS + FAP_ROWS


def row_named(name: Optional[str]) -> Row:
    """The row called ``name``; a `ConfigError` listing every name otherwise."""
    for row in ALL_ROWS:
        if row.name == name:
            return row
    what = f"{name!r} is not a row of the paper" if name else "name a row of the paper first"
    raise ConfigError(f"{what}: recipes/paper.py ROW [--dry-run] [--section.key=value ...] with ROW one of "
                      f"{', '.join(r.name for r in ALL_ROWS)} (--list shows them with the paper's numbers)")


def budget(row: Row, method_cfg: Any) -> Tuple[int, List[int]]:
    """The row's (epochs, milestones): its vanilla schedule, divided by the per-epoch cost if matched."""
    epochs, milestones = row.schedule
    if not row.matched:
        return epochs, list(milestones)
    # the cost ledger: 1 + p_adv*K with the reference code's rounding, K + 2 for AdvProp, 1 for vanilla
    return matched_budget(row.method, method_cfg, epochs, milestones)


def config(row: Row) -> fap.TrainConfig:
    """A classification row's full-size run: `resnet50.config` with the row's switches, model,
    budget and augmentation."""
    if row.detection:
        raise ConfigError(f"{row.name} is a detection row: detection_config builds it")
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


def detection_config(row: Row) -> fap.TrainConfig:
    """A Table 7 row: `recipes/retinanet_r50.py`'s config for the row's method, which is Table 7's
    24 vanilla epochs, divided by 1 + p_adv*K for Fast AdvProp (20)."""
    cfg = retinanet_r50.config(row.method)
    name = "paper_" + row.name.replace("/", "_")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, name=name),
                               log=dataclasses.replace(cfg.log, output_dir=f"runs/{name}"))


def row_config(row: Row) -> fap.TrainConfig:
    """The row's config, classification or detection."""
    return detection_config(row) if row.detection else config(row)


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


def _line(row: Row) -> Tuple[str, ...]:
    """One ``--list`` line: the row, its counted budget and the paper's numbers."""
    cfg = row_config(row)
    (cost, run), epochs = counted_cost(cfg), cfg.train.epochs
    p = row.paper
    numbers = ("",) * 6 if p is None else (_num(p.top1), _num(p.imagenet_c), _num(p.imagenet_r), _num(p.stylized),
                                           _num(p.map), _num(p.map_corrupted))
    return (row.name, p.setting if p else row.what, row.method, str(epochs), f"{cost.ratio:.3g}", f"{run:.3g}",
            *numbers)


def listing(rows: Sequence[Row] = ALL_ROWS) -> str:
    """``--list``: the rows table by table, with their counted budget and the paper's numbers."""
    head = ("row", "paper's setting", "method", "epochs", "x/step", "x run", "top-1", "IN-C↓", "IN-R", "S-IN",
            "mAP", "mAP-C")
    groups = [(t, [r for r in rows if r.paper is not None and r.paper.table == t]) for t in TABLES]
    groups.append(("fap's own steps (not rows of the paper; no paper numbers)",
                   [r for r in rows if r.paper is None]))
    lines = [_line(r) for _, members in groups for r in members]
    widths = [max(len(x[i]) for x in [head] + lines) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    text = [fmt(head), fmt(["-" * w for w in widths])]
    for title, members in groups:
        if members:
            text += [f"{title}:"] + [fmt(_line(r)) for r in members]
    return "\n".join(text + [
        "", "x/step: image-passes per update vs vanilla on the same loader batch (Method.cost); x run: over the run,",
        "vs the row's vanilla schedule. top-1, IN-C (unnormalised mean corruption error, lower is better), IN-R,",
        "Stylized-IN (S-IN) and COCO mAP clean / corrupted (mAP-C) are the paper's numbers in %; – = the paper gives",
        "none (fap.evaluation.paper says why)."])


def _paper_line(row: Row) -> str:
    p = row.paper
    if p is None:
        return f"fap's own step, not a row of the paper: {row.what}"
    numbers = (f"mAP {_num(p.map)}, corrupted mAP {_num(p.map_corrupted)}" if p.task == "detection" else
               f"top-1 {_num(p.top1)}, IN-C {_num(p.imagenet_c)}, IN-R {_num(p.imagenet_r)}, "
               f"Stylized-IN {_num(p.stylized)}")
    return (f"paper ({p.table}, {p.setting}): {numbers}; epochs {p.epochs or '–'}, {p.cost:.3g}N per epoch"
            + (f"; {p.note}" if p.note else ""))


def dry_run(name: Optional[str], argv: List[str]) -> int:
    """``ROW --dry-run [overrides]``: print the resolved config, the counted cost and the paper's row."""
    row = row_named(name)
    cfg = parse_args(row_config(row), argv, smoke=retinanet_r50.smoke if row.detection else smoke)
    (cost, run), epochs = counted_cost(cfg), cfg.train.epochs
    print(json.dumps(to_dict(cfg), indent=1))
    batch, vanilla_epochs = cfg.train.batch_size, cfg.train.reference_epochs or cfg.train.epochs
    print(f"cost: {cost.image_passes} image-passes per update on a loader batch of {batch} vs "
          f"{cost.vanilla} vanilla = {cost.ratio:.3f}x per step; over the run {epochs} epochs vs "
          f"{vanilla_epochs} vanilla = {run:.3f}x")
    print(_paper_line(row))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``--list``, ``ROW --dry-run [overrides]``, or ``ROW [overrides]`` (train)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--list" in argv:
        print(listing())
        return 0
    name, rest = (argv[0], argv[1:]) if argv and not argv[0].startswith("-") else (None, argv)
    prog = f"recipes/paper.py {name}" if name else "recipes/paper.py"
    if "--dry-run" in rest:
        return run_main(lambda args: dry_run(name, args), [a for a in rest if a != "--dry-run"], prog=prog)
    if name is not None and name.startswith("table7/"):
        return fap.train_cli(lambda _method: detection_config(row_named(name)), rest, smoke=retinanet_r50.smoke,
                             prog=prog)
    return fap.train_cli(lambda _method: config(row_named(name)), rest, smoke=smoke, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
