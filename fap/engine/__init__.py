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
* `fap.engine.state`: the method's random streams, stop signals, the run's exceptions.
"""
from __future__ import annotations

from typing import List, Optional

from fap.engine.loop import train
from fap.engine.setup import RESUME_MAY_CHANGE
from fap.engine.state import MethodRNG, NonFiniteLossError, Preempted

__all__ = ["train", "main", "MethodRNG", "NonFiniteLossError", "Preempted", "RESUME_MAY_CHANGE"]


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m fap.engine --section.key=value ...``: train from the default config plus overrides.

    Recipes (``recipes/*.py``) are the usual entry point; this runs any config without one,
    e.g. ``accelerate launch -m fap.engine --data.source=demo --data.path=data/demo``. A
    mistake in the config, data or checkpoint is one or two lines and exit status 2
    (`fap.cli.train_cli`; ``--debug`` shows the traceback).
    """
    from fap.cli import train_cli
    from fap.config import TrainConfig

    return train_cli(TrainConfig(), argv, prog="python -m fap.engine")
