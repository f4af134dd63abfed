"""``[accelerate launch ...] python tests/exactness_runner.py MODEL METHOD SHUFFLE OUT``: one update, measured.

The per-process half of ``tests/test_exactness.py``. It builds the Accelerator exactly as
``fap.train`` does (`fap.engine.distributed.make_accelerator`, precision from the launch),
a tiny model (``resnet``: timm ``test_resnet``, BatchNorm, aux BN in ghost groups of 4;
``vit``: a 2-block ViT, LayerNorm), prepares it with plain SGD (lr 0.1, no momentum or
decay) through the engine's own ``prepare`` and runs ONE update of the path
`fap.engine.step.make_update` picks, over two micro-batches of 40 images (Fast AdvProp:
32 clean + 8 adversarial, in two aux-BN ghost groups of 4): one per process in a
2-process run, both (accumulated) in a 1-process run.

The reference is per micro-batch, because BatchNorm statistics are per process by
design: for each micro-batch ``r`` a fresh fp32 copy of the initial weights runs the
method's ``train_step`` with plain ``loss.backward()``, and the reference gradient is the
mean over ``r`` (equal per-process counts make the global normalisation the mean). With
Shuffling BN on, each reference ``r`` is handed the adversarial images process ``r`` of the
run received from the exchange (the exchange itself is tested in
``test_fast_advprop_distributed.py``). Compared: the weights after the update,
``max|p_run - p_ref| / max|p_ref - p_0|`` per parameter group (shared, main norms, aux norms).

Reductions: every gradient reduction the update issues is counted in elements by wrapping
the ``torch.distributed`` reduce collectives before anything binds them (DDP's reducer is
C++: a communication hook sends its all-reduce through Python). One reduction per update means the elements
reduced equal the trainable parameter count (up to padding), not 2-3x it.
"""
import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

MICRO, NUM_CLASSES, LR = 40, 4, 0.1
_REDUCE_FNS = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter", "reduce", "reduce_scatter_single")


def build_model(name: str, seed: int = 0):
    from fap.models import create_model

    torch.manual_seed(seed)
    if name == "resnet":
        return create_model("test_resnet", num_classes=NUM_CLASSES, aux_group_size=4, mean=(0.5,) * 3,
                            std=(0.5,) * 3)
    return create_model("vit_tiny_patch16_224", num_classes=NUM_CLASSES, img_size=32, patch_size=8, depth=2,
                        mean=(0.5,) * 3, std=(0.5,) * 3)


def build_method(name: str, shuffle: bool):
    from fap.methods import AdvProp, FastAdvProp, Vanilla

    if name == "fast_advprop":
        return FastAdvProp(random_init_prob=0.0, shuffle=shuffle)
    if name == "advprop":
        # deterministic: no random start or random target, batch statistics in the attack
        return AdvProp(attack_steps=1, random_init_prob=0.0, targeted=False, attack_bn_mode="train")
    return Vanilla()


def micro_batches(count: int = 2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (MICRO, 3, 32, 32), dtype=torch.uint8, generator=g),
             torch.randint(0, NUM_CLASSES, (MICRO,), generator=g)) for _ in range(count)]


class ReductionCounter:
    """Elements reduced across processes while ``active`` (the agreement all-reduce excluded)."""

    def __init__(self):
        self.elements, self.calls, self.active = 0, 0, False
        self._saved = {}

    def add(self, tensor) -> None:
        if self.active:
            self.elements += tensor.numel()
            self.calls += 1

    def wrap_torch_distributed(self) -> None:
        for name in _REDUCE_FNS:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._counting(fn))

    def _counting(self, fn):
        def wrapped(*args, **kwargs):
            scatter = fn.__name__.startswith("reduce_scatter")
            tensor = _argument(args, kwargs, 1 if scatter else 0, ("input", "input_tensor", "input_list", "tensor"))
            for t in tensor if isinstance(tensor, (list, tuple)) else [tensor]:
                self.add(t)
            return fn(*args, **kwargs)
        return wrapped

    @staticmethod
    def ddp_hook(state, bucket):
        """DDP's own all-reduce, issued from Python (through the wrapped ``dist.all_reduce``)."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        return default_hooks.allreduce_hook(state, bucket)


def _argument(args, kwargs, position, names):
    if len(args) > position:
        return args[position]
    return next(kwargs[n] for n in names if n in kwargs)


def reference_weights(model_name, method, init, batches, received):
    """w0 - LR * mean_r grad_r (each micro-batch's 1-process step on fresh initial weights, fp32),
    and how many elements have a gradient (vanilla leaves the aux norms without one)."""
    from fap.data import to_unit_float

    grads = {}
    for r, (x, y) in enumerate(batches):
        ref = build_model(model_name)
        ref.load_state_dict(init)
        ref.train()
        torch.manual_seed(100 + r)
        shuffle = contextlib.nullcontext()
        if received is not None:  # Shuffling BN on: the adversarial images process r received
            shuffle = _patched(method, "_shuffle", lambda model, x_adv, y_adv, got=received[r]: got)
        with shuffle:
            method.train_step(ref, to_unit_float(x), y, lambda loss: loss.backward())
        for n, p in ref.named_parameters():
            if p.grad is not None:
                grads[n] = grads.get(n, 0) + p.grad / len(batches)
    weights = {n: (w - LR * grads[n] if n in grads else w) for n, w in init.items()}
    return weights, sum(g.numel() for g in grads.values())


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def group_errors(got, want, init, groups):
    """Per parameter group: max|p_run - p_ref| / max|p_ref - p_0| (``rel_err``), the same in L2
    norm (``rel_l2``), the cosine between the run's and the reference's update, and the max update
    (a group the method does not train, e.g. the aux norms under vanilla: absolute errors)."""
    norm = set(groups["main"]) | set(groups["aux"])
    out = {}
    for group in ("shared", "main", "aux"):
        names = [n for n in want if (n in groups.get(group, ()) if group != "shared" else n not in norm)
                 and init[n].is_floating_point() and not any(s in n for s in ("running_", "num_batches"))]
        if not names:
            continue
        delta = torch.cat([(got[n].double() - want[n].double()).flatten() for n in names])
        update = torch.cat([(want[n].double() - init[n].double()).flatten() for n in names])
        moved, norm = update.abs().max().item(), update.norm().item()
        out[group] = {"rel_err": delta.abs().max().item() / (moved or 1.0), "max_update": moved,
                      "rel_l2": delta.norm().item() / (norm or 1.0),
                      "cosine": torch.nn.functional.cosine_similarity(update + delta, update, dim=0).item()
                      if norm else 1.0}
    return out


def _config(precision: str):
    from fap.config import TrainConfig

    cfg = TrainConfig()
    cfg.train.precision = precision
    return cfg


def main(model_name: str, method_name: str, shuffle: bool, out: str) -> None:
    from fap.engine.distributed import configure_deepspeed, full_state_dict, make_accelerator, shard_fsdp2, using_fsdp2
    from fap.engine.setup import _prepare
    from fap.engine.step import make_update
    from fap.norm import norm_param_names

    counter = ReductionCounter()
    counter.wrap_torch_distributed()  # before DeepSpeed binds its collectives
    precision = "bf16" if os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16" else "fp32"
    cfg = _config(precision)
    accelerator, _ = make_accelerator(cfg, Path(out).parent)
    configure_deepspeed(accelerator, cfg, MICRO)
    world, rank = accelerator.num_processes, accelerator.process_index
    deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    model = build_model(model_name)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    groups = norm_param_names(model)
    method = build_method(method_name, shuffle)
    fsdp2 = using_fsdp2()
    if fsdp2:  # as fap.engine.setup.build_run: sharded before the optimizer is built
        model = shard_fsdp2(accelerator, model, precision)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer, _, _ = _prepare(accelerator, model, optimizer, None, None, (False, False), fsdp2=fsdp2)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # its reducer is C++ otherwise
        model.register_comm_hook(dist.group.WORLD, counter.ddp_hook)
    update = make_update(accelerator, model, optimizer, method, deepspeed=deepspeed, accum_steps=3 - world)
    if os.environ.get("EXACTNESS_DROP_NO_SYNC") == "1":  # negative control: every backward reduces
        update._no_sync = contextlib.nullcontext
    batches = micro_batches()
    mine = batches if world == 1 else [batches[rank]]
    received = []
    if shuffle:  # record what this process's adversarial pass received from the exchange
        real = method._shuffle
        method._shuffle = lambda *a: received.append(tuple(t.detach().clone() for t in real(*a))) or received[-1]
    import fap.engine.step as step_module

    agree = step_module.agree
    step_module.agree = lambda *a, **k: _uncounted(counter, agree, *a, **k)
    torch.manual_seed(100 + rank)
    counter.active = True
    result = update(mine)
    counter.active = False
    step_module.agree = agree
    got = full_state_dict(accelerator, model)
    running = [b for n, b in accelerator.unwrap_model(model).named_buffers() if "running_" in n]
    buffers = {"dtypes": sorted({str(b.dtype) for b in running}),
               "finite": all(bool(torch.isfinite(b.float()).all()) for b in running)}
    if shuffle and world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, received[0])
        received = everyone
    if rank != 0:
        return
    want, trainable = reference_weights(model_name, build_method(method_name, shuffle), init, batches,
                             received if shuffle else None)
    with open(out, "w") as f:
        json.dump({"groups": group_errors(got, want, init, groups), "nonfinite": result.nonfinite,
                   "description": update.description, "world": world, "precision": precision,
                   "distributed_type": "FSDP2" if fsdp2 else accelerator.distributed_type.name,
                   "bn_buffers": buffers, "reduced_elements": counter.elements, "reduce_calls": counter.calls,
                   "trainable_elements": trainable}, f)


def _uncounted(counter, fn, *args, **kwargs):
    active, counter.active = counter.active, False
    try:
        return fn(*args, **kwargs)
    finally:
        counter.active = active


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4])
