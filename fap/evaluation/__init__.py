"""Evaluation as a library: the suite (`fap.evaluation.suite`: ``run_suite``, ``evaluate_model``),
model loading, model-aligned folders, the gather-exact evaluation loop, the ImageNet-C metrics
and the report. ``fap eval`` (`fap.evaluate`) is its command line; the training engine's
final evaluation calls this package, never the command. Nothing here imports a training module."""
from fap.evaluation.folders import ModelFolder, align_classes, imagenet_c_layout
from fap.evaluation.loading import LoadedModel, WeightsError, load_model
from fap.evaluation.metrics import ALEXNET_CLEAN_ERROR, ALEXNET_ERRORS, corruption_summary, topk_correct
from fap.evaluation.report import flatten, format_markdown, write_report

__all__ = [
    "ALEXNET_CLEAN_ERROR",
    "ALEXNET_ERRORS",
    "LoadedModel",
    "ModelFolder",
    "WeightsError",
    "align_classes",
    "corruption_summary",
    "flatten",
    "format_markdown",
    "imagenet_c_layout",
    "load_model",
    "topk_correct",
    "write_report",
]
