"""What a run carries besides weights: the method's random streams, stop signals, the run's exceptions.

`MethodRNG` keeps the random draws of the training step (random starts, Shuffling BN's
permutation, Mixup/CutMix, drop-path; Mei et al., ICLR 2022, Sec. 4) apart from the data
pipeline's and is saved with every checkpoint, so a resumed run draws what the
interrupted one would have. `StopSignals` turns SIGTERM/SIGUSR1 into a flag the loop
acts on after the update in flight.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["MethodRNG", "StopSignals", "NonFiniteLossError", "Preempted"]


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss with ``train.nonfinite=stop``; the message names the update, the
    branch and the last good checkpoint."""


class Preempted(SystemExit):
    """The run was asked to stop (SIGTERM, SIGUSR1) and saved a checkpoint first; a
    script that does not catch it exits with status 143, as if killed by SIGTERM."""

    def __init__(self, message: str):
        super().__init__(143)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StopSignals:
    """SIGTERM / SIGUSR1 set a flag instead of killing the process: the loop finishes the
    update in flight, all processes agree on it (the flag rides on the per-update
    all-reduce), save a checkpoint and leave (`Preempted`). Schedulers send SIGTERM before
    SIGKILL (``torchrun`` forwards it to every worker; SLURM: ``--signal=USR1@120`` warns
    earlier). Handlers are only installed from the main thread, and restored on exit.
    """
    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: Optional[int] = None
        self.stop = False
        self._previous: Dict[int, Any] = {}

    def install(self, enabled: bool) -> None:
        import signal
        import threading

        if not enabled or threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def name(self) -> str:
        import signal

        return signal.Signals(self.received).name if self.received else "a stop request from another process"

    def __enter__(self) -> "StopSignals":
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _capture_rng() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seeded_state(stream: int) -> Dict[str, Any]:
    """The global generators' states after seeding them all with ``stream`` (they are left as they were)."""
    outer = _capture_rng()
    torch.manual_seed(stream)
    np.random.seed(stream)
    random.seed(stream)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(stream)
    state = _capture_rng()
    _restore_rng(outer)
    return state


class MethodRNG:
    """The random streams the training step draws from (random starts, Shuffling BN's
    permutation, Mixup/CutMix, drop-path).

    Running each update inside `scope` swaps in this object's own state (one stream per
    rank), which is saved with every checkpoint, so the method's randomness resumes exactly
    wherever the checkpoint was taken. (The data pipeline seeds each sample's augmentation
    itself, from ``(seed, epoch, index)``: ``fap.data.seeding``.) A checkpoint written by
    another number of processes has streams that do not map onto this run's ranks: then each
    rank starts a new stream, derived from the checkpoint and the rank, so the resumed run is
    reproducible but not bitwise equal to one that kept its process count.

    Args:
        seed: the run's seed.
        rank: this process's index (each rank gets its own stream).
        world: number of processes.
    """

    def __init__(self, seed: int, rank: int, world: int):
        self.seed, self.rank, self.world = seed, rank, world
        self._state = _seeded_state((seed * 1_000_003 + 7_919 * (rank + 1)) % (2 ** 32))

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        outer = _capture_rng()
        _restore_rng(self._state)
        try:
            yield
        finally:
            self._state = _capture_rng()
            _restore_rng(outer)

    def state_dict(self) -> Dict[str, Any]:
        # Called on every rank by save_state; only the main process writes, so gather all.
        states = [self._state]
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, self._state)
        return {"world": self.world, "states": states}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("world") == self.world:
            self._state = state["states"][self.rank]
            return
        saved = state["states"][0]["torch"].numpy().tobytes()
        digest = hashlib.sha256(saved + self.rank.to_bytes(4, "little")).digest()
        self._state = _seeded_state(int.from_bytes(digest[:4], "little"))
