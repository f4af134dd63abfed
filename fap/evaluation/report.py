"""Evaluation results as JSON, as a markdown table, and as flat metrics for trackers.

The headline table has the columns of the robustness literature: ImageNet top-1/top-5,
ImageNet-C mCE (AlexNet-normalised; Hendrycks & Dietterich 2019), the unnormalised mean
corruption error (what Mei et al. 2022's code reports as its ImageNet-C number), relative
mCE, ImageNet-R and -A (Hendrycks et al. 2021), Sketch, Stylized-ImageNet (Geirhos et al.
2019), ImageNet-V2 (Recht et al. 2019) and PGD-k accuracy. All numbers are percentages;
↓ marks errors (lower is better).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

__all__ = ["flatten", "format_markdown", "paper_lines", "write_report"]

SET_TITLES = {
    "imagenet_r": "ImageNet-R",
    "imagenet_a": "ImageNet-A",
    "sketch": "Sketch",
    "stylized": "Stylized-IN",
    "v2": "ImageNet-V2",
}


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}"


def _headline(sets: Dict) -> Tuple[List[str], List[str]]:
    head, row = [], []
    if "clean" in sets:
        head += ["ImageNet top-1", "top-5"]
        row += [_fmt(sets["clean"]["top1"]), _fmt(sets["clean"]["top5"])]
    if "imagenet_c" in sets:
        c = sets["imagenet_c"]
        n = len(c["standard"])
        suffix = "" if c["complete"] else f" ({n}/15)"
        if c.get("alexnet_normalised", True):
            head += [f"IN-C mCE ↓{suffix}", f"IN-C mean err ↓{suffix}", f"IN-C rel. mCE ↓{suffix}"]
            row += [_fmt(c["mce"]), _fmt(c["mean_error"]), _fmt(c["relative_mce"])]
        else:
            head.append(f"corrupted: mean err ↓ (unnormalised){suffix}")
            row.append(_fmt(c["mean_error"]))
        if len(c["corruptions"]) != n:
            head.append(f"IN-C mean err ↓ (all {len(c['corruptions'])})")
            row.append(_fmt(c["mean_error_all"]))
    for key, title in SET_TITLES.items():
        if key in sets:
            head.append(title)
            row.append(_fmt(sets[key]["top1"]))
    if "adversarial" in sets:
        a = sets["adversarial"]
        head.append(f"PGD-{a['steps']} ε={a['epsilon']:g}/255")
        row.append(_fmt(a["top1"]))
    return head, row


def _table(head: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def format_markdown(results: Dict) -> str:
    """The results as markdown: a headline row, then per-set details."""
    sets = results["sets"]
    model = results.get("model", {})
    branch = " (auxiliary norms)" if results.get("branch") == "aux" else ""
    lines = [f"## fap eval: {model.get('name', 'model')}{branch}", ""]
    if model.get("source"):
        lines += [f"Weights: `{model['source']}`", ""]
    head, row = _headline(sets)
    lines += _table(head, [row]) + [""]
    note = "Top-1 accuracy (%) unless marked ↓ (top-1 error, %)."
    if "imagenet_c" in sets and not sets["imagenet_c"].get("alexnet_normalised", True):
        note += (" The corrupted set is scored as the unnormalised mean top-1 error over its corruptions and "
                 "severities: the model does not predict ImageNet's 1000 classes, so AlexNet-normalised (m)CE, "
                 "which divides by AlexNet's ImageNet-C errors, would mean nothing here.")
    elif "imagenet_c" in sets:
        note += (" mCE is AlexNet-normalised over the 15 ImageNet-C corruptions (Hendrycks & Dietterich 2019); mean "
                 "err is the unnormalised mean error, the number the Fast AdvProp reference code prints (over 19 "
                 "corruptions); the two are not comparable.")
    lines += [note, ""]
    details = [[SET_TITLES.get(k, k), f"`{v['path']}`", str(v["images"]), _fmt(v["top1"]), _fmt(v["top5"])]
               for k, v in sets.items() if k in SET_TITLES or k == "clean"]
    if details:
        lines += _table(["set", "path", "images", "top-1", "top-5"], details) + [""]
    if "adversarial" in sets:
        a = sets["adversarial"]
        lines += [f"PGD-{a['steps']}: ε = {a['epsilon']:g}/255, step = {a['step']:g}/255, random start "
                  f"p = {a['random_init_prob']:g}, {a['images']} images: top-1 {_fmt(a['top1'])} "
                  f"(clean on the same images {_fmt(a['clean_top1'])}).", ""]
    if "imagenet_c" in sets:
        c = sets["imagenet_c"]
        normalised = c.get("alexnet_normalised", True)
        title = "ImageNet-C" if normalised else "Corrupted set"
        lines += [f"{title} (`{c['path']}`, {c['images']} images): top-1 error (%) per severity.", ""]
        head = ["corruption", "1", "2", "3", "4", "5", "mean err ↓"] + (["CE ↓", "rel. CE ↓"] if normalised else [])
        rows = [[name] + [_fmt(e) for e in v["errors"]] + [_fmt(v["error"])]
                + ([_fmt(v["ce"]), _fmt(v["relative_ce"])] if normalised else [])
                for name, v in c["corruptions"].items()]
        lines += _table(head, rows) + [""]
    if "paper" in results:
        lines += paper_lines(results["paper"])
    return "\n".join(lines)


def _as_printed(value: float) -> str:
    """A paper's number with the decimals it was printed with (one, or two where it gives two)."""
    return f"{value:.1f}" if round(value, 1) == value else f"{value:.2f}"


def paper_lines(paper: Dict) -> List[str]:
    """`fap.evaluation.paper.compare`'s output as a markdown table: ours, the paper's, the difference."""
    title = f"paper: {paper['row']}"
    rows = [[m["metric"], _fmt(m["ours"]), "not given" if m["paper"] is None else _as_printed(m["paper"]),
             "–" if m["difference"] is None else f"{m['difference']:+.2f}"] for m in paper["metrics"]]
    note = ("The paper's numbers: Mei et al., ICLR 2022 (`fap.evaluation.paper`). Difference = this evaluation minus "
            "the paper, in points (↓: lower is better); – = not evaluated here. ")
    if paper["table"] == "Table 7":
        note += ("mAP is COCO AP@[.50:.95]; the corrupted mAP is the mean over the corruptions of the copy evaluated "
                 "(the paper: 15 types).")
    else:
        note += "The paper's IN-C column is most likely the unnormalised mean error (its code averages 19 corruptions)."
    lines = [f"### Beside the paper: {paper['row']} ({paper['table']}, {paper['setting']})", ""]
    lines += _table(["metric", "fap eval", title, "difference"], rows) + ["", note, ""]
    return lines + ([f"Row note: {paper['note']}.", ""] if paper.get("note") else [])


METRICS = ("top1", "top5", "clean_top1", "mce", "relative_mce", "mean_error", "mean_error_all")


def flatten(results: Dict, prefix: str = "eval") -> Dict[str, float]:
    """The metrics as ``{"eval/clean/top1": ..., "eval/imagenet_c/mce": ...}`` for ``accelerator.log``."""
    flat: Dict[str, float] = {}
    for name, entry in results["sets"].items():
        for key in METRICS:
            if entry.get(key) is not None:
                flat[f"{prefix}/{name}/{key}"] = float(entry[key])
        for corruption, per in (entry.get("corruptions") or {}).items():
            flat[f"{prefix}/{name}/{corruption}/error"] = float(per["error"])
    return flat


def write_report(results: Dict, out_dir: str) -> Tuple[str, str]:
    """Write ``results.json`` and ``results.md`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    md_path = os.path.join(out_dir, "results.md")
    for path, text in ((json_path, json.dumps(results, indent=1)), (md_path, format_markdown(results) + "\n")):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return json_path, md_path
