"""The package is laid out by layer: every import of a sajax module runs down the layers of `sajax/__init__`'s
docstring, and no two modules import each other (directly or through others)."""

import ast
from pathlib import Path

import sajax

ROOT = Path(sajax.__file__).parent
# Layer of each top-level name under sajax/ (a package or a module), lowest first. A module may import its own
# layer and those below; fileutil and config_files are leaf utilities that import no sajax module (compilation_cache
# imports fileutil only).
LAYERS = {"fileutil": 0, "config_files": 0, "compilation_cache": 0, "parallel": 1, "model": 2, "formats": 3,
          "data": 4, "train": 5, "infer": 6, "evals": 7, "aot": 8, "cli": 9, "": 9}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("sajax",) + parts).removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """module → the sajax modules it imports (a `from package import module` counts as the module)."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sajax":
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    is_module = (ROOT.parent / (full.replace(".", "/") + ".py")).exists()
                    deps.add(full if is_module else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "sajax")
        graph[_module_name(path)] = deps - {"sajax"}
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def test_every_import_runs_down_the_layers():
    graph = _imports()
    assert len(graph) > 40 and all(m.count(".") <= 2 for m in graph)  # the walk saw the packages
    upward = sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps
                    if _layer(d) > _layer(m) and m.split(".")[:2] != d.split(".")[:2])
    assert upward == []


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, str] = {}
    cycles = []

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                cycles.append(" → ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
