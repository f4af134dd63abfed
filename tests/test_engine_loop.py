"""`fap.engine.loop`'s end-of-epoch cadence, without an accelerator (the loop itself runs in test_engine.py)."""
from fap.checkpoint import TrainState
from fap.config import CheckpointConfig, RunSection
from fap.engine.loop import EpochEnd, epoch_cadence

UPDATES = 4  # updates per epoch


def _due(epoch, batch_in_epoch, *, stopped=False, epochs=3, eval_every=1, every_epochs=1, every_steps=0, accum=1):
    state = TrainState(epoch=epoch, batch_in_epoch=batch_in_epoch)
    t = RunSection(epochs=epochs, eval_every=eval_every, accum_steps=accum)
    c = CheckpointConfig(every_epochs=every_epochs, every_steps=every_steps)
    return epoch_cadence(state, t, c, UPDATES, stopped=stopped)


def test_a_full_epoch_is_evaluated_and_checkpointed():
    assert _due(0, UPDATES) == EpochEnd(True, True, "epoch_end")


def test_eval_every_and_checkpoint_every_count_finished_epochs():
    assert _due(0, UPDATES, eval_every=2, every_epochs=2) == EpochEnd(True, False, None)
    assert _due(1, UPDATES, eval_every=2, every_epochs=2) == EpochEnd(True, True, "epoch_end")


def test_the_last_epoch_is_always_evaluated_and_checkpointed_if_the_run_checkpoints():
    assert _due(2, UPDATES, eval_every=0, every_epochs=0, every_steps=5) == EpochEnd(True, True, "epoch_end")
    assert _due(2, UPDATES, eval_every=0, every_epochs=0, every_steps=0) == EpochEnd(True, True, None)


def test_max_steps_mid_epoch_is_not_a_finished_epoch():
    """Stopped after 2 of 4 updates: no epoch-end evaluation (the loop evaluates the final weights
    once itself), and the checkpoint says it was a stop."""
    assert _due(1, 2, stopped=True) == EpochEnd(False, False, "stop")
    assert _due(1, 2, stopped=True, every_epochs=0) == EpochEnd(False, False, None)


def test_max_steps_at_an_epoch_boundary_finishes_the_epoch():
    assert _due(0, UPDATES * 2, stopped=True, accum=2) == EpochEnd(True, True, "epoch_end")
