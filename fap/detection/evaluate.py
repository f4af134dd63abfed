"""COCO mAP of a detector on clean images and on a corrupted copy (Mei et al., ICLR 2022, Table 7).

`coco_map` runs the model through its **main** norms in eval mode (the aux norms are for
training only) and scores the detections with pycocotools' ``COCOeval`` (bbox): ``map``
is AP@[.50:.95] in percent, the number Table 7 reports, with ``map50``, ``map75`` and the
small/medium/large APs beside it.

`corrupted_map` scores a copy made by ``fap data corrupt DIR/val OUT`` (the 15 ImageNet-C
corruptions of the ``imagecorruptions`` package, which Michaelis et al., 2019, made for
detection, at severities 1-5): per corruption the mean over its severities, and
``map_corrupted`` = the mean over the corruptions, i.e. Michaelis et al.'s mPC, which is
what Table 7's "mAP corrupted (15 types)" column reports.

`evaluate_cli` is ``fap eval`` of a detection export or run (`fap.evaluate` dispatches here
when the ``task`` recorded in its ``config.json`` is ``detection``); `load_detector` reads
such an export back as a plain torchvision RetinaNet.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from fap.data.base import DataNotFoundError, to_unit_float
from fap.data.coco import CocoDetection, detection_collate
from fap.checks import ConfigError
from fap.norm import route

__all__ = ["coco_map", "corrupted_map", "detections_to_coco", "summarize_coco", "load_detector", "write_results",
           "evaluate_cli"]

_STATS = ("map", "map50", "map75", "map_small", "map_medium", "map_large")


def detections_to_coco(detections: Sequence[Dict[str, torch.Tensor]], image_ids: Sequence[int]) -> List[Dict]:
    """torchvision detections (xyxy boxes) as COCO result entries (xywh)."""
    results = []
    for det, image_id in zip(detections, image_ids):
        boxes = det["boxes"].detach().float().cpu()
        boxes[:, 2:] -= boxes[:, :2]
        for box, score, label in zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist()):
            results.append({"image_id": int(image_id), "category_id": int(label), "bbox": box,
                            "score": float(score)})
    return results


def summarize_coco(coco_gt, results: List[Dict]) -> Dict[str, float]:
    """pycocotools' bbox AP (percent) of ``results`` against ``coco_gt``; 0 when nothing was detected."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {k: 0.0 for k in _STATS}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: max(0.0, 100.0 * float(v)) for k, v in zip(_STATS, evaluator.stats[:6])}


@torch.no_grad()
def coco_map(model: torch.nn.Module, dataset: CocoDetection, *, batch_size: int = 8, device="cpu",
             num_workers: int = 0) -> Dict[str, float]:
    """COCO bbox mAP of ``model`` (a `fap.detection.model.Detector`) on ``dataset``, main norms.

    The model is put in eval mode and back. Returns ``{"map", "map50", ..., "count"}``.
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=detection_collate)
    was_training = model.training
    model.eval()
    results: List[Dict] = []
    try:
        with route(model, "main"):
            for images, targets in loader:
                detections = model(to_unit_float(images.to(device)))
                results += detections_to_coco(detections, [t["image_id"] for t in targets.targets])
    finally:
        model.train(was_training)
    return {**summarize_coco(dataset.coco, results), "count": len(dataset)}


def corrupted_map(model: torch.nn.Module, corrupt_root: str, clean: CocoDetection, *,
                  corruptions: Optional[Sequence[str]] = None, severities: Optional[Sequence[int]] = None,
                  batch_size: int = 8, device="cpu") -> Dict[str, float]:
    """mAP on every (corruption, severity) of a ``fap data corrupt`` copy of ``clean``'s images.

    Args:
        model: the detector.
        corrupt_root: ``OUT`` of ``fap data corrupt DIR/val OUT`` (``OUT/<c>/<s>/images``).
        clean: the clean dataset (its annotations are the ground truth of every copy).
        corruptions, severities: default: those the copy was made with (its marker file).

    Returns:
        ``{"map_corrupted": mean over corruptions, "map/<c>": mean over severities,
        "map/<c>/<s>": ...}``.
    """
    from fap.data.corrupt import MARKER

    marker = os.path.join(corrupt_root, MARKER)
    if not os.path.isfile(marker):
        raise DataNotFoundError(f"{corrupt_root}: not a complete `fap data corrupt` copy (no {MARKER}); make one "
                                "with: fap data corrupt DIR/val OUT")
    with open(marker) as f:
        made = json.load(f)
    corruptions = list(corruptions or made["corruptions"])
    severities = list(severities or made["severities"])
    out: Dict[str, float] = {}
    for c in corruptions:
        for s in severities:
            images_dir = os.path.join(corrupt_root, c, str(s), "images")
            if not os.path.isdir(images_dir):
                raise DataNotFoundError(f"{images_dir}: missing from the corrupted copy {corrupt_root}")
            data = CocoDetection(images_dir, "", coco=clean.coco)
            out[f"map/{c}/{s}"] = coco_map(model, data, batch_size=batch_size, device=device)["map"]
        out[f"map/{c}"] = sum(out[f"map/{c}/{s}"] for s in severities) / len(severities)
    out["map_corrupted"] = sum(out[f"map/{c}"] for c in corruptions) / len(corruptions)
    return out


def write_results(results: Dict[str, float], out_dir: Path) -> Path:
    """``results.json`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return out_dir / "results.json"


def _export_dir(path: str) -> Path:
    p = Path(path)
    for d in (p, p / "export"):
        if (d / "config.json").is_file():
            try:
                recorded = json.loads((d / "config.json").read_text())
            except ValueError:
                break
            if recorded.get("task") == "detection" and "arch" in recorded:  # a run's own config.json has no arch
                return d
    raise ConfigError(f"{path}: not a detection export (no config.json with task 'detection', nor an export/ "
                      "holding one)")


def load_detector(path: str):
    """A `fap.detection.model.Detector` (plain norms) from a detection export or run directory."""
    from safetensors.torch import load_file

    from fap.detection.model import Detector, plain_retinanet

    d = _export_dir(path)
    arch = json.loads((d / "config.json").read_text())["arch"]
    net = plain_retinanet(arch["num_classes"], backbone=arch["backbone"], min_size=arch["min_size"],
                          max_size=arch["max_size"])
    net.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    return Detector(net, arch)


def evaluate_cli(args: Any) -> int:
    """``fap eval RUN_OR_EXPORT --suite clean [c=CORRUPT_DIR] --data DIR`` for a detector."""
    from fap.data.coco import dataset_for
    from fap.evaluation.paper import compare, paper_result
    from fap.evaluation.report import paper_lines

    compare_row = getattr(args, "compare", None)
    if compare_row:  # an unknown row, or a classification one, fails before any evaluation
        try:
            paper_result(compare_row, task="detection")
        except ConfigError as e:
            raise ConfigError(f"--compare {compare_row}: {e}") from None
    if not args.data:
        raise ConfigError("a detection eval scores the validation split's annotations: give --data DIR")
    corrupt = [s.split("=", 1)[1] for s in args.suite if s.startswith("c=")]
    if "clean" not in args.suite and not corrupt:
        raise ConfigError(f"--suite {' '.join(args.suite)}: a detector is scored on 'clean' and/or c=CORRUPT_DIR")
    model = load_detector(args.model)
    val_set = dataset_for(args.data, args.val_split)
    results = coco_map(model, val_set, batch_size=args.batch_size)
    if corrupt:
        results.update(corrupted_map(model, corrupt[0], val_set, batch_size=args.batch_size))
    if compare_row:
        results["paper"] = compare(results, compare_row)
    write_results(results, Path(args.out or f"eval-{Path(args.model).name}"))
    print(" | ".join(f"{k} {v:.2f}" for k, v in results.items() if k in ("map", "map50", "map_corrupted")))
    if compare_row:
        print("\n" + "\n".join(paper_lines(results["paper"])))
    return 0
