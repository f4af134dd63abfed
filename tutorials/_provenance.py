"""Stamps a tutorial run with what produced it, so committed outputs can be checked.

The first cell of every notebook calls `stamp(<its own file name>)`. It prints the fap
version, the git commit, the size the notebook ran at (``FAP_TUTORIAL_SIZE``: ``full``
for the committed outputs, ``ci`` in the test suite) and a digest of the notebook's code
cells as they were on disk when it ran, and a digest of the fap package's source
(``library_digest``), and the library's numerics fingerprint
(`fap.experiment.numerics`: what the library computes, not how its source reads). A
full-size run also writes the fingerprint's probes to ``tutorials/numerics.json``.
``tests/test_tutorials.py`` recomputes them: a code cell edited without re-running the
notebook fails it, and so does a library whose numbers moved since the outputs were made.
"""
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import fap

HERE = Path(__file__).resolve().parent

SIZES = ("full", "ci")


def code_digest(notebook: dict) -> str:
    """Digest of the notebook's code cells and of the helper modules beside it that they import."""
    code = "\n\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    for name in sorted(set(re.findall(r"^\s*(?:from|import)\s+(_\w+)", code, flags=re.M)) - {"_provenance"}):
        code += "\n\n" + (HERE / f"{name}.py").read_text()
    return hashlib.sha256(code.encode()).hexdigest()[:16]


def library_digest() -> str:
    """Digest of every ``.py`` file of the installed fap package (path and content)."""
    root = Path(fap.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def size() -> str:
    value = os.environ.get("FAP_TUTORIAL_SIZE", "full")
    if value not in SIZES:
        raise ValueError(f"FAP_TUTORIAL_SIZE={value!r}; expected one of {SIZES}")
    return value


def stamp(notebook_file: str) -> str:
    path = Path(notebook_file)
    digest = code_digest(json.loads(path.read_text()))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=path.resolve().parent).stdout.strip() or "unknown"
    from fap.experiment.numerics import fingerprint, probe

    values = probe()
    if size() == "full":
        (HERE / "numerics.json").write_text(json.dumps(values, indent=0, sort_keys=True) + "\n")
    line = (f"fap {fap.__version__} | commit {commit} | size {size()} | code {digest} | library {library_digest()} "
            f"| numerics {fingerprint(values)}")
    print(line)
    return line
