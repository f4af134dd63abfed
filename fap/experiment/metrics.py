"""The metrics an experiment compares: their short names, titles and direction."""
from __future__ import annotations

__all__ = ["METRIC_ALIASES", "TITLES", "title", "lower_is_better"]

# Short names for the final evaluation's numbers, used in contrasts (``fast:vanilla:corruption_error``).
METRIC_ALIASES = {
    "corruption_error": "eval/imagenet_c/mean_error",
    "mce": "eval/imagenet_c/mce",
    "pgd_top1": "eval/adversarial/top1",
    "rendition_top1": "eval/imagenet_r/top1",
}
TITLES = {"top1": "top-1 (%)", "top5": "top-5 (%)", "train_top1": "train top-1 (%)",
          "corruption_error": "corruption error (%) ↓", "mce": "mCE ↓", "pgd_top1": "PGD top-1 (%)",
          "map": "mAP", "map_corrupted": "corrupted mAP"}
LOWER_IS_BETTER = ("error", "mce", "loss")


def title(metric: str) -> str:
    """A metric's axis and column title."""
    return TITLES.get(metric, metric)


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)
