"""The GPU path without a GPU (issue #15): the air-gapped wheelhouse, its no-index install into
an interpreter that holds only a GPU node's preinstalled packages, and benchmarks/gpu_check.sh
in smoke mode through that install.

The wheelhouse needs a package index (CI has PyPI); it is built once per test session. CI's
Python is 3.11 while the node's is 3.12: the install test builds a 3.11 wheelhouse with the same
script (PYVER=3.11, PRESENT = this machine's versions of the node's packages); the node's own
3.12 wheelhouse is built too, and only its contents and size are checked (it cannot install here).
"""
import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers_engine import REPO, free_port

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_wheels  # noqa: E402

# The node's preinstalled packages (issue #15) and those it lacks.
NODE = ["torch", "torchvision", "timm", "accelerate", "transformers", "safetensors", "numpy", "pillow", "tqdm",
        "pyyaml", "tensorboard", "matplotlib", "pandas", "pyarrow"]
ABSENT = ["deepspeed", "datasets", "pydantic", "ffcv"]
NODE_WANTS = {"fap", "deepspeed", "datasets", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
              "hjson", "msgpack", "ninja", "py-cpuinfo", "einops", "dill", "multiprocess", "xxhash", "scipy"}


# ---- the resolution logic, offline -------------------------------------------------------------

def _report(packages):
    return {"install": [{"metadata": {"name": n, "version": "1.0", "requires_dist": r}} for n, r in packages.items()]}


def test_missing_is_what_the_wanted_reach_and_the_node_does_not():
    report = _report({
        "torch": ["filelock", "triton; platform_system == 'Linux'", "colorama; sys_platform == 'win32'"],
        "filelock": [], "triton": [], "colorama": [],
        "transformers": ["typer"], "typer": ["pydantic>=2"],                       # present -> absent: not present
        "pydantic": ["annotated-types", "tomli; python_version < '3.11'"], "annotated-types": [], "tomli": [],
        "fap": ["torch", "datasets; extra == 'hf'", "deepspeed; extra == 'deepspeed'"],
        "deepspeed": ["pydantic>=2", "torch", "ninja"], "ninja": [], "datasets": ["filelock", "dill"], "dill": [],
    })
    got = gpu_wheels.missing(report, present=["torch", "transformers"], absent=["pydantic", "deepspeed", "datasets"],
                             want=["fap[deepspeed,hf]"], python_version="3.12")
    assert got == ["annotated-types==1.0", "datasets==1.0", "deepspeed==1.0", "dill==1.0", "fap==1.0",
                   "ninja==1.0", "pydantic==1.0"]
    with pytest.raises(SystemExit, match="not in the report"):
        gpu_wheels.missing(report, present=["numpy"], absent=[], want=["fap"], python_version="3.12")


# ---- the wheelhouses (network) -----------------------------------------------------------------

def _wheelhouse(tmp_path_factory, name, **env):
    out = tmp_path_factory.mktemp(name)
    proc = subprocess.run(["bash", "benchmarks/gpu_wheels.sh", str(out)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PY": sys.executable, **env}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def _here(name):
    return f"{name}=={md.version(name)}"


@pytest.fixture(scope="session")
def wheelhouse_node(tmp_path_factory):
    """The node's wheelhouse: CPython 3.12, the issue's package set."""
    return _wheelhouse(tmp_path_factory, "wheelhouse_node")


@pytest.fixture(scope="session")
def wheelhouse_here(tmp_path_factory):
    """The same for this interpreter, against this machine's versions of the node's packages."""
    present = " ".join(_here(n) for n in NODE)
    return _wheelhouse(tmp_path_factory, "wheelhouse_here", PYVER=f"{sys.version_info[0]}.{sys.version_info[1]}",
                       PRESENT=present)[0]


def test_the_node_wheelhouse_holds_what_it_lacks_under_60_mib(wheelhouse_node):
    out, stdout = wheelhouse_node
    wheels = sorted(p.name for p in out.glob("*.whl"))
    names = {w.split("-")[0].lower().replace("_", "-") for w in wheels}
    assert names == NODE_WANTS, names ^ NODE_WANTS
    assert all(w.endswith(("-none-any.whl", "x86_64.whl")) for w in wheels)
    assert all("cp312" in w or "py3" in w for w in wheels), wheels
    total = sum(p.stat().st_size for p in out.glob("*.whl"))
    assert total < 60 * 2 ** 20 and f"total: {len(wheels)} wheels, {total} bytes" in stdout
    assert (out / "MANIFEST.txt").read_text().endswith(f"total_bytes {total}\n")


# ---- an interpreter with the node's packages only ---------------------------------------------

def _site() -> Path:
    """This environment's site-packages (where torch is)."""
    return Path(md.distribution("torch").locate_file(""))


def _site_distributions():
    """The distributions installed in `_site` only: anything else on ``sys.path`` (a test's
    temporary install, the source tree) is not part of the environment to copy."""
    return list(md.distributions(path=[str(_site())]))


def _installed_graph():
    """This environment's distributions as a pip-report-like graph (for gpu_wheels.reach)."""
    report = {"install": []}
    for d in _site_distributions():
        report["install"].append({"metadata": {"name": d.metadata["Name"], "version": d.version,
                                               "requires_dist": d.requires or []}})
    return gpu_wheels.dependency_graph(report)


def node_like_python(root: Path) -> Path:
    """A venv whose only packages are the node's (this machine's versions) and pip.

    The venv's site-packages holds one ``.pth`` naming a directory of symlinks to the
    top-level entries of this environment's site-packages that belong to those
    distributions (from their RECORD files); nothing else is reachable.
    """
    graph = _installed_graph()
    env = gpu_wheels.marker_env(f"{sys.version_info[0]}.{sys.version_info[1]}")
    keep = gpu_wheels.reach(graph, NODE + ["pip"], env, absent=ABSENT)
    owners = {}
    for d in _site_distributions():
        name = gpu_wheels.canonicalize_name(d.metadata["Name"])
        for f in d.files or []:
            top = Path(f).parts[0]
            if top != ".." and not top.endswith(".pth") and top != "__pycache__":
                owners.setdefault(top, set()).add(name)
    site = _site()
    farm = root / "site"
    farm.mkdir(parents=True)
    for top, names in owners.items():
        if not (site / top).exists():
            continue
        if names <= keep:
            (farm / top).symlink_to(site / top)
        elif names & keep:
            raise AssertionError(f"{top} is shared by kept and dropped distributions: {sorted(names)}")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (next(venv.glob("lib/python*/site-packages")) / "node.pth").write_text(f"{farm}\n")
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def node_python(tmp_path_factory):
    return node_like_python(tmp_path_factory.mktemp("node_python"))


def _probe(python, code):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=300)


def test_the_node_like_python_lacks_what_the_node_lacks(node_python):
    proc = _probe(node_python, """
import importlib.util, torch, torchvision, timm, accelerate, transformers, pandas, pyarrow, pip
print(torch.__version__)
for m in ("deepspeed", "datasets", "pydantic", "ffcv", "fap", "hjson", "xxhash"):
    try:
        __import__(m)
        print("imported", m)
    except ModuleNotFoundError:
        pass
""")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [torch.__version__]  # and none of the absent ones imported


def test_no_index_install_runs_the_gpu_check_in_smoke_mode(node_python, wheelhouse_here, tmp_path):
    """gpu_check.sh installs the wheelhouse with no index into the node-like python, then runs
    every part at toy size: both sweeps, ZeRO-2, FSDP2 (2 CPU processes) and the report."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("ACCELERATE_", "MASTER_"))}
    env.update(GPU_CHECK_SMOKE="1", OUT=str(out), PY=str(node_python), WHEELS=str(wheelhouse_here),
               PORT=str(free_port()), PIP_NO_INDEX="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PEAK_TFLOPS="0.5")  # a nominal peak, so that smoke mode computes MFU too
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=2400)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    assert "installing" in proc.stdout and f"({out / 'site'}" in (out / "env.txt").read_text()
    # the wheelhouse completes the node's packages: every requirement of everything is met
    assert "No broken requirements found" in (out / "pip_check.txt").read_text()
    for mode in ("eager", "compiled"):
        rows = json.loads((out / f"sweep_{mode}.json").read_text())["rows"]
        models = 2 if mode == "eager" else 1  # smoke compiles one model: the same code path
        assert len(rows) == models * 2 * 4 and all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
        assert all(r["mfu"] is not None for r in rows)  # PEAK_TFLOPS given: the MFU column is computed
        assert {r["method"] for r in rows} == {"vanilla", "fast_advprop", "fast_advprop_fused", "three_pass_floor"}
    compiled = json.loads((out / "sweep_compiled.json").read_text())["rows"]
    assert all(r["graphs_timed"] == 0 and r["graph_breaks"] == 0 for r in compiled)
    assert all(r["tflop_per_step"] for r in compiled)  # reused from the eager sweep
    zero2, fsdp2 = (json.loads((out / f"{n}.json").read_text()) for n in ("zero2", "fsdp2"))
    assert zero2["status"] == "ok" and zero2["zero_stage"] == 2 and zero2["gradient_reduction"].startswith("coalesced")
    assert fsdp2["status"] == "ok" and fsdp2["backend"] == "2 process(es), FSDP2, bf16"
    table = (out / "gpu_CPU_smoke_test.txt").read_text()
    assert "fast_advprop_fused" in table and "compiled" in table and "zero2: ok" in table and "fsdp2: ok" in table
    assert not (REPO / "benchmarks" / "results" / "gpu_CPU_smoke_test.txt").exists()


# ---- pieces of the check ------------------------------------------------------------------------

def test_a_sweep_cell_that_does_not_fit_before_the_deadline_is_skipped(monkeypatch):
    import gpu_sweep

    budget = gpu_sweep.Budget(deadline=None)
    assert budget.fits(10 ** 9)
    budget = gpu_sweep.Budget(deadline=1000.0)
    monkeypatch.setattr(gpu_sweep.time, "time", lambda: 900.0)
    # before any measurement: the FLOP prior; a compiled first run of three-pass reserves 3 graphs
    eager = budget.estimate("resnet50", "fast_advprop", 80, 1.2, 14, compiled=False)
    assert eager == pytest.approx(14 * 80 * 1.2 * 24.6e9 / (0.05 * 989e12))
    assert budget.estimate("resnet50", "fast_advprop", 80, 1.2, 14, compiled=True) == pytest.approx(
        eager + 3 * gpu_sweep.PRIOR_COMPILE_S)
    assert budget.fits(eager) and not budget.fits(eager + 3 * gpu_sweep.PRIOR_COMPILE_S)
    budget.learn({"model": "resnet50", "method": "fast_advprop", "mode": "compiled", "batch": 80, "cost_ratio": 1.2,
                  "step_ms": 96.0, "warmup_s": 300.0, "warmup_steps": 3, "graphs_warmup": 3})
    assert budget.s_per_image["resnet50"] == pytest.approx(0.096 / 96)
    assert budget.compile_s == pytest.approx((300.0 - 3 * 0.096) / 3)   # the slowest compile seen
    # at the next batch, at most one more graph (a dimension turning dynamic)
    assert budget.estimate("resnet50", "fast_advprop", 160, 1.2, 13, compiled=True) == pytest.approx(
        13 * 160 * 1.2 * 0.001 + budget.compile_s)


def test_fsdp2_on_one_process_only_for_the_gpu_check_and_with_a_process_group(monkeypatch):
    from fap.config import ConfigError
    from fap.engine import distributed

    one = SimpleNamespace(num_processes=1)
    monkeypatch.setenv("FAP_FSDP2_ONE_PROCESS", "1")
    with pytest.raises(ConfigError, match="no process group"):       # CPU, one process: nothing to shard with
        distributed.shard_fsdp2(one, torch.nn.Linear(2, 2), "fp32")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.delenv("FAP_FSDP2_ONE_PROCESS")
    with pytest.raises(ConfigError, match="1 process"):
        distributed.shard_fsdp2(one, torch.nn.Linear(2, 2), "fp32")
    monkeypatch.setenv("FAP_FSDP2_ONE_PROCESS", "1")
    with pytest.raises(AttributeError, match="state"):               # past the refusal: reads the plugin
        distributed.shard_fsdp2(one, torch.nn.Linear(2, 2), "fp32")
