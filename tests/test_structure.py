"""The package's structure: its import graph has no circle, the core never imports the contamination paths,
and a run config's checks walk few files (docs/architecture.md, "Layers").

The import graph is read from the source with `ast`: every `import` and `from ... import` of a module, at
its top and inside its functions (a lazy import is an edge too); only `if TYPE_CHECKING:` blocks, which
never run, are left out. `python tests/test_structure.py` prints the graph's layers and the config walk.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "simulator"
DOWNSTREAM = "simulator.contamination"
# the one module outside contamination/ allowed to import it: `simulate-report`, the command that reads
# both kinds of run directory (the loop's and simulate-contaminate's grids), above both in the layers
ABOVE_BOTH = "simulator.report_cli"
WALK_FILES = 5  # at most this many files receive the run config while cli.build checks and builds one run


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package by its __init__.py)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.AST, function: str = "") -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement of tree with the name of the function it sits in ('' at module level)."""
    for node in ast.iter_child_nodes(tree):
        if _type_checking(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, function
        inner = (
            node.name
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not function
            else function
        )
        yield from _imports(node, inner)


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The package module that importing name loads last (its longest known prefix)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def edges() -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported module, the function holding the import or '')}, within the package."""
    known = modules()
    graph: dict[str, set[tuple[str, str]]] = {m: set() for m in known}
    for module, path in known.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node, function in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    head = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*head, base] if base else head)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for name in names:
                target = _target(name, known)
                if target is not None and target != module:
                    graph[module].add((target, function))
    return graph


def cycles(graph: dict[str, set[tuple[str, str]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    succ = {m: sorted({t for t, _ in out}) for m, out in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []
    for root in succ:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on.add(v)
            if i < len(succ[v]):
                work.append((v, i + 1))
                w = succ[v][i]
                if w not in index:
                    work.append((w, 0))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            for w in succ[v]:
                if w in on:
                    low[v] = min(low[v], low[w])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def layers(graph: dict[str, set[tuple[str, str]]]) -> list[list[str]]:
    """Modules by layer: layer 0 imports no package module, layer k only modules of layers below k."""
    level: dict[str, int] = {}

    def depth(m: str) -> int:
        if m not in level:
            level[m] = 1 + max((depth(t) for t, _ in graph[m]), default=-1)
        return level[m]

    for m in graph:
        depth(m)
    return [sorted(m for m in graph if level[m] == k) for k in range(max(level.values()) + 1)]


def test_the_import_graph_has_no_circle_counting_lazy_imports():
    graph = edges()
    assert cycles(graph) == []


def test_the_core_never_imports_the_contamination_paths():
    graph = edges()
    core = [m for m in graph if m not in (DOWNSTREAM, ABOVE_BOTH) and not m.startswith(DOWNSTREAM + ".")]
    bad = sorted((m, f, t) for m in core for t, f in graph[m] if t.startswith(DOWNSTREAM))
    assert bad == []
    # the command above both layers is a leaf: nothing of the package imports it
    assert sorted(m for m in graph for t, _ in graph[m] if t == ABOVE_BOTH) == []


def test_the_checker_sees_lazy_imports_and_circles(tmp_path):
    """The parser counts an import inside a function, skips TYPE_CHECKING, and the search finds a circle."""
    tree = ast.parse("import os\nif TYPE_CHECKING:\n    import a\ndef f():\n    from b import c\n")
    assert [(type(n).__name__, f) for n, f in _imports(tree)] == [("Import", ""), ("ImportFrom", "f")]
    assert cycles({"a": {("b", "")}, "b": {("c", "f")}, "c": {("a", "")}, "d": set()}) == [["a", "b", "c"]]
    assert cycles({"a": {("b", "")}, "b": set()}) == []


def reach(graph: dict[str, set[tuple[str, str]]], start: str) -> set[str]:
    """Every module start imports, directly or through others, lazy imports included."""
    seen, todo = set(), [start]
    while todo:
        for target, _ in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_trainer_and_the_step_logger_reach_no_check():
    """models/training.py (every torch family's fit, and the classifiers') reaches none of the checks, the
    registry or the entry points, even through lazy imports: the step logger takes plain arguments and
    imports only simulator.options."""
    graph = edges()
    assert {t for t, _ in graph["simulator.step_log"]} == {"simulator.options"}
    checks = {
        "simulator.checks",
        "simulator.registry",
        "simulator.preflight",
        "simulator.cli",
        "simulator.entry",
    }
    for start in ("simulator.models.training", "simulator.classifiers", "simulator.curation"):
        reached = reach(graph, start)
        assert not reached & checks and not any(m.startswith(DOWNSTREAM) for m in reached), (start, reached)


# -- the config walk: which files receive the run config while cli.build checks and builds one run ----------


def walk_files(cfg) -> dict[str, int]:
    """Project file -> number of calls, of every function call during cli.build(cfg) that receives cfg or
    one of its nodes (cfg.data, cfg.eval.options, ...) as an argument: the files the config is walked in."""
    from omegaconf import DictConfig, ListConfig

    from simulator import cli

    prefix = str(PACKAGE)
    seen: dict[str, int] = {}

    def config_node(value) -> bool:
        return isinstance(value, (DictConfig, ListConfig)) and (value is cfg or value._get_root() is cfg)

    def tracer(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_filename.startswith(prefix):
            n = code.co_argcount + code.co_kwonlyargcount
            names = code.co_varnames[: n + bool(code.co_flags & 4) + bool(code.co_flags & 8)]
            values = [frame.f_locals.get(a) for a in names]
            flat = [
                v
                for x in values
                for v in (x.values() if isinstance(x, dict) else x if isinstance(x, tuple) else (x,))
            ]
            if any(config_node(v) for v in flat):
                name = str(Path(code.co_filename).relative_to(ROOT))
                seen[name] = seen.get(name, 0) + 1
        return None

    sys.settrace(tracer)
    try:
        cli.build(cfg)
    finally:
        sys.settrace(None)
    return seen


def test_the_config_walk_of_a_run_touches_at_most_five_files(tmp_path):
    from tests.conftest import compose_config

    image = ["model=diffusion_tiny", "data=digits", "eval.metrics=[bpd]", "eval.stability_metric=bpd"]
    for overrides in ([], image):
        cfg = compose_config(*overrides, f"run_root={tmp_path}")
        files = walk_files(cfg)
        assert "simulator/cli.py" in files and len(files) <= WALK_FILES, sorted(files)


if __name__ == "__main__":  # the layers, and the walk of the default config
    graph = edges()
    for k, names in enumerate(layers(graph) if not cycles(graph) else []):
        print(f"layer {k}: {', '.join(n.removeprefix('simulator.') for n in names)}")
    for component in cycles(graph):
        print("circle:", ", ".join(component))
    from tests.conftest import compose_config

    files = walk_files(compose_config(*sys.argv[1:], "run_root=/tmp"))
    print(f"config walk of cli.build: {len(files)} files, {sum(files.values())} calls: {files}")
