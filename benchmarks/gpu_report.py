"""The GPU check's report: the cost sweep's two modes and the ZeRO-2 / FSDP2 runs in one table.

    python benchmarks/gpu_report.py --out DIR [--results-dir benchmarks/results] [--wall-seconds S]

Reads ``DIR/sweep_eager.json``, ``DIR/sweep_compiled.json`` (``benchmarks/gpu_sweep.py``) and
``DIR/zero2.json``, ``DIR/fsdp2.json`` (``benchmarks/gpu_check.sh``), whichever exist, and
writes ``gpu_<device>.txt`` and ``.json`` to DIR (and ``--results-dir``). One line per cell:
images/s, step time, its ratio to vanilla of the same model, batch and mode, the counted
image-pass ratio, compiled against eager, achieved TFLOP/s, MFU, allocator peak, graphs
compiled. Standard library only, so that it reports whatever the other parts left.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional


def table(rows: List[Dict]) -> List[str]:
    """One line per cell; ratios to vanilla of the same model, batch and mode, and compiled vs eager."""
    index = {(r["model"], r["batch"], r["mode"], r["method"]): r for r in rows}
    head = (f"{'model':>20} {'batch':>5} {'mode':>8} {'method':>19} {'img/s':>7} {'ms/step':>8} {'vs vanilla':>10} "
            f"{'counted':>7} {'vs eager':>8} {'TFLOP/s':>7} {'MFU':>6} {'GiB':>5} {'graphs':>6}")
    lines = [head]
    for r in rows:
        lead = f"{r['model'][:20]:>20} {r['batch']:5d} {r['mode']:>8} {r['method']:>19}"
        if r["status"] != "ok":
            lines.append(f"{lead} {r['status']}")
            continue
        van = index.get((r["model"], r["batch"], r["mode"], "vanilla"), {})
        eag = index.get((r["model"], r["batch"], "eager", r["method"]), {})
        ratio = _ratio(r, van)
        vs_eager = _ratio(r, eag) if r["mode"] == "compiled" else None
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        graphs = f"{r['graphs_warmup']}+{r['graphs_timed']}" if r["mode"] == "compiled" else "-"
        lines.append(f"{lead} {r['images_per_s']:7.0f} {r['step_ms']:8.1f} {_x(ratio):>10} {r['cost_ratio']:6.2f}x "
                     f"{_x(vs_eager):>8} {_f(r.get('achieved_tflops'), '7.1f'):>7} {mfu:>6} "
                     f"{_f(r.get('peak_mem_gib'), '5.1f'):>5} {graphs:>6}")
    return lines


def _ratio(r: Dict, ref: Dict) -> Optional[float]:
    return r["step_ms"] / ref["step_ms"] if ref.get("status") == "ok" else None


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}x"


def _f(v: Optional[float], fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def report(args) -> int:
    """Merge the sweep's modes and the distributed runs into gpu_<device>.txt and .json."""
    out = Path(args.out)
    parts = {m: json.loads((out / f"sweep_{m}.json").read_text()) for m in ("eager", "compiled")
             if (out / f"sweep_{m}.json").is_file()}
    order = ["vanilla", "fast_advprop", "fast_advprop_fused", "three_pass_floor"]
    rows = sorted((r for p in parts.values() for r in p["rows"]),   # measured batch-first; shown model-first
                  key=lambda r: (r["mode"] != "eager", r["model"], r["batch"],
                                 order.index(r["method"]) if r["method"] in order else len(order)))
    first = next(iter(parts.values()), {})
    runs = {k: json.loads((out / f"{k}.json").read_text()) for k in ("zero2", "fsdp2") if (out / f"{k}.json").is_file()}
    peak = first.get("peak_tflops")
    lines = [f"{first.get('device', '?')}, torch {first.get('torch', '?')}, "
             f"{f'peak {peak:g} TFLOP/s dense bf16' if peak else 'no peak FLOP/s known (no MFU)'}, "
             f"bf16 autocast, synthetic batches; compiled = train.compile ({parts.get('compiled', {}).get('backend', '-')})",
             "vs vanilla: step time / vanilla's (same model, batch, mode); counted: image-passes / vanilla's; "
             "graphs: compiled during warm-up + during the timed steps", *table(rows), ""]
    for name, r in runs.items():
        lines.append(f"{name}: {r.get('status')}" + (f"; {r['line']}" if r.get("line") else ""))
    merged = {"device": first.get("device"), "peak_tflops": first.get("peak_tflops"), "sweep": parts, "runs": runs,
              "wall_seconds": args.wall_seconds}
    if args.wall_seconds is not None:
        lines.append(f"gpu_check wall time: {args.wall_seconds:.0f} s")
    text = "\n".join(lines) + "\n"
    slug = re.sub(r"[^A-Za-z0-9]+", "_", str(first.get("device", "unknown"))).strip("_")
    for d in {out, Path(args.results_dir)} if args.results_dir else {out}:
        d.mkdir(parents=True, exist_ok=True)
        (d / f"gpu_{slug}.txt").write_text(text)
        (d / f"gpu_{slug}.json").write_text(json.dumps(merged, indent=1))
    print(text)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the GPU check's output directory")
    p.add_argument("--results-dir", default=None, help="also write gpu_<device>.txt/.json here")
    p.add_argument("--wall-seconds", type=float, default=None, help="the whole check's wall time")
    return report(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
