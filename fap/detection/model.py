"""torchvision RetinaNet with trainable, dual BatchNorm, and its export.

Mei et al. (ICLR 2022, Sec. 5, Table 7) train RetinaNet with Fast AdvProp on COCO with the
BatchNorm statistics *not* frozen: torchvision freezes them (``FrozenBatchNorm2d``) only
when it loads pretrained weights, which would leave nothing to disentangle. `build_retinanet`
builds the detector as ``torchvision.models.detection.retinanet_resnet50_fpn`` does, with
``weights=None`` and plain, trainable ``nn.BatchNorm2d`` in every backbone layer, then
gives every BatchNorm an auxiliary copy (`fap.norm.convert_dual_norm`). The FPN and the
v1 heads have no norm layers.

`Detector` wraps it for the methods (`fap.tasks.DetectionTask`): ``model(images, targets)``
returns per-image losses ``(B, 2)`` = (focal classification, box regression) whatever
``model.training`` says, so the BatchNorm mode (batch or running statistics) is the
caller's choice, as for classification; ``model(images)`` returns torchvision's
detections (in eval mode). Images are ``(B, 3, H, W)`` float in [0, 1]: RetinaNet's own
transform normalises and resizes them inside the model, so attacks stay in pixel space.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn

from fap.norm import convert_dual_norm, strip_aux

__all__ = ["BACKBONES", "Detector", "build_retinanet", "plain_retinanet", "per_image_losses"]

BACKBONES = ("resnet50", "resnet18")


def plain_retinanet(num_classes: int, *, backbone: str = "resnet50", min_size: int = 800, max_size: int = 1333,
                    **kwargs) -> nn.Module:
    """torchvision's RetinaNet-FPN without downloaded weights, BatchNorm trainable everywhere.

    ``backbone="resnet50"`` is ``retinanet_resnet50_fpn(weights=None, weights_backbone=None,
    trainable_backbone_layers=5)`` with ``norm_layer=nn.BatchNorm2d`` spelled out;
    ``"resnet18"`` is the same construction on ResNet-18 (for tests and the demo).
    """
    from torchvision.models import resnet18, resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if backbone not in BACKBONES:
        raise ValueError(f"backbone={backbone!r}; expected one of {', '.join(BACKBONES)}")
    trunk = {"resnet50": resnet50, "resnet18": resnet18}[backbone](weights=None, norm_layer=nn.BatchNorm2d)
    fpn = _resnet_fpn_extractor(trunk, 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(fpn, num_classes, min_size=min_size, max_size=max_size, **kwargs)


def per_image_losses(net: nn.Module, images: torch.Tensor, targets: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
    """``(B, 2)``: torchvision RetinaNet's classification and box losses of each image.

    The training path of ``RetinaNet.forward`` (transform, backbone, head, anchors), then
    ``compute_loss`` one image at a time: torchvision's loss is the mean over images of
    per-image terms each normalised by that image's foreground anchors, so image i's row
    is exactly its term, and the mean of the rows is torchvision's loss.
    """
    if len(targets) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(targets)} targets")
    batch, tgts = net.transform(list(images), [dict(t) for t in targets])
    features = list(net.backbone(batch.tensors).values())
    head = net.head(features)
    anchors = net.anchor_generator(batch, features)
    rows = []
    for i in range(len(tgts)):
        losses = net.compute_loss(tgts[i:i + 1], {k: v[i:i + 1] for k, v in head.items()}, anchors[i:i + 1])
        rows.append(torch.stack([losses["classification"], losses["bbox_regression"]]))
    return torch.stack(rows)


class Detector(nn.Module):
    """A torchvision detector taking [0, 1] images; ``model(x, targets)`` gives per-image losses.

    Args:
        net: the RetinaNet; its state dict keys are kept under ``net.``.
        arch: ``{"backbone", "num_classes", "min_size", "max_size"}``, recorded for export.
    """

    def __init__(self, net: nn.Module, arch: Dict):
        super().__init__()
        self.net = net
        self.arch = dict(arch)

    def forward(self, images: torch.Tensor, targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}; divide uint8 by 255")
        dtype = next(self.net.parameters()).dtype
        if images.dtype != dtype:
            images = images.to(dtype)  # attacks hand over fp32 pixels; the network may run in another dtype
        if targets is None:
            return self.net(list(images))
        return per_image_losses(self.net, images, targets)

    def export_state_dict(self) -> Dict[str, torch.Tensor]:
        """The detector's weights without auxiliary norms: loads strictly into `plain_retinanet`."""
        return strip_aux(self.net.state_dict())


def build_retinanet(num_classes: int, *, backbone: str = "resnet50", min_size: int = 800, max_size: int = 1333,
                    dual_norm: bool = True, aux_group_size: Optional[int] = None) -> Detector:
    """`plain_retinanet`, with dual BatchNorm (``dual_norm``), wrapped in a `Detector`."""
    net = plain_retinanet(num_classes, backbone=backbone, min_size=min_size, max_size=max_size)
    if dual_norm:
        convert_dual_norm(net, aux_group_size=aux_group_size)
    return Detector(net, {"backbone": backbone, "num_classes": num_classes, "min_size": min_size,
                          "max_size": max_size})
