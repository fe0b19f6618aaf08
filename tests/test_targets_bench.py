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
