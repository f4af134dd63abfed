"""An experiment's results: per-arm summaries, the declared contrasts, and their report.

`Results` reads every run's ``measurements.json``, computes the statistics
(`fap.experiment.stats`) and writes, into the experiment folder, ``results.json`` (every
run's numbers, every statistic), ``report.md`` (the tables) and ``results.png`` (per metric:
every seed as a dot with the arm's mean and 95 % t interval; below, each contrast as an
interval around 0 at its corrected level). `Results.headline` is the table printed at the end.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from fap.experiment.metrics import title as _title
from fap.experiment.plan import Contrast, Plan
from fap.experiment.stats import ALPHA, POWER, analyse, check_metrics, describe, paired, sides

__all__ = ["Results", "load_results"]


class Results:
    """Every run's measurements and the statistics over them."""

    def __init__(self, plan: Dict[str, Any], runs: List[Dict[str, Any]]):
        self.plan = plan
        self.runs = runs
        self.values: Dict[Tuple[str, str], Dict[int, float]] = {}
        self.per_image: Dict[Tuple[str, str], Dict[int, str]] = {}
        for r in runs:
            for metric, v in r["metrics"].items():
                self.values.setdefault((r["arm"], metric), {})[r["seed"]] = float(v)
            for metric, bits in r.get("per_image", {}).items():
                self.per_image.setdefault((r["arm"], metric), {})[r["seed"]] = bits
        self.contrasts = analyse(_contrasts(plan), self.values, self.per_image)

    @classmethod
    def collect(cls, plan: Plan) -> "Results":
        runs = []
        for rp in plan.runs:
            m = json.loads((rp.run_dir / "measurements.json").read_text())
            runs.append({"arm": rp.arm, "seed": rp.seed, "run_dir": str(rp.run_dir), **m})
        info = {"out": str(plan.out), "protocol": plan.protocol, "seeds": list(plan.seeds),
                "vanilla_epochs": plan.vanilla_epochs, "vanilla_milestones": list(plan.vanilla_milestones),
                "arms": [{"name": a.name, "overrides": list(a.overrides)} for a in plan.arms],
                "contrasts": [{"a": c.a, "b": c.b, "c": c.c, "d": c.d, "metric": c.metric, "primary": c.primary}
                              for c in plan.contrasts],
                "alpha": ALPHA, "power": POWER}
        return cls(info, runs)

    # -- numbers -------------------------------------------------------------------------
    @property
    def arms(self) -> List[str]:
        return [a["name"] for a in self.plan["arms"]]

    def metrics(self) -> List[str]:
        """The contrasts' metrics, then clean top-1 and training top-1 if measured."""
        names = [c["metric"] for c in self.plan["contrasts"]]
        names += [m for m in ("top1", "train_top1", "corruption_error", "pgd_top1", "map", "map_corrupted")
                  if any((a, m) in self.values for a in self.arms)]
        return list(dict.fromkeys(names))

    def arm(self, name: str, metric: str) -> Dict[str, Any]:
        """Mean, sd, 95 % t interval and the per-seed values of one arm on one metric."""
        by_seed = self.values.get((name, metric), {})
        seeds = sorted(by_seed)
        out = describe([by_seed[s] for s in seeds])
        out["seeds"] = seeds
        out["interval"] = None
        if out["n"] > 1 and out["sd"] > 0:
            from scipy import stats

            ci = stats.ttest_1samp(out["values"], 0.0).confidence_interval(1 - ALPHA)
            out["interval"] = (float(ci.low), float(ci.high))
        return out

    def contrast(self, a: str, b: str, metric: str, c: Optional[str] = None, d: Optional[str] = None) -> Dict[str, Any]:
        """A declared contrast's statistics, ``a - b`` or with ``c``, ``d`` the interaction
        ``(a - b) - (c - d)`` (KeyError if it was not declared)."""
        key = (a, b, c, d, metric)
        for r in self.contrasts:
            if (r["a"], r["b"], r.get("c"), r.get("d"), r["metric"]) == key:
                return r
        raise KeyError(f"{Contrast(a, b, metric, c=c, d=d).spec} was not declared; the contrasts are "
                       f"{', '.join(_spec(r) for r in self.contrasts) or 'none'}")

    def difference(self, a: str, b: str, metric: str, c: Optional[str] = None, d: Optional[str] = None
                   ) -> Dict[str, Any]:
        """Any paired difference (or interaction with ``c``, ``d``), undeclared: uncorrected, exploratory."""
        contrast = Contrast(a, b, metric, c=c, d=d)
        check_metrics([contrast], self.values)
        seeds, x, y = sides(contrast, self.values)
        return {"seeds": seeds, "label": contrast.label, **paired(x, y)}

    def to_dict(self) -> Dict[str, Any]:
        arms = {a: {m: self.arm(a, m) for m in self.metrics() if (a, m) in self.values} for a in self.arms}
        return {"plan": self.plan, "arms": arms, "contrasts": self.contrasts, "runs": self.runs}

    # -- writing -------------------------------------------------------------------------
    def write(self) -> None:
        out = Path(self.plan["out"])
        (out / "results.json").write_text(json.dumps(self.to_dict(), indent=1, default=_jsonable))
        (out / "report.md").write_text(self.markdown() + "\n")
        self.plot(out / "results.png")

    def headline(self) -> str:
        """The arms' table and the contrasts' table, as printed at the end of ``fap compare``."""
        return "\n\n".join(t for t in (self.arm_table(), self.contrast_table(), self.notes()) if t)

    def arm_table(self) -> str:
        metrics = self.metrics()
        lines = ["| arm | epochs | compute vs vanilla | " + " | ".join(_title(m) for m in metrics) + " |",
                 "|---" * (3 + len(metrics)) + "|"]
        for a in self.arms:
            runs = [r for r in self.runs if r["arm"] == a]
            facts = runs[0]["run"] if runs else {}
            cells = []
            for m in metrics:
                s = self.arm(a, m)
                cells.append("–" if not s["n"] else f"{_mean_sd(s)} ({', '.join(f'{v:.2f}' for v in s['values'])})")
            ratio = facts.get("cost_ratio_run")
            lines.append(f"| {a} | {facts.get('epochs', '–')} | {'–' if ratio is None else f'{ratio:.2f}×'} | "
                         + " | ".join(cells) + " |")
        return "\n".join(lines)

    def contrast_table(self) -> str:
        if not self.contrasts:
            return "(no contrasts declared)"
        lines = ["| contrast | metric | role | per seed | mean | interval | p (t) | p (Holm) | per image "
                 "(McNemar) | detectable | verdict |", "|---" * 11 + "|"]
        for c in self.contrasts:
            lines.append("| " + " | ".join(_contrast_cells(c)) + " |")
        return "\n".join(lines)

    def notes(self) -> str:
        """What the contrast table leaves out and why (empty when nothing is)."""
        notes = []
        for c in self.contrasts:
            if c.get("mcnemar_note"):
                notes.append(f"- {c['label']} on {_title(c['metric'])}: per image (McNemar) is {c['mcnemar_note']}. "
                             "Its verdict rests on the seed-level interval, as every contrast's does.")
        return "\n".join(["Notes:", *notes]) if notes else ""

    def markdown(self) -> str:
        p = self.plan
        arms = "\n".join(f"- `{a['name']}`: `{' '.join(a['overrides']) or '(the base config)'}`" for a in p["arms"])
        return "\n".join([
            f"# Experiment `{p['out']}`", "",
            f"Protocol **{p['protocol']}**: vanilla's budget is {p['vanilla_epochs']} epochs"
            + (f" (milestones {p['vanilla_milestones']})" if p["vanilla_milestones"] else "")
            + f"; seeds {p['seeds']} (a seed fixes initial weights and data order in every arm).", "",
            "Arms (overrides on the base config):", arms, "",
            "## Arms", "", "Mean ± sd over seeds, then every seed.", "", self.arm_table(), "",
            "## Contrasts", "", DECISION_RULE, "", self.contrast_table(), "",
        ] + ([self.notes(), ""] if self.notes() else []))

    def plot(self, path: Path) -> Optional[Path]:
        from fap.experiment.plot import plot_results

        return plot_results(self, path)


DECISION_RULE = (
    "A − B per seed, paired (same seed: same initial weights and data order); an interaction "
    "(A − B) − (C − D) is that difference of differences per seed, analysed the same way. *Interval*: the t "
    f"interval of the mean difference, {100 * (1 - ALPHA):.0f} % for primary contrasts, at Holm's level for "
    "secondary ones (declared before the runs, corrected as one family). A difference is **resolved** when "
    "its interval excludes 0 after correction. *Per image*: exact McNemar test on clean top-1 outcomes pooled "
    "over seeds (images A gets right and B wrong / the reverse); it uses the image pairing but treats "
    "(image, seed) pairs as independent, so it is shown beside the verdict, not used for it. *Detectable*: "
    f"the true difference this design finds with {100 * POWER:.0f} % power at the contrast's level, from the "
    "spread of the per-seed differences; below it, \"not resolved\" means \"not detectable here\", not \"absent\"."
)


def _contrasts(plan: Dict[str, Any]) -> List[Contrast]:
    return [Contrast(c["a"], c["b"], c["metric"], c["primary"], c.get("c"), c.get("d")) for c in plan["contrasts"]]


def _spec(row: Dict[str, Any]) -> str:
    return Contrast(row["a"], row["b"], row["metric"], c=row.get("c"), d=row.get("d")).spec


def _contrast_cells(c: Dict[str, Any]) -> List[str]:
    role = "primary" if c["primary"] else "secondary"
    seeds = ", ".join(f"{d:+.2f}" for d in c["differences"])
    if c["interval"] is None:
        interval = p = holm = detectable = "–"
        verdict = {0: "not measured", 1: "one seed: no interval"}.get(c["n"], "no spread across seeds: no interval")
    else:
        lo, hi = c["interval"]
        interval = f"[{lo:+.2f}, {hi:+.2f}] ({100 * c['level']:.1f} %)"
        p = _p(c["p"])
        holm = _p(c["holm"]["p_adjusted"]) if "holm" in c else "–"
        detectable = f"{c['detectable']:.2f}"
        verdict = "**resolved**" if c["resolved"] else f"not resolved (detects ≥ {c['detectable']:.2f})"
    m = c.get("mcnemar")
    if c.get("mcnemar_note"):
        image = "n/a"
    else:
        image = "–" if not m else f"{m['a_only']} vs {m['b_only']} of {m['images']}, p {_p(m['p'])}"
    mean = "–" if c["n"] == 0 else f"{c['mean']:+.2f}"
    return [c["label"], _title(c["metric"]), role, seeds, mean, interval, p, holm, image, detectable, verdict]


def _mean_sd(s: Dict[str, Any]) -> str:
    return f"{s['mean']:.2f}" + (f" ± {s['sd']:.2f}" if s["sd"] is not None else " (one seed)")


def _p(p: float) -> str:
    """Two significant digits, or as many more as keep the printed value on the same side of
    the level `ALPHA` as the value itself (0.0495 prints as 0.0495, not as 0.05)."""
    if p < 1e-4:
        return f"{p:.1e}"
    for digits in range(2, 7):
        text = f"{p:.{digits}g}"
        if (float(text) < ALPHA) == (p < ALPHA):
            return text
    return repr(p)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def load_results(out: str) -> Results:
    """Read an experiment folder's ``results.json`` back as `Results`."""
    data = json.loads((Path(out) / "results.json").read_text())
    return Results(data["plan"], data["runs"])
