"""fap.experiment.measures: BatchNorm recalibration and the swap test, against the same
computations written out here on a tiny trained dual-norm run."""
import copy
import dataclasses

import pytest
import torch

import fap
from fap.config import apply_overrides
from fap.data import build_loader, make_demo, to_unit_float
from fap.evaluation.loading import load_model
from fap.experiment.measures import recalibrated_top1, swap_scores


@pytest.fixture(scope="module")
def dual_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("measures")
    data = make_demo(str(root / "demo"), train_per_class=4, val_per_class=3, image_size=32, num_workers=1)
    cfg = apply_overrides(fap.TrainConfig(), [
        "--method", "advprop", "--method.attack_steps=1", "--method.epsilon=8", "--model.name=test_resnet",
        "--data.source=folder", f"--data.path={data}", "--data.image_size=32", "--data.crop_pct=1.0",
        "--data.num_workers=0", "--train.batch_size=10", "--train.max_steps=3", "--optim.opt=adamw",
        "--optim.lr=1e-2", "--log.trackers=", f"--log.output_dir={root / 'run'}", "--log.progress=false"])
    fap.train(cfg)
    return str(root / "run"), cfg


def _top1(model, cfg):
    loader = build_loader(cfg.data, "val", batch_size=7, train=False)
    hits = n = 0
    with torch.no_grad():
        for x, y in loader:
            hits += int((model(to_unit_float(x)).argmax(1) == y).sum())
            n += len(y)
    return 100.0 * hits / n


def test_recalibration_is_a_cumulative_average_over_clean_training_images(dual_run):
    run_dir, cfg = dual_run
    model = load_model(run_dir, branch="main").model
    # by hand: every BatchNorm's statistics reset, then the plain average of the batch
    # statistics of all 40 clean training images (eval transform, the run's batch size)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for x, _ in build_loader(cfg.data, "train", batch_size=cfg.train.batch_size, train=False):
            model(to_unit_float(x))
    expected = _top1(model.eval(), cfg)
    got = recalibrated_top1(run_dir, cfg, {})
    assert got == {"recal_top1": pytest.approx(expected)}
    # and the statistics did move: the trained model's own running statistics score otherwise
    trained = load_model(run_dir, branch="main").model.eval()
    assert any(not torch.allclose(a.running_var, b.running_var) for a, b in
               zip(bns, [m for m in trained.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]))


def test_swap_exchanges_statistics_or_affine_parameters_only(dual_run):
    run_dir, cfg = dual_run
    main = load_model(run_dir, branch="main").model.eval()
    aux = load_model(run_dir, branch="aux").model.eval()
    out = swap_scores(run_dir, cfg, {})
    for metric, swapped in (("swap_stats_top1", ("running_mean", "running_var")),
                            ("swap_affine_top1", ("weight", "bias"))):
        model = copy.deepcopy(main)
        for (name, m), (_, a) in zip(model.named_modules(), aux.named_modules()):
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                for key in swapped:
                    getattr(m, key).data.copy_(getattr(a, key))
        assert out[metric] == pytest.approx(_top1(model, cfg)), metric
    # the branches did move apart in training, so the swap is not a no-op
    stats = [(m.running_var, a.running_var) for m, a in zip(main.modules(), aux.modules())
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert any(not torch.allclose(x, y) for x, y in stats)


def test_runs_without_auxiliary_norms_measure_nothing_to_swap(dual_run):
    _, cfg = dual_run
    mixed = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, norms="mixed"),
                                model=dataclasses.replace(cfg.model, dual_norm=False))
    assert swap_scores("unused", mixed, {}) == {}
