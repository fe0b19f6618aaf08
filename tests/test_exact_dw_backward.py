"""The exact weight gradient inside the backward's pass against the two passes it replaces.

``NativeBackend.backward_exact_dw`` (native_dw_fused.c through
``native_grads.backward_exact_dw``) makes ``dx`` and adds ``sum over rows of dy * (x /
rms)`` to the exact state in one pass, each thread into a state of its own: ``dx``
must be the bits of ``native_grads.backward_rows`` and the state the one
``native_grads.exact_dw(..., rms=)`` (and the torch form) gives, for any split among
threads.  Each comparison has a negative control that must see a difference.
"""

from __future__ import annotations

import pytest
import torch

import taskgraph_norm as tgn
from taskgraph_norm import pipeline
from taskgraph_norm.backends import registry
from taskgraph_norm.backends.native import grads as native_grads
from taskgraph_norm.backends.native import loader as native
from taskgraph_norm.constants import EXACT_DIGITS, EXACT_TOP_LIMIT
from taskgraph_norm.errors import ExactSumOverflowError
from taskgraph_norm.kernels import exact_sum as es
from taskgraph_norm.ops.exact_grad import ExactSum

from .helpers import assert_bits_equal

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.why_unavailable()}")


def rows_of(rows: int, hidden: int, seed: int, binades: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, dy and the forward's rms; dy spread over ``2 * binades + 1`` binades."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g)
    dy = torch.randn(rows, hidden, generator=g) * torch.exp2(
        torch.randint(-binades, binades + 1, (rows, hidden), generator=g).float())
    rms = (x.double().pow(2).mean(1, keepdim=True) + 1e-6).sqrt().float()
    return x, dy, rms


def start_state(hidden: int) -> torch.Tensor:
    """A nonzero normal state to add into (an earlier micro-batch's)."""
    x, dy, rms = rows_of(40, hidden, 99, binades=30)
    return ExactSum(hidden).add_normalized(dy, x, rms.reshape(-1)).state.clone()


def recipe(hidden: int, accumulate: str = "float") -> native_grads.FloatRecipe:
    pipe = pipeline.for_config(hidden, 64, "tree", "pairwise", accumulate, "auto")
    assert pipe.plan is not None
    return native_grads.recipe_of(pipe.plan)


def two_passes(x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor | None, rms: torch.Tensor, state: torch.Tensor,
               accumulate: str) -> tuple[torch.Tensor, torch.Tensor]:
    dx = torch.empty_like(x)
    assert native_grads.backward_rows(x, dy, w, rms, recipe(x.shape[1], accumulate), dx, None,
                                      exact=accumulate == "exact") == 0
    state = state.clone()
    assert native_grads.exact_dw(state, dy, x, rms=rms) == 0
    return dx, state


def one_pass(x: torch.Tensor, dy: torch.Tensor, w: torch.Tensor | None, rms: torch.Tensor, state: torch.Tensor,
             accumulate: str, threads: int, grain: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    dx, state = torch.empty_like(x), state.clone()
    assert native_grads.backward_exact_dw(x, dy, w, rms, recipe(x.shape[1], accumulate), dx, state,
                                          exact=accumulate == "exact", threads=threads, grain=grain) == 0
    return dx, state


@pytest.mark.parametrize("rows,hidden", [(1, 4096), (31, 96), (32, 4097), (33, 64), (64, 4096), (100, 1),
                                         (3000, 257)])
@pytest.mark.parametrize("threads", [1, 2])
def test_one_pass_gives_the_two_passes_bits(rows: int, hidden: int, threads: int) -> None:
    x, dy, rms = rows_of(rows, hidden, rows + hidden, binades=8)
    w = torch.rand(hidden, generator=torch.Generator().manual_seed(1)) + 0.5
    state = start_state(hidden)
    for weight, accumulate in ((w, "float"), (None, "float"), (w, "exact")):
        dx2, s2 = two_passes(x, dy, weight, rms, state, accumulate)
        dx1, s1 = one_pass(x, dy, weight, rms, state, accumulate, threads)
        assert_bits_equal(dx1, dx2, f"dx {rows}x{hidden} {accumulate}")
        assert torch.equal(s1, s2), f"state {rows}x{hidden} {accumulate}"
        with torch.no_grad():  # and the torch form's state
            torch_state = es.add_products_(state.clone(), dy, torch.div(x, rms))
        assert torch.equal(s1, torch_state)


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_from_memory_give_the_two_passes_bits(threads: int) -> None:
    """A dx of STREAM_BYTES or more: the one pass runs its folds 16 rows at a time
    (native_backward.c's FUSED_DW_STREAM_ROWS), here with a last block of 5 rows."""
    from taskgraph_norm.constants import STREAM_BYTES
    hidden = 4096
    rows = STREAM_BYTES // 4 // hidden + 5
    x, dy, rms = rows_of(rows, hidden, 17, binades=30)
    state = start_state(hidden)
    dx2, s2 = two_passes(x, dy, None, rms, state, "float")
    dx1, s1 = one_pass(x, dy, None, rms, state, "float", threads)
    assert_bits_equal(dx1, dx2)
    assert torch.equal(s1, s2)
    dy[rows - 3, 7] = torch.nextafter(dy[rows - 3, 7], torch.tensor(float("inf")))  # the last block's rows count
    assert not torch.equal(one_pass(x, dy, None, rms, state, "float", threads)[1], s1)


def test_the_split_among_threads_does_not_change_the_state() -> None:
    x, dy, rms = rows_of(3000, 384, 5, binades=40)  # third folds: the measured path too
    state = start_state(384)
    results = [one_pass(x, dy, None, rms, state, "float", threads, grain)
               for threads, grain in ((1, 32), (2, 32), (2, 96), (4, 64))]
    for dx, s in results[1:]:
        assert_bits_equal(dx, results[0][0])
        assert torch.equal(s, results[0][1])


def test_negative_control_one_ulp_of_dy_changes_the_state() -> None:
    x, dy, rms = rows_of(64, 256, 3)
    state = start_state(256)
    _, s1 = one_pass(x, dy, None, rms, state, "float", 2)
    dy2 = dy.clone()
    dy2[17, 100] = torch.nextafter(dy2[17, 100], torch.tensor(float("inf")))
    _, s2 = one_pass(x, dy2, None, rms, state, "float", 2)
    assert not torch.equal(s1, s2)


def test_a_row_that_is_not_finite_adds_nothing() -> None:
    x, dy, rms = rows_of(100, 128, 4)
    dy[40, 3] = float("nan")
    state = start_state(128)
    after = state.clone()
    bad = native_grads.backward_exact_dw(x, dy, None, rms, recipe(128), torch.empty_like(x), after, exact=False,
                                         threads=2)
    assert bad > 0 and torch.equal(after, state)
    # the module then runs the two passes: its gradients are those of the torch-ops backend
    grads = []
    for names in (("native", "torch_ops"), ("torch_ops",)):
        norm = tgn.RMSNorm(128, weight_grad="exact")
        xx = x.clone().requires_grad_(True)
        with tgn.backends.use(*names):
            norm(xx).backward(dy)
        assert xx.grad is not None and norm.weight.grad is not None
        grads.append((xx.grad, norm.weight.grad))
    assert_bits_equal(grads[0][0], grads[1][0])
    assert_bits_equal(grads[0][1], grads[1][1])


def garbage_state(hidden: int, seed: int) -> torch.Tensor:
    """A state's memory holding anything (a spare from an earlier step, or new memory)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2**62, 2**62, (EXACT_DIGITS + 3, hidden), generator=g, dtype=torch.int64)


@pytest.mark.parametrize("rows,hidden,binades", [(1, 4096, 0), (64, 4096, 8), (33, 96, 40), (3000, 257, 20)])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_fresh_state_is_written_whole_and_rounded(rows: int, hidden: int, binades: int, threads: int) -> None:
    """``fresh``: the state's memory holds anything; the pass writes it whole with its
    own sum (the two passes' state from zero) and rounds it from the rows the sum
    reached (``exact_round``'s bits).  Negative control: without ``fresh`` the same
    memory is added into, and the state differs."""
    x, dy, rms = rows_of(rows, hidden, 7 + rows, binades=binades)
    w = torch.rand(hidden, generator=torch.Generator().manual_seed(2)) + 0.5
    dx2, s2 = two_passes(x, dy, w, rms, es.empty_state(hidden), "float")
    state, rounded, dx = garbage_state(hidden, rows), torch.full((hidden,), float("nan")), torch.empty_like(x)
    assert native_grads.backward_exact_dw(x, dy, w, rms, recipe(hidden), dx, state, exact=False, threads=threads,
                                          fresh=True, rounded=rounded) == 0
    assert_bits_equal(dx, dx2)
    assert torch.equal(state, s2)
    assert_bits_equal(rounded, native_grads.exact_round(s2, torch.float32))
    assert_bits_equal(rounded, es.round_state(s2, torch.float32))
    added = start_state(hidden)  # memory an earlier step left
    assert native_grads.backward_exact_dw(x, dy, w, rms, recipe(hidden), dx, added, exact=False,
                                          threads=threads) == 0
    assert not torch.equal(added, s2)


def test_a_fresh_state_with_a_row_that_is_not_finite_is_zero() -> None:
    x, dy, rms = rows_of(100, 128, 4)
    dy[40, 3] = float("inf")
    state, rounded = garbage_state(128, 1), torch.full((128,), 7.0)
    assert native_grads.backward_exact_dw(x, dy, None, rms, recipe(128), torch.empty_like(x), state, exact=False,
                                          threads=2, fresh=True, rounded=rounded) > 0
    assert not state.any()
    assert torch.equal(rounded, torch.full((128,), 7.0))  # not written
    with pytest.raises(ValueError, match="rounded"):
        native_grads.backward_exact_dw(x, dy, None, rms, recipe(128), None, state, exact=False,
                                       rounded=rounded)  # rounded without fresh


def test_overflow_is_an_error() -> None:
    state = torch.zeros(EXACT_DIGITS + 3, 8, dtype=torch.int64)
    state[EXACT_DIGITS - 1] = EXACT_TOP_LIMIT  # at the bound: one more unit passes it
    x = torch.full((4, 8), 1.5 * 2.0**127)
    dy = torch.full((4, 8), 1.5 * 2.0**127)
    rms = torch.ones(4, 1)
    with pytest.raises(ExactSumOverflowError):
        native_grads.backward_exact_dw(x, dy, None, rms, recipe(8), None, state, exact=False)


def test_bad_operands_are_clear_errors() -> None:
    x, dy, rms = rows_of(4, 8, 0)
    with pytest.raises(ValueError, match="state"):
        native_grads.backward_exact_dw(x, dy, None, rms, recipe(8), None, torch.zeros(21, 8, dtype=torch.int64),
                                       exact=False)
    with pytest.raises(ValueError, match="fp32"):
        native_grads.backward_exact_dw(x.double(), dy, None, rms, recipe(8), None,
                                       torch.zeros(22, 8, dtype=torch.int64), exact=False)


def test_the_module_takes_the_one_pass_and_micro_batches_keep_their_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = registry.NativeBackend.backward_exact_dw

    def spy(self: registry.NativeBackend, *args: object, **kwargs: object) -> bool:
        done = real(self, *args, **kwargs)  # type: ignore[arg-type]
        calls.append(done)
        return done

    monkeypatch.setattr(registry.NativeBackend, "backward_exact_dw", spy)
    x, dy, _ = rows_of(2048, 512, 8, binades=6)
    grads = []
    for pieces in (1, 4, 16):
        norm = tgn.RMSNorm(512, weight_grad="exact")
        for part_x, part_dy in zip(x.chunk(pieces), dy.chunk(pieces)):
            norm(part_x.requires_grad_(True)).backward(part_dy)
        assert norm.weight.grad is not None
        grads.append(norm.weight.grad.clone())
    assert calls and all(calls)
    for g in grads[1:]:
        assert_bits_equal(g, grads[0])
    float_norm = tgn.RMSNorm(512)  # negative control: the float weight gradient of 16 pieces differs
    for part_x, part_dy in zip(x.chunk(16), dy.chunk(16)):
        float_norm(part_x.requires_grad_(True)).backward(part_dy)
    assert float_norm.weight.grad is not None
    assert not torch.equal(float_norm.weight.grad.view(torch.int32), grads[0].view(torch.int32))


def test_x_over_rms_keeps_the_division_bits_at_the_quotient_ranges_edges() -> None:
    """The host build forms x / rms from the row's reciprocal pair where every x of a
    tile is +-0 or in [2**-50, 2**60] and the rms in [2**-40, 2**40], else divides: tiles
    on both sides of each edge, against the torch form's torch.div."""
    g = torch.Generator().manual_seed(11)
    rows, hidden = 64, 32 * 12
    x = torch.randn(rows, hidden, generator=g)
    edges = [2.0**-50, 2.0**-50 * 0.75, 2.0**60, 2.0**60 * 1.5, 0.0, -0.0, 2.0**-149, 1e38]
    for t, v in enumerate(edges):  # tile t holds one edge value in a few rows
        x[::7, 32 * t + 5] = v
    dy = torch.randn(rows, hidden, generator=g)
    for rms_values in ((2.0**-40, 2.0**40), (2.0**-41, 1.0), (1.0, 2.0**41), (0.75, 3.0)):
        rms = torch.tensor(rms_values).repeat(rows // 2).reshape(rows, 1)
        s1 = start_state(hidden)  # (dx of these rows is not finite: the kernel alone)
        assert native_grads.exact_dw(s1, dy, x, rms=rms) == 0
        expected = es.add_products_(start_state(hidden), dy, torch.div(x, rms))
        assert torch.equal(s1, expected), rms_values
    # negative control: x / rms rounded another way (one ulp up) gives another state
    wrong = torch.nextafter(torch.div(x, rms), torch.tensor(float("inf")))
    assert not torch.equal(es.add_products_(start_state(hidden), dy, wrong), s1)


@pytest.mark.parametrize("shape", [(96, 512), (3, 32, 512)])
def test_the_modules_backward_makes_dx_in_the_one_pass_on_the_forwards_pipeline(
        monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...]) -> None:
    """No second pass for ``dx`` and no pipeline lookup in the backward: ``dx`` comes
    from the fused call on the pipeline the forward used, with the float mode's bits."""
    x, dy, _ = rows_of(96, 512, 11, binades=3)
    x, dy = x.reshape(shape), dy.reshape(shape)
    exact, float_ = tgn.RMSNorm(512, weight_grad="exact"), tgn.RMSNorm(512)
    xe, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ye, yf = exact(xe), float_(xf)
    lookups, second_passes = [], []
    real_lookup, real_rows = pipeline.for_config, registry.NativeBackend.backward_rows
    monkeypatch.setattr(pipeline, "for_config", lambda *a, **k: lookups.append(a) or real_lookup(*a, **k))
    monkeypatch.setattr(registry.NativeBackend, "backward_rows",
                        lambda self, *a, **k: second_passes.append(a) or real_rows(self, *a, **k))
    ye.backward(dy)
    assert not lookups and not second_passes
    yf.backward(dy)
    assert second_passes  # the spy sees the float mode's pass: it would see the exact one's
    assert xe.grad is not None and xf.grad is not None and xe.grad.shape == x.shape
    assert_bits_equal(xe.grad, xf.grad)


@pytest.mark.parametrize("openmp", [True, False])
@pytest.mark.parametrize("hidden", [4096, 1544])
def test_the_merge_shared_by_column_slabs_on_either_team_gives_one_threads_bits(openmp: bool, hidden: int) -> None:
    """The threads' states are merged, normalised and rounded by slabs of columns that
    the team's threads claim once every row block has run (torch's OpenMP team or
    native_team.c's own worker): the state, the rounding and ``dx`` are one thread's
    bits, a fresh state included; a row that is not finite still adds nothing."""
    from taskgraph_norm.backends.native import team

    if team.use_openmp(openmp) != openmp:
        team.use_openmp(True)
        pytest.skip("torch's parallel backend here is not OpenMP")
    try:
        x, dy, rms = rows_of(160, hidden, 13, binades=12)
        found = []
        for threads in (1, 2, 3):
            state, rounded, dx = garbage_state(hidden, threads), torch.empty(hidden), torch.empty_like(x)
            assert native_grads.backward_exact_dw(x, dy, None, rms, recipe(hidden), dx, state, exact=False,
                                                  threads=threads, fresh=True, rounded=rounded) == 0
            added = start_state(hidden)
            assert native_grads.backward_exact_dw(x, dy, None, rms, recipe(hidden), None, added, exact=False,
                                                  threads=threads) == 0
            found.append((state, rounded, dx, added))
        for state, rounded, dx, added in found[1:]:
            assert torch.equal(state, found[0][0]) and torch.equal(added, found[0][3])
            assert_bits_equal(rounded, found[0][1])
            assert_bits_equal(dx, found[0][2])
        assert_bits_equal(found[0][1], es.round_state(found[0][0], torch.float32))
        assert not torch.equal(found[0][3], found[0][0])  # negative control: added into a state that was not zero
        dy[100, 7] = float("inf")
        state = start_state(hidden)
        after = state.clone()
        assert native_grads.backward_exact_dw(x, dy, None, rms, recipe(hidden), torch.empty_like(x), after,
                                              exact=False, threads=2) > 0
        assert torch.equal(after, state)
    finally:
        team.use_openmp(True)
