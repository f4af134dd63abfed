"""`DetectionSection`: the ``detection`` section of a `fap.config.TrainConfig` (``task="detection"``).

Only what a detection run has and a classification run has not (Mei et al., ICLR 2022,
Table 7: RetinaNet on COCO): the backbone and its weights, RetinaNet's resize, horizontal
flips, and the corrupted copy of the validation images its robustness is scored on.
Everything else (optimizer, schedule with warm-up, batch, checkpoints, log, EMA, the method)
is the run's ordinary sections. A schema: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Tuple

from fap.checks import ConfigError

__all__ = ["DetectionSection", "BACKBONES"]

BACKBONES = ("resnet50", "resnet18")


@dataclass
class DetectionSection:
    """The ``detection`` section (``--detection.key=value``); unused when ``task="classification"``.

    Args:
        backbone: the ResNet trunk of the RetinaNet-FPN: ``resnet50`` (the paper) or ``resnet18``.
        backbone_weights: a local state dict (``.safetensors``/``.pt``, e.g. a fap export of a
            classification run; timm and torchvision share the names) loaded into the trunk;
            "" = random initialisation.
        min_size, max_size: RetinaNet's own resize (800 / 1333 on COCO).
        flip_prob: horizontal flips of training images (boxes flipped with them).
        corrupt_path: a ``fap data corrupt DATA/val OUT`` copy of the validation images, scored
            once on the final weights (corrupted mAP: per corruption the mean over severities,
            then the mean over corruptions); "" = none.
        corrupt_severities: severities of that copy to score; () = every one it has.
    """
    backbone: Literal["resnet50", "resnet18"] = "resnet50"
    backbone_weights: str = ""
    min_size: int = 800
    max_size: int = 1333
    flip_prob: float = 0.5
    corrupt_path: str = ""
    corrupt_severities: Tuple[int, ...] = ()

    def validate(self) -> "DetectionSection":
        if self.min_size < 1 or self.max_size < self.min_size:
            raise ConfigError(f"detection.min_size={self.min_size}, detection.max_size={self.max_size}: expected "
                              "1 <= min_size <= max_size")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ConfigError(f"detection.flip_prob={self.flip_prob}: expected a probability in [0, 1]")
        if any(s < 1 or s > 5 for s in self.corrupt_severities):
            raise ConfigError(f"detection.corrupt_severities={list(self.corrupt_severities)}: severities are 1 to 5")
        return self
