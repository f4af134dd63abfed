"""`fap.finetune` (``model.init_from``): a run starts from a run's, a checkpoint's or an export's weights.

A vanilla ``test_resnet`` run (2 updates, one set of norms) is the converged base; the
dual-norm model that starts from it must have its main norms and shared weights, and
auxiliary norms equal to the main ones, before the first update, in the model and its EMA.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fap.checkpoint import list_checkpoints, load_checkpoint_weights
from fap.config import ConfigError, TrainConfig, apply_overrides, validate
from fap.finetune import init_model, resolve_init
from fap.models import create_model
from fap.norm import AUX_NAME, strip_aux
from helpers_engine import REPO, clean_env, run, tiny_vit_overrides

PY = sys.executable
RESNET = {"model.name": "test_resnet", "model.img_size": "none", "model.kwargs": "{}", "train.epochs": 1,
          "train.max_steps": 2}


def _args(data, out, **overrides):
    return tiny_vit_overrides(data, out, **{**RESNET, **overrides})


def _train(data, out, check=True, **overrides):
    return run([PY, "-m", "fap.engine", *_args(data, out, **overrides)], check=check)


def _model(name="test_resnet", dual=True, classes=4):
    return create_model(name, num_classes=classes, dual_norm=dual, mean=(0.5,) * 3, std=(0.5,) * 3)


def _aux_pairs(sd):
    """(aux key, its main key) for every auxiliary-norm entry of ``sd``."""
    marker = f".{AUX_NAME}."
    return [(k, k.replace(marker, ".", 1)) for k in sd if marker in k]


def _assert_started_from(sd, source):
    """``sd`` holds ``source``'s weights, and every auxiliary entry equals its main one."""
    for k, v in source.items():
        assert torch.equal(sd[k], v), k
    pairs = _aux_pairs(sd)
    assert pairs and {main for _, main in pairs} >= {k for k in source if k.endswith("running_var")}
    for aux, main in pairs:
        assert torch.equal(sd[aux], sd[main]), aux


@pytest.fixture(scope="module")
def vanilla_run(tiny_folder, tmp_path_factory):
    """A finished vanilla run with one set of norms: checkpoints/step_00000002 and export/."""
    out = tmp_path_factory.mktemp("finetune") / "vanilla"
    _train(tiny_folder, out, method="vanilla", **{"model.dual_norm": "false"})
    return out


def test_a_vanilla_run_starts_a_dual_norm_model_with_aux_norms_copied_from_main(vanilla_run):
    ckpt = list_checkpoints(vanilla_run)[-1]
    source = load_checkpoint_weights(ckpt)
    assert int(source["net.bn1.num_batches_tracked"]) == 2  # trained: statistics are not the initial ones
    model = _model()
    line = init_model(model, resolve_init(str(vanilla_run)))
    assert line == f"initialised from {ckpt} (aux norms copied from main)"
    _assert_started_from(model.state_dict(), source)


def test_an_export_starts_a_model_too(vanilla_run):
    export = vanilla_run / "export" / "model.safetensors"
    source = load_checkpoint_weights(list_checkpoints(vanilla_run)[-1])  # what fap export wrote, keys net.*
    for path in (export, export.parent):  # the file, or the export directory that holds it
        model = _model()
        assert init_model(model, resolve_init(str(path))) == f"initialised from {export} (aux norms copied from main)"
        _assert_started_from(model.state_dict(), source)
    plain = _model(dual=False)  # shared / mixed norms: the same weights, one set of norms
    assert init_model(plain, resolve_init(str(export))) == f"initialised from {export}"
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in source.items())


@pytest.mark.parametrize("name", ["test_efficientnet", "test_vit"])  # BatchNormAct2d, LayerNorm
def test_every_kind_of_dual_norm_gets_its_aux_copy(name, tmp_path):
    torch.manual_seed(0)
    base = _model(name, dual=False)
    with torch.no_grad():  # a "converged" base: nothing left at its initial value
        for p in base.parameters():
            p.add_(torch.rand_like(p))
        for k, b in base.named_buffers():
            if k.endswith(("running_mean", "running_var")):
                b.add_(torch.rand_like(b))
    f = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.export_state_dict().items()}, str(f))
    model = _model(name)
    init_model(model, resolve_init(str(f)))
    _assert_started_from(model.state_dict(), base.state_dict())


def test_mismatched_weights_and_missing_paths_are_config_errors(vanilla_run, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.init_from: the weights in .*vanilla.*"
                                          r"'fc\.weight': file \(4, \d+\) vs model \(7, \d+\)"):
        init_model(_model(classes=7), resolve_init(str(vanilla_run)))
    with pytest.raises(ConfigError, match=r"model\.init_from: .*keys the model needs are missing"):
        init_model(_model("test_efficientnet"), resolve_init(str(vanilla_run)))
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=f"model.init_from='{missing}': no such file or directory"):
        resolve_init(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model.init_from=.*holds no complete checkpoint"):
        resolve_init(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="model.init_from=''"):
        validate(apply_overrides(TrainConfig(), ["--model.init_from="]))


def test_the_override_parses_and_defaults_to_none():
    assert TrainConfig().model.init_from is None
    assert apply_overrides(TrainConfig(), ["--model.init_from=runs/base"]).model.init_from == "runs/base"
    assert apply_overrides(TrainConfig(), ["--model.init_from=none"]).model.init_from is None


# One script builds a run (`fap.engine.setup.build_run`) and reports what its model and EMA start from.
BUILD = """
import json, sys, contextlib, torch
from fap.config import TrainConfig, apply_overrides
from fap.engine.setup import build_run
with contextlib.ExitStack() as held:
    run = build_run(apply_overrides(TrainConfig(), sys.argv[1:]), held=held)
    for name, m in (("model", run.unwrapped), ("ema", run.ema.module)):
        torch.save({k: v.detach().clone() for k, v in m.state_dict().items()}, f"{run.run_dir}/{name}.pt")
"""


def test_a_fine_tune_run_starts_from_the_base_then_trains_and_resumes(vanilla_run, tiny_folder, tmp_path):
    """AdvProp from the vanilla base: model and EMA start from it (aux = main), the run
    finishes, and a resumed run continues from its own checkpoint, not the base."""
    ckpt = list_checkpoints(vanilla_run)[-1]
    source = load_checkpoint_weights(ckpt)
    common = dict(method="advprop", **{"model.init_from": str(vanilla_run), "ema.enabled": "true",
                                       "method.attack_steps": 1})
    built = tmp_path / "built"
    proc = run([PY, "-c", BUILD, *_args(tiny_folder, built, **common)], env=clean_env())
    assert f"initialised from {ckpt} (aux norms copied from main)" in proc.stdout
    for name in ("model", "ema"):
        _assert_started_from(torch.load(built / f"{name}.pt"), source)

    out = tmp_path / "advprop"
    first = _train(tiny_folder, out, **common, **{"train.max_steps": 1, "checkpoint.every_steps": 1})
    assert f"initialised from {ckpt} (aux norms copied from main)" in first.stdout
    resumed = _train(tiny_folder, out, **common, **{"checkpoint.resume": "auto"})
    assert "resumed from" in resumed.stdout and "initialised from" not in resumed.stdout
    assert "model.init_from=" in resumed.stdout and "not loaded" in resumed.stdout
    assert [int(p.name.split("_")[1]) for p in list_checkpoints(out)][-1] == 2
    assert json.loads((out / "checkpoints" / "step_00000002" / "fap_checkpoint.json").read_text())[
        "config"]["model"]["init_from"] == str(vanilla_run)

    # a dual-norm source into a dual-norm model: the auxiliary norms as they were trained
    dual = load_checkpoint_weights(list_checkpoints(out)[-1])
    assert any(not torch.equal(dual[a], dual[m]) for a, m in _aux_pairs(dual))
    model = _model()
    assert init_model(model, resolve_init(str(out))).endswith("(aux norms as stored)")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dual.items())
    plain = _model(dual=False)  # into one set of norms: the main ones (what the export holds)
    assert init_model(plain, resolve_init(str(out))).endswith("(main norms; its aux norms left out)")
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in strip_aux(dual).items())


def test_a_missing_base_stops_the_run_before_it_trains(tiny_folder, tmp_path):
    proc = _train(tiny_folder, tmp_path / "run", check=False, **{"model.init_from": str(tmp_path / "nowhere")})
    assert proc.returncode == 2, proc.stderr
    assert "model.init_from=" in proc.stderr and "no such file or directory" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
