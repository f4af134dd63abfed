"""Top-k correctness with optional class-subset masking, and the ImageNet-C summary numbers.

Top-k: a prediction is correct at ``k`` when the label is among the ``k`` largest logits.
For a 200-class subset (ImageNet-R, ImageNet-A; Hendrycks et al. 2021) the logits are
restricted to the subset's columns first, as in the reference evaluation code
(``output[:, indices_in_1k]``), and predictions are mapped back to model label indices.

ImageNet-C (Hendrycks & Dietterich, ICLR 2019) numbers, for corruption ``c`` with top-1
errors ``E_{s,c}`` at severities ``s = 1..5``:

* unnormalised corruption error: ``mean_s E_{s,c}``; its mean over corruptions is what
  the Fast AdvProp reference code prints as "mCE (unnormalized)" (over 19 corruptions,
  Mei et al., ICLR 2022) — *not* comparable with published mCE;
* corruption error ``CE_c = sum_s E_{s,c} / sum_s E^AlexNet_{s,c}`` and
  ``mCE = mean_c CE_c`` over the 15 standard corruptions, the number published tables
  report (ResNet-50: 76.7);
* relative ``rCE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^AlexNet_{s,c} - E^AlexNet_clean)``
  and relative mCE, their mean.

The AlexNet errors are those of hendrycks/robustness (``ImageNet-C/test.py``), the means
over severities of the per-severity errors also shipped with timm; the AlexNet clean
error is that of torchvision's AlexNet weights (top-1 56.522 %), which the paper rounds to
43.5 %. The 4 held-out corruptions have no published AlexNet reference: they enter the
unnormalised "all" mean only.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch

from fap.data.corrupt import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS

__all__ = [
    "ALEXNET_CLEAN_ERROR",
    "ALEXNET_ERRORS",
    "ALL_CORRUPTIONS",
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "corruption_summary",
    "topk_correct",
    "topk_predictions",
]

# AlexNet's top-1 error on each ImageNet-C corruption, averaged over the 5 severities.
ALEXNET_ERRORS: Dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
# AlexNet's clean top-1 error (torchvision weights: 1 - 0.56522).
ALEXNET_CLEAN_ERROR = 0.43478


def topk_predictions(logits: torch.Tensor, k: int, subset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``k`` highest-scoring model labels per row, restricted to ``subset`` if given.

    Args:
        logits: ``(B, num_classes)``.
        k: how many; capped at the number of candidate classes.
        subset: optional int64 tensor of the model label indices allowed (e.g. ImageNet-R's 200).

    Returns:
        ``(B, min(k, C))`` int64 model label indices, best first.
    """
    if subset is None:
        return logits.topk(min(k, logits.shape[1]), dim=1).indices
    subset = subset.to(logits.device)
    restricted = logits.index_select(1, subset)
    return subset[restricted.topk(min(k, restricted.shape[1]), dim=1).indices]


def topk_correct(
        logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5), subset: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample correctness at each ``k``: an int64 tensor of shape ``(B, len(ks))``, 1 = correct."""
    top = topk_predictions(logits, max(ks), subset)
    hits = top.eq(labels.view(-1, 1))
    return torch.stack([hits[:, :k].any(dim=1) for k in ks], dim=1).long()


def corruption_summary(errors: Mapping[str, Sequence[float]], clean_error: Optional[float] = None, *,
                       alexnet_normalised: bool = True) -> Dict:
    """ImageNet-C numbers from top-1 errors per corruption and severity.

    Args:
        errors: ``{corruption: [E_1, ..., E_5]}``, errors as fractions in [0, 1].
        clean_error: the model's clean top-1 error (fraction), for the relative numbers.
        alexnet_normalised: compute the CE / mCE numbers, which divide by AlexNet's errors
            on ImageNet-C (Hendrycks & Dietterich 2019) and mean nothing for another label
            set; False (a corrupted copy of a 10-class toy set) leaves them None and
            keeps the unnormalised mean errors only.

    Returns:
        A dict with, in percent: ``corruptions`` (per corruption: ``errors``, ``error``
        (mean over severities), ``ce`` and ``relative_ce`` where an AlexNet reference
        exists), ``mean_error`` (unnormalised, over the standard 15 present),
        ``mean_error_all`` (unnormalised, over every corruption present), ``mce`` and
        ``relative_mce`` (over the standard 15 present), and ``complete`` (all 15 present).
    """
    per: Dict[str, Dict] = {}
    for name, errs in errors.items():
        mean = sum(errs) / len(errs)
        entry = {"errors": [100.0 * e for e in errs], "error": 100.0 * mean, "ce": None, "relative_ce": None}
        if alexnet_normalised and name in ALEXNET_ERRORS:
            entry["ce"] = 100.0 * mean / ALEXNET_ERRORS[name]
            if clean_error is not None:
                entry["relative_ce"] = 100.0 * (mean - clean_error) / (ALEXNET_ERRORS[name] - ALEXNET_CLEAN_ERROR)
        per[name] = entry
    standard = [c for c in CORRUPTIONS if c in per]
    summary = {
        "corruptions": {c: per[c] for c in ALL_CORRUPTIONS if c in per},
        "standard": standard,
        "complete": len(standard) == len(CORRUPTIONS),
        "alexnet_normalised": bool(alexnet_normalised),
        "mean_error": _mean([per[c]["error"] for c in standard]),
        "mean_error_all": _mean([e["error"] for e in per.values()]),
        "mce": _mean([per[c]["ce"] for c in standard]),
        "relative_mce": (_mean([per[c]["relative_ce"] for c in standard])
                         if clean_error is not None and alexnet_normalised else None),
        "clean_error": None if clean_error is None else 100.0 * clean_error,
    }
    return summary


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
