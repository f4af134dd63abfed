"""fap.experiment / `fap compare`: the plan, the statistics (against scipy called directly),
reuse and refusal of run directories, and a toy experiment through the command line that is
killed mid-way, started again, and ends with the results of an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scipy import stats

from fap.checkpoint import list_checkpoints
from fap.checks import ConfigError
from fap.config import TrainConfig, apply_overrides
from fap.experiment import Arm, Contrast, Results, make_plan
from fap.experiment.runner import check_run_dir, run_spec
from fap.experiment.stats import analyse, detectable_difference, holm, mcnemar, paired

A = [71.2, 70.4, 72.9, 70.8, 71.5]
B = [70.1, 70.6, 71.8, 69.9, 70.2]


# -- statistics ---------------------------------------------------------------------------

def test_paired_difference_is_scipys_paired_t_test():
    out = paired(A, B)
    ref = stats.ttest_rel(A, B)
    d = [a - b for a, b in zip(A, B)]
    n = len(d)
    mean = sum(d) / n
    sem = stats.sem(d)
    lo, hi = stats.t.interval(0.95, n - 1, loc=mean, scale=sem)
    assert out["differences"] == pytest.approx(d)
    assert out["mean"] == pytest.approx(mean)
    assert out["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert out["interval"] == pytest.approx((lo, hi), rel=1e-12)
    assert paired(A[:1], B[:1])["interval"] is None  # one seed: no interval


def test_detectable_difference_has_the_stated_power():
    sd, n = 0.7, 5
    delta = detectable_difference(sd, n)
    crit = stats.t.ppf(0.975, n - 1)
    nc = delta * n ** 0.5 / sd
    power = stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)
    assert power == pytest.approx(0.8, abs=1e-8)
    assert detectable_difference(sd, 2) > detectable_difference(sd, 6)  # more seeds, smaller effects


def test_mcnemar_is_the_exact_binomial_test_on_discordant_images():
    a = ["1101100111", "0111011110"]
    b = ["1001000111", "0110011111"]
    out = mcnemar(list(zip(a, b)))
    # A right and B wrong: 2 + 1; B right and A wrong: 0 + 1
    assert (out["a_only"], out["b_only"], out["images"]) == (3, 1, 20)
    assert out["p"] == pytest.approx(stats.binomtest(3, 4, 0.5).pvalue)


def test_holm_step_down():
    out = holm([0.01, 0.04, 0.03, 0.2])
    assert [o["p_adjusted"] for o in out] == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert [o["alpha"] for o in out] == pytest.approx([0.0125, 0.025, 0.05 / 3, 0.05])
    assert [o["rejected"] for o in out] == [True, False, False, False]


def test_analyse_corrects_secondary_contrasts_only():
    values = {("x", "top1"): dict(enumerate(A)), ("y", "top1"): dict(enumerate(B)),
              ("x", "err"): dict(enumerate(B)), ("y", "err"): dict(enumerate(A))}
    rows = analyse([Contrast("x", "y", "top1", primary=True), Contrast("x", "y", "err"),
                    Contrast("y", "x", "top1")], values, {})
    primary, s1, s2 = rows
    assert "holm" not in primary and primary["level"] == 0.95
    assert s1["holm"]["alpha"] == pytest.approx(0.025) and s1["level"] == pytest.approx(0.975)
    d = [b - a for a, b in zip(A, B)]
    lo, hi = stats.t.interval(0.975, 4, loc=sum(d) / 5, scale=stats.sem(d))
    assert s1["interval"] == pytest.approx((lo, hi))
    assert primary["resolved"] == (primary["p"] < 0.05)
    assert s1["resolved"] == (s1["holm"]["p_adjusted"] < 0.05)


# Does dual - mixed grow with epsilon? (dual24 - mixed24) - (dual2 - mixed2), per seed.
C = [70.9, 70.2, 71.6, 70.5, 70.8]
D = [70.5, 70.4, 71.3, 70.1, 70.6]
D_BY_HAND = [0.7, 0.0, 0.8, 0.5, 1.1]  # (A - B) - (C - D): (1.1 - 0.4, -0.2 + 0.2, 1.1 - 0.3, 0.9 - 0.4, 1.3 - 0.2)
INTERACTION = Contrast("dual24", "mixed24", "top1", c="dual2", d="mixed2")


def _values(metric="top1"):
    return {(arm, metric): dict(enumerate(v)) for arm, v in
            (("dual24", A), ("mixed24", B), ("dual2", C), ("mixed2", D))}


def test_an_interaction_is_the_paired_t_test_on_the_difference_of_differences():
    bits = {(arm, "top1"): {s: "1010" for s in range(5)} for arm in ("dual24", "mixed24", "dual2", "mixed2")}
    (row,) = analyse([INTERACTION], _values(), bits)
    ref = stats.ttest_1samp(D_BY_HAND, 0.0)
    ci = ref.confidence_interval(0.95)
    assert row["label"] == "(dual24 − mixed24) − (dual2 − mixed2)"
    assert row["differences"] == pytest.approx(D_BY_HAND, abs=1e-12)
    assert row["mean"] == pytest.approx(sum(D_BY_HAND) / 5)
    assert row["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert row["interval"] == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert row["detectable"] == pytest.approx(detectable_difference(stats.tstd(D_BY_HAND), 5), rel=1e-6)
    assert row["resolved"] == (ref.pvalue < 0.05 and ci.low > 0)
    # per-image outcomes exist for all four arms, yet McNemar is not applicable, not computed on two of them
    assert row["mcnemar"] is None and "not applicable" in row["mcnemar_note"]


def test_holm_corrects_an_interaction_with_the_other_secondary_contrasts():
    values = _values()
    rows = analyse([Contrast("dual24", "mixed24", "top1", primary=True), Contrast("dual2", "mixed2", "top1"),
                    INTERACTION], values, {})
    primary, simple, interaction = rows
    p_simple = stats.ttest_rel(C, D).pvalue
    p_interaction = stats.ttest_1samp(D_BY_HAND, 0.0).pvalue
    expected = holm([p_simple, p_interaction])
    assert "holm" not in primary
    for row, h, d in ((simple, expected[0], [c - d for c, d in zip(C, D)]), (interaction, expected[1], D_BY_HAND)):
        assert row["holm"]["p_adjusted"] == pytest.approx(h["p_adjusted"], rel=1e-9)
        assert row["holm"]["alpha"] == pytest.approx(h["alpha"]) and row["holm"]["rejected"] == h["rejected"]
        ci = stats.ttest_1samp(d, 0.0).confidence_interval(1 - h["alpha"])
        assert row["level"] == pytest.approx(1 - h["alpha"])
        assert row["interval"] == pytest.approx((ci.low, ci.high), rel=1e-9)
        assert row["resolved"] == (h["rejected"] and not ci.low <= 0 <= ci.high)


def test_a_contrast_on_a_metric_an_arm_lacks_names_the_arm_and_its_metrics():
    values = {**_values(), **{(arm, "clean_main"): {0: 70.0, 1: 71.0} for arm in ("dual24", "dual2")}}
    with pytest.raises(ConfigError, match=r"contrast dual24:mixed24:dual2:mixed2:clean_main .*"
                                          r"no run of arm 'mixed24', 'mixed2' measured 'clean_main' "
                                          r"\('mixed24' has top1; 'mixed2' has top1\)"):
        analyse([Contrast("dual24", "mixed24", "clean_main", c="dual2", d="mixed2")], values, {})
    with pytest.raises(ConfigError, match=r"contrast dual24:mixed24:top5 \(dual24 − mixed24\): no run of arm "
                                          r"'dual24', 'mixed24' measured 'top5'"):
        analyse([Contrast("dual24", "mixed24", "top5")], values, {})


# -- results and their report ---------------------------------------------------------------

FOUR_ARMS = tuple(Arm(name, ("--method", "vanilla")) for name in ("dual24", "mixed24", "dual2", "mixed2"))


def _results(tmp_path, contrasts, extra=lambda arm, seed: {}) -> Results:
    """Results read back from measurements.json files written by hand: no training."""
    plan = make_plan(_base(tmp_path), FOUR_ARMS, range(5), out=tmp_path / "exp", protocol="equal-epochs",
                     contrasts=contrasts)
    columns = dict(zip((a.name for a in FOUR_ARMS), (A, B, C, D)))
    for rp in plan.runs:
        rp.run_dir.mkdir(parents=True)
        metrics = {"top1": columns[rp.arm][rp.seed], **extra(rp.arm, rp.seed)}
        (rp.run_dir / "measurements.json").write_text(json.dumps(
            {"metrics": metrics, "per_image": {"top1": "0110"}, "run": {"epochs": 12, "cost_ratio_run": 1.0}}))
    return Results.collect(plan)


def test_the_report_shows_an_interaction_with_mcnemar_not_applicable(tmp_path):
    results = _results(tmp_path, [Contrast("dual24", "mixed24", "top1", primary=True), INTERACTION])
    results.write()
    report = (tmp_path / "exp" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| (dual24 − mixed24) − (dual2 − mixed2) |"))
    assert "| n/a |" in row and "+0.62" in row  # mean of D_BY_HAND
    assert "per image (McNemar) is not applicable to an interaction" in report
    simple = next(line for line in report.splitlines() if line.startswith("| dual24 − mixed24 |"))
    assert "0 vs 0 of 20" in simple  # the two-arm contrast keeps its McNemar test
    saved = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert [(c["label"], c["c"], c["mcnemar"]) for c in saved["contrasts"]] == [
        ("dual24 − mixed24", None, {"images": 20, "a_only": 0, "b_only": 0, "p": 1.0}),
        ("(dual24 − mixed24) − (dual2 − mixed2)", "dual2", None)]
    assert results.contrast("dual24", "mixed24", "top1", "dual2", "mixed2")["mean"] == pytest.approx(0.62)
    with pytest.raises(KeyError, match="dual2:mixed2:top1 was not declared"):
        results.contrast("dual2", "mixed2", "top1")
    # the plot's contrast panel labels it with both differences
    from fap.experiment.plot import contrast_label

    assert contrast_label(saved["contrasts"][1]) == "(dual24 − mixed24) − (dual2 − mixed2) (secondary)"
    assert (tmp_path / "exp" / "results.png").stat().st_size > 0


def test_writing_the_figure_leaves_the_callers_matplotlib_backend_and_figures_alone(tmp_path):
    """A notebook's inline backend survives `Results.write` (it used to be switched to Agg,
    after which the notebook's own plt.show() displayed nothing)."""
    import matplotlib
    import matplotlib.pyplot as plt

    previous = matplotlib.get_backend()
    matplotlib.use("svg")  # any backend but Agg stands in for the notebook's
    try:
        open_figures = plt.get_fignums()
        _results(tmp_path, [Contrast("dual24", "mixed24", "top1", primary=True)]).write()
        assert (tmp_path / "exp" / "results.png").stat().st_size > 0
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == open_figures
    finally:
        matplotlib.use(previous)


@pytest.mark.parametrize("p, shown", [(0.04950931, "0.0495"), (0.0499999, "0.0499999"), (0.0504, "0.05"),
                                      (0.072, "0.072"), (0.011244, "0.011"), (3e-5, "3.0e-05")])
def test_a_p_value_is_never_printed_on_the_other_side_of_the_level(p, shown):
    """The demo's corruption-error contrast (p 0.0495, resolved) used to print as p 0.05."""
    from fap.experiment.report import _p

    assert _p(p) == shown


def test_an_arm_without_a_metric_other_arms_have_gets_a_dash_in_the_arm_table(tmp_path):
    results = _results(tmp_path, [INTERACTION], extra=lambda arm, seed: {"pgd_top1": 40.0 + seed} if
                       arm.startswith("dual") else {})
    table = results.arm_table().splitlines()
    assert "PGD top-1 (%)" in table[0]
    assert table[2].startswith("| dual24 |") and "42.00 ± 1.58" in table[2]
    assert table[3].startswith("| mixed24 |") and table[3].endswith("| – |")
    results.plot(tmp_path / "plot.png")
    with pytest.raises(ConfigError, match="no run of arm 'mixed24' measured 'pgd_top1'"):
        results.difference("dual24", "mixed24", "pgd_top1")


# -- the plan -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("fast:vanilla:top1", Contrast("fast", "vanilla", "top1", primary=True)),
    (" dual24 : mixed24:dual2:mixed2:top1", Contrast("dual24", "mixed24", "top1", True, "dual2", "mixed2")),
])
def test_contrasts_parse_from_the_command_line(text, want):
    got = Contrast.parse(text, primary=True)
    assert got == want and Contrast.parse(got.spec, primary=True) == got


@pytest.mark.parametrize("text", ["fast:vanilla", "a:b:c:top1", "a:b:c:d:e:top1", "a::top1", "a:b:c: :top1"])
def test_a_bad_contrast_spec_shows_both_forms(text):
    with pytest.raises(ConfigError, match=r"--secondary .*ARM_A:ARM_B:METRIC .*ARM_A:ARM_B:ARM_C:ARM_D:METRIC"):
        Contrast.parse(text, primary=False)


def test_an_interaction_needs_both_c_and_d():
    with pytest.raises(ConfigError, match="give both c and d"):
        Contrast("a", "b", "top1", c="x")


def _base(tmp_path) -> TrainConfig:
    return apply_overrides(TrainConfig(), ["--data.source=folder", f"--data.path={tmp_path}", "--train.epochs=12",
                                           "--sched.sched=multistep", "--sched.milestones=6,9",
                                           "--train.batch_size=20"])


ARMS = (Arm("vanilla", ("--method", "vanilla", "--model.dual_norm=false")), Arm("fast", ("--method", "fast_advprop")),
        Arm("advprop", ("--method=advprop", "--method.attack_steps=1")))


def test_equal_compute_takes_epochs_and_milestones_from_the_cost_ledger(tmp_path):
    plan = make_plan(_base(tmp_path), ARMS, [0, 1], out=tmp_path / "x", protocol="equal-compute")
    got = {(r.arm, r.seed): (r.config.train.epochs, r.config.sched.milestones, r.config.train.reference_epochs)
           for r in plan.runs}
    assert got[("vanilla", 0)] == (12, (6, 9), 12)
    assert got[("fast", 1)] == (10, (5, 7), 12)      # / 1.2000000000000002, rounded: the reference code
    assert got[("advprop", 0)] == (4, (2, 3), 12)    # / (K + 2)
    assert plan.run("fast", 1).config.train.seed == 1
    assert plan.run("fast", 1).run_dir == tmp_path / "x" / "runs" / "fast" / "seed1"
    same = make_plan(_base(tmp_path), ARMS, [0], out=tmp_path / "x", protocol="equal-epochs")
    assert {r.config.train.epochs for r in same.runs} == {12}
    longer = make_plan(_base(tmp_path), ARMS[:2], [0], out=tmp_path / "x", protocol="equal-compute", epochs=24)
    assert longer.run("fast", 0).config.train.epochs == 20 and longer.vanilla_milestones == (12, 18)


@pytest.mark.parametrize("bad, words", [
    (dict(overrides=["--train.epochs=3"]), "train.epochs is set by the protocol"),
    (dict(contrasts=[Contrast("fast", "nope", "top1")]), "no arm named 'nope'"),
    (dict(contrasts=[Contrast("fast", "vanilla", "top1", c="advprop", d="nope")]),
     "contrast fast:vanilla:advprop:nope:top1: no arm named 'nope'"),
    (dict(contrasts=[Contrast("fast", "vanilla", "top1", c="advprop", d="advprop")]), "an arm against itself"),
    (dict(contrasts=[Contrast("fast", "vanilla", "top1", c="fast", d="vanilla")]), "the same A − B twice"),
    (dict(protocol="equal-time"), "equal-epochs, equal-compute"),
])
def test_plan_mistakes_are_named(tmp_path, bad, words):
    kwargs = dict(out=tmp_path, protocol="equal-compute")
    kwargs.update(bad)
    with pytest.raises(ConfigError, match=words):
        make_plan(_base(tmp_path), ARMS, [0], **kwargs)


def test_a_run_directory_made_with_another_config_is_refused_naming_the_key(tmp_path):
    plan = make_plan(_base(tmp_path), ARMS[:2], [0], out=tmp_path / "x")
    rp = plan.run("fast", 0)
    options = {"train_images": 100, "measure": None}
    assert check_run_dir(rp, run_spec(rp, options)) == "new"
    rp.run_dir.mkdir(parents=True)
    (rp.run_dir / "experiment.json").write_text(json.dumps(run_spec(rp, options)))
    assert check_run_dir(rp, run_spec(rp, options)) == "unfinished"
    (rp.run_dir / "measurements.json").write_text("{}")
    assert check_run_dir(rp, run_spec(rp, options)) == "finished"
    other = make_plan(_base(tmp_path), ARMS[:2], [0], out=tmp_path / "x", overrides=["--optim.lr=0.3"])
    with pytest.raises(ConfigError, match=r"optim\.lr: the run has 0\.1, this experiment 0\.3"):
        check_run_dir(other.run("fast", 0), run_spec(other.run("fast", 0), options))
    with pytest.raises(ConfigError, match="measurements.train_images"):
        check_run_dir(rp, run_spec(rp, {"train_images": 5, "measure": None}))
    # a key the record lacks (a field added to fap since the run) counts as its default, as on resume
    spec = run_spec(rp, options)
    del spec["config"]["method"]["random_init_prob"]
    del spec["config"]["model"]["init_from"]  # (model.init_from, default None, came later than many runs)
    (rp.run_dir / "experiment.json").write_text(json.dumps(spec))
    assert check_run_dir(rp, run_spec(rp, options)) == "finished"
    tuned = make_plan(_base(tmp_path), ARMS[:2], [0], out=tmp_path / "x", overrides=["--model.init_from=runs/base"])
    with pytest.raises(ConfigError, match=r"model\.init_from: the run has None, this experiment 'runs/base'"):
        check_run_dir(tuned.run("fast", 0), run_spec(tuned.run("fast", 0), options))
    # settings that cannot change the numbers do not count
    quiet = make_plan(_base(tmp_path), ARMS[:2], [0], out=tmp_path / "x", overrides=["--log.every_steps=7"])
    assert check_run_dir(quiet.run("fast", 0), run_spec(quiet.run("fast", 0), options)) == "finished"


# -- a toy experiment through the command line ---------------------------------------------

FAP = [sys.executable, "-m", "fap"]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from fap.data import make_demo

    return make_demo(str(tmp_path_factory.mktemp("toy") / "demo"), train_per_class=8, val_per_class=4,
                     image_size=32, num_workers=1)


TOY_ARMS = ("--arm", "vanilla=--method vanilla --model.dual_norm=false",
            "--arm", "fast=--method fast_advprop --model.aux_group_size=2")
TOY_CONTRASTS = ("--primary", "fast:vanilla:top1", "--secondary", "fast:vanilla:train_top1")


def _compare(data, out, protocol, *extra, arms=TOY_ARMS, seeds=("0", "1"), contrasts=TOY_CONTRASTS):
    return FAP + ["compare", *arms, "--seeds", *seeds, "--protocol", protocol, "--epochs", "6", "--jobs", "2",
                  "--out", str(out), "--train-images", "40", *contrasts, "--quiet", *extra,
                  "--", "--data.source=folder", f"--data.path={data}", "--model.name=test_resnet",
                  "--data.image_size=32", "--data.crop_pct=1.0", "--train.batch_size=20", "--data.num_workers=0",
                  "--optim.opt=adamw", "--optim.lr=3e-3", "--log.trackers=", "--checkpoint.every_steps=1"]


def _numbers(out: Path):
    data = json.loads((out / "results.json").read_text())
    return [(r["arm"], r["seed"], r["metrics"], r["per_image"]) for r in data["runs"]], data["contrasts"]


def _env():
    return dict(os.environ, PYTHONWARNINGS="ignore")


def test_a_killed_experiment_resumes_to_the_uninterrupted_results(toy_data, tmp_path):
    reference = tmp_path / "reference"
    done = subprocess.run(_compare(toy_data, reference, "equal-compute"), capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fast − vanilla" in done.stdout and "primary" in done.stdout
    for name in ("results.json", "report.md", "results.png"):
        assert (reference / name).is_file()

    out = tmp_path / "killed"
    proc = subprocess.Popen(_compare(toy_data, out, "equal-compute"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=_env())
    runs = [out / "runs" / a / f"seed{s}" for a in ("vanilla", "fast") for s in (0, 1)]
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once one run finished and a later one has a checkpoint
        finished = [r for r in runs if (r / "measurements.json").exists()]
        midway = [r for r in runs[2:] if r.is_dir() and len(list_checkpoints(str(r))) >= 2
                  and not (r / "measurements.json").exists()]
        if finished and midway:
            break
        assert proc.poll() is None, "the experiment ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()
    again = subprocess.run(_compare(toy_data, out, "equal-compute"), capture_output=True, text=True, env=_env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert _numbers(out) == _numbers(reference)
    resumed = [r for r in runs if "\"type\": \"resume\"" in (r / "log.jsonl").read_text()]
    assert resumed, "no run was resumed from its checkpoint"

    # the same folder with another learning rate: refused before anything trains, naming the key
    changed = subprocess.run(_compare(toy_data, out, "equal-compute") + ["--optim.lr=1e-3"], capture_output=True,
                             text=True, env=_env())
    assert changed.returncode == 2
    assert "optim.lr: the run has 0.003, this experiment 0.001" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) <= 2


def test_equal_epochs_through_the_cli(toy_data, tmp_path):
    out = tmp_path / "epochs"
    done = subprocess.run(_compare(toy_data, out, "equal-epochs", "--measure", "fap.experiment.measures:branch_scores"),
                          capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    branches = {"clean_main", "clean_aux", "adversarial_main", "adversarial_aux"}
    for r in data["runs"]:  # the measure's numbers are metrics; vanilla has no auxiliary norms to score
        assert (branches <= set(r["metrics"])) == (r["arm"] == "fast")
        if r["arm"] == "fast":
            assert r["metrics"]["clean_main"] == pytest.approx(r["metrics"]["top1"])
    assert {r["run"]["epochs"] for r in data["runs"]} == {6}
    fast = [r for r in data["runs"] if r["arm"] == "fast"]
    assert all(r["run"]["cost_ratio_run"] == pytest.approx(1.2) for r in fast)
    assert all(len(r["per_image"]["top1"]) == 40 and 0 <= r["metrics"]["train_top1"] <= 100 for r in data["runs"])
    assert all(r["metrics"]["val_top1_export"] == pytest.approx(r["metrics"]["top1"]) for r in data["runs"])


def test_a_launcher_runs_each_worker(toy_data, tmp_path):
    out = tmp_path / "launched"
    launcher = "accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"
    cmd = _compare(toy_data, out, "equal-epochs", "--launcher", launcher, arms=TOY_ARMS[2:], seeds=("0",),
                   contrasts=())
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    log = (out / "runs" / "fast" / "seed0" / "train.log").read_text()
    assert "accelerate launch --num_processes 1" in log and "-m fap.experiment.worker" in log
    data = json.loads((out / "results.json").read_text())
    assert [(r["arm"], r["seed"]) for r in data["runs"]] == [("fast", 0)] and data["contrasts"] == []


def test_compare_help_documents_the_feature(capsys):
    from fap.cli import main

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    for words in ("equal-epochs", "equal-compute", "matched_budget", "--jobs", "resumes unfinished", "another config",
                  "McNemar", "Holm", "detects", "training", "results.json", "report.md", "results.png", "--launcher",
                  "fap.experiment.run", "A:B:C:D:METRIC", "(A - B) - (C - D)"):
        assert words in text, words


def test_a_failing_run_is_named_with_its_log(toy_data, tmp_path):
    out = tmp_path / "broken"
    cmd = _compare(toy_data, out, "equal-epochs", arms=TOY_ARMS[2:], seeds=("0",), contrasts=())
    cmd[cmd.index(f"--data.path={toy_data}")] = f"--data.path={tmp_path / 'nowhere'}"
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert done.returncode == 2
    assert "run fast seed 0 failed (exit status 2)" in done.stderr and "nowhere" in done.stderr
    assert "Traceback" not in done.stderr
