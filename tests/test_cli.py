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


def test_interleaved_rounds_shuffle_the_order() -> None:
    """Each round calls every method once, in an order of its own that is the same
    every run, so no method always runs right after the same one (what a call leaves
    behind, such as a trimmed heap, falls on different methods in different rounds);
    a rotation of one order, which keeps every method's predecessor, must fail this."""
    from taskgraph_norm.tools.bench import interleaved_times

    def run() -> tuple[list[str], dict[str, list[float]]]:
        calls: list[str] = []
        methods = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
        return calls, interleaved_times(methods, 12)

    calls, times = run()
    assert calls[:4] == list("abcd")  # the warm-up, in order
    rounds = [calls[4 + 4 * r: 8 + 4 * r] for r in range(12)]
    assert all(sorted(r) == list("abcd") for r in rounds)
    assert run()[0] == calls  # the same orders every run
    before = {m: {r[r.index(m) - 1] for r in rounds if r.index(m) > 0} for m in "abcd"}
    assert all(len(p) >= 2 for p in before.values()), before
    assert {k: len(v) for k, v in times.items()} == {k: 12 for k in "abcd"}
    assert interleaved_times({}, 3) == {}
