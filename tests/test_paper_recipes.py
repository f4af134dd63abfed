"""recipes/paper.py: every row of Tables 1-7 of the Fast AdvProp paper (Mei et al., ICLR 2022) is
stored with its numbers as printed, builds, costs what the paper says, trains, and can be evaluated
beside the paper's numbers (``fap eval --compare``).

`PRINTED` lists every row with its numbers; the first test fails if `fap.evaluation.paper` misses
one, adds one or stores another number. Every row's config is built and checked against it
(counted cost per step, budget-matched epochs, whole-run budget), and every distinct classification
config trains two updates at toy size on the demo data (32 px, 16 clean images per update with the
row's clean : adversarial split; timm ``test_resnet``, except Table 3's rows, which keep their real
ResNet-101/152): Table 1's Fast AdvProp row through ``accelerate launch`` and ``fap eval
--compare``, the others in one process. Table 7's Fast AdvProp row trains one toy epoch of a
ResNet-18 RetinaNet through ``recipes/paper.py`` and is compared with ``fap eval --compare``.

Run as a script (``python tests/test_paper_recipes.py OUT DATA ROW...``) this file trains the
rows in one process, as `recipes/demo.py` trains two: the same Accelerate settings for every run.
"""
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from fap.config import method_name, to_dict
from helpers_engine import ACCELERATE, REPO, run

sys.path.insert(0, str(REPO / "recipes"))  # recipes/paper.py imports recipes/resnet50.py beside it
try:
    import paper  # noqa: E402
finally:
    sys.path.remove(str(REPO / "recipes"))

PY = sys.executable
NAMES = [row.name for row in paper.ROWS]
CLASSIFICATION = [row.name for row in paper.ROWS if not row.detection]
DETECTION = [row.name for row in paper.ROWS if row.detection]
FAP_NAMES = [row.name for row in paper.FAP_ROWS]
LAUNCHED = "table1/fast_advprop"  # trained through `accelerate launch recipes/paper.py`, then evaluated

# Every row of Tables 1-7 (and the Shuffling BN result of the text), with the numbers as printed:
# top-1, IN-C, IN-R, Stylized-IN, COCO mAP, COCO mAP corrupted (None = not given), epochs, cost per epoch.
PRINTED = {
    "table1/vanilla": (76.2, 58.5, 36.3, 7.8, None, None, 105, 1.0),
    "table1/pgd5_advprop": (77.0, 52.0, 42.3, 12.0, None, None, 105, 7.0),
    "table1/pgd5_advprop_15ep": (66.8, 66.2, 31.7, 8.6, None, None, 15, 7.0),
    "table1/pgd1_advprop": (77.5, 54.3, 39.5, 8.6, None, None, 105, 3.0),
    "table1/pgd1_advprop_35ep": (73.9, 59.6, 36.5, 9.3, None, None, 35, 3.0),
    "table1/fast_advprop": (76.5, 56.4, 38.2, 8.3, None, None, 87, 1.2),
    "table2/vanilla": (76.2, 58.5, None, None, None, None, None, 1.0),
    "table2/advprop": (77.0, 51.9, None, None, None, None, None, 7.0),
    "table2/advprop_1_iter": (77.5, 54.3, None, None, None, None, None, 3.0),
    "table2/decoupled": (76.6, 56.8, None, None, None, None, None, 1.2),
    "table3/resnet50_vanilla": (76.2, 58.5, 36.3, 7.8, None, None, 105, 1.0),
    "table3/resnet50_fast_advprop": (76.5, 56.4, 38.2, 8.3, None, None, 87, 1.2),
    "table3/resnet101_vanilla": (77.8, 54.7, 40.1, 9.1, None, None, 105, 1.0),
    "table3/resnet101_fast_advprop": (77.8, 51.7, 41.0, 10.8, None, None, 87, 1.2),
    "table3/resnet152_vanilla": (78.3, 52.3, 40.5, 10.5, None, None, 105, 1.0),
    "table3/resnet152_fast_advprop": (78.6, 49.8, 42.0, 12.4, None, None, 87, 1.2),
    "table4/p_adv_0.2": (76.5, None, None, None, None, None, 87, 1.2),
    "table4/p_adv_0.33": (76.0, None, None, None, None, None, 79, 4 / 3),
    "table4/p_adv_0.5": (75.4, None, None, None, None, None, 70, 1.5),
    "table5/neither": (76.20, None, None, None, None, None, None, 1.2),
    "table5/rebalancing": (76.27, None, None, None, None, None, None, 1.2),
    "table5/synchronisation": (76.35, None, None, None, None, None, None, 1.2),
    "table5/both": (76.53, None, None, None, None, None, None, 1.2),
    "shuffling_bn/off": (74.5, None, None, None, None, None, None, 1.2),
    "shuffling_bn/on": (75.1, None, None, None, None, None, None, 1.2),
    "table6/cutmix": (None, 58.9, 35.2, 5.5, None, None, 210, 1.0),
    "table6/cutmix_fast_advprop": (None, 55.0, 36.5, 7.0, None, None, 175, 1.2),
    "table6/mixup": (None, 53.4, 41.0, 10.0, None, None, 180, 1.0),
    "table6/mixup_fast_advprop": (None, 52.2, 41.7, 10.9, None, None, 150, 1.2),
    "table7/vanilla": (None, None, None, None, 35.8, 17.6, 24, 1.0),
    "table7/fast_advprop": (None, None, None, None, 35.8, 19.0, 20, 1.2),
}


def _toy(data, out):
    return ["--smoke", "--data.source=folder", f"--data.path={data}", "--model.name=test_resnet",
            f"--log.output_dir={out}", "--log.trackers=", "--log.progress=false"]


# ---- the paper's numbers ---------------------------------------------------------------------

def test_every_row_of_tables_1_to_7_is_stored_with_the_numbers_as_printed():
    from fap.evaluation.paper import PAPER_RESULTS, TABLES

    stored = {p.name: (p.top1, p.imagenet_c, p.imagenet_r, p.stylized, p.map, p.map_corrupted, p.epochs, p.cost)
              for p in PAPER_RESULTS}
    assert set(PRINTED) - set(stored) == set(), "rows of the paper missing from PAPER_RESULTS"
    assert set(stored) - set(PRINTED) == set(), "rows that are not the paper's in PAPER_RESULTS"
    for name, numbers in PRINTED.items():
        assert stored[name] == pytest.approx(numbers), name
    assert TABLES == ("Table 1", "Table 2", "Table 3", "Table 4", "Table 5", "text (Shuffling BN)", "Table 6",
                      "Table 7")
    per_table = Counter(p.table for p in PAPER_RESULTS)
    assert [per_table[t] for t in TABLES] == [6, 4, 6, 3, 4, 2, 4, 2]


def test_where_the_paper_contradicts_itself_the_table_is_stored_and_the_note_says_so():
    from fap.evaluation.paper import paper_result

    assert "51.9" in paper_result("table1/pgd5_advprop").note and "52.0" in paper_result("table2/advprop").note
    assert "2.1 / 1.3 / 2.5" in paper_result("table6/cutmix_fast_advprop").note
    assert "0.9" in paper_result("table4/p_adv_0.5").note


def test_the_rows_are_the_papers_rows_in_its_order_and_fap_steps_are_apart():
    from fap.evaluation.paper import PAPER_RESULTS, paper_result

    assert NAMES == [p.name for p in PAPER_RESULTS] == list(PRINTED)
    assert len(set(NAMES + FAP_NAMES)) == len(NAMES) + len(FAP_NAMES) == 35
    assert DETECTION == ["table7/vanilla", "table7/fast_advprop"]
    for name in FAP_NAMES:
        assert name.startswith("fap/") and paper.row_named(name).paper is None
        with pytest.raises(ValueError, match="is not a row of the paper"):
            paper_result(name)


@pytest.mark.parametrize("name", CLASSIFICATION + FAP_NAMES)
def test_every_row_builds_and_costs_what_the_paper_says(name):
    import timm

    from fap.config import parse_args
    from fap.methods import build_method

    row = paper.row_named(name)
    p = row.paper
    cfg = parse_args(paper.config(row), [])  # validates every section and the method against them
    cost, run_ratio = paper.counted_cost(cfg)
    expected = p.cost if p else 1.2  # fap's own steps are Fast AdvProp at p_adv 0.2
    assert cost.ratio == pytest.approx(expected), "counted image-passes per update vs the paper's cost model"
    if p is not None and p.epochs is not None:
        assert cfg.train.epochs == p.epochs
    if p is not None and p.budget is not None:
        assert run_ratio == pytest.approx(p.budget, abs=0.01)  # 87 x 1.2 / 105 = 0.994
    assert cfg.train.reference_epochs == row.schedule[0]
    assert timm.is_model(cfg.model.name) and cfg.model.name == row.model
    clean, aux = build_method(row.method, cfg.method).split(cfg.train.batch_size)
    assert clean == 256, "the paper's 256 clean images per update"
    if row.method == "fast_advprop":
        assert aux == 4 * cfg.model.aux_group_size, "a BatchNorm group per GPU: 64 clean + p/(1-p)*64 per GPU, 4 GPUs"
    # The toy run keeps the row's split, so it counts the paper's cost too.
    toy = parse_args(paper.config(row), _toy("data", "out"), smoke=paper.smoke)
    assert paper.counted_cost(toy)[0].ratio == pytest.approx(cost.ratio)


@pytest.mark.parametrize("name", DETECTION)
def test_table7_rows_are_the_detection_recipe_at_24_epochs(name):
    row = paper.row_named(name)
    cfg = paper.detection_config(row)
    (cost, run), epochs = paper.counted_cost(cfg), cfg.train.epochs
    assert (cfg.task, cfg.train.reference_epochs, method_name(cfg.method), cfg.detection.backbone) == \
        ("detection", 24, row.method, "resnet50")
    assert cfg.sched.milestones == ((16, 22) if row.method == "vanilla" else (13, 18))
    assert (epochs, cost.ratio, run) == pytest.approx((row.paper.epochs, row.paper.cost, row.paper.budget), abs=0.01)
    assert cfg.log.output_dir == "runs/paper_" + name.replace("/", "_")
    with pytest.raises(ValueError, match="detection row"):
        paper.config(row)


def test_budget_matching_uses_the_reference_arithmetic():
    cfg = paper.config(paper.row_named("table1/fast_advprop"))
    assert (cfg.train.epochs, cfg.sched.milestones, cfg.train.batch_size) == (87, (25, 50, 75, 83), 320)
    assert paper.config(paper.row_named("table1/pgd5_advprop_15ep")).sched.milestones == (4, 9, 13, 14)
    assert paper.config(paper.row_named("table1/pgd1_advprop_35ep")).sched.milestones == (10, 20, 30, 33)
    table4 = [paper.config(paper.row_named(f"table4/p_adv_{p}")) for p in ("0.2", "0.33", "0.5")]
    assert [c.train.batch_size for c in table4] == [320, 384, 512]
    assert [c.model.aux_group_size for c in table4] == [16, 32, 64]  # 64/(1-p) per GPU: 16, 32, 64 adversarial
    assert [c.sched.milestones for c in table4] == [(25, 50, 75, 83), (22, 45, 68, 75), (20, 40, 60, 67)]
    mixup = paper.config(paper.row_named("table6/mixup_fast_advprop"))
    assert (mixup.train.epochs, mixup.sched.milestones, mixup.mixup.mixup_alpha) == (150, (50, 100), 0.2)


def test_table5_update_speeds():
    """Update speed = a group's total loss weight over the shared parameters' (one normaliser
    for all without synchronisation): 1 : 0.8 : 0.2 at beta 0.5, 1 : 0.67 : 0.33 at beta 1."""
    from fap.methods import build_method

    speeds = {}
    for name in ("table5/neither", "table5/rebalancing", "table5/synchronisation", "table5/both"):
        cfg = paper.config(paper.row_named(name))
        w = build_method("fast_advprop", cfg.method).weights(256, 64)
        sync = cfg.method.per_group_normalization
        speeds[name] = (1.0, 1.0) if sync else (w["main"] / w["shared"], w["aux"] / w["shared"])
    assert speeds["table5/rebalancing"] == pytest.approx((0.8, 0.2))
    assert speeds["table5/neither"] == pytest.approx((2 / 3, 1 / 3))
    assert speeds["table5/both"] == speeds["table5/synchronisation"] == (1.0, 1.0)


SAME_EXPERIMENT = [("table2/vanilla", "table1/vanilla"), ("table2/advprop", "table1/pgd5_advprop"),
                   ("table2/advprop_1_iter", "table1/pgd1_advprop"), ("table3/resnet50_vanilla", "table1/vanilla"),
                   ("table3/resnet50_fast_advprop", "table1/fast_advprop"), ("table4/p_adv_0.2", "table1/fast_advprop"),
                   ("table5/both", "table1/fast_advprop"), ("shuffling_bn/on", "table1/fast_advprop")]
BUDGET = {"train.epochs", "sched.milestones"}
ADVPROP_ATTACK = {"method.attack_target", "method.attack_bn_mode", "method.random_init_prob", "method.beta",
                  "method.per_group_normalization", "method.shuffle"}
# (row, the row it is compared with, what may differ besides train.name): a comparison changes one thing.
ONE_THING = [
    ("table1/pgd5_advprop_15ep", "table1/pgd5_advprop", BUDGET),
    ("table1/pgd1_advprop", "table1/pgd5_advprop", {"method.attack_steps"}),
    ("table2/decoupled", "table2/advprop_1_iter", {"method", "model.aux_group_size", "train.batch_size",
                                                   "optim.lr_base_size"}),
    ("fap/decoupled_fast_attack", "table2/decoupled", ADVPROP_ATTACK),
    ("fap/reuse_105_epochs", "fap/decoupled_fast_attack", {"method.reuse"}),
    ("table1/fast_advprop", "fap/reuse_105_epochs", BUDGET),
    ("fap/targeted_attack", "table1/fast_advprop", {"method.attack_target"}),
    ("fap/attack_running_stats", "table1/fast_advprop", {"method.attack_bn_mode"}),
    ("table3/resnet152_fast_advprop", "table1/fast_advprop", {"model.name"}),
    ("table3/resnet101_vanilla", "table1/vanilla", {"model.name"}),
    ("table4/p_adv_0.5", "table4/p_adv_0.2", {"method.p_adv", "train.batch_size", "optim.lr_base_size",
                                              "model.aux_group_size", *BUDGET}),
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


def test_table2_decoupled_is_advprops_attack_on_a_decoupled_split():
    """Our reading of Table 2's decoupled row (the paper does not print its attack): AdvProp's
    PGD-1 attack, at weight 1 per adversarial image, no reuse, not budget-matched."""
    decoupled = paper.config(paper.row_named("table2/decoupled"))
    advprop = paper.config(paper.row_named("table2/advprop_1_iter"))
    m, a = decoupled.method, advprop.method
    assert (m.attack_steps, m.epsilon, m.random_init_prob) == (a.attack_steps, a.epsilon, a.random_init_prob)
    assert (m.attack_target, m.attack_bn_mode, a.targeted, a.attack_bn_mode) == ("random", "eval", True, "eval")
    assert (m.reuse, m.beta, m.per_group_normalization, m.shuffle, m.p_adv) == (False, 1.0, False, False, 0.2)
    assert decoupled.train.epochs == advprop.train.epochs == 105


# ---- the command line --------------------------------------------------------------------------

def test_list_dry_run_and_a_wrong_row(capsys):
    assert paper.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in NAMES + FAP_NAMES) and "76.53" in out and "0.994" in out
    titles = [line for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    fap_title = "fap's own steps (not rows of the paper; no paper numbers):"
    assert titles == [f"Table {i}:" for i in range(1, 6)] + ["text (Shuffling BN):", "Table 6:", "Table 7:", fap_title]
    table7 = [line.split() for line in out.splitlines() if line.startswith("table7/")]
    assert [(t[0], t[-2], t[-1]) for t in table7] == [("table7/vanilla", "35.8", "17.6"),
                                                     ("table7/fast_advprop", "35.8", "19.0")]
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
    assert paper.main(["table7/fast_advprop", "--dry-run", "--optim.lr=0.02"]) == 0
    out = capsys.readouterr().out
    assert '"lr": 0.02' in out and '"reference_epochs": 24' in out
    assert "over the run 20 epochs vs 24 vanilla = 1.000x" in out
    assert "mAP 35.8, corrupted mAP 19.0" in out
    assert paper.main(["fap/reuse_105_epochs", "--dry-run"]) == 0
    assert "fap's own step, not a row of the paper" in capsys.readouterr().out


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


def test_compare_a_detection_eval_with_table7():
    from fap.evaluation.paper import compare, paper_result
    from fap.evaluation.report import paper_lines

    got = compare({"map": 36.0, "map50": 55.0, "map_corrupted": 18.0}, "table7/fast_advprop")
    rows = {m["metric"]: (m["ours"], m["paper"], m["difference"]) for m in got["metrics"]}
    assert rows == {"COCO mAP": (36.0, 35.8, pytest.approx(0.2)),
                    "COCO mAP corrupted": (18.0, 19.0, pytest.approx(-1.0))}
    text = "\n".join(paper_lines(got))
    assert "| COCO mAP corrupted | 18.00 | 19.0 | -1.00 |" in text and "AP@[.50:.95]" in text
    with pytest.raises(ValueError, match="'table7/vanilla' is a detection row .* this is a classification model"):
        paper_result("table7/vanilla", task="classification")
    with pytest.raises(ValueError, match="'table1/vanilla' is a classification row .*: table7/vanilla, table7/fast"):
        paper_result("table1/vanilla", task="detection")


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
        assert s["cost_ratio_per_step"] == pytest.approx(row.paper.cost if row.paper else 1.2), name
        assert s["top1"] is not None and 0 <= s["top1"] <= 100, name


def _distinct_rows():
    """The classification rows and fap's steps, one per distinct config (Table 3's ResNet-50 rows
    are Table 1's runs, and so on: `SAME_EXPERIMENT`), without the launched one."""
    seen, names = set(), []
    for name in CLASSIFICATION + FAP_NAMES:
        cfg = to_dict(paper.config(paper.row_named(name)))
        cfg["train"].pop("name")
        key = json.dumps(cfg, sort_keys=True, default=str)
        if key not in seen and name != LAUNCHED:
            names.append(name)
        seen.add(key)
    return names


def test_every_row_trains_two_updates(data_demo, tmp_path):
    names = _distinct_rows()
    assert not {a for a, _ in SAME_EXPERIMENT} & set(names) and "fap/reuse_105_epochs" in names
    _train_rows(names, data_demo, tmp_path, timeout=900)


def test_table7_row_trains_by_name_and_compares(tmp_path, capsys):
    """Table 7 through recipes/paper.py (the detection recipe) at toy size, then `fap eval --compare`."""
    from fap.cli import main as fap_main
    from fap.data.corrupt import make_corrupted
    from fap.data.demo_det import make_demo_det

    data = make_demo_det(str(tmp_path / "demo"), image_size=48, train_images=10, val_images=3, num_classes=3,
                         max_objects=3)
    corrupt = make_corrupted(f"{data}/val", str(tmp_path / "demo-c"), corruptions=["brightness"], severities=[1],
                             num_workers=0, progress=False)
    out = tmp_path / "run"
    toy = [f"--data.path={data}", "--data.source=coco", "--detection.backbone=resnet18", "--detection.min_size=48",
           "--detection.max_size=48", "--train.epochs=1", "--sched.sched=constant", "--sched.milestones=", "--train.batch_size=5",
           "--sched.warmup_epochs=0", "--train.eval_batch_size=3", "--data.num_workers=0", f"--log.output_dir={out}",
           "--log.trackers=", "--method.shuffle=False"]
    assert paper.main(["table7/fast_advprop", *toy]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["method"], summary["epochs"], summary["cost_ratio_per_step"]) == ("fast_advprop", 1, 1.2)
    capsys.readouterr()
    assert fap_main(["eval", str(out), "--suite", "clean", f"c={corrupt}", "--data", data, "--batch-size", "3",
                     "--out", str(tmp_path / "eval"), "--compare", "table7/fast_advprop"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    metrics = {m["metric"]: m for m in results["paper"]["metrics"]}
    assert metrics["COCO mAP"]["ours"] == results["map"] and metrics["COCO mAP"]["paper"] == 35.8
    assert metrics["COCO mAP corrupted"]["ours"] == results["map_corrupted"]
    assert metrics["COCO mAP corrupted"]["paper"] == 19.0
    assert "### Beside the paper: table7/fast_advprop (Table 7, RetinaNet, Fast AdvProp)" in printed
    # a classification row for a detector is refused before anything is evaluated: exit status 2
    assert fap_main(["eval", str(out), "--suite", "clean", "--data", data, "--compare", "table1/vanilla"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compare table1/vanilla" in err[0] and "table7/fast_advprop" in err[0], err


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
