"""fap.cli: a user's mistake is one or two lines naming the key, value or file, and exit status 2;
``--debug`` shows the traceback. Run as the user runs them: ``fap train`` and the recipes."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    return proc.returncode, proc.stderr.strip().splitlines()


@pytest.mark.parametrize("args, words", [
    (["-m", "fap", "train", "--data.source=folder", "--data.path=/nonexistent"],
     ["fap train: error:", "data.path='/nonexistent'", "no such directory"]),
    (["-m", "fap", "train", "--method.p_adv=1.5"], ["method.p_adv=1.5", "(0, 1)"]),
    (["-m", "fap", "train", "--train.precision=fp16"], ["--train.precision='fp16'", "'fp32', 'bf16'"]),
    (["-m", "fap", "train", "--data.path=data/demo", "--sched.sched=multistep"], ["sched.milestones is empty"]),
    (["recipes/vit_b.py"], ["recipes/vit_b.py: error: data.path is empty", "--data.source=folder|hf|ffcv",
                            "recipes/vit_b.py --smoke --data.source=demo --data.path=data/demo"]),
    (["recipes/resnet50.py", "--method", "madry"], ["--method='madry'", "advprop, fast_advprop, vanilla"]),
    (["recipes/vit_l.py", "--smoke"], ["DeepSpeed ZeRO-3 recipe", "deepspeed_zero3.yaml"]),
    (["-m", "fap", "eval", "/nonexistent", "--suite", "clean"], ["fap eval: error:", "/nonexistent"]),
])
def test_a_mistake_is_two_lines_at_most_and_status_2(args, words):
    status, lines = _run(*args)
    assert status == 2, lines
    assert 1 <= len(lines) <= 2, lines
    for w in words:
        assert w in "\n".join(lines), (w, lines)


def test_debug_shows_the_traceback():
    status, lines = _run("-m", "fap", "train", "--method.p_adv=1.5", "--debug")
    assert status == 1 and lines[0].startswith("Traceback") and "ConfigError: method.p_adv=1.5" in lines[-1]
    status, lines = _run("recipes/resnet50.py", "--debug")
    assert status == 1 and lines[0].startswith("Traceback") and "data.path is empty" in lines[-2]


def test_train_cli_in_process(capsys):
    from fap import TrainConfig, train_cli

    assert train_cli(TrainConfig(), ["--train.epochs=0", "--data.path=x"], prog="t") == 2
    assert capsys.readouterr().err.strip() == "t: error: train.epochs=0: expected an int >= 1"
    with pytest.raises(SystemExit) as e:
        train_cli(lambda method: TrainConfig(), ["--help"], prog="t")
    assert e.value.code == 0 and "--method.p_adv=0.2" in capsys.readouterr().out
