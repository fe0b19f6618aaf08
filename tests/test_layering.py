"""The package's imports point one way (docs/design.md, "Layout and layering").

Every ``import`` and ``from ... import`` in the package is read with ``ast``, at
module level and inside functions alike (a lazy import is still an arrow), and
importing ``a.b.c`` counts as importing the packages ``a.b`` too, since Python
runs their ``__init__`` first.  The test fails on any cycle between files, on a
backend or an executor importing the prover (they are handed a plan or a proof),
and on any family importing one it may not.  It also keeps the folders small: no
folder holds more than a quarter of the package's lines in its own files.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent / "taskgraph_norm"

#: Which families each family may import (besides itself).  A family is a
#: top-level module or folder of the package.
ALLOWED: dict[str, set[str]] = {
    "caches": set(),
    "constants": set(),
    "errors": set(),
    "testing": set(),
    "graph": {"errors"},
    # kernels/reference.py, the oracle, interprets a graph node by node
    "kernels": {"errors", "graph"},
    "topologies": {"errors", "graph"},
    "prover": {"errors", "graph", "topologies", "kernels"},
    "viz": {"errors", "graph"},
    "lowering": {"errors", "graph"},
    "torch_state": set(),
    "backends": {"errors", "graph", "lowering", "kernels", "torch_state"},
    # executors/__init__'s EXECUTORS names the backends' runners too
    "executors": {"errors", "graph", "lowering", "kernels", "backends", "torch_state"},
    "checks": {"errors", "kernels"},
    # Only these join the pieces.
    "pipeline": {"errors", "graph", "kernels", "topologies", "prover", "lowering", "backends", "executors", "checks",
                 "torch_state"},
    # ops sit under api: normalize_sync calls them when a gradient or a tracer needs them
    "ops": {"checks", "pipeline", "errors", "graph", "kernels", "topologies", "prover", "lowering", "backends",
            "executors"},
    "api": {"errors", "graph", "kernels", "topologies", "prover", "lowering", "backends", "executors", "checks",
            "pipeline", "ops"},
    "module": {"checks", "pipeline", "errors", "graph", "kernels", "topologies", "prover", "lowering", "backends",
               "executors", "api", "ops"},
    # LayerNorm's faces (issue 23): the functional faces and the module
    "layernorm": {"checks", "pipeline", "errors", "graph", "kernels", "topologies", "prover", "lowering", "backends",
                  "executors", "ops"},
    "integrations": {"checks", "pipeline", "errors", "kernels", "api", "ops", "module", "layernorm"},
    # distributed/dtensor.py runs the faces (RMSNorm's and LayerNorm's) on a DTensor's local tensors
    "distributed": {"checks", "pipeline", "errors", "graph", "kernels", "topologies", "prover", "lowering", "backends",
                    "executors", "api", "ops", "module", "layernorm"},
    "tools": {"checks", "pipeline", "errors", "graph", "kernels", "topologies", "prover", "lowering", "backends",
              "executors", "api", "ops", "module", "viz", "testing", "distributed"},
    "__main__": {"tools"},
}

#: What every family may import: its caches' registry, and the constants that decide
#: the bits (defined once, importing nothing).
EVERYONES = ("caches", "constants")

#: The families that run a plan or a graph: they are handed a plan or a proof and
#: never import the prover.
NEVER_PROVE = ("lowering", "backends", "executors")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            if not target.startswith("taskgraph_norm."):
                continue
            # Importing a.b.c runs a.b's __init__ first (the root package excepted:
            # every module of ours is inside it).
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                found.add(".".join(parts[:i]))
    return {t for t in found if t in modules and t != name and not name.startswith(t + ".")}


def import_graph() -> nx.DiGraph:
    modules = _modules()
    graph: nx.DiGraph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        for target in _imports(name, path, modules):
            graph.add_edge(name, target)
    return graph


def _family(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else module


def test_the_reader_sees_the_package() -> None:
    graph = import_graph()
    # A check that reads nothing proves nothing: these arrows exist today.
    assert graph.has_edge("taskgraph_norm.pipeline", "taskgraph_norm.executors")
    assert graph.has_edge("taskgraph_norm.backends.torch_ops.compiled", "taskgraph_norm.lowering")
    assert graph.has_edge("taskgraph_norm.prover.rules", "taskgraph_norm.prover.canonical")
    assert len(graph) > 30


def test_no_import_cycles() -> None:
    graph = import_graph()
    graph.remove_node("taskgraph_norm")  # the root re-exports; nothing inside imports it
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles[:5])


def test_backends_and_executors_never_import_the_prover() -> None:
    graph = import_graph()
    bad = [(a, b) for a, b in graph.edges if _family(a) in NEVER_PROVE and _family(b) == "prover"]
    assert not bad, f"backends and executors are handed a plan or a proof, they never import the prover: {bad}"


def test_every_family_imports_only_what_it_may() -> None:
    graph = import_graph()
    bad = []
    for a, b in graph.edges:
        fa, fb = _family(a), _family(b)
        if a == "taskgraph_norm" or fa == fb or fb in EVERYONES:
            continue  # the root re-exports
        allowed = ALLOWED.get(fa)
        assert allowed is not None, f"{a}: a family this test does not know; add it to ALLOWED"
        sub = ".".join(b.split(".")[1:3])
        if fb not in allowed and sub not in allowed:
            bad.append(f"{a} -> {b}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


@pytest.mark.parametrize("module", ["constants", "graph", "topologies", "prover.canonical", "prover.readers",
                                    "prover.conclusions", "prover.placement", "prover.proof", "prover.rules"])
def test_the_ir_and_prover_never_import_torch(module: str) -> None:
    path = ROOT / module.replace(".", "/")
    paths = sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    assert paths and all(p.is_file() for p in paths), module
    for file in paths:
        tree = ast.parse(file.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {n for n in names if n == "torch" or n.startswith("torch.")}, file


def test_a_planted_cycle_is_caught(tmp_path: Path) -> None:
    # Negative control: the same reader on a two-file package with a lazy import cycle.
    pkg = tmp_path / "taskgraph_norm"
    (pkg / "executors").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "executors" / "__init__.py").write_text("")
    (pkg / "executors" / "a.py").write_text("def f():\n    from ..prover import b\n")
    (pkg / "prover").mkdir()
    (pkg / "prover" / "__init__.py").write_text("")
    (pkg / "prover" / "b.py").write_text("from ..executors import a\n")
    global ROOT
    saved, ROOT = ROOT, pkg
    try:
        graph = import_graph()
    finally:
        ROOT = saved
    assert graph.has_edge("taskgraph_norm.executors.a", "taskgraph_norm.prover.b")
    assert list(nx.simple_cycles(graph))


#: What the package may import at module level: the standard library, its declared
#: dependencies, and triton only in the kernel files the Triton runner loads lazily.
DEPENDENCIES = {"torch", "anyio", "networkx", "numpy", "tqdm"}
LAZY_KERNEL_FILES = {"backends/triton/kernels.py", "backends/triton/backward_kernels.py", "backends/triton/layer_kernels.py",
                     "backends/triton/exact_dw_kernels.py", "backends/triton/layer_backward_kernels.py"}


def test_module_level_imports_are_declared_dependencies() -> None:
    # A fresh `pip install .` has only pyproject's dependencies: a module-level import
    # of anything else (sniffio came in with the test extras once) breaks `import
    # taskgraph_norm` for users while CI stays green.
    import sys

    stdlib = set(sys.stdlib_module_names)
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.parse(path.read_text()).body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                if top in stdlib or top in DEPENDENCIES or top in ("taskgraph_norm", "__future__"):
                    continue
                if top == "triton" and rel in LAZY_KERNEL_FILES:
                    continue
                bad.append(f"{rel}: import {name}")
    assert not bad, "module-level imports outside the declared dependencies:\n" + "\n".join(bad)


#: The files whose lines count: the package's sources, Python and C.
SOURCE_SUFFIXES = (".py", ".c", ".h")

#: No folder may hold more than this share of the package's lines in its own files.
MAX_FOLDER_SHARE = 0.25


def folder_lines(root: Path) -> dict[str, int]:
    """Lines of source per folder of ``root``, each folder counting only its own
    files (a subfolder is a folder of its own), C sources included."""
    lines: dict[str, int] = {}
    for path in root.rglob("*"):
        if path.suffix in SOURCE_SUFFIXES and path.is_file() and "__pycache__" not in path.parts:
            folder = path.parent.relative_to(root.parent).as_posix()
            lines[folder] = lines.get(folder, 0) + len(path.read_text().splitlines())
    return lines


def crowded_folders(root: Path) -> dict[str, float]:
    """The folders over :data:`MAX_FOLDER_SHARE`, with their share of the lines."""
    lines = folder_lines(root)
    total = sum(lines.values())
    return {f: n / total for f, n in lines.items() if n > MAX_FOLDER_SHARE * total}


def test_no_folder_holds_more_than_a_quarter_of_the_lines() -> None:
    lines = folder_lines(ROOT)
    # The reader sees the C sources and the subfolders apart.
    assert lines["taskgraph_norm/backends/native/csrc"] > 1000
    assert "taskgraph_norm/executors/concurrent" in lines
    crowded = crowded_folders(ROOT)
    assert not crowded, "folders over a quarter of the package's lines (split them by family): " + ", ".join(
        f"{f} {share:.0%}" for f, share in sorted(crowded.items()))


def test_a_crowded_folder_is_caught(tmp_path: Path) -> None:
    # Negative control: one folder with most of a planted package's lines, in C.
    pkg = tmp_path / "taskgraph_norm"
    (pkg / "big" / "small").mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n" * 10)
    (pkg / "big" / "a.c").write_text("int x;\n" * 30)
    (pkg / "big" / "small" / "b.py").write_text("y = 2\n" * 10)
    assert set(crowded_folders(pkg)) == {"taskgraph_norm/big"}
