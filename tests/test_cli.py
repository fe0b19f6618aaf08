from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from taskgraph_norm.tools.cli import build_parser, main
from taskgraph_norm.tools.report import SYSTEMS, ReportConfig, measure_rows


def test_report_prints_every_row_of_the_original_report(capsys) -> None:
    assert main(["report", "--shape", "3x20x256", "--repeats", "3", "--chunk-size", "32"]) == 0
    out = capsys.readouterr().out
    for system in SYSTEMS:
        assert f"| {system.name} " in out
    assert "| best: " in out
    for column in ("median ms", "run-to-run max diff", "max diff vs standard",
                   "batch-invariant (measured)", "max abs err vs fp64"):
        assert column in out


def test_report_measures_what_it_claims() -> None:
    rows = {r.name: r for r in measure_rows(ReportConfig(shape=(64, 1024), repeats=8, seed=1))}
    for name in ("V1 linear", "V3 tree", "V4 cat"):
        assert rows[name].run_spread == 0 and rows[name].batch_invariant
    # The unordered variant draws a fresh random schedule per run: its spread is
    # measured, not assumed.  (V2 under Fifo races on real thread timing, which may
    # or may not reorder within a few runs on a quiet machine, so it is not asserted.)
    assert rows["variant (unordered)"].run_spread > 0
    assert not rows["variant (unordered)"].batch_invariant
    assert rows["standard"].diff_vs_standard == 0
    # The exact accumulator makes the very same shuffled race order-free.
    assert rows["V2 race + exact"].run_spread == 0 and rows["V2 race + exact"].batch_invariant
    assert rows["V2 race (lock)"].proved.startswith("refuted")
    assert rows["V3 tree"].proved.startswith("certified")
    assert all(r.agrees for r in rows.values()), "a measurement contradicts a certificate"
    assert all(r.max_ulp_err < 16 for r in rows.values())


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_report_other_dtypes(dtype: str, capsys) -> None:
    assert main(["report", "--shape", "8x128", "--dtype", dtype, "--repeats", "2", "--seed", "3"]) == 0
    assert dtype in capsys.readouterr().out


def test_bad_arguments_exit_with_usage(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["report", "--shape", "4xabc"])
    assert info.value.code == 2
    assert "shape must look like" in capsys.readouterr().err
    assert main(["report", "--shape", "4x64", "--chunk-size", "0"]) == 2
    assert "chunk_size=0 is invalid" in capsys.readouterr().err


def test_module_entry_point_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "taskgraph_norm", "report", "--shape", "4x64", "--repeats", "1"],
        capture_output=True, text=True, check=True,
    )
    assert "V3 tree" in out.stdout


def test_report_rejects_empty_shapes_and_zero_repeats(capsys) -> None:
    assert main(["report", "--shape", "0x64"]) == 2
    assert "shape=(0, 64) is invalid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", "--repeats", "0"])


def test_report_out_writes_markdown_with_pictures(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "rep"
    assert main(["report", "--shape", "16x256", "--repeats", "2", "--chunk-size", "64", "--out", str(out)]) == 0
    page = (out / "report.md").read_text()
    assert "| V3 tree " in page
    for name in ("dag-linear.svg", "dag-tree.svg", "dag-race.svg", "dag-cat.svg", "timeline-race.svg"):
        assert f"]({name})" in page
        assert (out / name).stat().st_size > 0
        assert (out / name).read_text().lstrip().startswith(("<?xml", "<svg"))
    assert f"wrote {out / 'report.md'}" in capsys.readouterr().out


def _undocumented_options(parser: argparse.ArgumentParser) -> list[str]:
    """Options of every subcommand with no help, or whose help does not end with
    ``(default: X)`` where the option has a default."""
    problems = []
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, subparser in sub.choices.items():
        text = " ".join(subparser.format_help().split())
        for action in subparser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = f"{command} {'/'.join(action.option_strings) or action.dest}"
            if not action.help:
                problems.append(f"{name}: no help")
            elif action.default is not None:
                shown = " ".join(action.help.split())
                if f"{shown} (default: {action.default})" not in text:
                    problems.append(f"{name}: help does not state the default {action.default!r}")
    return problems


def test_every_option_has_help_with_its_default(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "10000")  # one line per help, so no wrap splits a default
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"report", "prove", "viz", "bench"}
    assert _undocumented_options(parser) == []
    assert "(default: 4x256x4096)" in sub.choices["report"].format_help()
    # Negative control: argparse's plain formatter states no default, and an option
    # without help is caught.
    plain = argparse.ArgumentParser()
    toy = plain.add_subparsers().add_parser("toy")
    toy.add_argument("--rounds", type=int, default=7, help="timed rounds")
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--out", help="no default, nothing to state")
    assert _undocumented_options(plain) == [
        "toy --rounds: help does not state the default 7", "toy --seed: no help",
    ]


def _carry_over_balanced(orders: list[list[str]]) -> bool:
    """Every method right after every other one equally often, and at every place
    equally often, over ``orders``."""
    from collections import Counter

    names = sorted(orders[0])
    follows = Counter((a, b) for o in orders for a, b in zip(o, o[1:]))
    places = Counter((i, m) for o in orders for i, m in enumerate(o))
    return (len(follows) == len(names) * (len(names) - 1) and len(set(follows.values())) == 1
            and len(places) == len(names) ** 2 and len(set(places.values())) == 1)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7])
def test_interleaved_rounds_balance_carry_over(n: int) -> None:
    """Each round calls every method once, in the orders of ``balanced_orders``: the
    same every run, and over a whole period every method follows every other one
    equally often and holds every place equally often, so what a call leaves behind
    (eager's temporaries evicting the caches, a trimmed heap) falls on each method
    alike.  Negative controls: a rotation of one order, and the seeded shuffles the
    rounds used before (which put one method after eager's calls in 6 of 9 rounds and
    another in 1), must fail the same check."""
    import random

    from taskgraph_norm.tools.bench import balanced_orders, interleaved_times

    names = "abcdefg"[:n]
    period = len(balanced_orders(n))
    assert period == (2 * n if n % 2 else n)
    cycle = n * period

    def run() -> tuple[list[str], dict[str, list[float]]]:
        calls: list[str] = []
        methods = {name: (lambda name=name: calls.append(name)) for name in names}
        return calls, interleaved_times(methods, cycle)

    calls, times = run()
    assert calls[:n] == list(names)  # the warm-up, in order
    rounds = [calls[n + n * r: 2 * n + n * r] for r in range(cycle)]
    assert all(sorted(r) == list(names) for r in rounds)
    assert run()[0] == calls  # the same orders every run
    for p in range(n):  # each period balanced; the next one moves every method along
        assert _carry_over_balanced(rounds[p * period: (p + 1) * period])
        shifted = [[names[(names.index(m) + p) % n] for m in o] for o in rounds[:period]]
        assert rounds[p * period: (p + 1) * period] == shifted
    # over the n periods each method is first in a round (after the round before's
    # last, which the design leaves unbalanced) equally often
    firsts = [r[0] for r in rounds]
    assert len({firsts.count(m) for m in names}) == 1
    assert {k: len(v) for k, v in times.items()} == {k: cycle for k in names}
    rotations = [list(names[r:] + names[:r]) for r in range(n)]
    assert not _carry_over_balanced(rotations) or n == 2
    shuffled = []
    for r in range(period):
        order = list(names)
        random.Random(r).shuffle(order)
        shuffled.append(order)
    assert not _carry_over_balanced(shuffled) or n == 2


def test_interleaved_rounds_settle_each_timing() -> None:
    """``settle[name]`` runs untimed right before each timed call of ``name`` (so every
    timed call follows its own method), and only for the names it has."""
    from taskgraph_norm.tools.bench import interleaved_times

    calls: list[str] = []
    methods = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    settle = {name: (lambda name=name: calls.append(name + "~")) for name in "ab"}
    times = interleaved_times(methods, 6, settle=settle)
    rounds = calls[3:]
    assert len(rounds) == 6 * 5 and rounds.count("c~") == 0
    for i, c in enumerate(rounds):
        if c in ("a", "b"):
            assert rounds[i - 1] == c + "~"
        if c.endswith("~"):
            assert rounds[i + 1] == c[0]
    assert {k: len(v) for k, v in times.items()} == {k: 6 for k in "abc"}


def test_interleaved_rounds_edge_cases() -> None:
    from taskgraph_norm.tools.bench import balanced_orders, interleaved_times

    assert balanced_orders(0) == [[]] and balanced_orders(1) == [[0]]
    assert interleaved_times({}, 3) == {}
