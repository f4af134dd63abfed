"""Engine overhead of two fap checkouts side by side: does a change to the engine cost speed?

    python benchmarks/engine_split.py OLD_CHECKOUT NEW_CHECKOUT [--pairs 3] [-- fap bench options]

Runs ``fap bench``'s part 2 (vanilla through ``fap.train`` against a bare PyTorch loop, the
fastest of ``--rounds``) in a fresh process per checkout, alternating OLD, NEW, OLD, NEW, ...
so drift of a shared machine falls on both. Prints each measurement and the medians.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """
import json, sys, torch
from fap import bench
from fap.data import DataConfig
p = bench.argparse.ArgumentParser(); bench.add_arguments(p); args = p.parse_args(sys.argv[2:])
torch.set_num_threads(args.threads or 1)
data = DataConfig(source=args.source, path=args.data, image_size=args.image_size, crop_pct=1.0, scale=(0.25, 1.0),
                  num_workers=1)
if args.source == "demo":
    from fap.data import build_loader
    build_loader(data, "train", batch_size=2, train=True)  # generates the demo set once
json.dump(bench.part2(args, data), open(sys.argv[1], "w"))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--pairs", type=int, default=3)
    args, bench_args = p.parse_known_args()
    results = {"old": [], "new": []}
    for i in range(args.pairs):
        for name in ("old", "new"):
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                env = {"PYTHONPATH": str(Path(getattr(args, name)).resolve())}
                subprocess.run([sys.executable, "-c", PROBE, f.name, *bench_args], check=True,
                               env={**os.environ, **env}, stdout=subprocess.DEVNULL)
                r = json.loads(Path(f.name).read_text())
            results[name].append(r)
            print(f"pair {i + 1} {name}: fap {r['fap_seconds']:.3f} s, bare {r['bare_seconds']:.3f} s, "
                  f"overhead {100 * r['overhead']:+.1f} %", flush=True)
    for name in ("old", "new"):
        o = [100 * r["overhead"] for r in results[name]]
        print(f"{name}: overhead median {statistics.median(o):+.1f} % (each: {', '.join(f'{v:+.1f}' for v in o)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
