"""Per-sample seeded augmentation: a training sample's random crop, flip and policy depend
only on ``(seed, epoch, sample index)``.

timm's training transforms draw from the process-global generators (``random`` for
RandomResizedCrop and the AutoAugment/RandAugment ops, ``numpy.random`` for RandAugment's
op weights, ``torch`` for torchvision's flip). Left alone, what a sample gets depends on
which process decodes it (the main process or one of ``num_workers`` DataLoader workers,
each seeded once per epoch) and on how many samples that process decoded before it. A
mid-epoch resume skips the epoch's first batches, so every later sample would be
augmented differently from the run it resumes, and the run would silently depart from it.

:class:`SampleSeeds` fixes each sample's draws instead: around the transform of sample
``index`` in epoch ``epoch`` it seeds the three generators from
``numpy.random.SeedSequence([seed, epoch, index])`` (and, in the main process, restores
their previous states afterwards: nothing global changes). So the augmentation of a sample is the same whatever
the worker count, wherever a resume starts, however many samples were skipped, and however
the samples are spread over processes. The epoch lives in shared memory, so the loader's
(persistent) worker processes see :meth:`SampleSeeds.set_epoch` from the main process; it is
set before the epoch's iterator starts, when no worker holds indices of the epoch.

FFCV's numba-compiled crop and flip draw from numba's own per-thread generator;
``fap.data.ffcv`` seeds that per sample with :func:`ffcv_sample_seed` from the same
``(seed, epoch, index)`` (see there).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import random
from typing import Iterator

import numpy as np
import torch

__all__ = ["SampleSeeds", "epoch_key", "sample_seed_words"]

_MASK64 = (1 << 64) - 1


def sample_seed_words(seed: int, epoch: int, index: int) -> np.ndarray:
    """Four 32-bit words that seed the augmentation of sample ``index`` in ``epoch``."""
    return np.random.SeedSequence([int(seed) & _MASK64, int(epoch), int(index)]).generate_state(4)


def epoch_key(seed: int, epoch: int, salt: int = 0) -> int:
    """A 32-bit key for ``(seed, epoch, salt)``, mixed with a sample index inside FFCV's compiled code."""
    return int(np.random.SeedSequence([int(seed) & _MASK64, int(epoch), 1 << 32, int(salt)]).generate_state(1)[0])


class SampleSeeds:
    """Seeds the global generators per sample, from ``(seed, epoch, index)``, around a transform.

    Args:
        seed: the run's seed (``train.seed``).
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._epoch = multiprocessing.Value("q", 0)  # shared with DataLoader worker processes

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Augment as in ``epoch`` from now on (call before the epoch's iterator is created)."""
        self._epoch.value = int(epoch)

    @contextlib.contextmanager
    def scope(self, index: int) -> Iterator[None]:
        """Inside: ``random``, ``numpy.random`` and torch's CPU generator are seeded for sample
        ``index`` of the current epoch. In the main process (``num_workers=0``) they are back
        where they were on exit; a DataLoader worker's generators serve its transforms only,
        so they are not restored there (that would cost ~60 us a sample, mostly numpy's)."""
        words = sample_seed_words(self.seed, self.epoch, index)
        in_worker = torch.utils.data.get_worker_info() is not None
        saved = None if in_worker else (random.getstate(), np.random.get_state(), torch.default_generator.get_state())
        random.seed(int(words[0]) | int(words[1]) << 32 | int(words[2]) << 64 | int(words[3]) << 96)
        np.random.seed(words)
        torch.default_generator.manual_seed(int(words[2]) | int(words[3]) << 32)
        try:
            yield
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.default_generator.set_state(saved[2])

    def __repr__(self) -> str:
        return f"SampleSeeds(seed={self.seed}, epoch={self.epoch})"
