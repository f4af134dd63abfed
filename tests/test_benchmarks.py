"""The benchmark scripts run: `benchmarks/gpu_check.sh` at toy size on the CPU, and the
step-cost bench's plain-PyTorch floor. Nothing here times anything."""
import json
import subprocess
import sys

import torch

from helpers_engine import REPO, clean_env, free_port


def test_gpu_check_script_runs_end_to_end_in_smoke_mode(tmp_path):
    """Both parts of the GPU check, on CPU: throughput/MFU rows for the three forms, and a
    ZeRO-2 bf16 fap.train that coalesces its reduction and exports."""
    env = clean_env(GPU_CHECK_SMOKE="1", OUT=str(tmp_path / "out"), PORT=str(free_port()),
                    PY=sys.executable)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    rows = {r["label"]: r for r in result["throughput"]["results"]}
    assert list(rows) == ["vanilla", "fast_advprop", "fast_advprop_fused"]
    assert rows["vanilla"]["cost_ratio"] == 1.0 and rows["fast_advprop"]["cost_ratio"] == 1.2
    # FLOPs are counted, not assumed: three passes over 1.2x the images cost more than vanilla's one
    assert rows["fast_advprop"]["tflop_per_step"] > 1.15 * rows["vanilla"]["tflop_per_step"]
    z = result["zero2"]
    assert z["steps"] == 4 and z["zero_stage"] == 2 and z["precision"] == "bf16"
    assert z["gradient_reduction"].startswith("coalesced")
    table = (tmp_path / "out" / "gpu_check.txt").read_text()
    assert "fast_advprop_fused" in table and "ZeRO-2 bf16 fap.train: 4 updates" in table


def test_three_pass_floor_is_fast_advprops_passes_in_plain_pytorch():
    """The floor makes the same three passes over the same rows as Fast AdvProp."""
    from fap.bench import ThreePassFloor

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    seen = []
    net.register_forward_pre_hook(lambda m, a: seen.append((a[0].shape[0], a[0].requires_grad)))
    x, y = torch.rand(20, 3, 8, 8), torch.randint(0, 5, (20,))
    losses = []
    ThreePassFloor().train_step(net, x, y, lambda loss: (losses.append(float(loss.detach())), loss.backward()))
    assert seen == [(16, False), (4, True), (4, False)]
    assert len(losses) == 3 and all(p.grad is not None for p in net.parameters())
    assert ThreePassFloor().cost(20).ratio == 1.2


def test_cpu_memory_profile_prints_nothing_of_its_own():
    """The CPU profiler's native start/stop lines and 'gpuGetDeviceCount failed' stay out of the output."""
    code = ("import torch\nfrom fap.bench import peak_memory_of_step\n"
            "print(peak_memory_of_step(lambda: torch.ones(256, 256) * 2, 'cpu'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) > 0
    assert "gpuGetDeviceCount" not in proc.stderr and "profiler_st" not in proc.stderr, proc.stderr
