"""House rules that a test can hold: no function of incubate/ takes more than 7 parameters or runs
over 60 lines (read statically with ast; `self` and `cls` of a method are not counted)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_PARAMS, MAX_LINES = 7, 60


def functions():
    """(where, node) for every function and method under incubate/, nested ones included."""
    for path in sorted((ROOT / "incubate").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node


def params(fn) -> int:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    return len(names) - (1 if names[:1] in (["self"], ["cls"]) else 0)


def test_params_counts_every_kind():
    fn = ast.parse("def f(self, a, /, b, *c, d, **e): pass").body[0]
    assert params(fn) == 5


def test_no_function_takes_more_than_7_parameters():
    over = [f"{where} ({params(fn)})" for where, fn in functions() if params(fn) > MAX_PARAMS]
    assert not over, "functions with more than 7 parameters: " + ", ".join(over)


def test_no_function_is_over_60_lines():
    over = [f"{where} ({fn.end_lineno - fn.lineno + 1})" for where, fn in functions()
            if fn.end_lineno - fn.lineno + 1 > MAX_LINES]
    assert not over, "functions over 60 lines: " + ", ".join(over)
