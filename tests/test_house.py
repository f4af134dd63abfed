"""The house rules of DESIGN.md that code can check: short functions, no mutable closures in the engine.

The checks parse the source in a fresh interpreter: in a pytest process that has run numba
(FFCV), CPython 3.11's ``ast.parse`` can fail with "AST constructor recursion depth mismatch".
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

FAP = Path(__file__).resolve().parents[1] / "fap"
MAX_LINES = 80


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _fresh(check: str):
    proc = subprocess.run([sys.executable, __file__, check], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_no_function_in_fap_or_the_recipes_is_longer_than_80_lines():
    long = _fresh("long_functions")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def test_no_engine_closure_captures_mutable_state():
    """A nested function may read what its enclosing function bound once to an immutable value."""
    problems = _fresh("mutable_closures")
    assert not problems, "\n".join(problems)


def long_functions():
    long = []
    for path in sorted(FAP.rglob("*.py")) + sorted((FAP.parent / "recipes").glob("*.py")):
        for fn in _functions(ast.parse(path.read_text())):
            lines = fn.end_lineno - fn.lineno + 1
            if lines > MAX_LINES:
                long.append(f"{path.relative_to(FAP.parent)}:{fn.lineno} {fn.name} ({lines} lines)")
    return long


def _bindings(fn):
    """name -> how it is bound in ``fn``'s own body (not inside nested functions)."""
    bound = {}
    args = fn.args
    for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
        if a is not None:
            bound.setdefault(a.arg, []).append(None)
    stack = list(fn.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            if not isinstance(node, ast.Lambda):
                bound.setdefault(node.name, []).append(None)
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for name in ast.walk(t):
                    if isinstance(name, ast.Name):
                        value = None if isinstance(node, ast.AugAssign) else node.value
                        bound.setdefault(name.id, []).append(value if not isinstance(node, ast.AugAssign) else "aug")
        elif isinstance(node, (ast.For, ast.With, ast.comprehension)):
            for name in ast.walk(node.target if isinstance(node, (ast.For, ast.comprehension)) else node):
                if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Store):
                    bound.setdefault(name.id, []).append("loop")
        stack.extend(ast.iter_child_nodes(node))
    return bound


def _mutable(value) -> bool:
    if value in ("aug", "loop"):
        return True
    return isinstance(value, (ast.List, ast.Dict, ast.Set)) or (
        isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in ("list", "dict", "set"))


def mutable_closures():
    problems = []
    for path in sorted((FAP / "engine").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for outer in _functions(tree):
            bound = _bindings(outer)
            for inner in ast.walk(outer):
                if inner is outer or not isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    continue
                own = _bindings(inner) if not isinstance(inner, ast.Lambda) else {
                    a.arg: [None] for a in inner.args.args + inner.args.kwonlyargs}
                for node in ast.walk(inner):
                    if isinstance(node, (ast.Nonlocal, ast.Global)):
                        problems.append(f"{path.name}:{node.lineno} {type(node).__name__.lower()} in a closure")
                    if isinstance(node, ast.Name) and node.id in bound and node.id not in own:
                        values = bound[node.id]
                        if len(values) > 1 or _mutable(values[0]):
                            problems.append(f"{path.name}:{node.lineno} captures {node.id!r} of {outer.name}")
    return sorted(set(problems))


if __name__ == "__main__":
    print(json.dumps({"long_functions": long_functions, "mutable_closures": mutable_closures}[sys.argv[1]]()))
