"""Every topology against torch's kernel (within torch's default tolerances) and fp64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import taskgraph_norm as tgn
from taskgraph_norm.tools.report import fp64_reference, ulp_error

from .conftest import gen

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CONFIGS = [
    (t, leaf, acc)
    for t in ("linear", "tree", "race", "cat")
    for leaf in ("pairwise", "native")
    for acc in ("float", "exact")
] + [("standard", "pairwise", "float")]

# Max ULP error of the output against an fp64 reference.  A single rounding of the
# output already costs 0.5 ULP; fp32/fp64 add a few ULP from the sum, the square root,
# the division and the weight multiply.  Low precision rounds those away.
ULP_BOUND = {torch.float32: 8.0, torch.float64: 8.0, torch.float16: 1.0, torch.bfloat16: 1.0}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("topology", "leaf", "accumulate"), CONFIGS)
def test_matches_torch_and_fp64(topology: str, leaf: str, accumulate: str, dtype: torch.dtype) -> None:
    x = (torch.randn(33, 1000, generator=gen(0), dtype=torch.float64) * 2).to(dtype)
    w = (1 + 0.1 * torch.randn(1000, generator=gen(1), dtype=torch.float64)).to(dtype)
    y = tgn.normalize_sync(x, w, topology=topology, leaf=leaf, accumulate=accumulate, chunk_size=64)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, F.rms_norm(x, (1000,), w))
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    assert ulp_error(y, fp64_reference(x, w, eps)) <= ULP_BOUND[dtype]


def test_ulp_error_sees_a_wrong_answer() -> None:
    # Negative control for the ULP bound: a result off by a relative 1e-5 must fail it.
    x = torch.randn(8, 64, generator=gen(2))
    ref = fp64_reference(x, None, 1e-6)
    assert ulp_error((ref * (1 + 1e-5)).float(), ref) > ULP_BOUND[torch.float32]


def test_eps_none_means_what_torch_means() -> None:
    tiny = torch.full((2, 16), 1e-5)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = tiny.to(dtype)
        torch.testing.assert_close(tgn.normalize_sync(x), F.rms_norm(x, (16,)))
    torch.testing.assert_close(tgn.normalize_sync(tiny, eps=0.5), F.rms_norm(tiny, (16,), eps=0.5))


def test_layer_norm_exact_mean_is_correctly_rounded_on_hard_rows() -> None:
    """benchmarks/layer_accuracy.py: the exact plan's mean is the correctly rounded one
    on every family of hard rows and its output within a few ulps of fp64; the float
    plans' means are not always (the negative control)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import layer_accuracy

    results = layer_accuracy.measure(rows=8, hidden=1024, seed=3)
    exact = [r for r in results if r[1].startswith("tgn exact")]
    assert len(exact) == len(layer_accuracy.FAMILIES)
    assert all(mean == 1.0 and ulp <= 4.0 for _, _, _, ulp, mean in exact), exact
    floats = [mean for _, name, _, _, mean in results if name.startswith("tgn float")]
    assert any(mean is not None and mean < 1.0 for mean in floats)
