"""`fap.engine.distributed`: FSDP2 settings that need no processes."""
from types import SimpleNamespace

import pytest
import torch

from fap.config import ConfigError


def test_fsdp1_is_refused_with_the_setting_to_change(monkeypatch):
    from fap.engine.distributed import fsdp2_plugin

    monkeypatch.setenv("FSDP_VERSION", "1")
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None))
    with pytest.raises(ConfigError, match="FSDP_VERSION=1.*fsdp_version: 2"):
        fsdp2_plugin(accelerator, "fp32")


def test_fsdp2_policy_reduces_in_fp32_and_keeps_buffers_loading_local(monkeypatch):
    from fap.engine.distributed import fsdp2_plugin

    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None))
    plugin = fsdp2_plugin(accelerator, "bf16")
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.float32,
                                                                             torch.float32)
    assert plugin.cpu_ram_efficient_loading is False and accelerator.state.fsdp_plugin is plugin


def test_each_dual_batchnorm_is_one_fp32_unit_with_its_aux_copy():
    """In bf16 every outermost BatchNorm (a dual one carries its aux copy inside) gets its own unit."""
    from fap.engine.distributed import _outermost_batch_norms
    from fap.models import create_model
    from fap.norm import AUX_NAME

    model = create_model("test_resnet", num_classes=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    found = _outermost_batch_norms(model)
    every = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(found) * 2 == len(every)  # main (outer) + aux (inside it)
    assert all(hasattr(m, AUX_NAME) for m in found)


def test_fsdp2_on_one_process_is_a_clear_error():
    from fap.engine.distributed import shard_fsdp2

    with pytest.raises(ConfigError, match="1 process.*launch without --use_fsdp"):
        shard_fsdp2(SimpleNamespace(num_processes=1), torch.nn.Linear(2, 2), "fp32")
