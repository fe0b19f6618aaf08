"""Timelines of real traced runs (the concurrent executor's Trace), API and CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

import taskgraph_norm as tgn
from taskgraph_norm.tools.cli import main
from taskgraph_norm.tools.report import traced_run
from taskgraph_norm.viz.timeline import critical_path, timeline_events

pytest.importorskip("matplotlib")


def test_a_real_trace_becomes_timeline_events_and_a_picture(tmp_path: Path) -> None:
    g = tgn.build_graph(512, chunk_size=64, topology="tree")
    trace = traced_run(g, rows=32, max_workers=2)
    events = timeline_events(trace, g)
    assert {e.node for e in events} == {s.node for s in trace.spans}
    assert all(e.end >= e.start for e in events)
    path = critical_path(events, g)
    assert path[-1] == "finalize" and path[0].startswith("p")
    for a, b in zip(path, path[1:]):
        assert a in g[b].inputs  # every step follows an operand edge
    out = tgn.render_timeline(trace, tmp_path / "t.png", g)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_viz_timeline_writes_png_svg_and_chrome_json(tmp_path: Path, capsys) -> None:
    for name in ("t.png", "t.svg"):
        rc = main(["viz", "--topology", "race", "--hidden-size", "256", "--chunk-size", "32",
                   "--timeline", "--rows", "8", "-o", str(tmp_path / name), "--chrome", str(tmp_path / "t.json")])
        assert rc == 0
        assert (tmp_path / name).stat().st_size > 0
    assert '"traceEvents"' in (tmp_path / "t.json").read_text()
    assert "wrote" in capsys.readouterr().out
