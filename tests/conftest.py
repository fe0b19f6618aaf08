from __future__ import annotations

import os

import pytest
import torch

#: CI runs reduced sweeps; TGN_FULL=1 runs the full matrices of the slow tests.
FULL = os.environ.get("TGN_FULL") == "1"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
