"""Core tests run tiny float64 models: one intra-op thread is several times faster than two on a busy
2-core CI machine (thread hand-off dominates such small matmuls), so each module runs single-threaded."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
