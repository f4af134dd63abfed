"""Evaluation as a library: the suite (`fap.evaluation.suite`: ``run_suite``, ``evaluate_model``),
model loading, model-aligned folders, the gather-exact evaluation loop, the ImageNet-C metrics
and the report. ``fap eval`` (`fap.evaluate`) is its command line; the training engine's
final evaluation calls this package, never the command. Nothing here imports a training module.

The torch-free parts (the suite's config, `fap.evaluation.config`, and the report) import at
once; the rest on first use (PEP 562), so ``fap.config`` reads ``SuiteConfig`` without torch."""
from fap.evaluation.report import flatten, format_markdown, write_report  # torch-free
from fap.lazy import lazy_exports

_LAZY = {
    "ModelFolder": "fap.evaluation.folders",
    "align_classes": "fap.evaluation.folders",
    "imagenet_c_layout": "fap.evaluation.folders",
    "LoadedModel": "fap.evaluation.loading",
    "WeightsError": "fap.evaluation.loading",
    "load_model": "fap.evaluation.loading",
    "ALEXNET_CLEAN_ERROR": "fap.evaluation.metrics",
    "ALEXNET_ERRORS": "fap.evaluation.metrics",
    "corruption_summary": "fap.evaluation.metrics",
    "topk_correct": "fap.evaluation.metrics",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


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
