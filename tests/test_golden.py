"""Golden bits: every recorded configuration still gives the bits it gave when recorded.

``tests/golden/record.py`` defines the cases (forward through ``normalize_sync``,
backward through ``tgn.RMSNorm``, the exact weight gradient over two micro-batches)
and recorded their hashes in ``tests/golden/bits.json`` on one thread.  Here they
run with torch's default thread count: the bits depend on neither.
"""

from __future__ import annotations

import pytest
import torch

from .golden.record import BITS_FILE, CASES, compute, digest, load

RECORDED = load()


def test_every_case_is_recorded() -> None:
    missing, stale = sorted(set(CASES) - set(RECORDED)), sorted(set(RECORDED) - set(CASES))
    assert not missing and not stale, (
        f"{BITS_FILE.name} is out of step with record.py's cases: not recorded {missing}, recorded but "
        f"gone {stale}; re-record (python -m tests.golden.record) and say in CHANGELOG.md why"
    )


@pytest.mark.parametrize("name", list(CASES))
def test_bits_are_the_recorded_ones(name: str) -> None:
    want = RECORDED.get(name)
    if want is None:
        pytest.fail(f"{name} is not recorded in {BITS_FILE.name}: run python -m tests.golden.record")
    got = compute(CASES[name])
    changed = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    assert not changed, (
        f"the bits of {', '.join(changed)} changed for {name}: either restore the bits, or re-record them "
        "(python -m tests.golden.record) and say in CHANGELOG.md why they changed"
    )


def test_the_hash_sees_only_the_bits() -> None:
    """Negative control for the hash: -0.0 and +0.0, a dtype and a shape are told apart;
    a copy and a non-contiguous tensor of the same values are not."""
    a = torch.tensor([[1.0, -0.0], [float("nan"), 3.0]])
    assert digest(a) == digest(a.clone()) == digest(a.t().contiguous().t())
    assert digest(a) != digest(a.abs())  # -0.0 -> +0.0
    assert digest(a) != digest(a.reshape(4))
    assert digest(a) != digest(a.view(torch.int32))
    assert digest(a.bfloat16()) != digest(a.half())
