"""The package boundaries of DESIGN.md, read from the source (every import, module-level or inside a function):
no import cycle between megatron's packages (nor between the packages of megatron/core), megatron/core
imports nothing outside core, inference and evaluation import nothing from training; and no docstring
cites the unpublished "reference N.N" document."""

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MEGATRON = ROOT / "megatron"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the megatron modules it imports (relative imports resolved)."""
    out: dict[str, set[str]] = defaultdict(set)
    for path in sorted(MEGATRON.rglob("*.py")):
        mod = _module(path)
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module]
            else:
                continue
            out[mod].update(n for n in names if n == "megatron" or n.startswith("megatron."))
    return out


def _unit(module: str, depth: int) -> str:
    """``megatron.X`` (depth 2), or ``megatron.core.X`` inside core (depth 3)."""
    return ".".join(module.split(".")[:depth])


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one node (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


IMPORTS = _imports()


@pytest.mark.parametrize("within,depth", [("megatron", 2), ("megatron.core", 3)], ids=["megatron", "core"])
def test_no_import_cycle_between_packages(within, depth):
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, targets in IMPORTS.items():
        if not mod.startswith(within + "."):
            continue
        for target in targets:
            if target.startswith(within + ".") and _unit(mod, depth) != _unit(target, depth):
                edges[_unit(mod, depth)].add(_unit(target, depth))
    assert _cycles(edges) == []


def test_core_imports_nothing_outside_core():
    outside = {(mod, t) for mod, targets in IMPORTS.items() if mod.startswith("megatron.core")
               for t in targets if not t.startswith("megatron.core")}
    assert outside == set()


def test_inference_and_evaluation_import_nothing_from_training():
    found = {(mod, t) for mod, targets in IMPORTS.items()
             if mod.startswith(("megatron.text_generation", "megatron.evaluation"))
             for t in targets if t == "megatron.training" or t.startswith("megatron.training.")}
    assert found == set(), "inference / evaluation import from megatron.training"


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_citation_of_the_unpublished_reference():
    cited = re.compile(r"\breference (?:section )?\d+\.\d+")
    hits = [f"{p.relative_to(ROOT)}:{n}" for top in ("megatron", "tools", "bench", "examples", "tests")
            for p in sorted((ROOT / top).rglob("*")) if p.suffix in (".py", ".sh", ".md")
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if cited.search(line)]
    assert hits == []
