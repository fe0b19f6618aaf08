"""``benchmarks/targets.py`` on tiny sizes: every group runs and gives one line per
case with its target (nothing about the timings is asserted: they are figures, not
tests), and a result is judged by its ratio."""

from __future__ import annotations

import pytest

from benchmarks import targets


def test_a_result_is_met_by_its_ratio() -> None:
    assert targets.Result("a", 1.0, 2.0, "b", 0.5).met
    assert not targets.Result("a", 1.1, 2.0, "b", 0.5).met
    assert targets.Result("a", 1.0, 2.0, "b", None).met is None
    assert targets.Result("a", 1e-6, 2e-6, "b", 0.45).row() == "| a | 1.0 | 2.0 | b | 0.50x | <= 0.45x | **no** |"


def test_every_group_runs_on_tiny_sizes() -> None:
    found = [
        *targets.out_group(((8, 64),), ("fp32", "bf16"), 1),
        *targets.fresh_group(((8, 64),), ("fp16",), 1, False),
        *targets.exact_group(((2, 64),), 1),
        *targets.exact_dw_group((4,), 64, 1),
        *targets.train_group((4,), 64, 1, False),
        *targets.small_group(1),
    ]
    assert [r.case for r in found] == [
        "out= (8, 64) fp32", "out= (8, 64) bf16", "fresh normalize_sync (8, 64) fp16",
        "fresh tgn.RMSNorm, no_grad (8, 64) fp16", "exact forward (2, 64) fp32", "exact forward, out= (2, 64) fp32",
        "forward+backward, exact dW (4, 64) fp32", "forward+backward (4, 64) fp32", "normalize_sync (1, 4096) fp32",
    ]
    assert all(r.ours > 0 and r.base > 0 and r.target for r in found)


def test_groups_are_checked() -> None:
    with pytest.raises(SystemExit):
        targets.main(["--only", "nothing"])


def test_the_exact_dw_step_breakdown_runs_and_times_both_kernels() -> None:
    from benchmarks import exact_dw_step
    from taskgraph_norm.backends import registry

    before = {name: getattr(registry._native_grads, name) for name in exact_dw_step.KERNELS.values()}
    found = exact_dw_step.measure(2, 1, calls=2)
    assert {name: getattr(registry._native_grads, name) for name in before} == before  # unwrapped again
    assert all(len(rounds) == 1 and rounds[0][0] > rounds[0][1] > 0 for rounds in found.values())
    lines = exact_dw_step.table(2, found)
    assert lines[0].startswith("| (2, 4096) | all rounds (1) |")


def test_each_line_comes_from_the_process_of_the_median_ratio() -> None:
    runs = [[targets.Result("a", 1.0, 1.0, "b", 1.0, (0.0, 3.0)), targets.Result("c", 3.0, 1.0, "d", 2.0)],
            [targets.Result("a", 1.2, 1.0, "b", 1.0), targets.Result("c", 1.0, 1.0, "e", 2.0)],
            [targets.Result("a", 0.5, 1.0, "b", 1.0), targets.Result("c", 3.6, 2.0, "d", 2.0)]]
    merged, ratios = targets.median_process(runs)
    assert merged == [runs[0][0], runs[2][1]]  # ratios 1.0 (of 1.0, 1.2, 0.5); 1.8 (of 3.0, 1.0, 1.8)
    assert ratios == {"a": [1.0, 1.2, 0.5], "c": [3.0, 1.0, 1.8]}
    assert targets.median_process(runs[:2])[0] == [runs[0][0], runs[1][1]]  # even: the lower middle
    with pytest.raises(ValueError, match="different cases"):
        targets.median_process([runs[0], runs[1][::-1]])


def test_a_worker_prints_its_results_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    found = targets.main(["--quick", "--only", "small", "--rounds", "1", "--json"])
    lines = capsys.readouterr().out.splitlines()
    assert [targets.Result(**{**json.loads(line), "faults": tuple(json.loads(line)["faults"])})
            for line in lines] == found


def test_processes_are_checked() -> None:
    with pytest.raises(SystemExit):
        targets.main(["--processes", "0"])
