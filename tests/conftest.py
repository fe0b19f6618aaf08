from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from taskgraph_norm.backends.native import team

from ._triton_interpreter import skip_repatching
from ._trust_helpers import native_status

#: CI runs reduced sweeps; TGN_FULL=1 runs the full matrices of the slow tests.
FULL = os.environ.get("TGN_FULL") == "1"

# Load (or fail to load) the native kernels once, up front: a checkout without them
# gets its one NativeKernelsWarning here, not inside whichever test runs first
# (test_native.py says how to build them where a compiler exists).
native_status()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _spinning_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite's split decisions as under the runtime's default wait policy, whatever
    OMP_WAIT_POLICY the tests run under (tests/test_native_team.py sets PASSIVE itself)."""
    monkeypatch.setattr(team, "PASSIVE", False)


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """torch's thread count for the test: 1, and 2 (the native team splits the rows)."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(request.param))
    try:
        yield int(request.param)
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def interpreted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's interpreter (``TRITON_INTERPRET=1``) for the test; skipped without triton."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    skip_repatching(monkeypatch)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
