"""`SuiteConfig`: which evaluation sets to score and how; the ``final_eval`` section of a run.

Kept apart from `fap.evaluation.suite` (the evaluation itself) so that `fap.config` can hold it
without importing the evaluation code. ``from fap.evaluate import SuiteConfig`` still works.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from fap.checks import ConfigError, check_choices, check_epsilon
from fap.data.config import Interpolation

__all__ = ["FOLDER_SETS", "SuiteConfig"]

# ImageNet-layout robustness sets: key -> (title, class subset the logits are masked to)
FOLDER_SETS: Dict[str, Tuple[str, Optional[str]]] = {
    "imagenet_r": ("ImageNet-R", "imagenet_r"),
    "imagenet_a": ("ImageNet-A", "imagenet_a"),
    "sketch": ("ImageNet-Sketch", None),
    "stylized": ("Stylized-ImageNet", None),
    "v2": ("ImageNet-V2", None),
}


@dataclass
class SuiteConfig:
    """Which sets to evaluate, and how. Empty paths and ``pgd_steps=0`` switch a set off.

    Args:
        clean: top-1/top-5 on the validation split of the data config passed alongside.
        imagenet_c: root of an ImageNet-C layout (``<corruption>/<severity>/<class>/``).
        imagenet_r, imagenet_a, sketch, stylized, v2: roots of those sets (class folders).
        corruptions: ImageNet-C corruptions to score; empty = every corruption folder found.
        pgd_steps: K of the PGD-K attack on the clean split; 0 = no adversarial evaluation.
        pgd_epsilon: ε in 1/255 pixel units.
        pgd_step: step size in 1/255 units; None = ``fap.attacks.pgd``'s default
            ``min(max(1, ε/K), ε)``.
        pgd_random_init_prob: probability of a random start. The default 0 starts from
            the clean image, so the result does not depend on random numbers (and hence not
            on the number of processes).
        pgd_max_images: attack only this many clean images (evenly spaced); 0 = all.
        batch_size: images per process and batch.
        num_workers: DataLoader workers per process.
        image_size, crop_pct, interpolation: eval preprocessing (resize the short side to
            ``image_size / crop_pct``, centre-crop ``image_size``); None = the data
            config's, else the model's recorded one, else 224 / 0.875 / bilinear.
            ImageNet-C images are pre-cropped: they get ``crop_pct = 1``.
        seed: seeds the PGD random start (per process).
        clean_max_images: score only this many clean images (evenly spaced, folder/hf
            sets); 0 = all. For training accuracy on a large training split.
        per_image: also record each clean image's top-1 hit (``sets.clean.correct``, a
            string of 0/1 in dataset order), for paired per-image tests between models.
    """
    clean: bool = True
    imagenet_c: str = ""
    imagenet_r: str = ""
    imagenet_a: str = ""
    sketch: str = ""
    stylized: str = ""
    v2: str = ""
    corruptions: Tuple[str, ...] = ()
    pgd_steps: int = 0
    pgd_epsilon: float = 1.0
    pgd_step: Optional[float] = None
    pgd_random_init_prob: float = 0.0
    pgd_max_images: int = 0
    batch_size: int = 64
    num_workers: int = 2
    image_size: Optional[int] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[Interpolation] = None
    seed: int = 0
    clean_max_images: int = 0
    per_image: bool = False

    def validate(self) -> "SuiteConfig":
        """Check the fields; raise `ConfigError` (a ``ValueError``) naming the key, the value and what is valid."""
        check_choices(self, "suite")  # interpolation
        _check(isinstance(self.pgd_steps, int) and self.pgd_steps >= 0, "pgd_steps", self.pgd_steps,
               "an int >= 0 (0 = no adversarial evaluation)")
        check_epsilon(self.pgd_epsilon, "suite.pgd_epsilon")
        if self.pgd_step is not None:
            check_epsilon(self.pgd_step, "suite.pgd_step")
        _check(0.0 <= self.pgd_random_init_prob <= 1.0, "pgd_random_init_prob", self.pgd_random_init_prob,
               "a probability in [0, 1]")
        _check(isinstance(self.pgd_max_images, int) and self.pgd_max_images >= 0, "pgd_max_images",
               self.pgd_max_images, "an int >= 0 (0 = all)")
        _check(isinstance(self.clean_max_images, int) and self.clean_max_images >= 0, "clean_max_images",
               self.clean_max_images, "an int >= 0 (0 = all)")
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", self.batch_size, "an int >= 1")
        _check(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers", self.num_workers,
               "an int >= 0")
        _check(self.image_size is None or (isinstance(self.image_size, int) and self.image_size >= 8),
               "image_size", self.image_size, "None or an int >= 8")
        _check(self.crop_pct is None or 0.0 < self.crop_pct <= 1.0, "crop_pct", self.crop_pct, "None or (0, 1]")
        for key in ("imagenet_c",) + tuple(FOLDER_SETS):
            _check(isinstance(getattr(self, key), str), key, getattr(self, key), "a directory path or ''")
        if self.corruptions and not self.imagenet_c:
            raise ConfigError("suite.corruptions is set but suite.imagenet_c is empty: give the ImageNet-C root")
        if not self.requested():
            raise ConfigError("the suite turns on no set: set clean=True, pgd_steps >= 1, or a path for imagenet_c, "
                             + ", ".join(FOLDER_SETS))
        return self

    def requested(self) -> List[str]:
        """The names of the sets this config turns on."""
        names = ["clean"] if self.clean else []
        names += ["adversarial"] if self.pgd_steps else []
        names += [k for k in FOLDER_SETS if getattr(self, k)]
        names += ["imagenet_c"] if self.imagenet_c else []
        return names


def _check(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"suite.{key}={value!r} is not valid: expected {expected}")
