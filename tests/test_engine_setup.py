"""`fap.engine.setup`: resuming across launches that store checkpoints differently is refused."""
from pathlib import Path

import pytest

from fap.config import ConfigError, TrainConfig, to_dict
from fap.engine.setup import check_resume_config


@pytest.mark.parametrize("saved, launched", [("FSDP2", "false"), ("DistributedType.MULTI_CPU", "true")])
def test_an_fsdp2_checkpoint_resumes_only_under_fsdp2(saved, launched, monkeypatch):
    """FSDP2 checkpoints are distributed state dicts, the others Accelerate's own files."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", launched)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    cfg = TrainConfig()
    marker = {"config": to_dict(cfg), "world_size": 2, "distributed_type": saved}
    with pytest.raises(ConfigError, match="FSDP2.*resume with the launch that wrote it"):
        check_resume_config(marker, cfg, Path("ckpt"), 2)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true" if launched == "false" else "false")
    check_resume_config(marker, cfg, Path("ckpt"), 2)  # the matching launch is fine
