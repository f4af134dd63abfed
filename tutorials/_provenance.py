"""Stamps a tutorial run with what produced it, so committed outputs can be checked.

The first cell of every notebook calls `stamp(<its own file name>)`. It prints the fap
version, the git commit, the size the notebook ran at (``FAP_TUTORIAL_SIZE``: ``full``
for the committed outputs, ``ci`` in the test suite) and a digest of the notebook's code
cells as they were on disk when it ran. ``tests/test_tutorials.py`` recomputes the digest
from the committed notebook: a code cell edited without re-running the notebook fails it.
"""
import hashlib
import json
import os
import subprocess
from pathlib import Path

import fap

SIZES = ("full", "ci")


def code_digest(notebook: dict) -> str:
    code = "\n\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    return hashlib.sha256(code.encode()).hexdigest()[:16]


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
    line = f"fap {fap.__version__} | commit {commit} | size {size()} | code {digest}"
    print(line)
    return line
