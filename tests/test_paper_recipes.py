"""recipes/paper.py: every row of the Fast AdvProp paper (Mei et al., ICLR 2022) builds, costs what
the paper says, trains, and can be evaluated beside the paper's numbers (``fap eval --compare``).

Every row's config is built and checked against `fap.evaluation.paper` (counted cost per step,
budget-matched epochs, whole-run budget), and every row trains two updates at toy size on the
demo data (32 px, 16 clean images per update with the row's clean : adversarial split; timm
``test_resnet``, except Table 3's rows, which keep their real ResNet-101/152): Table 1's Fast
AdvProp row through ``accelerate launch`` and ``fap eval --compare``, the others in one process.

Run as a script (``python tests/test_paper_recipes.py OUT DATA ROW...``) this file trains the
rows in one process, as `recipes/demo.py` trains two: the same Accelerate settings for every run.
"""
import json
import sys
from pathlib import Path

import pytest

from helpers_engine import ACCELERATE, REPO, run

sys.path.insert(0, str(REPO / "recipes"))  # recipes/paper.py imports recipes/resnet50.py beside it
try:
    import paper  # noqa: E402
finally:
    sys.path.remove(str(REPO / "recipes"))

PY = sys.executable
NAMES = [row.name for row in paper.ROWS]
LAUNCHED = "table1/fast_advprop"  # trained through `accelerate launch recipes/paper.py`, then evaluated


def _toy(data, out):
    return ["--smoke", "--data.source=folder", f"--data.path={data}", "--model.name=test_resnet",
            f"--log.output_dir={out}", "--log.trackers=", "--log.progress=false"]


# ---- every row: config, cost and budget ------------------------------------------------------

def test_the_rows_are_the_papers_rows_in_its_order():
    from fap.evaluation.paper import PAPER_RESULTS

    assert NAMES == [p.name for p in PAPER_RESULTS]
    assert len(NAMES) == 28 and len(set(NAMES)) == 28
    tables = {n.split("/")[0] for n in NAMES}
    assert tables == {"table1", "table2", "table3", "table4", "table5", "table6", "shuffling_bn"}


@pytest.mark.parametrize("name", NAMES)
def test_every_row_builds_and_costs_what_the_paper_says(name):
    import timm

    from fap.config import parse_args
    from fap.methods import build_method

    row = paper.row_named(name)
    p = row.paper
    cfg = parse_args(paper.config(row), [])  # validates every section and the method against them
    cost, run_ratio = paper.counted_cost(cfg)
    assert cost.ratio == pytest.approx(p.cost), "counted image-passes per update vs the paper's cost model"
    if p.epochs is not None:
        assert cfg.train.epochs == p.epochs
    if p.budget is not None:
        assert run_ratio == pytest.approx(p.budget, abs=0.01)  # 87 x 1.2 / 105 = 0.994
    assert cfg.train.reference_epochs == row.schedule[0]
    assert timm.is_model(cfg.model.name) and cfg.model.name == row.model
    clean, aux = build_method(row.method, cfg.method).split(cfg.train.batch_size)
    assert clean == 256, "the paper's 256 clean images per update"
    if row.method == "fast_advprop":
        assert aux % cfg.model.aux_group_size == 0, "Shuffling BN needs whole groups of 16"
    # The toy run keeps the row's split, so it counts the paper's cost too.
    toy = parse_args(paper.config(row), _toy("data", "out"), smoke=paper.smoke)
    assert paper.counted_cost(toy)[0].ratio == pytest.approx(p.cost)


def test_budget_matching_uses_the_reference_arithmetic():
    cfg = paper.config(paper.row_named("table1/fast_advprop"))
    assert (cfg.train.epochs, cfg.sched.milestones, cfg.train.batch_size) == (87, (25, 50, 75, 83), 320)
    assert paper.config(paper.row_named("table1/pgd5_advprop_15ep")).sched.milestones == (4, 9, 13, 14)
    assert paper.config(paper.row_named("table1/pgd1_advprop_35ep")).sched.milestones == (10, 20, 30, 33)
    assert [paper.config(paper.row_named(f"table4/p_adv_{p}")).train.batch_size for p in ("0.2", "0.33", "0.5")] \
        == [320, 384, 512]
    mixup = paper.config(paper.row_named("table6/mixup_fast_advprop"))
    assert (mixup.train.epochs, mixup.sched.milestones, mixup.mixup.mixup_alpha) == (150, (50, 100), 0.2)


SAME_EXPERIMENT = [("table2/advprop", "table1/pgd5_advprop"), ("table2/advprop_1_iter", "table1/pgd1_advprop"),
                   ("table2/fast_advprop", "table1/fast_advprop"), ("table4/p_adv_0.2", "table1/fast_advprop"),
                   ("table5/both", "table1/fast_advprop"), ("shuffling_bn/on", "table1/fast_advprop")]
BUDGET = {"train.epochs", "sched.milestones"}
# (row, the row it is compared with, what may differ besides train.name): a comparison changes one thing.
ONE_THING = [
    ("table1/pgd5_advprop_15ep", "table1/pgd5_advprop", BUDGET),
    ("table1/pgd1_advprop", "table1/pgd5_advprop", {"method.attack_steps"}),
    ("table2/decoupled", "table2/decoupled_reuse", {"method.reuse"}),
    ("table2/decoupled_reuse", "table2/fast_advprop", BUDGET),
    ("table3/resnet152_fast_advprop", "table1/fast_advprop", {"model.name"}),
    ("table3/resnet101_vanilla", "table1/vanilla", {"model.name"}),
    ("table4/p_adv_0.5", "table4/p_adv_0.2", {"method.p_adv", "train.batch_size", "optim.lr_base_size", *BUDGET}),
    ("table5/neither", "table5/both", {"method.beta", "method.per_group_normalization"}),
    ("table5/rebalancing", "table5/both", {"method.per_group_normalization"}),
    ("table5/synchronisation", "table5/both", {"method.beta"}),
    ("shuffling_bn/off", "shuffling_bn/on", {"method.shuffle"}),
    ("table6/mixup", "table1/vanilla", {"mixup.mixup_alpha", "mixup.label_smoothing", "train.reference_epochs",
                                         *BUDGET}),
    ("table6/mixup_fast_advprop", "table1/fast_advprop", {"mixup.mixup_alpha", "mixup.label_smoothing",
                                                          "train.reference_epochs", *BUDGET}),
    ("table6/cutmix_fast_advprop", "table6/cutmix", {"method", "model", "train.batch_size", "optim.lr_base_size",
                                                     *BUDGET}),
]


@pytest.mark.parametrize("a, b", SAME_EXPERIMENT)
def test_rows_that_are_one_experiment_have_one_config(a, b):
    from fap.config import diff

    assert set(diff(paper.config(paper.row_named(a)), paper.config(paper.row_named(b)))) == {"train.name"}


@pytest.mark.parametrize("a, b, allowed", ONE_THING, ids=[f"{a}-vs-{b}" for a, b, _ in ONE_THING])
def test_each_comparison_changes_what_its_table_varies(a, b, allowed):
    from fap.config import diff

    changed = set(diff(paper.config(paper.row_named(a)), paper.config(paper.row_named(b)))) - {"train.name"}
    sections = {k for k in allowed if "." not in k}  # a whole section may differ (vanilla vs Fast AdvProp)
    assert changed and {k for k in changed if k.split(".")[0] not in sections} <= allowed, changed


# ---- the command line --------------------------------------------------------------------------

def test_list_dry_run_and_a_wrong_row(capsys):
    assert paper.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in NAMES) and "76.53" in out and "0.994" in out
    assert paper.main(["table4/p_adv_0.33", "--dry-run", "--optim.lr=0.2"]) == 0
    out = capsys.readouterr().out
    assert '"p_adv": 0.3333333333333333' in out and '"lr": 0.2' in out and '"epochs": 79' in out
    assert "512 image-passes per update on a loader batch of 384 vs 384 vanilla = 1.333x per step" in out
    assert "over the run 79 epochs vs 105 vanilla = 1.003x" in out and "top-1 76.0" in out
    for argv in (["table9/nope", "--dry-run"], ["table9/nope", "--data.path=data"], []):
        assert paper.main(argv) == 2, argv  # a user's mistake: exit status 2, never training
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "of the paper" in err[0], err
        assert "table6/mixup_fast_advprop" in err[0] and "--list" in err[0], err
    assert paper.main(["table1/vanilla", "--dry-run", "--method.p_adv=0.3"]) == 2
    assert "unknown key 'p_adv' in --method.p_adv: method 'vanilla'" in capsys.readouterr().err


def test_compare_sets_each_column_beside_the_paper():
    from fap.evaluation.paper import compare
    from fap.evaluation.report import paper_lines

    results = {"sets": {"clean": {"top1": 78.0}, "imagenet_c": {"mean_error": 50.0}, "stylized": {"top1": 12.0}}}
    got = compare(results, "table3/resnet152_fast_advprop")
    rows = {m["metric"]: (m["ours"], m["paper"], m["difference"]) for m in got["metrics"]}
    assert rows["ImageNet top-1"] == (78.0, 78.6, pytest.approx(-0.6))
    assert rows["IN-C mean err ↓ (15)"] == (50.0, 49.8, pytest.approx(0.2))
    assert rows["ImageNet-R"] == (None, 42.0, None) and rows["Stylized-IN"] == (12.0, 12.4, pytest.approx(-0.4))
    text = "\n".join(paper_lines(compare(results, "table6/mixup")))
    assert "| ImageNet top-1 | 78.00 | not given | – |" in text and "| Stylized-IN | 12.00 | 10.0 | +2.00 |" in text


# ---- training ----------------------------------------------------------------------------------

def test_fast_advprop_row_trains_through_accelerate_and_compares(data_demo, tmp_path, capsys):
    out, ev = tmp_path / "run", tmp_path / "eval"
    run([ACCELERATE, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "recipes/paper.py", LAUNCHED, *_toy(data_demo, out)], timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["method"], summary["steps"], summary["cost_ratio_per_step"]) == ("fast_advprop", 2, 1.2)
    proc = run([PY, "-m", "fap", "eval", str(out / "export"), "--suite", "clean", "--data", str(data_demo),
                "--num-workers", "0", "--compare", "table1/fast_advprop", "--out", str(ev)])
    results = json.loads((ev / "results.json").read_text())
    top1 = results["sets"]["clean"]["top1"]
    assert results["paper"]["metrics"][0] == {"metric": "ImageNet top-1", "ours": top1, "paper": 76.5,
                                              "difference": pytest.approx(top1 - 76.5), "lower_is_better": False}
    line = f"| ImageNet top-1 | {top1:.2f} | 76.5 | {top1 - 76.5:+.2f} |"
    assert "### Beside the paper: table1/fast_advprop (Table 1, Fast AdvProp)" in proc.stdout and line in proc.stdout
    assert line in (ev / "results.md").read_text()
    from fap.cli import main  # a wrong row is refused before anything is loaded: in process, exit status 2

    status = main(["eval", str(out / "export"), "--suite", "clean", "--data", str(data_demo),
                   "--compare", "table1/nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "--compare table1/nope" in err[0] and "table5/both" in err[0], err


def _train_rows(rows, data, tmp_path, *, timeout):
    proc = run([PY, __file__, str(tmp_path), str(data), *rows], timeout=timeout)  # OMP_NUM_THREADS=1 (clean_env)
    summaries = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(summaries) == list(rows)
    for name, s in summaries.items():
        row = paper.row_named(name)
        assert (s["method"], s["steps"]) == (row.method, 2), name
        assert s["cost_ratio_per_step"] == pytest.approx(row.paper.cost), name
        assert s["top1"] is not None and 0 <= s["top1"] <= 100, name


def test_every_row_trains_two_updates(data_demo, tmp_path):
    _train_rows([n for n in NAMES if n != LAUNCHED], data_demo, tmp_path, timeout=900)


def main(out: str, data: str, names) -> None:
    """Train each row two updates at toy size in this process; print their summaries as one JSON line."""
    import fap
    from fap.config import parse_args

    summaries = {}
    for i, name in enumerate(names):
        args = _toy(data, Path(out) / f"row{i}") + ["--checkpoint.every_epochs=0", "--checkpoint.export=false"]
        if name.startswith("table3/"):
            args.remove("--model.name=test_resnet")  # the real ResNet-101/152, at 32 px
        cfg = parse_args(paper.config(paper.row_named(name)), args, smoke=paper.smoke)
        summary = fap.train(cfg)
        summaries[name] = {k: summary[k] for k in ("method", "steps", "cost_ratio_per_step", "top1")}
    print(json.dumps(summaries))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
