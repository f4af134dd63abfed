"""Which packages an air-gapped GPU node lacks, read from a pip resolution report.

    python benchmarks/gpu_wheels.py REPORT --python-version 3.12 \\
        --present "torch==2.11.0 timm ..." --absent "deepspeed datasets pydantic ffcv" --want "fap[deepspeed,hf]"

REPORT is ``pip install --dry-run --ignore-installed --report REPORT`` of the present and
the wanted requirements together, resolved for the node's interpreter and platform
(``benchmarks/gpu_wheels.sh`` makes it). Every package in it carries its own
``Requires-Dist``, so the dependency graph is read from the packages' metadata, not
guessed.

The node has the ``--present`` packages and whatever they depend on, except the
``--absent`` ones: the walk from the present roots does not enter an absent package (so
transformers -> typer -> pydantic, true of the versions on PyPI, does not count as
present when the node is known to lack pydantic). What the wanted requirements reach and
the node does not have is printed as ``name==version``, one a line: the wheels to bring.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, Iterable, List, Set

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a bare interpreter: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

__all__ = ["marker_env", "dependency_graph", "reach", "missing"]


def marker_env(python_version: str) -> Dict[str, str]:
    """Environment markers of CPython ``python_version`` on Linux x86-64 (the node)."""
    return {"python_version": python_version, "python_full_version": f"{python_version}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "implementation_version": f"{python_version}.0", "os_name": "posix", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "platform_release": "",
            "platform_version": "", "extra": ""}


def _applies(req: Requirement, env: Dict[str, str], extras: Iterable[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras))


def dependency_graph(report: Dict) -> Dict[str, Dict]:
    """``{name: {"version": v, "requires": [Requirement, ...]}}`` of every package in a pip report."""
    graph = {}
    for item in report["install"]:
        meta = item["metadata"]
        graph[canonicalize_name(meta["name"])] = {
            "version": meta["version"],
            "requires": [Requirement(r) for r in meta.get("requires_dist") or []],
        }
    return graph


def reach(graph: Dict[str, Dict], roots: Iterable[str], env: Dict[str, str], *,
          absent: Iterable[str] = ()) -> Set[str]:
    """Names reachable from ``roots`` (requirement strings, extras honoured), never entering ``absent``."""
    blocked = {canonicalize_name(a) for a in absent}
    seen: Set[str] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in blocked or name not in graph:
            continue
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        for dep in graph[name]["requires"]:
            if _applies(dep, env, req.extras):
                todo.append(dep)
    return {k.split("[")[0] for k in seen}


def missing(report: Dict, *, present: List[str], absent: List[str], want: List[str],
            python_version: str) -> List[str]:
    """``name==version`` of what ``want`` needs that a node with ``present`` minus ``absent`` lacks."""
    env = marker_env(python_version)
    graph = dependency_graph(report)
    unknown = [r for r in present + want if canonicalize_name(Requirement(r).name) not in graph]
    if unknown:
        raise SystemExit(f"gpu_wheels.py: {unknown} are not in the report; resolve them together with the rest")
    have = reach(graph, present, env, absent=absent)
    need = reach(graph, want, env) - have
    return sorted(f"{n}=={graph[n]['version']}" for n in need)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", help="pip install --dry-run --ignore-installed --report JSON")
    p.add_argument("--present", required=True, help="requirements the node has, space-separated")
    p.add_argument("--absent", default="", help="packages the node lacks even if a present one requires them")
    p.add_argument("--want", required=True, help="requirements to bring, space-separated")
    p.add_argument("--python-version", default="3.12")
    a = p.parse_args(argv)
    with open(a.report) as f:
        report = json.load(f)
    for line in missing(report, present=a.present.split(), absent=a.absent.split(), want=a.want.split(),
                        python_version=a.python_version):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
