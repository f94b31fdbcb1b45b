"""The package's layout is the compiler's pipeline: imports point one way.

Every module belongs to one stage; a module may import modules of its own stage or of stages
before it, never after (capture -> analysis -> one-shot statistics -> planning -> rewriting ->
backends -> records -> stages -> driver -> workflows -> interface), and the module graph has no
cycle. Imports inside functions are refused too: a graphprune import belongs at the top of
the module, where this test sees it (a local import is how cycles hide).
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {  # import name -> folder
    "graphprune.passes": ROOT / "passes",
    "graphprune.models": ROOT / "models",
    "graphprune": ROOT / "graphprune",
}
STAGES: list[tuple[str, tuple[str, ...]]] = [  # in pipeline order; longest prefix wins
    (
        "base",
        (
            "graphprune.errors",
            "graphprune.io",
            "graphprune.progress",
            "graphprune.timing",
            "graphprune.dictview",
            "graphprune.modules",
            "graphprune.keying",
            "graphprune.memory",
        ),
    ),
    (
        "capture",
        ("graphprune.capture", "graphprune.checks", "graphprune.hf", "graphprune.hf_defaults"),
    ),
    ("analysis", ("graphprune.analysis",)),
    ("oneshot", ("graphprune.oneshot",)),
    ("planning", ("graphprune.planning",)),
    ("rewriting", ("graphprune.passes", "graphprune.kernels", "graphprune.sparsity")),
    ("backends", ("graphprune.onnx",)),
    ("records", ("graphprune.report", "graphprune.record")),
    ("stages", ("graphprune.stages",)),
    ("driver", ("graphprune.compile",)),
    (
        "workflows",
        (
            "graphprune.serialize",
            "graphprune.finetune",
            "graphprune.advise",
            "graphprune.checkpoint",
        ),
    ),
    ("interface", ("graphprune.cli", "graphprune.models")),
]
RANK = {prefix: i for i, (_, prefixes) in enumerate(STAGES) for prefix in prefixes}


def module_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if package == "graphprune" and parts[0] in ("passes", "models"):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def stage_of(module: str) -> int | None:
    """The stage of a module (None: the package root, which re-exports the public API)."""
    if module == "graphprune":
        return None
    matches = [p for p in RANK if module == p or module.startswith(p + ".")]
    assert matches, f"{module} belongs to no stage: add it to STAGES in {__file__}"
    return RANK[max(matches, key=len)]


def imports(path: Path, modules: set[str]) -> tuple[set[str], list[str]]:
    """graphprune modules imported at module level, and those imported inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top: set[str] = set()
    local: list[str] = []
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    inside = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # "from package import submodule" imports the submodule, not the package alone
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                for a in node.names
            ]
        names = [n for n in names if n.split(".")[0] == "graphprune"]
        (local.extend if id(node) in inside else top.update)(names)
    return top, local


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    files = module_files()
    g = nx.DiGraph()
    g.add_nodes_from(files)
    for module, path in files.items():
        top, _ = imports(path, set(files))
        g.add_edges_from((module, target) for target in top if target != module)
    return g


def test_every_module_has_a_stage() -> None:
    for module in module_files():
        stage_of(module)


def test_no_import_cycles(graph: nx.DiGraph) -> None:
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_imports_never_climb_to_a_later_stage(graph: nx.DiGraph) -> None:
    upward = []
    for source, target in graph.edges:
        a, b = stage_of(source), stage_of(target)
        if a is not None and (b is None or b > a):
            stage = STAGES[b][0] if b is not None else "the package root"
            upward.append(f"{source} ({STAGES[a][0]}) imports {target} ({stage})")
    assert not upward, "\n".join(upward)


def test_no_function_local_graphprune_imports() -> None:
    files = module_files()
    found = {
        module: local for module, path in files.items() if (local := imports(path, set(files))[1])
    }
    assert not found, found


def test_stages_are_reached_through_the_driver_only(graph: nx.DiGraph) -> None:
    """Planning, rewriting and the backends never reach the driver or its stages (a call
    into planning never calls back up into compile)."""
    top = (RANK["graphprune.stages"], RANK["graphprune.compile"])
    driver = {m for m in graph if stage_of(m) in top}
    below = [m for m in graph if (s := stage_of(m)) is not None and s < RANK["graphprune.report"]]
    reach = {m: driver & nx.descendants(graph, m) for m in below}
    assert not any(reach.values()), {m: r for m, r in reach.items() if r}


def test_no_function_over_80_lines() -> None:
    """Short functions with one job each (the analyzer's rule tables would be the exception;
    none needs it today)."""
    long = []
    for module, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > 80:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, long


def test_every_package_is_installed() -> None:
    """pyproject lists every package folder (a missing one is absent from a wheel: an editable
    install, as the tests use, would not notice), mapped to its folder."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        ".".join(("graphprune", *p.parent.relative_to(ROOT / "graphprune").parts)): p.parent
        for p in (ROOT / "graphprune").rglob("__init__.py")
    }
    folders |= {"graphprune.passes": ROOT / "passes", "graphprune.models": ROOT / "models"}
    assert sorted(config["packages"]) == sorted(folders)
    mapped = {name: ROOT / folder for name, folder in config["package-dir"].items()}
    assert mapped == folders
