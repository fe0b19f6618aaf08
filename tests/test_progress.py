"""Progress bars (``taskgraph_norm/tools/progress.py``): a tqdm bar on stderr when it is
a terminal, nothing when it is not (pytest's capture, CI, a pipe), and stdout the same
bytes either way.  Each quiet check has its counterpart on a fake terminal that must
see a bar, so a bar that never draws cannot pass for a quiet one."""

from __future__ import annotations

import io
import itertools
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks import common, versions
from taskgraph_norm.tools import bench
from taskgraph_norm.tools.cli import main
from taskgraph_norm.tools.progress import progress_bar


class FakeTerminal(io.StringIO):
    """A stderr that says it is a terminal and keeps what is written to it."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def steady_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Makes every timed call take exactly 1 ms (a fresh clock per call of the fixture's
    value), so two runs print the same table and any byte of difference is the bar's."""

    def reset() -> None:
        ticks = itertools.count()
        monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks) * 1e-3))

    return reset


def _stdout_and_stderr(
    run: Callable[[], object], terminal: bool, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> tuple[str, str]:
    """``run()``'s stdout and stderr, with stderr pytest's capture or a fake terminal."""
    capsys.readouterr()
    fake = FakeTerminal()
    with monkeypatch.context() as patch:
        if terminal:
            patch.setattr(sys, "stderr", fake)
        run()
    captured = capsys.readouterr()
    return captured.out, fake.getvalue() if terminal else captured.err


def test_the_bar_draws_on_a_terminal_only(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def count() -> None:
        with progress_bar(3, "counting", unit="round") as bar:
            for _ in range(3):
                bar.update()

    assert not sys.stderr.isatty()  # pytest's capture: what CI and a pipe look like
    assert _stdout_and_stderr(count, False, capsys, monkeypatch) == ("", "")
    out, drawn = _stdout_and_stderr(count, True, capsys, monkeypatch)
    assert out == "" and "counting:" in drawn and "0/3" in drawn
    assert drawn.endswith("\r")  # leave=False: the bar's line is cleared at the end


def test_report_draws_on_a_terminal_and_prints_the_same_table(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, steady_clock: Callable[[], None],
) -> None:
    # One chunk per row: the race rows have one order to run in, so the table is the
    # same bytes every run (with the steady clock).
    argv = ["report", "--shape", "4x64", "--chunk-size", "64", "--repeats", "3"]

    def report() -> None:
        steady_clock()
        assert main(argv) == 0

    piped, quiet = _stdout_and_stderr(report, False, capsys, monkeypatch)
    shown, drawn = _stdout_and_stderr(report, True, capsys, monkeypatch)
    assert quiet == ""
    assert "report:" in drawn and "/10" in drawn  # 3 rounds + 7 rows checked
    assert shown == piped and "| V3 tree" in piped


def test_bench_draws_on_a_terminal_and_prints_the_same_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    steady_clock: Callable[[], None],
) -> None:
    config = bench.BenchConfig(shapes=((8, 256),), dtypes=("float32",), batches=(1,), rounds=1,
                               torch_compile=False, memory=False, out_dir=tmp_path)

    def run() -> None:
        steady_clock()
        bench.run_bench(config, stream=sys.stdout)

    piped, quiet = _stdout_and_stderr(run, False, capsys, monkeypatch)
    shown, drawn = _stdout_and_stderr(run, True, capsys, monkeypatch)
    assert quiet == ""
    assert "bench:" in drawn and "rounds:" in drawn  # the steps and each step's rounds
    assert shown == piped and "| 8x256 float32 |" in piped


class _Timer:
    def time(self, case: str) -> float:
        return 1.0


#: The benchmark scripts' shared loops and the label of the bar each draws.
LOOPS: dict[str, tuple[Callable[[], object], str]] = {
    "interleaved_medians": (lambda: bench.interleaved_medians({"a": lambda: None}, 3), "rounds:"),
    "median_seconds": (lambda: common.median_seconds(lambda: None, repeats=3), "repeats:"),
    "versions.run_rounds": (lambda: versions.run_rounds(_Timer(), _Timer(), ["a"], 3, "run 1/2"), "run 1/2:"),
}


@pytest.mark.parametrize("name", list(LOOPS))
def test_benchmark_loops_draw_on_a_terminal_only(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop, label = LOOPS[name]
    assert _stdout_and_stderr(loop, False, capsys, monkeypatch) == ("", "")
    out, drawn = _stdout_and_stderr(loop, True, capsys, monkeypatch)
    assert out == "" and label in drawn and "/3" in drawn
