"""Per-GPU-batch cost sweep: what vanilla, Fast AdvProp (three-pass and fused) and the plain
three-pass floor cost on one GPU, eager and compiled (part of ``benchmarks/gpu_check.sh``).

    python benchmarks/gpu_sweep.py measure --mode eager --out DIR [--deadline UNIX_S] [--smoke]
    python benchmarks/gpu_sweep.py measure --mode compiled --out DIR --flops-from DIR/sweep_eager.json

``measure`` trains synthetic bf16 batches (torch.autocast) through the methods' own
``train_step`` (`fap.methods`; the floor is `fap.bench.ThreePassFloor` on the plain model):
ResNet-50 (channels_last) and ViT-B/16 at 224 px, per-GPU loader batches 80 (64 clean + 16
adversarial: the paper's per-GPU split), 160 and 320. One GPU means one auxiliary BN group
and no Shuffling BN exchange (that all-gather is a multi-GPU cost, not measured here).
Every cell starts from the same weights; per cell: warm-up steps (the compiled mode's
compile happens there), then timed steps, the CUDA allocator's peak over them (it includes
both model instances' weights, ``weights_gib`` in the JSON), and FLOPs
per step counted by torch's FlopCounterMode on one eager step (forward, backward and the
attack's input gradient: executed work), so MFU = FLOPs / step time / peak bf16 FLOP/s.

Compiled mode is what ``train.compile`` does (`fap.engine.compiled.compile_network`): the
network compiled in place, one plain and one dual-norm instance per model reused across
batches and methods (dynamo's default automatic dynamic shapes: a batch dimension that
changes becomes dynamic instead of compiling again). Graphs compiled during warm-up and
during the timed steps are counted; the timed steps must compile none.

A cell starts only if its estimated time fits before ``--deadline``; the estimate comes
from the measured seconds per image-pass of the model (before the first measurement: the
FLOP budget in gpu_check.sh) and, for compiled cells, the slowest compile seen per graph.
A cell that does not fit, or fails (out of memory, a compile error), is recorded as such
and the sweep goes on. Results are rewritten after every cell, so a killed run keeps them.

``benchmarks/gpu_report.py`` merges the two modes with the ZeRO-2 and FSDP2 runs into one
table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch

try:  # the installed fap (gpu_check.sh installs the wheelhouse), else this checkout's
    import fap  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fap.bench import ThreePassFloor  # noqa: E402
from fap.engine.compiled import compile_network, dynamo_counts  # noqa: E402
from fap.methods import build_method  # noqa: E402
from fap.models import create_model  # noqa: E402

# name, timm kwargs, image size, channels_last, optimizer (as the recipes train them)
MODELS = [("resnet50", {}, 224, True, "sgd"), ("vit_base_patch16_224", {}, 224, False, "adamw")]
SMOKE_MODELS = [("test_resnet", {}, 32, True, "sgd"),
                ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, 32, False, "adamw")]
BATCHES, SMOKE_BATCHES = (80, 160, 320), (10, 20)
METHODS = ["vanilla", "fast_advprop", "fast_advprop_fused", "three_pass_floor"]
# Prior seconds per training image-pass at 224 px on an H100/H200 in bf16, before the first
# measurement (gpu_check.sh: FLOPs per image at an assumed MFU), and per compiled graph.
PRIOR_S_PER_IMAGE = {"resnet50": 24.6e9 / (0.05 * 989e12), "vit_base_patch16_224": 105e9 / (0.10 * 989e12)}
PRIOR_COMPILE_S = 45.0
# Graphs a method compiles the first time it runs on a model instance (measured in smoke mode:
# the floor's clean pass reuses vanilla's graph); at a later batch at most one more (a batch
# dimension becoming dynamic, or the fused form's split point, which is a Python int).
FIRST_GRAPHS = {"vanilla": 1, "fast_advprop": 3, "fast_advprop_fused": 1, "three_pass_floor": 2}


def peak_tflops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak: PEAK_TFLOPS, else H100/H200 989, A100 312; None (no MFU) otherwise."""
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return 989.0 if ("H100" in name or "H200" in name) else 312.0 if "A100" in name else None


def build_method_named(name: str):
    if name == "three_pass_floor":
        return ThreePassFloor()
    return build_method("fast_advprop", fused=True) if name == "fast_advprop_fused" else build_method(name)


def build_models(spec, device: torch.device, mode: str, backend: str) -> Dict[str, object]:
    """The plain and the dual-norm model of ``spec`` (same initial weights), compiled in compiled mode."""
    name, kwargs, _, channels_last, _ = spec
    out = {}
    for kind, dual in (("plain", False), ("dual", True)):
        torch.manual_seed(0)
        model = create_model(name, num_classes=1000, dual_norm=dual, **kwargs).to(device).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        out[f"{kind}_init"] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if mode == "compiled":
            compile_network(model, backend)
        out[kind] = model
    out["weights_gib"] = sum(t.numel() * t.element_size() for kind in ("plain", "dual")
                             for t in (*out[kind].parameters(), *out[kind].buffers())) / 2 ** 30
    return out


def make_step(method, model, optimizer: str, device: torch.device):
    """One bf16 update of ``method``: ``step(images, labels)``."""
    cuda = device.type == "cuda"
    params = model.parameters()
    opt = (torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=cuda) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=1e-4, fused=cuda))

    def step(x, y):
        with warnings.catch_warnings(), torch.autocast(device.type, dtype=torch.bfloat16):
            warnings.filterwarnings("ignore", message="Shuffling BN is a no-op")  # one GPU: one BN group
            method.train_step(model, x, y, lambda loss: loss.backward())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_flops(step, x, y) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(x, y)
    return float(counter.get_total_flops())


def measure_cell(step, x, y, device, *, warmup: int, steps: int) -> Dict:
    """Warm-up, then ``steps`` timed updates: time, allocator peak, graphs compiled in each phase."""
    c0 = dynamo_counts()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(x, y)
    sync(device)
    c1, t1 = dynamo_counts(), time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        step(x, y)
    sync(device)
    c2, t2 = dynamo_counts(), time.perf_counter()
    dt = (t2 - t1) / steps
    return {"step_ms": 1000 * dt, "warmup_s": t1 - t0,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None,
            "graphs_warmup": c1["graphs"] - c0["graphs"], "graphs_timed": c2["graphs"] - c1["graphs"],
            "graph_breaks": c2["graph_breaks"] - c0["graph_breaks"]}


class Budget:
    """Whether the next cell fits before the deadline, from what the cells so far measured."""

    def __init__(self, deadline: Optional[float]):
        self.deadline = deadline
        self.s_per_image: Dict[str, float] = {}
        self.compile_s = PRIOR_COMPILE_S
        self.ran: Dict[str, int] = {}   # "model|method" -> graphs its last compiled cell compiled

    def estimate(self, model: str, method: str, batch: int, ratio: float, steps: int, compiled: bool) -> float:
        per_image = self.s_per_image.get(model, PRIOR_S_PER_IMAGE.get(model, 0.0))
        graphs = 0
        if compiled:
            last = self.ran.get(f"{model}|{method}")
            graphs = FIRST_GRAPHS[method] if last is None else min(last, 1)
        return steps * batch * ratio * per_image + graphs * self.compile_s

    def fits(self, seconds: float) -> bool:
        return self.deadline is None or time.time() + seconds < self.deadline

    def learn(self, row: Dict) -> None:
        per_image = row["step_ms"] / 1000 / (row["batch"] * row["cost_ratio"])
        self.s_per_image[row["model"]] = max(self.s_per_image.get(row["model"], 0.0), per_image)
        if row["mode"] == "compiled":
            self.ran[f"{row['model']}|{row['method']}"] = row["graphs_warmup"]
            if row["graphs_warmup"]:
                spent = row["warmup_s"] - row["step_ms"] / 1000 * row["warmup_steps"]
                self.compile_s = max(self.compile_s, spent / row["graphs_warmup"])


def _flops_table(path: Optional[str]) -> Dict[str, float]:
    if not path or not os.path.isfile(path):
        return {}
    rows = json.loads(Path(path).read_text())["rows"]
    return {f"{r['model']}|{r['batch']}|{r['method']}": r["tflop_per_step"] for r in rows
            if r.get("tflop_per_step")}


def run_cell(spec, models, batch: int, method_name: str, args, budget: Budget, flops: Dict[str, float]) -> Dict:
    """One (model, batch, method) cell of the sweep, measured, skipped or failed."""
    name, _, size, channels_last, optimizer = spec
    device = torch.device(args.device)
    row = {"model": name, "batch": batch, "mode": args.mode, "method": method_name,
           "weights_gib": models["weights_gib"]}
    method = build_method_named(method_name)
    steps = args.warmup + args.steps + (1 if args.mode == "eager" else 0)
    need = budget.estimate(name, method_name, batch, method.cost(batch).ratio, steps, args.mode == "compiled")
    if not budget.fits(need):
        return {**row, "status": f"skipped: needs ~{need:.0f} s, the deadline is {budget.deadline - time.time():.0f} s away"}
    kind = "plain" if method_name in ("vanilla", "three_pass_floor") else "dual"
    model = models[kind]
    model.load_state_dict(models[f"{kind}_init"])
    gen = torch.Generator(device=device).manual_seed(batch)
    x = torch.rand(batch, 3, size, size, device=device, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    y = torch.randint(0, 1000, (batch,), device=device, generator=gen)
    try:
        step = make_step(method, model, optimizer, device)
        cost = method.cost(batch)  # counted, exact: the floor makes Fast AdvProp's passes
        row.update(measure_cell(step, x, y, device, warmup=args.warmup, steps=args.steps), status="ok",
                   warmup_steps=args.warmup, timed_steps=args.steps, image_passes=cost.image_passes,
                   cost_ratio=cost.ratio)
        key = f"{name}|{batch}|{method_name}"
        tflop = count_flops(step, x, y) / 1e12 if args.mode == "eager" else flops.get(key)
    except Exception as e:  # one-shot GPU time: record the failure, measure the rest
        torch.cuda.empty_cache() if device.type == "cuda" else None
        return {**row, "status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    peak = peak_tflops(device)
    dt = row["step_ms"] / 1000
    row.update(images_per_s=batch / dt, tflop_per_step=tflop,
               achieved_tflops=tflop / dt if tflop else None,
               mfu=tflop / dt / peak if (tflop and peak) else None)
    budget.learn(row)
    return row


def measure(args) -> int:
    """Run every cell of one mode, smallest batch first, until the deadline; rewrite the JSON
    after each. Exit status 1 if a cell failed (skipped for lack of time is not a failure)."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    import torch._dynamo as dynamo

    dynamo.config.recompile_limit = 64  # several instances and batches share each model's code
    specs, batches = (SMOKE_MODELS, SMOKE_BATCHES) if args.smoke else (MODELS, BATCHES)
    if args.smoke and args.mode == "compiled":
        specs = specs[:1]  # the same code path for both models; one keeps CI's CPU time down
    budget, flops = Budget(args.deadline), _flops_table(args.flops_from)
    out = Path(args.out) / f"sweep_{args.mode}.json"
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke test)",
              "peak_tflops": peak_tflops(device), "mode": args.mode, "backend": args.backend,
              "torch": torch.__version__, "rows": []}
    models = {spec[0]: build_models(spec, device, args.mode, args.backend) for spec in specs}
    for batch in batches:  # batch first: if time runs out, the paper's per-GPU batch of 80 is measured
        for spec in specs:
            for method_name in METHODS:
                row = run_cell(spec, models[spec[0]], batch, method_name, args, budget, flops)
                result["rows"].append(row)
                out.write_text(json.dumps(result, indent=1))
                print(_row_line(row), flush=True)
    return 1 if any(r["status"].startswith("failed") for r in result["rows"]) else 0


def _row_line(r: Dict) -> str:
    if r["status"] != "ok":
        return f"{r['model']:>22} {r['batch']:4d} {r['mode']:>8} {r['method']:>19}  {r['status']}"
    mem = f"{r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else "-"
    return (f"{r['model']:>22} {r['batch']:4d} {r['mode']:>8} {r['method']:>19} {r['step_ms']:8.1f} ms "
            f"{r['images_per_s']:7.0f} img/s  graphs {r['graphs_warmup']}+{r['graphs_timed']}  {mem}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["measure"])
    p.add_argument("--out", required=True, help="directory for sweep_<mode>.json")
    p.add_argument("--mode", choices=["eager", "compiled"], default="eager")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled mode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="toy models, batches and steps (CPU, CI)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--deadline", type=float, default=None, help="unix time after which no cell starts")
    p.add_argument("--flops-from", default=None, help="the eager sweep's JSON (compiled mode reuses its FLOPs)")
    return measure(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
