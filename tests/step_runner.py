"""``[accelerate launch ...] python tests/step_runner.py PATH ACCUM OUT``: one `fap.engine.step` update, checked.

Builds a 2-block dual-norm ViT on 32 px images, prepares it with a plain SGD optimizer
(lr 0.1, no momentum or decay) through the Accelerator the launcher set up (one process,
DDP or DeepSpeed ZeRO), runs ONE update of the named gradient-reduction path (``local``,
``coalesced`` or ``per_backward``) over ``ACCUM`` Fast AdvProp micro-batches, and compares
the new weights with the closed form: the same micro-batches through an unwrapped copy with
plain ``loss.backward()``, then ``w - 0.1 * grad``. Writes ``{"max_abs_err", ...}`` to OUT.
"""
import json
import sys

import torch


def _model():
    from fap.models import create_model

    return create_model("vit_tiny_patch16_224", num_classes=4, dual_norm=True, img_size=32, patch_size=8, depth=2,
                        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def main(path: str, accum: int, out: str) -> None:
    from accelerate import Accelerator

    from fap.data import to_unit_float
    from fap.engine.distributed import full_state_dict
    from fap.engine.step import CoalescedUpdate, LocalUpdate, PerBackwardUpdate
    from fap.methods import FastAdvProp

    accelerator = Accelerator(cpu=path == "local")
    torch.manual_seed(0)
    model = _model()
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    method = FastAdvProp(random_init_prob=0.0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g),
                torch.randint(0, 4, (10,), generator=g)) for _ in range(accum)]
    cls = {"local": LocalUpdate, "coalesced": CoalescedUpdate, "per_backward": PerBackwardUpdate}[path]
    result = cls(accelerator, model, optimizer, method, accum_steps=accum)(batches)

    ref = _model()
    ref.load_state_dict(init)
    ref.train()
    for x, y in batches:
        method.train_step(ref, to_unit_float(x), y, lambda loss: (loss / accum).backward())
    grads = {n: p.grad for n, p in ref.named_parameters()}
    got = full_state_dict(accelerator, model)
    err, moved = 0.0, 0.0
    for name, w0 in init.items():
        if name not in grads:
            continue
        want = w0 - 0.1 * grads[name] if grads[name] is not None else w0
        err = max(err, (got[name].float() - want).abs().max().item())
        moved = max(moved, (want - w0).abs().max().item())
    with open(out, "w") as f:
        json.dump({"max_abs_err": err, "max_update": moved, "nonfinite": result.nonfinite,
                   "grad_norm": result.grad_norm, "micro_batches": len(result.metrics),
                   "description": cls.description}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
