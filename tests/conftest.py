from __future__ import annotations

import os

import pytest
import torch

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


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
