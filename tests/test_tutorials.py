"""The tutorials run top to bottom at CI size, and their committed outputs are real.

Each notebook is executed on a fresh kernel with ``FAP_TUTORIAL_SIZE=ci`` (small data, few
steps) in a temporary work directory; a cell that raises fails the test. The committed
copies must carry the outputs of a full-size run made with the committed code: their first
cell prints a digest of the notebook's code cells and the helper modules they import
(``tutorials/_provenance.py``), which must match them as committed, and the library's numerics
fingerprint, which must match what the library computes now: a change that moves a number the
notebooks depend on fails, a change that moves none (a docstring, a refactor) does not force
an hour of re-runs.
"""
import json
import os
import re
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(p.name for p in TUTORIALS.glob("[0-9][0-9]_*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_disentangled_learning.ipynb", "03_cost_anatomy.ipynb",
            "04_scaling_out.ipynb", "05_data_pipelines.ipynb", "06_from_scratch.ipynb"]
STAMP = re.compile(r"fap (\S+) \| commit (\S+) \| size (\w+) \| code ([0-9a-f]{16}) \| library ([0-9a-f]{16})"
                   r"(?: \| numerics ([0-9a-f]{16}))?")


def test_all_six_tutorials_exist():
    assert NOTEBOOKS == EXPECTED


def _stamp_of(nb) -> re.Match:
    first = next(c for c in nb["cells"] if c["cell_type"] == "code")
    text = "".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"])
                   for o in first.get("outputs", []) if o.get("output_type") == "stream")
    match = STAMP.search(text)
    assert match, f"the first cell has no provenance stamp in its output: {text!r}"
    return match


def _provenance():
    sys.path.insert(0, str(TUTORIALS))
    try:
        import _provenance
    finally:
        sys.path.pop(0)
    return _provenance


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_outputs_come_from_a_full_run_of_the_committed_code(name):
    code_digest = _provenance().code_digest
    nb = json.loads((TUTORIALS / name).read_text())
    stamp = _stamp_of(nb)
    assert stamp.group(3) == "full", f"{name} was committed with outputs of a {stamp.group(3)!r} run"
    assert stamp.group(4) == code_digest(nb), (
        f"{name}: its code cells changed after the run that produced its outputs; re-run it "
        "(FAP_TUTORIAL_SIZE=full) and commit the result")
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code), f"{name}: some code cells were not executed"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    plots = sum(1 for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    if name != "04_scaling_out.ipynb":
        assert plots >= 1, f"{name}: no plot in the committed outputs (stripped?)"


def test_the_library_computes_the_numbers_the_notebooks_were_made_with():
    """Stale outputs fail: the library's numerics probes (`fap.experiment.numerics`) against the
    probes of the full-size runs (``tutorials/numerics.json``), and each notebook's stamped
    fingerprint against that file. A change that moves no number (a docstring, a refactor)
    passes without re-running anything."""
    from fap.experiment.numerics import compare, fingerprint, probe

    recorded = json.loads((TUTORIALS / "numerics.json").read_text())
    moved = compare(recorded, probe())
    assert not moved, (f"the library's numbers moved since the tutorials' outputs were made ({len(moved)} probes, e.g. "
                       f"{', '.join(moved[:4])}): re-run the notebooks with FAP_TUTORIAL_SIZE=full and commit them")
    for name in EXPECTED:
        stamped = _stamp_of(json.loads((TUTORIALS / name).read_text())).group(6)
        assert stamped is not None, f"{name} carries no numerics fingerprint: re-run it with FAP_TUTORIAL_SIZE=full"
        assert stamped == fingerprint(recorded), (
            f"{name} was made with numerics {stamped}, tutorials/numerics.json holds {fingerprint(recorded)}: "
            "re-run it with FAP_TUTORIAL_SIZE=full")


@pytest.mark.parametrize("name", ["02_disentangled_learning", "06_from_scratch"])
def test_experiments_open_with_their_verdict_then_the_plan_committed_before_their_runs(name):
    """#25: the verdict comes first, then the plan exactly as committed in ``plans/``."""
    nb = json.loads((TUTORIALS / f"{name}.ipynb").read_text())
    md = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]
    assert md[1].startswith("## Verdict")
    assert md[2] == (TUTORIALS / "plans" / f"{name}.md").read_text().strip("\n")


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPECTED)
def test_tutorial_runs_at_ci_size(name, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("FAP_TUTORIAL_SIZE", "ci")
    monkeypatch.setenv("FAP_TUTORIAL_WORKDIR", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(TUTORIALS)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    assert _stamp_of(nb).group(3) == "ci"
