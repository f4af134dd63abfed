"""The experiment's figure: per metric, every seed of every arm, and every contrast around 0.

Top row, one panel per metric: each seed's value as a dot, the arm's mean with its 95 % t
interval beside them. Bottom row: each declared contrast on that metric as its mean with its
interval (the corrected level for secondary ones) and its per-seed differences, around a
line at 0, labelled ``A − B`` (an interaction ``(A − B) − (C − D)``) and its role. Axes are
labelled with the metric.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ["plot_results", "contrast_label"]


def plot_results(results, path: Path) -> Optional[Path]:
    """Save the figure to ``path`` (PNG); None when matplotlib is not installed.

    Drawn on a bare `matplotlib.figure.Figure`, not through pyplot: the caller's backend (a
    notebook's inline one) is left as it is, and no figure is left open."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None

    from fap.experiment.metrics import lower_is_better, title

    metrics = results.metrics()
    contrasts = results.contrasts
    rows = 2 if contrasts else 1
    # each metric's column as wide as its arms or its contrasts need, so that no labels collide
    widths = [max(3, len(results.arms), sum(c["metric"] == m for c in contrasts)) for m in metrics]
    fig = Figure(figsize=(0.62 * sum(widths) + 1.3 * len(metrics), 4.4 * rows))
    axes = fig.subplots(rows, len(metrics), squeeze=False, gridspec_kw={"width_ratios": widths})
    for j, metric in enumerate(metrics):
        _arms_panel(axes[0][j], results, metric, title(metric), lower_is_better(metric))
        if contrasts:
            _contrast_panel(axes[1][j], [c for c in contrasts if c["metric"] == metric], title(metric))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def _arms_panel(ax, results, metric: str, title: str, lower: bool) -> None:
    names = results.arms
    for k, name in enumerate(names):
        s = results.arm(name, metric)
        if not s["n"]:
            continue
        ax.scatter([k - 0.12] * s["n"], s["values"], color="k", s=12, zorder=3)
        lo, hi = s["interval"] if s["interval"] else (s["mean"], s["mean"])
        ax.errorbar(k + 0.12, s["mean"], yerr=[[s["mean"] - lo], [hi - s["mean"]]], fmt="D", ms=6, capsize=4,
                    color=f"C{k}", zorder=2)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel(title)
    ax.set_title(f"{title}: seeds, mean, 95 % interval" + (" (lower is better)" if lower else ""), fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def _contrast_panel(ax, contrasts, title: str) -> None:
    ax.axhline(0.0, color="k", lw=0.8)
    labels = []
    for k, c in enumerate(contrasts):
        ax.scatter([k - 0.12] * len(c["differences"]), c["differences"], color="k", s=12, zorder=3)
        if c["interval"]:
            lo, hi = c["interval"]
            ax.errorbar(k + 0.12, c["mean"], yerr=[[c["mean"] - lo], [hi - c["mean"]]], fmt="o", ms=6, capsize=4,
                        color="C3" if c["resolved"] else "C7", zorder=2)
        labels.append(contrast_label(c))
    if not contrasts:
        ax.text(0.5, 0.5, "no contrast on this metric", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks(range(len(contrasts)), labels, fontsize=7, rotation=30 if len(contrasts) > 2 else 0,
                  ha="right" if len(contrasts) > 2 else "center")
    ax.set_xlim(-0.6, max(1, len(contrasts)) - 0.4)
    ax.set_ylabel(f"difference in {title}")
    ax.set_title("paired differences: seeds, mean, interval (red: resolved)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def contrast_label(c) -> str:
    """A contrast's tick label: ``A − B`` or ``(A − B) − (C − D)``, then its role."""
    label = f"({c['a']} − {c['b']}) − ({c['c']} − {c['d']})" if c.get("c") else f"{c['a']} − {c['b']}"
    return f"{label} ({'primary' if c['primary'] else 'secondary'})"
