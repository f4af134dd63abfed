"""What each method costs, side by side, on the same model and the same loader batches.

    fap bench                                            # = python benchmarks/step_cost.py
    fap bench --model resnet50 --image-size 224 --batch 64 --device cuda

Part 1 (methods): vanilla, AdvProp with PGD-1 and PGD-5, Fast AdvProp (three passes, and
fused) train on the same pre-decoded loader batches from the same initial weights; an
"epoch" is those batches once. Printed per method: wall time per epoch and its ratio to
vanilla, image-passes per epoch (forward+backward of one image = 1; exact, from the
method), peak tensor memory of one step, and the whole-run ratio when the method is
budget-matched (Fast AdvProp: epochs / (1 + p_adv), Mei et al., ICLR 2022) against
``--reference-epochs`` vanilla epochs (105, ResNet-50's schedule). Rounds are
interleaved (method 1, 2, ..., then again). ``vs vanilla`` divides the fastest rounds (as
``timeit`` does: other load only ever adds time); ``(paired)`` is the median over rounds of
the ratio within a round, and ``(CPU)`` the same for process CPU time. On a shared machine
trust the paired columns: the two fastest rounds can come from different load, and the
ratio of minima moved by ±0.1 between repeated runs of unchanged code, the paired median
by about ±0.05.

Fast AdvProp runs as the recipes train it: auxiliary BatchNorm statistics in ghost groups
of ``--aux-group-size`` 16 and Shuffling BN between them. The default loader batch 160
(128 clean + 32 adversarial) is the reference layout per GPU (64 + 16) on two emulated
GPUs, so Shuffling BN has two groups to regroup across. At a batch whose B_a does not
split into two groups (e.g. 100: B_a = 20) Fast AdvProp runs with one BN group and no
shuffle, which is cheaper than what the recipes train; the table says which it was.
``--batch 100,160,320`` measures several batch sizes in one run; ``--methods`` picks a
subset (vanilla always runs). Vanilla trains the plain timm model (no auxiliary norms), as
the recipes train it.

``three_pass_floor`` is Fast AdvProp's three passes written in plain PyTorch on the plain
model: the clean part, the noisy part with its input gradient, the FGSM-stepped part; no
auxiliary norms, ghost groups, Shuffling BN, gradient scales or metrics. It is what any
implementation pays on this hardware, so ``vs floor`` (Fast AdvProp over the floor,
paired) is fap's own overhead, and the floor over vanilla is the hardware's.

Measurements made with it, and what they show, are in ``benchmarks/results/`` (README.md
there, the raw tables beside it) and the README's "Cost, measured".

Part 2 (engine overhead): one vanilla epoch through ``fap.train`` against a bare PyTorch
loop (same model, data loader, optimizer and loss), training time only (fap's summary
excludes its evaluation and checkpoint time).

Targets (CPU, small model): Fast AdvProp <= 1.25x vanilla per epoch (ideal 1.2x; budget-matched
total <= 1.02x); AdvProp PGD-5 about 7x; fap's vanilla epoch within 5 % of the bare loop.
This is a measurement, not a test: nothing here asserts.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
import warnings
from typing import Dict, List, Optional, Tuple, Union

import torch

from fap.attacks import random_start, sign_step
from fap.data import DataConfig, build_loader, num_classes, to_unit_float
from fap.methods import build_method, matched_budget
from fap.methods.fast_advprop import split_sizes
from fap.models import create_model
from fap.norm import has_batch_norm, set_aux_group_size

__all__ = ["add_arguments", "run", "main"]

# The vanilla schedule the whole-run ratio is budget-matched against: ResNet-50's 105 epochs,
# which Fast AdvProp divides to 87 (Mei et al., ICLR 2022, Sec. 4.1; recipes/resnet50.py).
REFERENCE_EPOCHS = 105

METHODS = [
    ("vanilla", "vanilla", {}),
    ("advprop_pgd1", "advprop", {"attack_steps": 1}),
    ("advprop_pgd5", "advprop", {"attack_steps": 5}),
    ("fast_advprop", "fast_advprop", {}),
    ("fast_advprop_fused", "fast_advprop", {"fused": True}),
    ("three_pass_floor", "floor", {}),
]


class ThreePassFloor:
    """Fast AdvProp's three passes in plain PyTorch: the floor any implementation pays.

    The same model without auxiliary norms, no ghost groups, no Shuffling BN, no
    per-group gradient scale, no metrics: a clean pass over the first B_c images, a noisy
    pass over the last B_a from a random start that keeps its weight gradients and takes
    the input gradient, and an FGSM-stepped adversarial pass over the same B_a. What it
    costs over vanilla is the hardware's price for three smaller batches and the
    attack's input gradient; what Fast AdvProp costs over *it* is fap's own code.
    """
    name = "three_pass_floor"

    def __init__(self):
        self._fast = build_method("fast_advprop")
        self.config = self._fast.config

    def cost(self, batch_size: int):
        return self._fast.cost(batch_size)

    def train_step(self, model, images, labels, backward, **_):
        c = self.config
        b_c, b_a = split_sizes(images.shape[0], c.p_adv)
        k = 1.0 / self._fast.weights(b_c, b_a)["shared"]
        ce = torch.nn.functional.cross_entropy
        backward(k * ce(model(images[:b_c]), labels[:b_c], reduction="sum"))
        x_a, y_a = images[b_c:], labels[b_c:]
        x_n = random_start(x_a, c.epsilon, random_init_prob=c.random_init_prob,
                           per=c.random_init_per).requires_grad_(True)
        backward(k * c.beta * ce(model(x_n), y_a, reduction="sum"))
        x_adv = sign_step(x_a, x_n, x_n.grad, epsilon=c.epsilon, step=c.step if c.step is not None else c.epsilon)
        backward(k * c.beta * ce(model(x_adv), y_a, reduction="sum"))
        return {}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/demo", help="dataset root (generated if --source demo)")
    p.add_argument("--source", default="demo", choices=["demo", "folder"])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--channels", default="32,64,128,256", help="ResNet widths ('' = the model's own)")
    p.add_argument("--model-kwargs", default="{}", help='more timm.create_model arguments, JSON (e.g. {"patch_size": 4})')
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--batch", type=_batch_sizes, default=160,
                   help="loader batch (Fast AdvProp: 128 clean + 32 adversarial); a comma list (e.g. 100,160,320) "
                        "runs part 1 once per batch size")
    p.add_argument("--aux-group-size", type=int, default=16,
                   help="Fast AdvProp's auxiliary BN groups (ghost batches), as the recipes train: groups of 16 "
                        "emulate 16 adversarial images per GPU, and Shuffling BN regroups them. Used when it splits "
                        "B_a into at least 2 groups; otherwise (or 0) one group, and Shuffling BN is a no-op")
    p.add_argument("--batches", type=int, default=8, help="loader batches per 'epoch' in part 1")
    p.add_argument("--methods", default=",".join(name for name, _, _ in METHODS),
                   help="which of part 1's methods to run, comma-separated (vanilla is always run: the ratios need it)")
    p.add_argument("--reference-epochs", type=int, default=REFERENCE_EPOCHS,
                   help="the vanilla epochs the budget-matched total divides (ResNet-50's 105 -> 87)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved repetitions (the fastest is reported)")
    p.add_argument("--engine-steps", type=int, default=20, help="updates per engine-overhead epoch (part 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads; 0: 1 on CPU (a second thread on a 2-core machine shared with the "
                        "loader worker makes timings swing by 10x), torch's default on GPU")
    p.add_argument("--skip-engine", action="store_true", help="only part 1")
    p.add_argument("--json", default=None, help="also write the numbers here")


def _batch_sizes(text: str) -> Union[int, Tuple[int, ...]]:
    sizes = tuple(int(v) for v in str(text).split(",") if v.strip())
    if not sizes or any(b < 2 for b in sizes):
        raise argparse.ArgumentTypeError(f"--batch must be an int >= 2 or a comma list of them, got {text!r}")
    return sizes[0] if len(sizes) == 1 else sizes


def aux_groups(args, method) -> Optional[int]:
    """The ghost-group size Fast AdvProp runs with at this batch, or None (one BN group)."""
    g = getattr(args, "aux_group_size", 0)
    if not g:
        return None
    _, b_a = split_sizes(args.batch, method.config.p_adv)
    return g if (b_a % g == 0 and b_a // g >= 2) else None


def model_kwargs(args) -> Dict:
    kw = json.loads(args.model_kwargs)
    if args.channels:
        kw["channels"] = [int(c) for c in args.channels.split(",")]
    return kw


def fixed_batches(args, data_cfg: DataConfig) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``--batches`` training batches, decoded once, kept as uint8 in memory."""
    loader = build_loader(data_cfg, "train", batch_size=args.batch, train=True, seed=0)
    out = []
    for images, labels in loader:
        out.append((images.clone(), labels.clone()))
        if len(out) == args.batches:
            break
    if len(out) < args.batches:
        raise SystemExit(f"the training split has only {len(out)} batches of {args.batch}; lower --batches")
    return out


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence the process's stderr (file descriptor 2) for the duration: the profiler's C++
    side prints a start/stop trace line and, on a machine without a GPU, "gpuGetDeviceCount
    failed", none of which is a problem of the measurement. Python exceptions still propagate."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_of_step(fn, device: str) -> float:
    """Peak tensor memory (MiB) while ``fn()`` runs: CUDA's allocator peak, or on CPU the
    torch profiler's memory timeline (parameters, gradients, optimizer state, activations)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                          with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return max(sum(s) for s in sizes) / 2 ** 20 if sizes else float("nan")


def part1(args, data_cfg: DataConfig) -> Dict[str, Dict]:
    """Time every chosen method on the same batches from the same weights; one result per method."""
    device = torch.device(args.device)
    n_classes = num_classes(data_cfg)
    batches = fixed_batches(args, data_cfg)
    torch.manual_seed(0)
    init = create_model(args.model, num_classes=n_classes, **model_kwargs(args)).to(device)
    torch.manual_seed(0)
    plain = create_model(args.model, num_classes=n_classes, dual_norm=False, **model_kwargs(args)).to(device)
    methods = _chosen_methods(args)
    batch_norm = has_batch_norm(init)
    groups = {name: aux_groups(args, m) if name.startswith("fast_advprop") and batch_norm else None
              for name, m in methods.items()}
    times, cpu, peak = _time_rounds(args, methods, batches, init=init, plain=plain, groups=groups, device=device)
    return {name: {**_method_result(args, name, method, times, cpu), "peak_memory_mib": peak[name],
                   "aux_group_size": groups[name], "batch_norm": batch_norm}
            for name, method in methods.items()}


def _chosen_methods(args) -> Dict[str, object]:
    """``--methods`` (vanilla always) as ``{name: method}``."""
    chosen = set(getattr(args, "methods", "").split(",")) if getattr(args, "methods", "") else {n for n, _, _ in METHODS}
    unknown = chosen - {n for n, _, _ in METHODS}
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {[n for n, _, _ in METHODS]}")
    return {name: ThreePassFloor() if kind == "floor" else build_method(kind, None, **kw)
            for name, kind, kw in METHODS if name in chosen | {"vanilla"}}


def _make_step(method, model, opt, device: torch.device):
    """One optimizer update of ``method`` on a uint8 loader batch."""
    def step(images, labels):
        x = to_unit_float(images.to(device, non_blocking=True))
        with warnings.catch_warnings():  # "Shuffling BN is a no-op": the table says so
            warnings.filterwarnings("ignore", message="Shuffling BN is a no-op")
            method.train_step(model, x, labels.to(device), lambda loss: loss.backward())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_rounds(args, methods, batches, *, init, plain, groups, device):
    """Interleaved rounds: wall and CPU seconds per epoch of each method, and its peak memory."""
    times: Dict[str, List[float]] = {name: [] for name in methods}
    cpu: Dict[str, List[float]] = {name: [] for name in methods}
    peak: Dict[str, float] = {}
    for r in range(args.rounds):
        for name, method in methods.items():
            # vanilla and the floor train the plain model, as the recipes train vanilla
            model = copy.deepcopy(plain if name in ("vanilla", "three_pass_floor") else init).train()
            set_aux_group_size(model, groups[name])
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            step = _make_step(method, model, opt, device)
            for images, labels in batches[:2]:  # warm-up (allocator, oneDNN/cuDNN primitives)
                step(images, labels)
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            for images, labels in batches:
                step(images, labels)
            _sync(device)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            if r == 0:
                peak[name] = peak_memory_of_step(lambda: step(*batches[0]), args.device)
            print(f"  round {r + 1}/{args.rounds} {name:>20}: {times[name][-1]:.2f} s", flush=True)
    return times, cpu, peak


def _method_result(args, name: str, method, times: Dict[str, List[float]], cpu: Dict[str, List[float]]) -> Dict:
    """Ratios of one method's times to vanilla's (and the floor's), and its exact image-passes."""
    cost = method.cost(args.batch)
    per_epoch, vanilla = min(times[name]), min(times["vanilla"])
    epochs_factor = None  # the floor is not a method: it has no budget of its own
    if name != "three_pass_floor":
        reference = getattr(args, "reference_epochs", REFERENCE_EPOCHS)
        matched, _ = matched_budget(method.name, method.config, reference)
        epochs_factor = matched / reference  # 87 / 105 for Fast AdvProp, 35 / 105 for AdvProp PGD-1
    return {
        "seconds_per_epoch": per_epoch,
        "ratio_to_vanilla": per_epoch / vanilla,
        "median_ratio_to_vanilla": statistics.median(times[name]) / statistics.median(times["vanilla"]),
        "paired_median_ratio_to_vanilla": _paired_median(times[name], times["vanilla"]),
        "paired_median_cpu_ratio_to_vanilla": _paired_median(cpu[name], cpu["vanilla"]),
        "cpu_ratio_to_vanilla": min(cpu[name]) / min(cpu["vanilla"]),
        "image_passes_per_epoch": cost.image_passes * args.batches,
        "image_pass_ratio": cost.ratio,
        "budget_matched_total_ratio": None if epochs_factor is None else per_epoch / vanilla * epochs_factor,
        "paired_median_ratio_to_floor": (_paired_median(times[name], times["three_pass_floor"])
                                         if "three_pass_floor" in times else None),
        "all_seconds": times[name],
        "all_cpu_seconds": cpu[name],
    }


def _paired_median(times: List[float], vanilla: List[float]) -> float:
    """Median over rounds of the time ratio within a round (a round's methods ran back to back)."""
    return statistics.median(t / v for t, v in zip(times, vanilla))


def part2(args, data_cfg: DataConfig) -> Dict[str, float]:
    """Vanilla through fap.train vs a bare loop: training seconds for ``--engine-steps`` updates."""
    import fap

    n_classes = num_classes(data_cfg)
    fap_times, bare_times = [], []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = fap.TrainConfig(
                train=fap.RunSection(name="overhead", epochs=1, batch_size=args.batch, max_steps=args.engine_steps,
                                     precision="fp32"),
                data=data_cfg,
                model=fap.ModelConfig(name=args.model, kwargs=model_kwargs(args), dual_norm=False),
                method=build_method("vanilla").config,
                optim=fap.OptimConfig(opt="momentum", lr=0.01, lr_base_size=0, weight_decay=0.0,
                                      no_decay_norm_bias=False),
                sched=fap.ScheduleConfig(sched="none"),
                checkpoint=fap.CheckpointConfig(every_steps=0, every_epochs=0, export=False),
                log=fap.LogConfig(output_dir=tmp, trackers=(), progress=False, every_steps=10 ** 6),
            )
            summary = fap.train(cfg)
            fap_times.append(summary["train_seconds"])
        bare_times.append(bare_loop(args, data_cfg, n_classes))
        print(f"  round {r + 1}/{args.rounds}: fap {fap_times[-1]:.2f} s, bare loop {bare_times[-1]:.2f} s", flush=True)
    f, b = min(fap_times), min(bare_times)
    return {"fap_seconds": f, "bare_seconds": b, "overhead": f / b - 1.0, "fap_all": fap_times, "bare_all": bare_times}


def bare_loop(args, data_cfg: DataConfig, n_classes: int) -> float:
    """The same training in plain PyTorch: timm model, SGD, cross-entropy, the same loader."""
    import timm

    device = torch.device(args.device)
    torch.manual_seed(0)
    net = timm.create_model(args.model, num_classes=n_classes, **model_kwargs(args)).to(device).train()
    cfg = net.pretrained_cfg
    mean = torch.tensor(cfg["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], device=device).view(1, -1, 1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loader = build_loader(data_cfg, "train", batch_size=args.batch, train=True, seed=0)
    start = time.perf_counter()
    for i, (images, labels) in enumerate(loader):
        x = (images.to(device).float() / 255.0 - mean) / std
        loss = torch.nn.functional.cross_entropy(net(x), labels.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i + 1 == args.engine_steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    threads = args.threads or (1 if args.device == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    data_cfg = DataConfig(source=args.source, path=args.data, image_size=args.image_size, crop_pct=1.0,
                          scale=(0.25, 1.0), num_workers=1)
    sizes = args.batch if isinstance(args.batch, tuple) else (args.batch,)
    print(f"device {args.device}, {torch.get_num_threads()} threads, model {args.model} {model_kwargs(args)}, "
          f"{args.image_size}px, loader batch {', '.join(map(str, sizes))}, {args.batches} batches per epoch, "
          f"{args.rounds} rounds")
    lines, by_batch = [], {}
    for b in sizes:
        sub = copy.copy(args)
        sub.batch = b
        print(f"part 1: methods, loader batch {b}")
        res = part1(sub, data_cfg)
        by_batch[b] = res
        lines += ["", table(sub, res)]
    out = {"args": vars(args), "methods": by_batch[sizes[0]], "by_batch": {str(b): r for b, r in by_batch.items()}}
    if not args.skip_engine:
        sub = copy.copy(args)
        sub.batch = sizes[0]
        print(f"part 2: engine overhead (vanilla, loader batch {sizes[0]})")
        eng = part2(sub, data_cfg)
        out["engine"] = eng
        lines.append("")
        lines.append(f"engine overhead: fap.train {eng['fap_seconds']:.2f} s vs bare PyTorch loop {eng['bare_seconds']:.2f} s "
                     f"for {args.engine_steps} vanilla updates = {100 * eng['overhead']:+.1f} %")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def table(args, res: Dict[str, Dict]) -> str:
    """Part 1's results at one batch size, one line per method."""
    fast = build_method("fast_advprop")
    b_c, b_a = split_sizes(args.batch, fast.config.p_adv)
    g = aux_groups(args, fast)
    if not all(r.get("batch_norm", True) for r in res.values()):
        bn = "no BatchNorm in the model: ghost groups and Shuffling BN do not apply"
    else:
        bn = (f"aux BN in {b_a // g} groups of {g}, Shuffling BN on" if g else
              f"aux BN in one group (--aux-group-size {args.aux_group_size} does not split B_a={b_a} into >= 2 "
              "groups), Shuffling BN a no-op")
    lines = [f"loader batch {args.batch}: Fast AdvProp {b_c} clean + {b_a} adversarial, {bn}",
             f"{'method':>20} {'s/epoch':>9} {'vs vanilla':>11} {'(paired)':>9} {'(CPU)':>7} "
             f"{'image-passes':>13} {'(ratio)':>8} {'peak MiB':>9} {'budget-matched total':>21} {'vs floor':>9}"]
    for name, r in res.items():
        total = "-" if r["budget_matched_total_ratio"] is None else f"{r['budget_matched_total_ratio']:.3f}x"
        floor = r.get("paired_median_ratio_to_floor")
        floor = f"{floor:.3f}x" if floor is not None and name.startswith("fast_advprop") else "-"
        lines.append(f"{name:>20} {r['seconds_per_epoch']:9.2f} {r['ratio_to_vanilla']:10.3f}x "
                     f"{r['paired_median_ratio_to_vanilla']:8.3f}x {r['paired_median_cpu_ratio_to_vanilla']:6.3f}x "
                     f"{r['image_passes_per_epoch']:13d} {r['image_pass_ratio']:7.2f}x {r['peak_memory_mib']:9.1f} "
                     f"{total:>21} {floor:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fap bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
