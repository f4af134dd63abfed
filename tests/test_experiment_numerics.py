"""fap.experiment.numerics: the fingerprint moves with what the library computes, not with its source."""
import pytest

import fap.methods.fast_advprop as fast_advprop
from fap.experiment.numerics import compare, fingerprint, probe


@pytest.fixture(scope="module")
def baseline():
    return probe()


def test_a_loss_weight_changed_by_1e_6_moves_the_fingerprint(baseline, monkeypatch):
    weights = fast_advprop.FastAdvProp.weights

    def nudged(self, b_c, b_a):
        return {k: v * (1 + 1e-6) if k == "aux" else v for k, v in weights(self, b_c, b_a).items()}

    monkeypatch.setattr(fast_advprop.FastAdvProp, "weights", nudged)
    now = probe()
    moved = compare(baseline, now)
    assert moved and all(name.startswith("fast_advprop/") for name in moved)
    assert fingerprint(now) != fingerprint(baseline)


def test_a_docstring_change_moves_nothing(baseline, monkeypatch):
    monkeypatch.setattr(fast_advprop.FastAdvProp.train_step, "__doc__", "reworded")
    monkeypatch.setattr(fast_advprop, "__doc__", "reworded")
    now = probe()
    assert compare(baseline, now) == [] and fingerprint(now) == fingerprint(baseline)


def test_the_probes_cover_every_method_norm_mode_evaluation_and_corruption(baseline):
    prefixes = {k.split("/step")[0].split("/state")[0] for k in baseline if "/step" in k or "/state/" in k}
    assert prefixes == {"vanilla", "fast_advprop/dual", "fast_advprop/shared", "fast_advprop/mixed",
                        "advprop/dual", "advprop/shared", "advprop/mixed"}
    assert {"eval/clean/logits", "eval/pgd/logits", "corrupt/gaussian_noise/s3"} <= set(baseline)
    assert any(k.startswith("corrupted_copy/") for k in baseline)
