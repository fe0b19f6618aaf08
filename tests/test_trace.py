"""Traces: frozen records of spans and decisions, Chrome trace JSON, profiler ranges."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm.executors.concurrent.schedules import Random

from ._executor_helpers import BACKENDS, run, wide_input

G = tgn.build_graph(512, chunk_size=64, topology="race")
X = wide_input(2, 512, seed=21)


def _trace(backend: str = "asyncio", **options: object) -> tgn.Trace:
    traces: list[tgn.Trace] = []
    run(lambda: tgn.execute(G, X, executor="concurrent", trace=traces.append, **options), backend=backend)
    assert len(traces) == 1
    return traces[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_trace_records_every_node_and_decision(backend: str) -> None:
    tr = _trace(backend, schedule=Random(1))
    ids = [n.id for n in G]
    assert tr.node_ids == tuple(ids)
    assert sorted(tr.completion_order) == sorted(ids)  # every node completes once
    assert sorted(tr.dispatch_order) == sorted(ids)
    assert len(tr.decisions) == 2 * len(ids)
    worked = {s.node for s in tr.spans}
    assert worked == {n.id for n in G if n.op not in (tgn.Op.INPUT, tgn.Op.OUTPUT)}
    for s in tr.spans:
        assert 0 <= s.start_ns <= s.end_ns and s.worker.startswith("tgn-")
    assert sorted(tr.arrival["accumulate"]) == list(range(8))
    # The arrival order is the completion order of the partials.
    partials = [n.id for n in G if n.op is tgn.Op.SUMSQ]
    completed = [n for n in tr.completion_order if n in partials]
    assert tuple(partials.index(n) for n in completed) == tr.arrival["accumulate"]


def test_trace_values_are_frozen() -> None:
    tr = _trace()
    with pytest.raises(dataclasses.FrozenInstanceError):
        tr.schedule = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        tr.spans[0].node = "x"  # type: ignore[misc]


def test_to_chrome_writes_trace_event_json(tmp_path: Path) -> None:
    tr = _trace()
    path = tmp_path / "run.json"
    tr.to_chrome(path)
    data = json.loads(path.read_text())
    events = data["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert len(spans) == len(tr.spans)
    assert {e["name"] for e in spans} == {s.node for s in tr.spans}
    for e in spans:
        assert e["dur"] >= 0 and isinstance(e["tid"], int) and e["cat"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert set(tr.workers) <= names
    assert len([e for e in events if e["ph"] == "i"]) == len(tr.decisions)


def test_nodes_appear_as_profiler_ranges() -> None:
    from torch.profiler import _ExperimentalConfig

    config = _ExperimentalConfig(profile_all_threads=True)  # the nodes run on worker threads
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], experimental_config=config) as prof:
        run(lambda: tgn.execute(G, X, executor="concurrent"))
    names = {e.name for e in prof.events()}
    assert "tgn.accumulate:accumulate" in names
    assert any(n.startswith("tgn.sumsq:p") for n in names)
