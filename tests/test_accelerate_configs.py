"""Every file in accelerate_configs/ parses with accelerate, and the DeepSpeed ones avoid the known traps."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers_engine import REPO

CONFIGS = REPO / "accelerate_configs"
EXPECTED = {
    "single_gpu.yaml": "NO",
    "multi_gpu.yaml": "MULTI_GPU",
    "multi_node.yaml": "MULTI_GPU",
    "cpu_multiprocess.yaml": "MULTI_GPU",
    "deepspeed_zero2.yaml": "DEEPSPEED",
    "deepspeed_zero3.yaml": "DEEPSPEED",
    "fsdp2.yaml": "FSDP",
    "fsdp2_shard_grad_op.yaml": "FSDP",
}


def test_every_yaml_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_yaml_parses_with_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / name))  # raises on unknown keys
    assert str(cfg.distributed_type).split(".")[-1] == EXPECTED[name]
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert raw["distributed_type"] == EXPECTED[name], "quote NO: bare NO is YAML's False"
    if name.startswith("fsdp2"):
        assert cfg.fsdp_config["fsdp_version"] == 2, "fap drives FSDP2 only (FSDP1 is refused)"
    if name == "multi_node.yaml":
        assert cfg.num_machines == 2 and cfg.num_processes == 16 and cfg.machine_rank == 0


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_pair_is_consistent(stage, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    yaml_path = CONFIGS / f"deepspeed_zero{stage}.yaml"
    cfg = load_config_from_file(str(yaml_path))
    raw = yaml.safe_load(yaml_path.read_text())
    assert "mixed_precision" not in raw, "a YAML naming a deepspeed_config_file must not set mixed_precision"
    json_path = REPO / cfg.deepspeed_config["deepspeed_config_file"]
    assert json_path.is_file()
    ds = json.loads(json_path.read_text())
    assert ds["zero_optimization"]["stage"] == stage
    assert isinstance(ds["gradient_clipping"], (int, float)), "explicit clipping: 'auto' becomes 1.0"
    assert ds["bf16"]["enabled"] is True, "'auto' silently resolves to False without --mixed_precision bf16"
    assert ds["data_types"]["buffer_dtype"] == "bf16"
    assert ds["gradient_accumulation_steps"] == 1 and "optimizer" not in ds and "scheduler" not in ds
    # What `accelerate launch --config_file` hands the plugin: it refuses YAML keys that the JSON owns.
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", ",".join(cfg.deepspeed_config).lower())
    plugin = DeepSpeedPlugin(hf_ds_config=str(json_path))
    assert plugin.zero_stage == stage and plugin.deepspeed_config["bf16"]["enabled"] is True


def test_slurm_example_is_valid_bash():
    script = CONFIGS / "slurm_multi_node.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "accelerate launch" in text and "--rdzv_backend c10d" in text and "#SBATCH --nodes" in text
