"""Paired statistics for an experiment's arms, with scipy.

Runs of two arms with the same seed share their initial weights and data order, so a
contrast (arm A - arm B on a metric) is analysed on the per-seed differences ``d``:

* their mean, a t interval and the paired t-test (``scipy.stats.ttest_1samp(d)``, the same
  as ``ttest_rel(a, b)``): the evidence that the difference holds across training runs;
* an exact McNemar test on the per-image outcomes pooled over seeds, where the metric has
  them (clean top-1): ``scipy.stats.binomtest`` on the images one arm gets right and the
  other wrong. It uses the images' pairing, which the seed-level test ignores, but it
  treats (image, seed) pairs as independent, so it says whether the arms differ *on these
  images for these seeds*, not across training runs; the report's verdict rests on the
  seed-level interval, McNemar is shown beside it;
* the smallest true difference the design detects with 80 % power at the contrast's
  level, from the spread of ``d`` (noncentral t, ``scipy.stats.nct``), so that "not
  detectable here" and "absent" can be told apart.

An interaction (A - B) - (C - D) gets the same seed-level analysis of its per-seed
``d = (A - B) - (C - D)``; McNemar does not apply to it (it pairs two arms' outcomes per
image) and is reported as not applicable.

Primary contrasts are tested at ``alpha`` each; secondary ones are Holm-corrected as one
family (Holm, Scand. J. Statist. 1979): the k-th smallest p of m is tested at
``alpha / (m - k + 1)``, stopping at the first that fails, and its interval is reported at
that level. A difference is *resolved* only when its interval excludes 0 after correction.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

from fap.checks import ConfigError

__all__ = ["ALPHA", "POWER", "MCNEMAR_INTERACTION", "describe", "paired", "mcnemar", "holm", "detectable_difference",
           "sides", "check_metrics", "analyse"]

ALPHA = 0.05
POWER = 0.8
MCNEMAR_INTERACTION = ("not applicable to an interaction (A − B) − (C − D): McNemar pairs two arms' outcomes on "
                       "each image, and a difference of differences has no such pairs")


def describe(values: Sequence[float]) -> Dict:
    """Mean, sample standard deviation (None for one value) and the values."""
    v = [float(x) for x in values]
    n = len(v)
    mean = sum(v) / n if n else float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "sd": sd, "values": v}


def paired(a: Sequence[float], b: Sequence[float], *, level: float = 1 - ALPHA) -> Dict:
    """``a - b`` paired: per-pair differences, mean, t interval at ``level``, paired t-test p
    and the smallest difference detectable with `POWER` at ``1 - level``.

    With one pair, or pairs that all differ by the same amount, there is no spread: interval,
    p and detectable difference are None.
    """
    from scipy import stats

    if len(a) != len(b):
        raise ValueError(f"paired samples of different lengths: {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    out = describe(d)
    out.update(differences=out.pop("values"), level=level, interval=None, p=None, detectable=None)
    n, sd = out["n"], out["sd"]
    if n < 2:
        return out
    if sd == 0.0:  # every pair differs by the same amount: no spread, no t interval
        return out
    test = stats.ttest_1samp(d, 0.0)
    ci = test.confidence_interval(confidence_level=level)
    out.update(interval=(float(ci.low), float(ci.high)), p=float(test.pvalue),
               detectable=detectable_difference(sd, n, alpha=1 - level))
    return out


def detectable_difference(sd: float, n: int, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """The true mean difference a two-sided paired t-test at ``alpha`` finds with ``power``,
    for ``n`` pairs whose differences have standard deviation ``sd`` (noncentral t)."""
    from scipy import optimize, stats

    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(delta: float) -> float:
        nc = delta * math.sqrt(n) / sd
        lower = stats.nct.cdf(-crit, df, nc)  # ~0 for delta > 0; scipy gives NaN for some tiny values
        return stats.nct.sf(crit, df, nc) + (0.0 if math.isnan(lower) else lower) - power

    hi = sd
    while shortfall(hi) < 0:
        hi *= 2
    return float(optimize.brentq(shortfall, 0.0, hi, xtol=1e-10 * sd))


def mcnemar(pairs: Sequence[Tuple[str, str]]) -> Dict:
    """Exact McNemar test on per-image outcomes: ``pairs`` of equal-length 0/1 strings (arm A's,
    arm B's), one per seed, pooled. ``a_only``: images A gets right and B wrong."""
    from scipy import stats

    a_only = b_only = images = 0
    for x, y in pairs:
        if len(x) != len(y):
            raise ValueError(f"per-image outcomes of different lengths: {len(x)} and {len(y)} images")
        images += len(x)
        a_only += sum(1 for p, q in zip(x, y) if p == "1" and q == "0")
        b_only += sum(1 for p, q in zip(x, y) if p == "0" and q == "1")
    discordant = a_only + b_only
    p = float(stats.binomtest(a_only, discordant, 0.5).pvalue) if discordant else 1.0
    return {"images": images, "a_only": a_only, "b_only": b_only, "p": p}


def holm(pvalues: Sequence[float], *, alpha: float = ALPHA) -> List[Dict]:
    """Holm's step-down correction: per p, its adjusted p, the level it is tested at
    (``alpha / (m - rank + 1)``) and whether it is rejected."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out: List[Optional[Dict]] = [None] * m
    running, stopped = 0.0, False
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        level = alpha / (m - rank)
        rejected = not stopped and pvalues[i] < level
        stopped = stopped or not rejected
        out[i] = {"p_adjusted": running, "alpha": level, "rejected": rejected}
    return out  # type: ignore[return-value]


def sides(contrast, values) -> Tuple[List[int], List[float], List[float]]:
    """The seeds every arm of ``contrast`` was measured on, and per seed the two values it
    subtracts: A and B, or A - B and C - D for an interaction (so `paired` gives its ``d``)."""
    by_arm = [values.get((arm, contrast.metric), {}) for arm in contrast.arms]
    seeds = sorted(set.intersection(*(set(v) for v in by_arm)))
    if not contrast.interaction:
        a, b = by_arm
        return seeds, [a[s] for s in seeds], [b[s] for s in seeds]
    a, b, c, d = by_arm
    return seeds, [a[s] - b[s] for s in seeds], [c[s] - d[s] for s in seeds]


def check_metrics(contrasts, values) -> None:
    """`ConfigError` naming a contrast whose metric one of its arms has in none of its runs,
    with the metrics that arm has."""
    for c in contrasts:
        lacking = [arm for arm in dict.fromkeys(c.arms) if not values.get((arm, c.metric))]
        if lacking:
            has = "; ".join(f"{arm!r} has {', '.join(sorted(m for (x, m) in values if x == arm)) or 'none'}"
                            for arm in lacking)
            raise ConfigError(f"contrast {c.spec} ({c.label}): no run of arm {', '.join(map(repr, lacking))} "
                              f"measured {c.metric!r} ({has}); name a metric every arm of the contrast has "
                              "(finished runs are kept: start the experiment again to read them back)")


def analyse(contrasts, values, per_image, *, alpha: float = ALPHA) -> List[Dict]:
    """Every declared contrast, corrected as the module docstring says; `ConfigError` if one
    names a metric that one of its arms lacks (`check_metrics`).

    Args:
        contrasts: `fap.experiment.Contrast` objects.
        values: ``values[(arm, metric)] = {seed: value}``.
        per_image: ``per_image[(arm, metric)] = {seed: "0101..."}`` where measured.
    """
    check_metrics(contrasts, values)
    rows = []
    for c in contrasts:
        seeds, x, y = sides(c, values)
        row = {"a": c.a, "b": c.b, "c": c.c, "d": c.d, "label": c.label, "metric": c.metric, "primary": c.primary,
               "seeds": seeds, **paired(x, y, level=1 - alpha), "mcnemar": None, "mcnemar_note": None}
        if c.interaction:
            row["mcnemar_note"] = MCNEMAR_INTERACTION
        else:
            pa, pb = per_image.get((c.a, c.metric), {}), per_image.get((c.b, c.metric), {})
            both = [s for s in seeds if s in pa and s in pb]
            row["mcnemar"] = mcnemar([(pa[s], pb[s]) for s in both]) if both else None
        rows.append((row, x, y))
    secondary = [(r, x, y) for r, x, y in rows if not r["primary"] and r["p"] is not None]
    for (r, x, y), h in zip(secondary, holm([r["p"] for r, _, _ in secondary], alpha=alpha)):
        r["holm"] = h
        again = paired(x, y, level=1 - h["alpha"])
        r.update(level=again["level"], interval=again["interval"], detectable=again["detectable"])
    for r, _, _ in rows:
        if r["p"] is None:
            r["resolved"] = False
        elif r["primary"]:
            r["resolved"] = r["p"] < alpha and not _straddles(r["interval"])
        else:
            r["resolved"] = r["holm"]["rejected"] and not _straddles(r["interval"])
    return [r for r, _, _ in rows]


def _straddles(interval: Tuple[float, float]) -> bool:
    return interval[0] <= 0.0 <= interval[1]
