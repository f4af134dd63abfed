"""fap.models: pixel-space timm models with the normalisation inside."""
import pytest
import timm
import torch

from fap.models import create_model
from fap.norm import has_dual_norm


def test_normalisation_inside_and_export_loads_into_plain_timm():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=7, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).eval()
    assert has_dual_norm(model)
    plain = timm.create_model("resnet18", num_classes=7)
    plain.load_state_dict(model.export_state_dict(), strict=True)
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(model(x), plain.eval()((x - 0.5) / 0.5))
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()  # not persistent


def test_defaults_come_from_the_timm_config_and_dual_norm_is_optional():
    model = create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=1, dual_norm=False)
    assert not has_dual_norm(model)
    cfg = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=1).pretrained_cfg
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(cfg["mean"]))


def test_bf16_network_gets_fp32_pixels_cast_inside():
    model = create_model("resnet18", num_classes=4).to(torch.bfloat16).eval()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32  # the perturbation side stays fp32


def test_bad_input():
    with pytest.raises(ValueError, match="unknown timm model 'resnet_does_not_exist'"):
        create_model("resnet_does_not_exist", num_classes=2)
    model = create_model("resnet18", num_classes=2)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        model(torch.rand(2, 1, 32, 32))
