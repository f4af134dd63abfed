"""fap: Fast AdvProp training toolkit (Mei et al., ICLR 2022) on timm + Accelerate.

    import fap
    cfg = fap.parse_args(fap.TrainConfig())      # or a recipe's config; --section.key=value overrides
    summary = fap.train(cfg)                     # `accelerate launch` it for many processes

    sys.exit(fap.train_cli(config, smoke=smoke))  # a recipe's last line: both of the above, with
                                                 # one-line errors (exit 2) for the user's mistakes

The training API is imported on first use, so ``import fap.norm`` stays light.
``fap.evaluate`` is the evaluation module (``fap eval``), not an attribute of this one.

What may import what (data flows recipe -> config -> engine -> task, data, model, method ->
metrics, checkpoints, export; imports point the same way, function-level imports included,
and never form a cycle: ``tests/test_imports.py`` walks them all and prints any cycle):

* ``fap.cli``, ``fap.__main__`` and ``fap.engine.__main__`` are the top floor: nothing imports them.
* ``fap.engine`` drives a run and is task-blind: it calls ``fap.tasks.get_task(cfg.task)``
  and never imports ``fap.attacks``, ``fap.detection`` or the ``fap eval`` command (``fap.evaluate``).
* ``fap.methods`` drive a task's step; ``fap.tasks`` sits below them and reaches down into
  ``fap.data``, ``fap.models``, ``fap.evaluation``, ``fap.detection`` and ``fap.checkpoint``.
* ``fap.evaluation`` and ``fap.detection`` never import a training module (``fap.engine``).
* ``fap.config`` imports only schema modules (``fap.data.config``, ``fap.evaluation.config``,
  ``fap.detection.config``, ``fap.methods.config``), none of which imports torch, and the
  packages around them load their torch-importing parts on first use (PEP 562), so
  ``import fap.config``, ``fap --help`` and a config error load no torch (tested);
  ``fap.checks`` (the errors of the user's mistakes, the checks of values) is the ground floor.
"""
__version__ = "0.1.0"

from fap.lazy import lazy_exports  # noqa: E402  (standard library only)

_LAZY = {
    "train": "fap.engine",
    "train_cli": "fap.cli",
    "parse_args": "fap.config",
    "peek_method": "fap.config",
    "TrainConfig": "fap.config",
    "RunSection": "fap.config",
    "ModelConfig": "fap.config",
    "OptimConfig": "fap.config",
    "ScheduleConfig": "fap.config",
    "MixupConfig": "fap.config",
    "EMAConfig": "fap.config",
    "CheckpointConfig": "fap.config",
    "LogConfig": "fap.config",
    "DetectionSection": "fap.config",
    "ConfigError": "fap.config",
}

__all__ = ["__version__", *_LAZY]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
