"""Step profiling (``DFLARE_STEP_PROFILE``): which calls run under the profiler. Whole decode steps and the
adaptive step's shorter eager drafts are counted apart per batch size, each profiled once after its
warm-up; everything else runs as it is. The profiler itself (torch.profiler on CUDA) needs a GPU and is
replaced by a recorder here."""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang_ext.sglang_plugin import step_profile
from sglang_ext.sglang_plugin.step_profile import SHORT_WARMUP, WARMUP, StepProfiler


@pytest.fixture
def profiled(monkeypatch) -> list[tuple[int, str]]:
    calls: list[tuple[int, str]] = []

    def record(self, bs, name, fn, args):
        calls.append((bs, name))
        return fn(*args)

    monkeypatch.setattr(StepProfiler, "_profile", record)
    return calls


def test_each_kind_and_listed_batch_size_is_profiled_once_after_its_warm_up(tmp_path: Path, profiled) -> None:
    profiler = StepProfiler(tmp_path, {128})
    outs = [profiler.run_short_draft(128, 4, lambda x: x + 1, i) for i in range(3 * SHORT_WARMUP)]
    assert outs == [i + 1 for i in range(3 * SHORT_WARMUP)]  # every call still returns its own result
    assert profiled == [(128, "draft_short_w4_bs128")]
    for _ in range(WARMUP):
        profiler.run(128, lambda: None)
    assert len(profiled) == 1  # short drafts did not count towards the steps' warm-up
    profiler.run(128, lambda: None)
    profiler.run(128, lambda: None)
    assert profiled[1:] == [(128, "step_profile_bs128")]
    for _ in range(3 * WARMUP):
        profiler.run(64, lambda: None)
        profiler.run_short_draft(64, 4, lambda: None)
    assert len(profiled) == 2  # batch 64 is not listed


def test_from_environment_reads_the_listed_batch_sizes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(step_profile.ENV, raising=False)
    assert step_profile.from_environment() is None
    monkeypatch.setenv(step_profile.ENV, str(tmp_path))
    monkeypatch.setenv(step_profile.BATCHES_ENV, "8, 256")
    profiler = step_profile.from_environment()
    assert profiler is not None and {bs for _, bs in profiler.pending} == {8, 256}
