"""The step-cost bench's plain-PyTorch floor and its CPU memory profile. Nothing here times
anything. `benchmarks/gpu_check.sh` runs at toy size in tests/test_gpu_path.py, through the
no-index install of its wheelhouse."""
import subprocess
import sys

import torch

from helpers_engine import REPO


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
