"""Extra per-run measurements for ``fap compare --measure`` / ``fap.experiment.run(measure=...)``.

A measure is ``fn(run_dir, config, summary) -> {name: number}``, called in the run's worker
after training; its numbers become metrics that contrasts can name.
"""
from __future__ import annotations

import dataclasses
from typing import Dict

__all__ = ["branch_scores", "BRANCH_IMAGES"]

BRANCH_IMAGES = 1000


def branch_scores(run_dir: str, cfg, summary) -> Dict[str, float]:
    """Clean and adversarial top-1 through each branch of a dual-norm run (AdvProp's two
    domains; Xie et al., CVPR 2020, Sec. 3): ``clean_main``, ``clean_aux``,
    ``adversarial_main``, ``adversarial_aux``.

    Clean top-1 is scored on the whole validation split; adversarial top-1 on
    `BRANCH_IMAGES` evenly spaced validation images under an untargeted FGSM step from a
    random start at the run's training ε (``method.epsilon``; PGD-1 with step ε), made
    against the branch that is scored. It is not AdvProp's targeted training attack: one
    attack for every method, so the branches are compared like for like. A run without
    auxiliary norms (vanilla, ``norms`` shared/mixed) returns {}.
    """
    from fap.evaluation.suite import evaluate_model
    from fap.evaluation.config import SuiteConfig

    if not cfg.model.dual_norm or getattr(cfg.method, "norms", "dual") != "dual":
        return {}
    eps = float(getattr(cfg.method, "epsilon", 0.0)) or 1.0
    suite = SuiteConfig(clean=True, pgd_steps=1, pgd_epsilon=eps, pgd_step=eps, pgd_random_init_prob=1.0,
                        pgd_max_images=BRANCH_IMAGES, batch_size=max(1, cfg.train.eval_batch_size or 250),
                        num_workers=cfg.data.num_workers)
    out: Dict[str, float] = {}
    for branch in ("main", "aux"):
        sets = evaluate_model(run_dir, suite, data=dataclasses.replace(cfg.data), branch=branch)["sets"]
        out[f"clean_{branch}"] = sets["clean"]["top1"]
        out[f"adversarial_{branch}"] = sets["adversarial"]["top1"]
    return out
