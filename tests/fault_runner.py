"""``python tests/fault_runner.py --section.key=value ...``: `python -m fap.engine` (`fap.engine.__main__.main`) with one fault injected.

The fault comes from the environment variable ``FAP_FAULT`` (unset: no fault), so that
the faults live in the tests, not in the library:

* ``kill_in_save:N`` - SIGKILL this process in the middle of its N-th checkpoint save,
  after the model weights are written and before the optimizer state is;
* ``kill_before_rename:N`` - SIGKILL after the N-th save wrote and fsynced its marker,
  just before the rename that publishes it;
* ``kill_in_prune:N`` - SIGKILL when the N-th deletion of an old checkpoint starts;
* ``nan:STEP:BRANCH`` - the Fast AdvProp loss of BRANCH (clean, noisy or adversarial)
  in optimizer update STEP (1-based, one micro-batch per update) is NaN;
* ``disk_full:N`` - before the N-th save, fill the file system of ``$FAP_FAULT_FILL``
  (a small tmpfs the test mounted) until it has no space left;
* ``read_only:N`` - before the N-th save, remount ``$FAP_FAULT_MOUNT`` read-only;
* ``pause_after_save:N`` - after the N-th save, sleep (a run that is still running, holding
  its run directory, until the test kills it).
"""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


def _nth(counter: dict, key: str, n: int) -> bool:
    counter[key] = counter.get(key, 0) + 1
    return counter[key] == n


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str) -> None:
    kind, *args = fault.split(":")
    counts: dict = {}
    if kind == "kill_in_save":
        import accelerate.checkpointing as ac

        n, real = int(args[0]), ac.save

        def save(obj, f, *a, **k):  # the optimizer state: written after the model's weights
            if str(f).endswith("optimizer.bin") and _nth(counts, "save", n):
                assert any(Path(f).parent.glob("model.safetensors")), "the model was not written first"
                Path(f).write_bytes(b"half an optimizer state")
                _die()
            return real(obj, f, *a, **k)
        ac.save = save
    elif kind == "kill_before_rename":
        n, real = int(args[0]), os.replace

        def replace(src, dst, *a, **k):
            if Path(src).name.startswith(".tmp-step_") and _nth(counts, "rename", n):
                assert (Path(src) / "fap_checkpoint.json").is_file()
                _die()
            return real(src, dst, *a, **k)
        os.replace = replace
    elif kind == "kill_in_prune":
        n, real = int(args[0]), shutil.rmtree

        def rmtree(path, *a, **k):
            if Path(path).name.startswith(".tmp-del-step_") and _nth(counts, "prune", n):
                _die()
            return real(path, *a, **k)
        shutil.rmtree = rmtree
    elif kind == "nan":
        import torch

        import fap.tasks as fa   # the classification task's loss calls fap.tasks.ce_sum at call time

        step, branch = int(args[0]), args[1]
        order = ("clean", "noisy", "adversarial")
        real = fa.ce_sum

        def ce_sum(*a, **k):
            loss = real(*a, **k)
            calls = counts["calls"] = counts.get("calls", 0) + 1
            if calls == 3 * (step - 1) + order.index(branch) + 1:
                loss = loss * torch.tensor(float("nan"))
            return loss
        fa.ce_sum = ce_sum
    elif kind in ("disk_full", "read_only"):
        import fap.engine.loop as engine

        n, real = int(args[0]), engine.save_checkpoint

        def save_checkpoint(*a, **k):
            if _nth(counts, "save", n):
                if kind == "disk_full":
                    filler = Path(os.environ["FAP_FAULT_FILL"]) / "filler"
                    with open(filler, "wb", buffering=0) as f:
                        for chunk in (1 << 16, 1 << 12, 1):
                            try:
                                while True:
                                    f.write(b"\0" * chunk)
                            except OSError:
                                pass
                else:
                    subprocess.run(["mount", "-o", "remount,ro", os.environ["FAP_FAULT_MOUNT"]], check=True)
            return real(*a, **k)
        engine.save_checkpoint = save_checkpoint
    elif kind == "pause_after_save":
        import time

        import fap.engine.loop as engine

        n, real = int(args[0]), engine.save_checkpoint

        def save_checkpoint(*a, **k):
            path = real(*a, **k)
            if _nth(counts, "save", n):
                time.sleep(600)
            return path
        engine.save_checkpoint = save_checkpoint
    else:
        raise SystemExit(f"FAP_FAULT={fault!r}: unknown fault kind {kind!r}")


if __name__ == "__main__":
    if os.environ.get("FAP_FAULT"):
        install(os.environ["FAP_FAULT"])
    from fap.engine.__main__ import main

    sys.exit(main(sys.argv[1:]))
