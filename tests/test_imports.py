"""The import graph of `fap` (issue #26): no cycles, function-level imports included.

The graph is read from the source (``ast``), not from what happens to be imported at run
time, so an import inside a function counts as much as one at the top of a module. An
edge goes from a module to the module it names: ``from fap.data import config`` names the
submodule ``fap.data.config``, ``from fap.data import DataConfig`` names the package
``fap.data`` (its ``__init__``). A package's ``__init__`` importing its own submodules is
not a cycle of the kind this guards against, so importing ``fap.a.b`` does not add an edge
to ``fap.a`` (Python runs ``fap/a/__init__.py`` first, but that is the package, not a
dependency the importer chose).
"""
import ast
import functools
from pathlib import Path
from typing import Dict, List, Set

import pytest

FAP = Path(__file__).resolve().parent.parent / "fap"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(FAP.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> Dict[str, Path]:
    return {module_name(p): p for p in sorted(FAP.rglob("*.py"))}


def imports_of(name: str, path: Path, known: Set[str]) -> Set[str]:
    """The fap modules ``path`` imports anywhere in its body (``TYPE_CHECKING`` blocks left out)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip: Set[int] = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports never run
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: Set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:
                    out.add(sub)
                elif base in known:
                    out.add(base)
    out.discard(name)
    return out


@functools.lru_cache(maxsize=1)
def graph() -> Dict[str, Set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def find_cycle(g: Dict[str, Set[str]]) -> List[str]:
    """One cycle of ``g`` as ``[a, b, ..., a]``, or [] when there is none (depth-first search)."""
    state: Dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(g):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_and_prints_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_count(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from fap.cli import main\n    import fap.engine\n")
    assert imports_of("fap.x", src, {"fap.cli", "fap.engine"}) == {"fap.cli", "fap.engine"}


@pytest.mark.parametrize("lower, upper", [
    ("fap.engine", "fap.cli"),          # nothing imports the command line
    ("fap.engine", "fap.evaluate"),     # the engine's final evaluation is the library's, not `fap eval`'s
    ("fap.tasks", "fap.methods"),       # the task sits below the methods that drive it
    ("fap.evaluation", "fap.engine"),   # evaluation never reaches into training
    ("fap.detection", "fap.engine"),
    ("fap.engine", "fap.attacks"),      # the engine knows nothing of adversarial examples
    ("fap.engine", "fap.detection"),    # nor of a specific task
    ("fap.config", "fap.engine"),
])
def test_layers_point_down(lower, upper):
    g = graph()
    top = {"fap.engine.__main__"}  # `python -m fap.engine` is the command line, not the engine
    up = [(a, b) for a, targets in g.items() for b in targets if a not in top
          and (a == lower or a.startswith(lower + ".")) and (b == upper or b.startswith(upper + "."))]
    assert not up, f"{lower} must not import {upper}: {up}"


def test_nothing_imports_the_command_line():
    g = graph()
    # the console entry points themselves, and `python -m fap.engine`, are the top floor
    top = {"fap.cli", "fap.__main__", "fap.engine.__main__"}
    users = sorted(a for a, targets in g.items() if "fap.cli" in targets and a not in top)
    assert not users, f"modules importing fap.cli: {users}"


# --- The config is the ground floor of a run: parsing and checking it loads no torch -------------

SCHEMA_MODULES = {"fap.checks", "fap.data.config", "fap.evaluation.config", "fap.detection.config",
                  "fap.methods.config"}


def test_the_config_imports_only_the_sections_schema_modules():
    g = graph()
    reached, todo = set(), ["fap.config"]
    while todo:  # everything fap.config reaches, function-level imports included
        for nxt in g[todo.pop()] - reached:
            reached.add(nxt)
            todo.append(nxt)
    assert reached == SCHEMA_MODULES, f"fap.config reaches {sorted(reached)}, not only the schema modules"


def _fresh(code: str):
    """Run ``code`` in a fresh interpreter, this tree first on the path: ``(status, stdout, stderr)`` lines."""
    import os
    import subprocess
    import sys

    repo = FAP.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, proc.stdout.strip().splitlines(), proc.stderr.strip().splitlines()


TORCH_LOADED = "import sys; print('torch loaded' if 'torch' in sys.modules else 'no torch')\n"


def test_a_config_is_built_overridden_and_refused_without_torch():
    status, out, err = _fresh(
        "import fap.config as C\n"
        "cfg = C.apply_overrides(C.TrainConfig(), ['--method', 'vanilla', '--optim.lr=0.2', '--data.source=demo'])\n"
        "assert (C.method_name(cfg.method), cfg.optim.lr, cfg.data.source) == ('vanilla', 0.2, 'demo')\n"
        "try:\n"
        "    C.parse_args(C.TrainConfig(), ['--method.p_adv=1.5'])  # refused by the method's own validate\n"
        "except C.ConfigError as e:\n"
        "    print('refused:', e)\n"
        + TORCH_LOADED)
    assert status == 0, err
    assert out[0].startswith("refused: method.p_adv=1.5") and out[-1] == "no torch", out


@pytest.mark.parametrize("argv, status, expect", [
    (["train", "--bogus.key=1"], 2, "fap train: error: unknown section 'bogus' in --bogus.key; valid sections: "
                                    "train, data, model, method, optim, sched, mixup, ema, checkpoint, log, "
                                    "final_eval, detection"),  # a config error: one line, exit 2
    (["train", "--help"], 0, "--optim.lr=0.1"),  # every key, with its default
    (["--help"], 0, "compare"),  # the subcommands
])
def test_the_command_line_answers_help_and_config_errors_without_torch(argv, status, expect):
    rc, out, err = _fresh("import sys\nimport fap.cli\n"
                          "try:\n"
                          f"    rc = fap.cli.main({argv!r})\n"
                          "except SystemExit as e:\n"
                          "    rc = e.code\n"
                          "print('exit', rc, file=sys.stderr)\n" + TORCH_LOADED)
    assert rc == 0 and out[-1] == "no torch", (out, err)
    assert err[-1] == f"exit {status}", err
    if status:
        assert err[:-1] == [expect], err  # one line
    else:
        assert any(expect in line for line in out), out
