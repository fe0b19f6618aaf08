"""Drawing merge DAGs: DOT and Mermaid text, SVG/PNG files, collapsing, the CLI."""

from __future__ import annotations

import ast
import builtins
import re
import shutil
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import taskgraph_norm as tgn
from taskgraph_norm.tools.cli import main
from taskgraph_norm.errors import ConfigError, MissingDependencyError
from taskgraph_norm.graph import Graph, Node, Op
from taskgraph_norm.viz import COLLAPSE_THRESHOLD, build_scene
from taskgraph_norm.viz.render import _layer_positions

VIZ_DIR = Path(tgn.__file__).parent / "viz"
HAVE_DOT = shutil.which("dot") is not None

#: Small configurations covering every op kind (exact mode brings ROWMAX/MAX/SCALE).
CONFIGS = [
    pytest.param(dict(hidden_size=hs, chunk_size=64, topology=t, accumulate=a), id=f"{t}-{hs}-{a}")
    for t in ("linear", "tree", "race", "cat")
    for hs, a in ((256, "float"), (300, "exact"))
] + [pytest.param(dict(hidden_size=64, topology="standard"), id="standard")]


@dataclass(frozen=True)
class FakeProof:
    """Stands in for the prover's Proof (duck-typed, as viz reads it)."""

    deterministic: bool
    batch_invariant: bool
    rule: str
    fingerprint: str
    witness: Any = None


def _graph(**kw: Any) -> Graph:
    return tgn.build_graph(kw.pop("hidden_size"), **kw)


def _operand_edges(graph: Graph) -> int:
    return sum(len(n.inputs) for n in graph.nodes)


# --- DOT ---------------------------------------------------------------------


def _parse_dot(text: str) -> Any:
    pydot = pytest.importorskip("pydot")
    # pydot's parser still calls pyparsing's camelCase API, which newer pyparsing
    # flags as deprecated; that is pydot's business, not a failure of ours.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        (parsed,) = pydot.graph_from_dot_data(text)
    return parsed


@pytest.mark.parametrize("config", CONFIGS)
def test_dot_parses_with_matching_counts_and_operand_order(config: dict[str, Any]) -> None:
    graph = _graph(**config)
    parsed = _parse_dot(tgn.to_dot(graph))
    names = {n.get_name().strip('"') for n in parsed.get_nodes()} - {"node", "edge", "graph"}
    assert names == set(graph.by_id)
    edges = parsed.get_edges()
    assert len(edges) == _operand_edges(graph)
    # Rebuild every node's operand tuple from the edges' position attributes and,
    # where shown, from the visible labels.
    rebuilt: dict[str, dict[int, str]] = {}
    for edge in edges:
        dst, src = edge.get_destination().strip('"'), edge.get_source().strip('"')
        pos = int(edge.get("position").strip('"'))
        rebuilt.setdefault(dst, {})[pos] = src
        label = edge.get("label") or edge.get("headlabel")
        if len(graph[dst].inputs) >= 2 and graph[dst].op is not Op.SUMSQ:
            assert label is not None and int(label.strip('" ')) == pos
        else:
            assert label is None  # one operand, or (x, scale): no order to misread
    for node in graph.nodes:
        got = rebuilt.get(node.id, {})
        assert tuple(got[i] for i in range(len(got))) == node.inputs


def test_dot_structure_does_not_lean_on_node_names() -> None:
    """Rename every node (reversing name order); the drawing keeps the same shape."""
    graph = tgn.build_graph(300, chunk_size=64, topology="tree", accumulate="exact")
    ids = [n.id for n in graph.nodes]
    renamed = graph.relabel({old: f"n{len(ids) - i:03d}" for i, old in enumerate(ids)})

    def shape(g: Graph) -> list[tuple[str, str, str]]:
        index = {n.id: i for i, n in enumerate(g.nodes)}
        edges = re.findall(r'^  "([^"]+)" -> "([^"]+)" \[position="(\d+)"', tgn.to_dot(g), re.M)
        return sorted((str(index[a]), str(index[b]), p) for a, b, p in edges)

    assert shape(renamed) == shape(graph)
    assert tgn.to_dot(graph) == tgn.to_dot(graph)  # and the text is reproducible


def test_operand_order_swap_is_visible() -> None:
    """Negative control: swapping the operands of one ADD changes the labels."""
    graph = tgn.build_graph(256, chunk_size=64, topology="tree")
    node = graph["tree1.0"]
    swapped = graph.replace_node(node.replace(inputs=node.inputs[::-1]))
    assert tgn.to_dot(swapped) != tgn.to_dot(graph)
    assert '"p1" -> "tree1.0" [position="0", label=" 0 "' in tgn.to_dot(swapped)
    assert '"p1" -> "tree1.0" [position="1", label=" 1 "' in tgn.to_dot(graph)


@pytest.mark.skipif(not HAVE_DOT, reason="the Graphviz program is not installed")
@pytest.mark.parametrize("topology", ["linear", "tree", "race", "cat"])
def test_dot_accepted_by_graphviz_program(topology: str, tmp_path: Path) -> None:
    import subprocess

    graph = tgn.build_graph(300, chunk_size=64, topology=topology, accumulate="exact")
    src = tmp_path / "g.dot"
    src.write_text(tgn.to_dot(graph))
    done = subprocess.run(["dot", "-Tplain", str(src)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert sum(line.startswith("node ") for line in done.stdout.splitlines()) == len(graph)


def test_node_kinds_are_visually_distinct() -> None:
    graph = tgn.build_graph(300, chunk_size=64, topology="race", accumulate="exact")
    scene = build_scene(graph)
    styles = {}
    for box in scene.boxes:
        styles.setdefault(box.op, set()).add(box.kind)
    assert styles[Op.SUMSQ] == {"leaf"} and styles[Op.ACCUMULATE] == {"race"}
    assert styles[Op.ROWMAX] == styles[Op.MAX] == styles[Op.SCALE] == {"exact"}
    dot = tgn.to_dot(graph)
    fill = dict(re.findall(r'fillcolor="(#\w+)", color="#\w+", penwidth="[\d.]+", kind="(\w+)"', dot))
    kinds = {v: k for k, v in fill.items()}
    assert len(set(kinds.values())) == len(kinds)  # one colour per kind
    assert {"io", "leaf", "race", "exact", "finalize"} <= set(kinds)
    # Arrival-order operands are dashed; ordered ones are not.
    assert re.search(r'"p2" -> "accumulate" \[[^]]*style=dashed', dot)
    assert "style=dashed" not in tgn.to_dot(tgn.build_graph(256, chunk_size=64, topology="tree"))


# --- Mermaid -----------------------------------------------------------------

_MM_NODE = re.compile(r'^  (n\d+)(\(\[|\[\[|\[/|\[\(|\{\{|\[|\()"([^"]*)"(\]\)|\]\]|\\\]|\)\]|\}\}|\]|\))$')
_MM_EDGE = re.compile(r'^  (n\d+) (-->|-\.->)(?:\|"([^"]*)"\|)? (n\d+)$')


def _parse_mermaid(text: str) -> tuple[str, dict[str, str], list[tuple[str, str, str, str]]]:
    lines = text.splitlines()
    assert lines[0] == "---" and lines[1].startswith('title: "') and lines[2] == "---"
    assert lines[3] == "flowchart TB"
    nodes: dict[str, str] = {}
    edges: list[tuple[str, str, str, str]] = []
    for line in lines[4:]:
        if m := _MM_NODE.match(line):
            opener, closer = m.group(2), m.group(4)
            assert (opener, closer) in {("([", "])"), ("[[", "]]"), ("[/", "\\]"), ("[(", ")]"),
                                        ("{{", "}}"), ("[", "]"), ("(", ")")}
            nodes[m.group(1)] = m.group(3)
        elif m := _MM_EDGE.match(line):
            edges.append((m.group(1), m.group(4), m.group(3) or "", m.group(2)))
        else:
            assert re.match(r"^  (classDef \w+ \S+|class [n\d,]+ \w+)$", line), line
    return lines[1], nodes, edges


@pytest.mark.parametrize("config", CONFIGS)
def test_mermaid_structure_counts_and_operand_order(config: dict[str, Any]) -> None:
    graph = _graph(**config)
    _, nodes, edges = _parse_mermaid(tgn.to_mermaid(graph))
    ids = {mid: label.split("<br/>")[0] for mid, label in nodes.items()}
    assert sorted(ids.values()) == sorted(graph.by_id)
    assert len(edges) == _operand_edges(graph)
    by_dst: dict[str, list[tuple[str, str, str]]] = {}
    for src, dst, label, arrow in edges:
        assert src in ids and dst in ids
        by_dst.setdefault(ids[dst], []).append((ids[src], label, arrow))
    for node in graph.nodes:
        operands = by_dst.get(node.id, [])
        if len(node.inputs) >= 2 and node.op is not Op.SUMSQ:
            order = sorted(operands, key=lambda e: int(e[1]))
            assert tuple(src for src, _, _ in order) == node.inputs
            assert [int(e[1]) for e in order] == list(range(len(node.inputs)))
        expected_arrow = "-.->" if node.op is Op.ACCUMULATE else "-->"
        assert all(arrow == expected_arrow for _, _, arrow in operands)


def test_mermaid_escapes_quotes_in_ids() -> None:
    graph = tgn.build_graph(128, chunk_size=64, topology="tree").relabel({"p0": 'p"0<b>'})
    _, nodes, _ = _parse_mermaid(tgn.to_mermaid(graph))
    assert any(label.startswith("p#quot;0#lt;b#gt;") for label in nodes.values())


# --- proofs in the picture -----------------------------------------------------


def test_proof_caption_and_refuted_race_highlight() -> None:
    graph = tgn.build_graph(512, chunk_size=64, topology="race")
    proof = FakeProof(False, True, "refuted", "fp-3141592653")
    dot = tgn.to_dot(graph, proof=proof)
    assert "deterministic: NO" in dot and "rule: refuted" in dot and "fp-3141592653" in dot
    assert re.search(r'"accumulate" \[label="accumulate\\nACCUMULATE[^"]*refuted[^]]*penwidth="3"', dot)
    assert build_scene(graph, proof).highlighted == ("accumulate",)
    title, nodes, _ = _parse_mermaid(tgn.to_mermaid(graph, proof=proof))
    assert "rule: refuted" in title and "fp-3141592653" in title
    assert "class n" in tgn.to_mermaid(graph, proof=proof).split("classDef refuted")[1]


def test_certified_proof_highlights_nothing() -> None:
    """Negative control for the highlight: a certified race (exact rule) is not blamed."""
    graph = tgn.build_graph(512, chunk_size=64, topology="race", accumulate="exact")
    scene = build_scene(graph, FakeProof(True, True, "exact", "abc"))
    assert scene.highlighted == ()
    assert "deterministic: yes" in scene.caption[0] and "rule: exact" in scene.caption[0]


def test_witness_node_is_the_one_blamed() -> None:
    base = tgn.build_graph(256, chunk_size=64, topology="tree")
    # Two races; the witness names the second one.
    graph = base.add_nodes(
        Node("race_a", Op.ACCUMULATE, ("p0", "p1", "p2")),
    ).replace_node(Node("tree2.0", Op.ACCUMULATE, ("tree1.0", "tree1.1", "race_a")))

    @dataclass(frozen=True)
    class Witness:
        node: str

    scene = build_scene(graph, FakeProof(False, True, "refuted", "f", Witness("tree2.0")))
    assert scene.highlighted == ("tree2.0",)
    assert set(build_scene(graph, FakeProof(False, True, "refuted", "f")).highlighted) == {
        "race_a", "tree2.0"
    }


# --- collapsing large graphs ----------------------------------------------------


def test_collapse_threshold_boundary() -> None:
    at = tgn.build_graph(64 * COLLAPSE_THRESHOLD, chunk_size=64, topology="tree")
    above = tgn.build_graph(64 * COLLAPSE_THRESHOLD + 1, chunk_size=64, topology="tree")
    assert not build_scene(at).collapsed
    assert build_scene(above).collapsed
    assert build_scene(at, collapse=True).collapsed and not build_scene(above, collapse=False).collapsed


@pytest.mark.parametrize("topology", ["linear", "tree", "race", "cat"])
def test_collapsed_4096_chunks_is_fast_and_accounts_for_every_node(topology: str, tmp_path: Path) -> None:
    graph = tgn.build_graph(4096 * 64, chunk_size=64, topology=topology, accumulate="exact")
    start = time.perf_counter()
    scene = build_scene(graph)
    dot = tgn.to_dot(graph)
    tgn.to_mermaid(graph)
    assert time.perf_counter() - start < 5
    assert scene.collapsed and len(scene.boxes) < 40
    assert sum(b.count for b in scene.boxes) == len(graph)
    assert sum(link.count for link in scene.links) == _operand_edges(graph)
    assert "SUMSQ \u00d74096" in dot and "ROWMAX \u00d74096" in dot
    if topology == "tree":
        assert "ADD level 1 \u00d72048" in dot and "0,1 \u00d74096" in dot
    if topology == "linear":
        assert '"ADD" -> "ADD"' in dot  # the fold feeds itself at operand 0
    if not HAVE_DOT:
        pytest.importorskip("matplotlib")
    start = time.perf_counter()
    tgn.render(graph, tmp_path / "big.svg")
    assert time.perf_counter() - start < 20


def test_full_layout_has_no_overlapping_boxes() -> None:
    for topology in ("linear", "tree", "race", "cat"):
        for chunks in (4, 16, 32):
            scene = build_scene(tgn.build_graph(64 * chunks, chunk_size=64, topology=topology,
                                                accumulate="exact"))
            rows: dict[int, list[float]] = {}
            for x, rank in _layer_positions(scene).values():
                rows.setdefault(rank, []).append(x)
            for xs in rows.values():
                xs.sort()
                assert all(b - a >= 1.0 - 1e-9 for a, b in zip(xs, xs[1:]))


# --- files ----------------------------------------------------------------------

ENGINES = [
    pytest.param("matplotlib", id="matplotlib"),
    pytest.param("graphviz", id="graphviz",
                 marks=pytest.mark.skipif(not HAVE_DOT, reason="Graphviz program not installed")),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("topology", ["linear", "race"])
def test_render_png_and_svg(engine: str, topology: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib" if engine == "matplotlib" else "graphviz")
    graph = tgn.build_graph(300, chunk_size=64, topology=topology, accumulate="exact")
    proof = FakeProof(False, True, "refuted", "deadbeef") if topology == "race" else None
    png = tgn.render(graph, tmp_path / "g.png", proof, engine=engine)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    svg = tgn.render(graph, tmp_path / "g.svg", proof, engine=engine)
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    if engine == "graphviz":  # matplotlib draws text as paths, Graphviz keeps it
        text = svg.read_text()
        assert "p4" in text and ("deadbeef" in text) == (proof is not None)


@pytest.mark.parametrize("suffix", [".dot", ".gv", ".mmd"])
def test_render_text_formats(suffix: str, tmp_path: Path) -> None:
    graph = tgn.build_graph(256, chunk_size=64, topology="tree")
    out = tgn.render(graph, tmp_path / f"g{suffix}")
    expected = tgn.to_mermaid(graph) if suffix == ".mmd" else tgn.to_dot(graph)
    assert out.read_text() == expected


def test_render_rejects_unknown_suffix_and_engine(tmp_path: Path) -> None:
    graph = tgn.build_graph(256, chunk_size=64, topology="tree")
    with pytest.raises(ConfigError, match=r"\.svg, \.png"):
        tgn.render(graph, tmp_path / "g.jpg")
    with pytest.raises(ConfigError, match="engine"):
        tgn.render(graph, tmp_path / "g.svg", engine="tikz")


def test_invalid_graph_is_refused_before_drawing() -> None:
    graph = tgn.build_graph(256, chunk_size=64, topology="tree")
    broken = graph.replace_node(graph["tree1.0"].replace(inputs=("p0", "nope")))
    with pytest.raises(tgn.GraphError, match="nope"):
        tgn.to_dot(broken)


# --- optional dependencies --------------------------------------------------------


def _hide(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in names:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    import importlib

    real_import_module = importlib.import_module

    def fake_import_module(name: str, package: str | None = None) -> Any:
        if name.split(".")[0] in names:
            raise ImportError(f"No module named {name!r}")
        return real_import_module(name, package)

    monkeypatch.setattr(importlib, "import_module", fake_import_module)


def test_missing_matplotlib_and_graphviz_gives_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide(monkeypatch, "matplotlib", "graphviz")
    graph = tgn.build_graph(256, chunk_size=64, topology="tree")
    with pytest.raises(MissingDependencyError, match=r"pip install 'taskgraph-norm\[viz\]'") as info:
        tgn.render(graph, tmp_path / "g.png")
    assert isinstance(info.value, ImportError) and info.value.package == "matplotlib"
    # Text output still works with nothing optional installed.
    assert tgn.to_dot(graph).startswith("digraph") and "flowchart" in tgn.to_mermaid(graph)
    tgn.render(graph, tmp_path / "g.dot")


def test_missing_graphviz_falls_back_to_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _hide(monkeypatch, "graphviz")
    graph = tgn.build_graph(256, chunk_size=64, topology="tree")
    out = tgn.render(graph, tmp_path / "g.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(MissingDependencyError, match="apt-get install graphviz"):
        tgn.render(graph, tmp_path / "g.svg", engine="graphviz")


def test_missing_dot_program_falls_back_to_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    graph = tgn.build_graph(256, chunk_size=64, topology="tree")
    svg = tgn.render(graph, tmp_path / "g.svg")
    # matplotlib's SVG says who made it; Graphviz's does not.
    assert "Matplotlib" in svg.read_text()[:2000]


def test_missing_dot_program_gives_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    graphviz = pytest.importorskip("graphviz")

    def no_dot(*args: Any, **kwargs: Any) -> Any:
        raise graphviz.ExecutableNotFound(("dot",))

    monkeypatch.setattr(graphviz.Source, "pipe", no_dot)
    graph = tgn.build_graph(256, chunk_size=64, topology="tree")
    with pytest.raises(MissingDependencyError, match="Graphviz program"):
        tgn.render(graph, tmp_path / "g.svg", engine="graphviz")


def test_viz_imports_only_graph_and_errors() -> None:
    """Layering (docs/design.md, "Layout and layering"): no torch, no executor, optional deps only lazily."""
    allowed_ours = {"graph", "errors", "scene", "scene_types", "text", "render", "_optional", "timeline"}
    for path in VIZ_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for stmt in tree.body:  # module level only: lazy imports inside functions are fine
            if isinstance(stmt, ast.Import):
                roots = {a.name.split(".")[0] for a in stmt.names}
                assert not roots & {"torch", "matplotlib", "graphviz", "networkx", "pydot"}, path
            elif isinstance(stmt, ast.ImportFrom):
                if stmt.level == 0:
                    assert stmt.module.split(".")[0] not in {"torch", "matplotlib", "graphviz"}, path
                else:
                    assert (stmt.module or "").split(".")[0] in allowed_ours, (path, stmt.module)


def test_public_reexports() -> None:
    assert tgn.to_dot is tgn.viz.to_dot and tgn.render is tgn.viz.render
    assert {"to_dot", "to_mermaid", "render", "MissingDependencyError"} <= set(tgn.__all__)


# --- command line ---------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".svg", ".png", ".dot", ".mmd"])
def test_cli_viz_writes_each_format(suffix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if suffix in (".svg", ".png"):
        pytest.importorskip("matplotlib")
    out = tmp_path / f"dag{suffix}"
    rc = main(["viz", "--topology", "race", "--hidden-size", "512", "--chunk-size", "64",
               "--leaf", "native", "--accumulate", "exact", "-o", str(out)])
    assert rc == 0 and out.stat().st_size > 0
    assert str(out) in capsys.readouterr().out
    if suffix == ".dot":
        assert "ACCUMULATE" in out.read_text() and "ROWMAX" in out.read_text()


def test_cli_viz_prove_puts_the_verdict_in_the_caption(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "race.dot"
    rc = main(["viz", "--topology", "race", "--hidden-size", "512", "--prove", "-o", str(out)])
    from taskgraph_norm.prover.rules import prove

    assert rc == 0
    text = out.read_text()
    assert "rule: refuted" in text and prove(tgn.build_graph(512, topology="race")).fingerprint in text
    assert re.search(r'"accumulate" \[[^]]*penwidth="3"', text)


def test_cli_viz_errors_are_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["viz", "--hidden-size", "512", "-o", str(tmp_path / "dag.jpg")]) == 2
    assert "expected a file name ending in" in capsys.readouterr().err
    assert main(["viz", "--hidden-size", "0", "-o", str(tmp_path / "dag.dot")]) == 2
    with pytest.raises(SystemExit):
        main(["viz", "--topology", "bogus", "--hidden-size", "8", "-o", "x.dot"])


# --- timelines ------------------------------------------------------------------


def _simulated_trace(graph: Graph, workers: int, cost: dict[str, float]) -> list[dict[str, Any]]:
    """List-schedule the graph on ``workers`` (earliest-free worker first), the
    way a recorder would log it: one dict per node."""
    free = [0.0] * workers
    done: dict[str, float] = {}
    events = []
    for nid in graph.topological_order:
        ready = max((done[i] for i in graph[nid].inputs), default=0.0)
        w = min(range(workers), key=lambda k: max(free[k], ready))
        start = max(free[w], ready)
        end = start + cost.get(graph[nid].op.name, 1e-4)
        free[w], done[nid] = end, end
        events.append({"node": nid, "stream": f"worker-{w}", "start": 5.0 + start, "end": 5.0 + end})
    return events


def test_critical_path_follows_the_slowest_operand() -> None:
    from taskgraph_norm.viz import TimelineEvent, critical_path

    graph = tgn.build_graph(256, chunk_size=64, topology="tree")
    slow = {"p2": 9.0}
    events = [TimelineEvent(n, "w", 0.0, slow.get(n, 1.0)) for n in ("x", "p0", "p1", "p2", "p3")]
    events += [TimelineEvent("tree1.0", "w", 1.0, 2.0), TimelineEvent("tree1.1", "w", 9.0, 10.0),
               TimelineEvent("tree2.0", "w", 10.0, 11.0), TimelineEvent("finalize", "w", 11, 12),
               TimelineEvent("y", "w", 12, 12.5)]
    assert critical_path(events, graph) == ("x", "p2", "tree1.1", "tree2.0", "finalize", "y")
    # Negative control: make p0 the slow one and the path moves with it.
    moved = [e if e.node != "p0" else TimelineEvent("p0", "w", 0.0, 9.5) for e in events]
    moved = [e if e.node != "tree1.0" else TimelineEvent("tree1.0", "w", 9.5, 10.0) for e in moved]
    assert critical_path(moved, graph)[1:3] == ("p0", "tree1.0")
    assert critical_path(events, None) == ("y",)


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_render_timeline_from_synthetic_trace(suffix: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from taskgraph_norm.viz import render_timeline

    graph = tgn.build_graph(512, chunk_size=64, topology="tree")
    trace = _simulated_trace(graph, 3, {"SUMSQ": 3e-4, "ADD": 1e-4})
    out = render_timeline(trace, tmp_path / f"t{suffix}", graph)
    data = out.read_bytes()
    if suffix == ".png":
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert ET.fromstring(data).tag.endswith("svg")

    @dataclass
    class Trace:  # the attribute form: .events and .graph
        events: list[Any]
        graph: Graph

    render_timeline(Trace(trace, graph), tmp_path / "attr.png")


def test_render_timeline_rejects_bad_traces(tmp_path: Path) -> None:
    from taskgraph_norm.viz import render_timeline

    with pytest.raises(ConfigError, match="at least one event"):
        render_timeline([], tmp_path / "t.png")
    with pytest.raises(ConfigError, match="end >= start"):
        render_timeline([{"node": "a", "worker": 0, "start": 2, "end": 1}], tmp_path / "t.png")
    with pytest.raises(ConfigError, match="worker"):
        render_timeline([{"node": "a", "start": 0, "end": 1}], tmp_path / "t.png")
    with pytest.raises(ConfigError, match=r"\.svg or \.png"):
        render_timeline([{"node": "a", "worker": 0, "start": 0, "end": 1}], tmp_path / "t.pdf")


def test_doc_page_images_exist_and_are_pngs_or_svgs() -> None:
    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "viz.md").read_text()
    images = re.findall(r"\]\((images/[^)]+)\)", page)
    assert len(images) >= 7
    for rel in images:
        data = (root / "docs" / rel).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" if rel.endswith(".png") else b"<svg" in data[:2000]
    assert "python scripts/make_doc_images.py" in page
