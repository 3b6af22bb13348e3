"""The house rules of src/moelab, checked on the source: imports only point down, no cycles, no private
names across modules, no file over the size a reader can hold in their head.

Layers, lowest first (a module may import its own layer's package and any lower layer):

    0  errors, common (atomic writes, JSON, figures, progress)
    1  config
    2  model
    3  interop (checkpoints, Hugging Face), lm (logits / padding / NLL of any causal LM)
    4  data, infer, dist (torchrun, meshes, FSDP / expert parallelism, sharded checkpoints, the planner)
    5  train, analysis, evaluate, serve   (siblings: none imports another)
    6  tune, scaling                      (they train: built on train)
    7  the command line: cli.py (entry point), app_cli.py (the commands), cli_utils.py, */cli.py, */*_cli.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moelab"

LAYERS = {
    "errors": 0, "common": 0, "__init__": 7, "__main__": 7,   # moelab/__init__.py: the public facade
    "config": 1,
    "model": 2,
    "interop": 3, "lm": 3,
    "data": 4, "infer": 4, "dist": 4, "vision": 4,
    "train": 5, "analysis": 5, "evaluate": 5, "serve": 5,
    "tune": 6, "scaling": 6,
    "cli": 7, "cli_utils": 7, "app_cli": 7,
}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(("moelab",) + tuple(p for p in parts if p != "__init__"))
        out[name] = path
    return out


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    leaf = module.split(".")[-1]
    if leaf == "cli" or leaf.endswith("_cli") or leaf == "cli_utils":
        return 7
    return LAYERS[_area(module)]


def _imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every moelab import, also those inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "moelab"]
        elif isinstance(node, ast.ImportFrom) and node.module:
            name = node.module
            if node.level:   # relative: resolve against this package
                base = module.split(".")[: -node.level if path.name != "__init__.py" else len(module.split("."))]
                name = ".".join(base + [node.module])
            if name.split(".")[0] == "moelab":
                found.append((name, [a.name for a in node.names], node.lineno))
    return found


MODULES = _modules()


def _resolve(target: str, names: list[str]) -> list[str]:
    """``from moelab.x import y``: y may be a submodule."""
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    return subs or [target]


def test_every_area_has_a_layer():
    assert sorted({_area(m) for m in MODULES} - set(LAYERS)) == []


def test_imports_point_down_and_siblings_stay_apart():
    bad = []
    for module, path in MODULES.items():
        for target, names, line in _imports(path, module):
            for t in _resolve(target, names):
                if t not in MODULES:
                    continue
                mine, theirs = _layer(module), _layer(t)
                same_area = _area(module) == _area(t)
                if theirs > mine or (theirs == mine and not same_area and mine == 5):
                    bad.append(f"{path.relative_to(SRC.parent)}:{line} ({mine}) imports {t} ({theirs})")
    assert bad == [], "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for module, path in MODULES.items():
        for target, names, line in _imports(path, module):
            if target == module:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                bad.append(f"{path.relative_to(SRC.parent)}:{line} imports {', '.join(private)} from {target}")
    assert bad == [], "\n".join(bad)


def test_no_import_cycles():
    graph = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, names, _ in _imports(path, module):
            graph[module] |= {t for t in _resolve(target, names) if t in MODULES and t != module}
    # a package's __init__ importing its own submodules is not a cycle through the package
    for m in graph:
        graph[m] = {t for t in graph[m] if not (m.startswith(t + ".") and MODULES[t].name == "__init__.py")}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == [], "\n".join(cycles)


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_files_stay_small(path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(SRC)} has {n} lines; split it along its sections"
