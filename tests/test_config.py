"""fap.config: typed sections, --section.key=value overrides, errors that name the key."""
import dataclasses
import json

import pytest

from fap.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    describe,
    diff,
    from_dict,
    method_name,
    parse_args,
    to_dict,
    validate,
)
from fap.methods import CONFIGS, FastAdvPropConfig, VanillaConfig


def test_overrides_parse_every_field_type():
    cfg = apply_overrides(TrainConfig(), [
        "--train.batch_size=64",                 # int
        "--optim.lr", "0.2",                     # float, space-separated form
        "--train.channels_last=true",            # bool
        "--train.max_steps=none",                # Optional[int] -> None
        "--train.precision=bf16",                # Literal
        "--sched.sched=multistep",
        "--sched.milestones=30,60,90",           # Tuple[int, ...]
        "--model.mean=[0.5, 0.5, 0.5]",          # JSON list form
        '--model.kwargs={"depth": 2}',           # Dict
        "--data.scale=0.5,1.0",                  # fap.data.DataConfig's bare tuple
        "--log.trackers=",                       # empty tuple
    ])
    assert cfg.train.batch_size == 64 and isinstance(cfg.train.batch_size, int)
    assert cfg.optim.lr == 0.2
    assert cfg.train.channels_last is True
    assert cfg.train.max_steps is None
    assert cfg.train.precision == "bf16"
    assert cfg.sched.milestones == (30, 60, 90)
    assert cfg.model.mean == (0.5, 0.5, 0.5)
    assert cfg.model.kwargs == {"depth": 2}
    assert cfg.data.scale == (0.5, 1.0)
    assert cfg.log.trackers == ()


def test_overrides_return_a_new_config():
    base = TrainConfig()
    apply_overrides(base, ["--train.batch_size=64"])
    assert base.train.batch_size == TrainConfig().train.batch_size


def test_method_section_is_the_methods_own_dataclass():
    cfg = TrainConfig()
    assert type(cfg.method) is CONFIGS["fast_advprop"]
    # --method.KEY sets a field of that dataclass; --method NAME swaps it, in either order
    cfg = apply_overrides(cfg, ["--method.label_smoothing=0.1", "--method", "vanilla"])
    assert type(cfg.method) is VanillaConfig and cfg.method.label_smoothing == 0.1
    cfg = apply_overrides(TrainConfig(), ["--method=fast_advprop", "--method.p_adv=0.25", "--method.fused=true"])
    assert cfg.method == FastAdvPropConfig(p_adv=0.25, fused=True)
    assert method_name(cfg.method) == "fast_advprop"


@pytest.mark.parametrize("args, words", [
    (["--train.batchsize=3"], ["'batchsize'", "train", "batch_size", "accum_steps"]),
    (["--trian.batch_size=3"], ["'trian'", "train, data, model, method"]),
    (["--train.batch_size=1.5"], ["train.batch_size", "an int"]),
    (["--train.channels_last=maybe"], ["train.channels_last", "true or false"]),
    (["--train.precision=fp16"], ["train.precision", "'fp32'", "'bf16'"]),
    (["--method", "madry"], ["'madry'", "advprop, fast_advprop, vanilla"]),
    (["--method", "vanilla", "--method.p_adv=0.3"], ["'p_adv'", "method 'vanilla'", "label_smoothing"]),
    (["--sched.milestones=a,b"], ["sched.milestones", "a list of an int"]),
    (['--model.kwargs=[1]'], ["model.kwargs", "JSON object"]),
    (["--data.source=s3"], ["data.source", "'s3'", "'folder', 'hf', 'ffcv', 'demo'"]),
    (["--data.interpolation=cubic"], ["data.interpolation", "'cubic'", "'bicubic'"]),
    (["--method.random_init_per=step"], ["method.random_init_per", "'step'", "'sample', 'batch'"]),
    (["--method", "advprop", "--method.attack_bn_mode=frozen"], ["method.attack_bn_mode", "'eval', 'train'"]),
    (["--final_eval.interpolation=cubic"], ["final_eval.interpolation", "'bilinear'", "None"]),
    (["--train"], ["--train needs a value"]),
    (["train.batch_size=3"], ["unexpected argument"]),
])
def test_bad_overrides_name_the_key_and_the_valid_choices(args, words):
    with pytest.raises(ValueError) as e:
        apply_overrides(TrainConfig(), args)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("change, words", [
    (lambda c: dataclasses.replace(c, train=dataclasses.replace(c.train, batch_size="32")),
     ["train.batch_size='32'", "an int"]),
    (lambda c: dataclasses.replace(c, sched=dataclasses.replace(c.sched, sched="multistep", milestones=(30, 120))),
     ["sched.milestones", "train.epochs=100", "budget_matched"]),
    (lambda c: dataclasses.replace(c, sched=dataclasses.replace(c.sched, sched="multistep")),
     ["sched.milestones is empty"]),
    (lambda c: dataclasses.replace(c, model=dataclasses.replace(c.model, dual_norm=False)),
     ["method.norms='dual'", "model.dual_norm=False"]),
    (lambda c: dataclasses.replace(c, method=CONFIGS["advprop"](), mixup=dataclasses.replace(c.mixup, mixup_alpha=0.8)),
     ["mixup", "advprop"]),
    (lambda c: dataclasses.replace(c, optim=dataclasses.replace(c.optim, opt="adamwww")),
     ["optim.opt='adamwww'", "timm optimizer"]),
    (lambda c: dataclasses.replace(c, method=object()),
     ["not a method config", "FastAdvPropConfig"]),
    (lambda c: dataclasses.replace(c, method=FastAdvPropConfig(p_adv=1.5)),
     ["method.p_adv=1.5", "(0, 1)"]),
    (lambda c: dataclasses.replace(c, method=FastAdvPropConfig(random_init_per="step")),
     ["method.random_init_per='step'", "'sample', 'batch'"]),
    (lambda c: dataclasses.replace(c, method=FastAdvPropConfig(epsilon=-1.0)),
     ["method.epsilon", ">= 0"]),
    (lambda c: dataclasses.replace(c, train=dataclasses.replace(c.train, nonfinite="ignore")),
     ["train.nonfinite='ignore'", "'stop', 'skip'"]),
])
def test_validate_rejects_inconsistent_configs(change, words):
    with pytest.raises(ConfigError) as e:
        validate(change(TrainConfig()))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_parse_args_applies_smoke_first_then_overrides():
    def smoke(cfg):
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1, batch_size=8))

    cfg = parse_args(TrainConfig(), ["--smoke", "--train.batch_size=16"], smoke=smoke)
    assert cfg.train.epochs == 1 and cfg.train.batch_size == 16
    with pytest.raises(ConfigError, match="no smoke mode"):
        parse_args(TrainConfig(), ["--smoke"])


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit):
        parse_args(TrainConfig(), ["--help"])
    out = capsys.readouterr().out
    assert "--train.batch_size=256" in out and "--method.p_adv=0.2" in out and "--data.path=''" in out
    assert describe(TrainConfig()) in out
    # Closed choices are listed, from the Literal annotations.
    assert "--method.random_init_per='sample'    (one of 'sample', 'batch')" in out
    assert "--data.source='folder'    (one of 'folder', 'hf', 'ffcv', 'demo', 'coco', 'demo-det')" in out
    assert "--task='classification'" in out and "--detection.backbone='resnet50'" in out
    assert "--final_eval.interpolation=None    (one of 'bilinear'" in out


def test_method_configs_validate_themselves_against_the_run():
    """`fap.config.validate` holds no method rule: each method config checks its own."""
    import inspect

    import fap.config

    source = inspect.getsource(fap.config)
    assert "advprop" not in source.replace("fast_advprop", "") and "fap.evaluate " not in source
    assert "import fap.evaluate" not in source and "from fap.evaluate " not in source
    with pytest.raises(ConfigError, match="method.norms='dual' but model.dual_norm=False"):
        FastAdvPropConfig().validate(model_dual_norm=False)
    FastAdvPropConfig().validate()  # without the run: no model to compare against
    with pytest.raises(ConfigError, match="mixup is enabled but method 'advprop'"):
        CONFIGS["advprop"]().validate(mixup_enabled=True)
    assert VanillaConfig().validate(model_dual_norm=True, mixup_enabled=True) == VanillaConfig()


def test_round_trip_through_json():
    cfg = apply_overrides(TrainConfig(), ["--method", "advprop", "--method.attack_steps=3",
                                          "--sched.sched=multistep", "--sched.milestones=10,20",
                                          "--model.mean=0.5,0.5,0.5", '--model.kwargs={"depth": 2}'])
    d = json.loads(json.dumps(to_dict(cfg)))
    assert d["method"]["name"] == "advprop"
    back = from_dict(d)
    assert back == cfg and diff(back, cfg) == {}
    changed = apply_overrides(cfg, ["--train.epochs=7"])
    assert diff(cfg, changed) == {"train.epochs": (100, 7)}
    with pytest.raises(ConfigError, match="unknown keys"):
        from_dict({**d, "train": {**d["train"], "bogus": 1}})
