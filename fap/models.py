"""timm models that take [0, 1] pixels, with optional dual normalisation.

Attacks in AdvProp / Fast AdvProp are defined in pixel space (ε = 1/255 of the [0, 1]
range in Mei et al., ICLR 2022). Keeping mean/std normalisation *inside* the model makes
ε, the step and the clipping exact whatever the input statistics, and keeps the
perturbation in fp32 even when the network itself runs in bf16: the cast to the
network's parameter dtype happens here, after normalisation.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import timm
import torch
import torch.nn as nn

from fap.norm import convert_dual_norm, strip_aux

__all__ = ["PixelModel", "create_model"]


class PixelModel(nn.Module):
    """A timm classifier preceded by per-channel ``(x - mean) / std``.

    Args:
        net: the timm model; its state dict keys are kept under ``net.``.
        mean: per-channel mean in [0, 1] units.
        std: per-channel std in [0, 1] units.
        model_name: the timm name, recorded for export and error messages.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], model_name: str = ""):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} must have the same length and std > 0")
        self.net = net
        self.model_name = model_name
        # Not persistent: exports must load into a plain timm model.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"expected images of shape (B, {self.mean.shape[1]}, H, W) in [0, 1], got {tuple(x.shape)}"
            )
        x = (x.float() - self.mean) / self.std
        dtype = _param_dtype(self.net)
        if dtype is not None and dtype != x.dtype:
            x = x.to(dtype)  # DeepSpeed bf16 casts weights, not inputs
        return self.net(x)

    def export_state_dict(self) -> Dict[str, torch.Tensor]:
        """The network's weights without auxiliary norms: loads strictly into timm."""
        return strip_aux(self.net.state_dict())


def _param_dtype(module: nn.Module) -> Optional[torch.dtype]:
    for p in module.parameters():
        return p.dtype
    return None


def create_model(
        name: str,
        *,
        num_classes: int,
        dual_norm: bool = True,
        aux_group_size: Optional[int] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        img_size: Optional[int] = None,
        **timm_kwargs: Any,
) -> PixelModel:
    """Build ``timm.create_model(name)`` (random weights), wrap it to take [0, 1] pixels.

    Args:
        name: any timm model name, e.g. ``"resnet50"``, ``"efficientnet_b0"``,
            ``"vit_base_patch16_224"``.
        num_classes: classifier width.
        dual_norm: give every norm layer an auxiliary copy (`fap.norm.convert_dual_norm`).
            False gives shared norms (plain adversarial training when used with an attack).
        aux_group_size: ghost-batch size of auxiliary BatchNorm statistics.
        mean, std: input normalisation; defaults to the model's timm pretrained config.
        img_size: passed to timm for models that need it (ViT).
        **timm_kwargs: forwarded to ``timm.create_model`` (``drop_path_rate``, ...).
    """
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise ValueError(
            f"unknown timm model {name!r}; see timm.list_models('*pattern*') for the names"
        )
    kwargs = dict(timm_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        net = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise ValueError(f"timm model {name!r} does not take the arguments {sorted(kwargs)} it was given "
                         f"({e}); remove the ones it does not know (model.kwargs, model.img_size, "
                         "model.drop_path_rate)") from e
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    mean = tuple(mean if mean is not None else cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(std if std is not None else cfg.get("std", (0.229, 0.224, 0.225)))
    if dual_norm:
        convert_dual_norm(net, aux_group_size=aux_group_size)
    return PixelModel(net, mean, std, model_name=name)
