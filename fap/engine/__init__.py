"""The training engine: one `train(config)` for vanilla, AdvProp and Fast AdvProp, through Accelerate.

What a step computes lives in the method (`fap.methods`; Mei et al., ICLR 2022); the engine
decides how it runs on the hardware and everything around it. Its parts, in reading order:

* `fap.engine.loop`: ``train(cfg)`` (build -> resume -> epochs -> final evaluation ->
  export -> summary), ``train_one_epoch``, the end-of-epoch cadence, evaluation, export;
* `fap.engine.setup`: the `Run` that set-up builds from the config (accelerator, data,
  model, method, optimizer, schedule, EMA, checkpointed state), and resuming it;
* `fap.engine.step`: one optimizer update per gradient-reduction path (DDP/local, DeepSpeed
  coalesced, DeepSpeed per backward): where the exactness invariants live;
* `fap.engine.distributed`: the Accelerator, DeepSpeed checks, BN statistics, full weights;
* `fap.engine.log`: the JSON-lines log, trackers, progress bar, banner and summary;
* `fap.engine.state`: the method's random streams, stop signals, the run's exceptions;
* `fap.engine.__main__`: ``python -m fap.engine --section.key=value ...`` (the command line
  is the top floor: nothing in the engine imports `fap.cli`).

What differs between tasks (data, model, headline evaluation, export, final suite) is the
task object's (`fap.tasks`, chosen by ``cfg.task``); the engine never names a task.
"""
from __future__ import annotations

from fap.engine.loop import train
from fap.engine.setup import RESUME_MAY_CHANGE
from fap.engine.state import MethodRNG, NonFiniteLossError, Preempted

__all__ = ["train", "MethodRNG", "NonFiniteLossError", "Preempted", "RESUME_MAY_CHANGE"]

