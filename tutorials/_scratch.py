"""Tutorial 06's experiments, as planned in ``plans/06_from_scratch.md``: Fast AdvProp from
random weights on tutorial 02's data (`_disentangled.prepare_data`), with `fap.experiment`
(the same as ``fap compare``) for the runs and the statistics.

* B: the disentangled-learning hypothesis from scratch, with the same (no) ghost groups and
  (no) Shuffling BN in every arm (Mei et al., ICLR 2022; Xie et al., CVPR 2020, Sec. 4.2);
* C: capacity, three widths of ``test_resnet`` at equal compute (the seed abstract's "scales
  better if larger models are used");
* M: Mixup/CutMix on both arms (Mei et al., Table 6).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, Optional, Tuple

import fap
import fap.experiment
from fap.evaluation.config import SuiteConfig
from fap.experiment import Arm, Contrast
from fap.methods.config import CONFIGS

import _disentangled as D02

EPSILON = 8.0
LR = 4e-3
WIDTHS = {"half": (16, 24, 24, 48), "default": (32, 48, 48, 96), "1.5x": (48, 72, 72, 144)}


@dataclasses.dataclass(frozen=True)
class Size:
    epochs: int
    seeds_b: Tuple[int, ...]
    seeds: Tuple[int, ...]          # C and M
    jobs: int
    max_steps: Optional[int] = None


SIZES = {
    "full": Size(epochs=12, seeds_b=tuple(range(8)), seeds=(0, 1, 2, 3), jobs=2),
    "ci": Size(epochs=1, seeds_b=(0,), seeds=(0,), jobs=2, max_steps=2),
}


def config(paths: Dict[str, str], size: Size):
    """The common schedule: ``config(method) -> TrainConfig`` for `fap.experiment`."""
    def make(method: str) -> fap.TrainConfig:
        method_cfg = CONFIGS[method]()
        batch = D02.BATCH
        if method == "fast_advprop":   # no Shuffling BN: one BN group on one process without ghost groups
            method_cfg = dataclasses.replace(method_cfg, epsilon=EPSILON, shuffle=False)
            batch = round(D02.BATCH / (1 - method_cfg.p_adv))   # 160 = 128 clean + 32 adversarial
        return fap.TrainConfig(
            train=fap.RunSection(name="scratch", epochs=size.epochs, batch_size=batch, max_steps=size.max_steps,
                                 eval_every=size.epochs),
            data=D02.data_config(paths),
            model=fap.ModelConfig(**D02.MODEL, dual_norm=method != "vanilla", aux_group_size=None),
            method=method_cfg,
            optim=fap.OptimConfig(opt="adamw", lr=LR, lr_base_size=batch, weight_decay=0.05),
            sched=fap.ScheduleConfig(sched="cosine", warmup_epochs=0.5, warmup_lr=1e-4),
            checkpoint=fap.CheckpointConfig(every_steps=0, every_epochs=1, keep=1),
            log=fap.LogConfig(trackers=(), progress=False),
            final_eval=SuiteConfig(clean=False, imagenet_c=paths["corrupted"], batch_size=250, num_workers=0),
        )
    return make


FAST = ("--method", "fast_advprop")

# -- B ----------------------------------------------------------------------------------------
ARMS_B = (
    Arm("vanilla", ("--method", "vanilla")),
    Arm("dual", FAST),
    Arm("mixed", FAST + ("--method.norms=mixed", "--model.dual_norm=false")),
    Arm("dual-0", FAST + ("--method.epsilon=0",)),
)
CONTRASTS_B = (
    Contrast("dual", "mixed", "top1", primary=True),                  # B1
    Contrast("dual", "vanilla", "corruption_error", primary=True),    # B2
    Contrast("dual", "vanilla", "top1", primary=True),                # B3
    Contrast("dual", "dual-0", "top1"),
    Contrast("dual", "dual-0", "corruption_error"),
    Contrast("dual-0", "vanilla", "top1"),
    Contrast("dual", "mixed", "corruption_error"),
    Contrast("mixed", "vanilla", "top1"),
    Contrast("mixed", "vanilla", "corruption_error"),
)

# -- C ----------------------------------------------------------------------------------------


def _width(name: str) -> str:
    return '--model.kwargs={"channels": [%s]}' % ", ".join(str(c) for c in WIDTHS[name])


ARMS_C = tuple(arm for w in WIDTHS for arm in (Arm(f"vanilla-{w}", ("--method", "vanilla", _width(w))),
                                               Arm(f"fast-{w}", FAST + (_width(w),))))
CONTRASTS_C = (
    Contrast("fast-1.5x", "vanilla-1.5x", "top1", primary=True, c="fast-half", d="vanilla-half"),   # C1
    *(Contrast(f"fast-{w}", f"vanilla-{w}", "top1") for w in WIDTHS),
    Contrast("fast-1.5x", "vanilla-1.5x", "corruption_error", c="fast-half", d="vanilla-half"),
)

# -- M ----------------------------------------------------------------------------------------
MIX = ("--mixup.mixup_alpha=0.2", "--mixup.cutmix_alpha=1.0", "--mixup.switch_prob=0.5", "--mixup.label_smoothing=0.1")
ARMS_M = (Arm("vanilla-mix", ("--method", "vanilla") + MIX), Arm("fast-mix", FAST + MIX))
CONTRASTS_M = (
    Contrast("fast-mix", "vanilla-mix", "corruption_error", primary=True),   # M1
    Contrast("fast-mix", "vanilla-mix", "top1"),
)


def run(part: str, paths: Dict[str, str], size: Size, work: Path):
    """One of the three experiments: ``"B"``, ``"C"`` or ``"M"``."""
    arms, contrasts, seeds, protocol = {
        "B": (ARMS_B, CONTRASTS_B, size.seeds_b, "equal-epochs"),
        "C": (ARMS_C, CONTRASTS_C, size.seeds, "equal-compute"),
        "M": (ARMS_M, CONTRASTS_M, size.seeds, "equal-epochs"),
    }[part]
    return fap.experiment.run(config(paths, size), arms, seeds, out=work / part, protocol=protocol,
                              epochs=size.epochs, contrasts=contrasts, jobs=size.jobs, train_images=0,
                              progress=False, quiet=True)


def parameters(width: str) -> int:
    from fap.models import create_model

    model = create_model(D02.MODEL["name"], num_classes=10, dual_norm=False, channels=WIDTHS[width])
    return sum(p.numel() for p in model.parameters())
