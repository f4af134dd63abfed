"""House rules that hold for every module of fap (DESIGN.md, "Invariants")."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_80_lines():
    # fap/engine is being split into parts (#13); it joins this rule when that lands.
    files = [p for p in sorted((REPO / "fap").rglob("*.py")) if not p.relative_to(REPO).as_posix().startswith("fap/engine")]
    files += sorted((REPO / "recipes").glob("*.py"))
    long = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these into smaller functions:\n" + "\n".join(long)
