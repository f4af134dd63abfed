"""Extra per-run measurements for ``fap compare --measure`` / ``fap.experiment.run(measure=...)``.

A measure is ``fn(run_dir, config, summary) -> {name: number}``, called in the run's worker
after training; its numbers become metrics that contrasts can name. Those here test the
disentangled-learning hypothesis (Xie et al., CVPR 2020, Sec. 3-4) on a trained run:

* `branch_scores`: each kind of image through each branch (the two domains);
* `recalibrated_top1`: the main norms' running statistics re-estimated on clean training
  images, no training step: does a model trained with shared or mixed norms lose clean
  accuracy through its running statistics alone?
* `swap_scores`: a dual-norm model with its main and auxiliary running statistics, or
  affine parameters, exchanged: the statistics' share of the difference between branches.
"""
from __future__ import annotations

import dataclasses
from typing import Dict

__all__ = ["branch_scores", "recalibrated_top1", "swap_scores", "BRANCH_IMAGES"]

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

    if not _is_dual(cfg):
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


def _is_dual(cfg) -> bool:
    return bool(cfg.model.dual_norm) and getattr(cfg.method, "norms", "dual") == "dual"


def _clean_top1(model, cfg) -> float:
    """Clean top-1 of an in-memory model on the run's validation split."""
    from fap.evaluation.config import SuiteConfig
    from fap.evaluation.suite import evaluate_model

    suite = SuiteConfig(clean=True, batch_size=max(1, cfg.train.eval_batch_size or 250),
                        num_workers=cfg.data.num_workers)
    return evaluate_model(model, suite, data=dataclasses.replace(cfg.data))["sets"]["clean"]["top1"]


def recalibrated_top1(run_dir: str, cfg, summary, *, images: int = 0) -> Dict[str, float]:
    """``recal_top1``: clean top-1 through the main norms after their BatchNorm running
    statistics are re-estimated on clean training images (eval transform, ``images`` of
    them, 0 = all; a cumulative average, `torch.optim.swa_utils.update_bn`), without a
    training step. A model without BatchNorm returns {}.
    """
    import torch
    from torch.optim.swa_utils import update_bn

    from fap.data import build_loader, to_unit_float
    from fap.evaluation.loading import load_model
    from fap.norm import has_batch_norm

    model = load_model(run_dir, branch="main").model.eval()
    if not has_batch_norm(model):
        return {}
    loader = build_loader(cfg.data, cfg.data.train_split, batch_size=max(1, cfg.train.batch_size), train=False)
    limit = images or len(loader.dataset)

    def batches():
        seen = 0
        for x, _ in loader:
            if seen >= limit:
                return
            x = to_unit_float(x[:limit - seen])
            seen += len(x)
            yield x

    with torch.no_grad():
        update_bn(batches(), model)
    return {"recal_top1": _clean_top1(model.eval(), cfg)}


def swap_scores(run_dir: str, cfg, summary) -> Dict[str, float]:
    """The swap test of a dual-norm run, on clean validation images through the main norms:
    ``swap_stats_top1`` with the auxiliary running statistics in place of the main ones (main
    affine parameters), ``swap_affine_top1`` with the auxiliary affine parameters (main running
    statistics). Against ``top1`` (neither swapped) and ``clean_aux`` (both), they separate
    what the statistics and the affine parameters each carry. Other runs return {}.
    """
    import torch

    from fap.evaluation.loading import load_model

    if not _is_dual(cfg):
        return {}
    main = load_model(run_dir, branch="main").model.eval()
    aux = load_model(run_dir, branch="aux").model.state_dict()
    norms = [name for name, m in main.named_modules()
             if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm))]
    original = {k: v.clone() for k, v in main.state_dict().items()}
    out = {}
    for metric, suffixes in (("swap_stats_top1", ("running_mean", "running_var")),
                             ("swap_affine_top1", ("weight", "bias"))):
        swapped = dict(original)
        swapped.update({f"{n}.{s}": aux[f"{n}.{s}"] for n in norms for s in suffixes if f"{n}.{s}" in aux})
        main.load_state_dict(swapped, strict=True)
        out[metric] = _clean_top1(main, cfg)
    main.load_state_dict(original, strict=True)
    return out
