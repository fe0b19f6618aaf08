"""``benchmarks/versions.py``'s parts that start no process: its options, the order of
the interleaved rounds, the table and summary from made-up timings, and the worker's
check that every package module it loaded came from its own tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import versions


def test_options_default_to_both_suites_one_run_of_fifteen_rounds_and_five_percent() -> None:
    options = versions.parse_args(["--old", "abc123", "--new", "."])
    assert options == versions.Options("abc123", ".", 15, "both", 0.05, 0, runs=1)
    assert versions.parse_args(["--old", "a", "--new", "b", "--runs", "3"]).runs == 3


@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--runs", "0"], ["--suite", "nope"], ["--tolerance", "1.5"], ["--threads", "-1"]])
def test_bad_options_are_refused(bad: list[str]) -> None:
    with pytest.raises(SystemExit):
        versions.parse_args(["--old", "a", "--new", "b", *bad])


def test_a_directory_without_the_package_is_refused(tmp_path: Path) -> None:
    with pytest.raises(versions.VersionsError, match="no taskgraph_norm"):
        with versions.checkout(str(tmp_path), tmp_path):
            pass


def test_a_spec_that_is_neither_a_directory_nor_a_rev_is_refused(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    with pytest.raises(versions.VersionsError, match="neither a directory nor a git rev"):
        with versions.checkout(str(tmp_path / "no-such-rev-or-dir"), repo):
            pass


class FakeTimer:
    """Answers from a table of per-round seconds and logs who was asked what."""

    def __init__(self, name: str, seconds: dict[str, list[float]], log: list[tuple[str, str]]) -> None:
        self.name, self.seconds, self.log = name, {k: iter(v) for k, v in seconds.items()}, log

    def time(self, case: str) -> float:
        self.log.append((self.name, case))
        return next(self.seconds[case])


def test_rounds_alternate_which_version_goes_first_and_rotate_the_cases() -> None:
    log: list[tuple[str, str]] = []
    ones = {c: [1.0] * 3 for c in "ab"}
    old, new = versions.run_rounds(FakeTimer("old", ones, log), FakeTimer("new", ones, log), ["a", "b"], 3)
    assert log == [("old", "a"), ("new", "a"), ("old", "b"), ("new", "b"),   # round 0: old first
                   ("new", "b"), ("old", "b"), ("new", "a"), ("old", "a"),   # round 1: new first, from b
                   ("old", "a"), ("new", "a"), ("old", "b"), ("new", "b")]
    assert old == new == {"a": [1.0] * 3, "b": [1.0] * 3}


def test_the_table_gives_medians_ratios_and_flags_a_case_outside_the_tolerance() -> None:
    old = {"same": [1e-6, 1e-6, 9e-6], "slower": [1e-3, 1e-3, 1e-3], "faster": [2e-3, 2e-3, 2e-3]}
    new = {"same": [1.0e-6, 0.99e-6, 9e-6], "slower": [1.1e-3, 1.2e-3, 1.1e-3], "faster": [1.8e-3, 1.8e-3, 1.8e-3]}
    rows = versions.compare(old, new, {"same": 256, "slower": 1, "faster": 1})
    by_case = {r.case: r for r in rows}
    assert by_case["same"].old_s == 1e-6 and by_case["same"].new_s == 1e-6  # medians, not means
    assert by_case["slower"].ratio == pytest.approx(1.1)
    assert [r.verdict(0.05) for r in rows] == ["yes", "no, slower", "no, faster"]
    assert by_case["slower"].middle_half() == pytest.approx((1.1, 1.15))
    text = versions.table(rows, 0.05)
    assert "| same | 256 | 1.0 | 1.0 | 1.000 | 0.995 - 1.000 | yes |" in text
    assert "| slower | 1 | 1000.0 | 1100.0 | 1.100 | 1.100 - 1.150 | no, slower |" in text
    line = versions.summary(rows, 0.05)
    assert line.startswith("1 of 3 cases within 5%; new / old from 0.900 to 1.100")
    assert "slower: slower (1.100)" in line and "faster: faster (0.900)" in line
    # The same timings under a 15% tolerance: every case is within it.
    assert versions.summary(rows, 0.15).startswith("3 of 3 cases within 15%")


def test_one_round_has_a_middle_half_of_its_one_ratio() -> None:
    (row,) = versions.compare({"a": [2.0]}, {"a": [3.0]}, {"a": 1})
    assert row.middle_half() == (1.5, 1.5)


def test_runs_pool_their_rounds_and_each_run_keeps_its_own_ratio() -> None:
    first = ({"a": [1.0, 1.0]}, {"a": [1.2, 1.2]})  # a pair of processes where new ran slow
    second = ({"a": [1.0, 1.0, 1.0]}, {"a": [0.9, 0.9, 0.9]})
    old, new = versions.pooled([first, second])
    assert old == {"a": [1.0] * 5} and new == {"a": [1.2, 1.2, 0.9, 0.9, 0.9]}
    rows = versions.compare(old, new, {"a": 1})
    per_run = [versions.compare(*first, {"a": 1}), versions.compare(*second, {"a": 1})]
    assert "| a | 1000000.0 | 900000.0 | 0.900 | 1.200, 0.900 | no, faster |" in versions.runs_table(rows, per_run, 0.05)


def test_a_worker_names_package_modules_loaded_from_outside_its_tree(tmp_path: Path) -> None:
    from types import ModuleType

    from benchmarks import version_worker

    def module(name: str, file: Path) -> ModuleType:
        made = ModuleType(name)
        made.__file__ = str(file)
        return made

    tree, other = tmp_path / "tree", tmp_path / "other"
    modules = {
        "taskgraph_norm": module("taskgraph_norm", tree / "taskgraph_norm" / "__init__.py"),
        "taskgraph_norm.api": module("taskgraph_norm.api", tree / "taskgraph_norm" / "api.py"),
        "taskgraph_norm.stray": module("taskgraph_norm.stray", other / "taskgraph_norm" / "stray.py"),
        "torch": module("torch", other / "torch" / "__init__.py"),  # not the package: not counted
    }
    assert version_worker._foreign_modules(tree, modules) == ["taskgraph_norm.stray"]
    del modules["taskgraph_norm.stray"]
    assert version_worker._foreign_modules(tree, modules) == []
