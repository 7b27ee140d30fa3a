"""Imports flow one way: no circle among the modules of incubate/ and of benchmarks/.

Read statically (ast) from every file's import statements, relative ones resolved, those inside
functions included (a function-level import still makes the two modules need each other). Not
seen: imports built at run time (cli.py's importlib.import_module of a stage by name), which name
only the stages, and the implicit import of a module's parent packages (every submodule would
otherwise need its package's __init__, a circle with any __init__ that imports its submodules).
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("incubate", "benchmarks")
KNOWN: set = set()         # circles tolerated for now: none


def modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted name -> file, for every .py file of `packages` under `root`."""
    found = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _targets(node, name: str, is_package: bool, known: dict) -> list[str]:
    """The modules of `known` an import statement of module `name` reaches."""
    if isinstance(node, ast.Import):
        heads = [a.name for a in node.names]
        return [h for h in heads if h in known] + [h.rsplit(".", 1)[0] for h in heads
                                                   if h not in known and h.rsplit(".", 1)[0] in known]
    base = node.module or ""
    if node.level:
        package = name.split(".") if is_package else name.split(".")[:-1]
        up = package[:len(package) - (node.level - 1)]
        base = ".".join(up + ([node.module] if node.module else []))
    out = []
    for alias in node.names:
        if f"{base}.{alias.name}" in known:
            out.append(f"{base}.{alias.name}")
        elif base in known:
            out.append(base)
    return out


def import_graph(known: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(_targets(node, name, path.name == "__init__.py", known))
        graph[name] = edges - {name}
    return graph


def circles(graph: dict[str, set[str]], known_pairs=()) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), after dropping known pairs."""
    graph = {a: {b for b in bs if frozenset({a, b}) not in known_pairs} for a, bs in graph.items()}
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_no_import_circle_in_incubate_or_benchmarks():
    graph = import_graph(modules(ROOT))
    assert graph["incubate.pipeline"] >= {"incubate.launchers", "incubate.store.rundir"}
    assert circles(graph, KNOWN) == []


def test_the_run_directory_and_the_launchers_are_below_the_stages():
    graph = import_graph(modules(ROOT))
    below = [m for m in graph if m == "incubate.store.rundir" or m.startswith("incubate.launchers")]
    assert len(below) > 5
    for m in below:
        reached, todo = set(), [m]
        while todo:       # every module m needs, directly or through others
            for t in graph[todo.pop()] - reached:
                reached.add(t)
                todo.append(t)
        assert not any(t.startswith("incubate.stages") for t in reached), m


def test_a_circle_through_a_function_level_relative_import_is_found(tmp_path):
    pkg = tmp_path / "incubate"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import x\n")
    (pkg / "sub" / "a.py").write_text("def x():\n    from ..b import y\n")
    (pkg / "b.py").write_text("import incubate.sub.a\n")
    (pkg / "c.py").write_text("from . import b\n")
    graph = import_graph(modules(tmp_path, ("incubate",)))
    assert graph["incubate.sub.a"] == {"incubate.b"} and graph["incubate.c"] == {"incubate.b"}
    assert circles(graph) == [["incubate.b", "incubate.sub.a"]]


def test_a_launchers_job_wrapper_starts_without_torch():
    """A submitit or Ray task only runs `incubate.cli` in a child process: importing what it unpickles
    (the launchers, the run directory, the checkpoint module) must not cost torch's 3 s import."""
    import subprocess
    import sys
    code = ("import sys, incubate.launchers, incubate.launchers.slurm, incubate.launchers.ray, incubate.store.rundir\n"
            "print(sorted(m for m in ('torch', 'timm', 'transformers', 'sklearn') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_status_and_report_read_a_run_without_torch(tmp_path):
    """`incubate status` and `report` read files: they answer in about a second instead of the 8 s that
    torch and timm cost to import (the family registry and the tasks import them when first used)."""
    import subprocess
    import sys
    from tests.conftest import in_process, write_recipe
    run = tmp_path / "run"
    in_process("meta", "--recipe", write_recipe(tmp_path / "r.yaml", meta__epochs=1), "--out", run, check=True)
    code = ("import sys\nfrom incubate.cli import main\n"
            f"assert main(['status', {str(run)!r}]) == 0 and main(['report', {str(run)!r}]) == 0\n"
            "print(sorted(m for m in ('torch', 'timm', 'transformers', 'sklearn') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr
    assert "  meta       finished     top-1 " in proc.stdout and (run / "report.png").exists()
