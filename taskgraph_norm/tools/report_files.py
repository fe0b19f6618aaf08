"""``taskgraph-norm report --out DIR``: the report as a Markdown page with pictures.

Writes ``report.md`` (the table, viewable in any Markdown viewer), one merge-DAG
picture per topology (LayerNorm's graphs for ``--norm layer``) with its proof in the
caption, and (RMSNorm) a timeline of one traced run of the race row on the
concurrent executor.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..prover import prove
from .report import ReportConfig, traced_run
from ..topologies import build_graph, build_layer_graph
from ..viz import render, render_timeline

__all__ = ["write_report_dir", "PICTURED_TOPOLOGIES"]

PICTURED_TOPOLOGIES = ("linear", "tree", "race", "cat")


def write_report_dir(config: ReportConfig, text: str, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``report.md`` and its pictures into ``out_dir``; return the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hidden = config.shape[-1]
    written: list[Path] = []
    sections = []
    build = build_layer_graph if config.norm == "layer" else build_graph
    for topology in PICTURED_TOPOLOGIES:
        graph = build(hidden, chunk_size=config.chunk_size, topology=topology, leaf=config.leaf)
        written.append(render(graph, out / f"dag-{topology}.svg", prove(graph)))
        sections.append(f"### {topology}\n\n![{topology} merge DAG](dag-{topology}.svg)\n")
    timeline = [
        "## One run of the race on the concurrent executor",
        "",
        "Rows are worker threads, bars are nodes; the critical path is outlined in red. "
        "The race merges partials in the order these bars end.",
        "",
        "![timeline of the race row](timeline-race.svg)",
        "",
    ]
    if config.norm == "layer":
        timeline = []  # (the concurrent executor runs RMSNorm graphs only)
    else:
        race = build_graph(hidden, chunk_size=config.chunk_size, topology="race", leaf=config.leaf)
        rows = min(256, max(1, _rows_of(config)))
        trace = traced_run(race, rows=rows, max_workers=2, schedule="fifo", seed=config.seed)
        written.append(render_timeline(
            trace, out / "timeline-race.svg", race,
            title=f"race, D={hidden}, chunk={config.chunk_size}: one run of {rows} rows, fifo schedule",
        ))
    page = "\n".join([
        "# taskgraph-norm report",
        "",
        "```text",
        text.rstrip("\n"),
        "```",
        "",
        "## Merge DAGs",
        "",
        "Each picture's caption carries the prover's verdict, rule and fingerprint; "
        "large graphs are drawn as per-level summaries.",
        "",
        *sections,
        *timeline,
    ])
    report = out / "report.md"
    report.write_text(page, encoding="utf-8")
    return [report, *written]


def _rows_of(config: ReportConfig) -> int:
    rows = 1
    for d in config.shape[:-1]:
        rows *= d
    return rows
