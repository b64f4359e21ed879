"""Phase timing (``DFLARE_PHASE_TIMING``): GPU phase times read without ever waiting for the GPU, and the
host's step period per batch size. Stand-in events with the CUDA event interface (``record``, ``query``,
``elapsed_time``, ``synchronize``) on a scripted GPU timeline; a ``synchronize`` is a test failure, since
under overlap scheduling it drains the GPU queue."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sglang_ext.sglang_plugin import phase_timing
from sglang_ext.sglang_plugin.phase_timing import PhaseTimer
from tests.plugin.fake_gpu import FakeGpu


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def forward(gpu: FakeGpu, ms: float):
    def run() -> str:
        gpu.run(ms)
        return "out"

    return run


def written(path: Path) -> dict:
    """The GPU phases and step periods the timer wrote (host launch times and allocator counters apart, see
    the tests of those)."""
    totals = json.loads(path.read_text())
    return {k: v for k, v in totals.items() if "_host/" not in k and not k.startswith("allocator_")}


def test_records_are_read_once_the_gpu_passed_them_and_never_waited_for(tmp_path: Path) -> None:
    gpu = FakeGpu()
    timer = PhaseTimer(tmp_path, make_event=gpu.event, clock=Clock())
    for _ in range(phase_timing._FLUSH_EVERY):  # a full flush batch while the GPU has finished nothing
        assert timer.timed("verify/128", forward(gpu, 25.0)) == "out"
    # only host launch times so far: no GPU phase is read before the GPU passed it
    assert written(timer.path) == {} and len(timer.pending) == phase_timing._FLUSH_EVERY

    gpu.done_until = 10 * 25.0  # the GPU passed the first ten verifies
    for _ in range(phase_timing._FLUSH_EVERY - 1):
        timer.timed("draft/128", forward(gpu, 6.0))
    assert written(timer.path) == {}  # one flush per 64 records
    timer.timed("draft/128", forward(gpu, 6.0))
    assert written(timer.path) == {"verify/128": [10, 250.0]}
    assert len(timer.pending) == 2 * phase_timing._FLUSH_EVERY - 10

    gpu.done_until = gpu.now
    timer.flush()
    n = phase_timing._FLUSH_EVERY
    assert written(timer.path) == {"verify/128": [n, n * 25.0], "draft/128": [n, pytest.approx(n * 6.0)]}
    assert not timer.pending


def test_step_wall_is_the_launch_period_at_one_batch_size_without_prefills_between(tmp_path: Path) -> None:
    clock = Clock()
    timer = PhaseTimer(tmp_path, make_event=FakeGpu().event, clock=clock)
    for t, bs in ((0.0, 128), (0.047, 128), (0.094, 128), (0.110, 127), (0.150, 127)):
        clock.now = t
        timer.step_launched(bs)
    clock.now = 0.2
    timer.other_forward()  # a prefill: the next period would include it
    clock.now = 0.3
    timer.step_launched(127)
    clock.now = 0.33
    timer.step_launched(127)
    assert timer.totals["step_wall/128"] == [2, pytest.approx(94.0)]
    assert timer.totals["step_wall/127"] == [2, pytest.approx(40.0 + 30.0)]
    timer.flush()  # no GPU records yet: the host periods are written anyway
    assert written(timer.path)["step_wall/128"][0] == 2


def test_hook_times_target_steps_not_drafts_and_restarts_after_prefill(tmp_path: Path, monkeypatch) -> None:
    gpu, clock = FakeGpu(), Clock()
    timer = PhaseTimer(tmp_path, make_event=gpu.event, clock=clock)
    monkeypatch.setattr(phase_timing, "_timer", timer)

    def mode(name: str) -> SimpleNamespace:
        return SimpleNamespace(
            is_target_verify=lambda: name == "verify",
            is_decode=lambda: name == "decode",
            is_idle=lambda: name == "idle",
        )

    target, draft = SimpleNamespace(is_draft_worker=False), SimpleNamespace(is_draft_worker=True)

    def original(runner, batch):
        gpu.run(1.0)
        return runner

    def step(t: float, bs: int = 8) -> None:
        clock.now = t
        batch = SimpleNamespace(forward_mode=mode("verify"), batch_size=bs)
        assert phase_timing.around_model_forward(original, draft, batch) is draft
        assert phase_timing.around_model_forward(original, target, batch) is target

    step(1.0)
    step(1.02)
    idle = SimpleNamespace(forward_mode=mode("idle"), batch_size=0)
    phase_timing.around_model_forward(original, target, idle)
    step(1.05)  # an idle batch between steps does not break the period
    prefill = SimpleNamespace(forward_mode=mode("extend"), batch_size=8)
    phase_timing.around_model_forward(original, target, prefill)
    step(2.0)  # after a prefill: no period
    assert timer.totals["step_wall/8"] == [2, pytest.approx(20.0 + 30.0)]
    gpu.done_until = gpu.now
    timer.flush()
    totals = written(timer.path)
    assert totals["draft/8"][0] == 4 and totals["verify/8"][0] == 4
    assert "extend/8" not in totals and "verify/0" not in totals
    short = SimpleNamespace(
        forward_mode=mode("verify"), batch_size=8, spec_info=SimpleNamespace(ragged_verify_layout=1)
    )
    clock.now = 2.04
    phase_timing.around_model_forward(original, draft, short)  # a shorter, eager draft: timed apart
    phase_timing.around_model_forward(
        original, target, SimpleNamespace(forward_mode=mode("verify"), batch_size=8)
    )
    gpu.done_until = gpu.now
    timer.flush()
    assert written(timer.path)["draft_short/8"][0] == 1 and written(timer.path)["draft/8"][0] == 4
    # its step is one launch, not two: the period from the last step, 40 ms, once
    assert timer.totals["step_wall/8"] == [3, pytest.approx(20.0 + 30.0 + 40.0)]
    # FA3's way (short_draft.py): a uniform batch of fewer positions per request than the server's block
    draft.server_args = SimpleNamespace(speculative_num_draft_tokens=16)
    uniform = SimpleNamespace(forward_mode=mode("verify"), batch_size=8, input_ids=torch.zeros(8 * 4))
    whole = SimpleNamespace(forward_mode=mode("verify"), batch_size=8, input_ids=torch.zeros(8 * 16))
    assert phase_timing.is_short_draft(draft, uniform) and not phase_timing.is_short_draft(draft, whole)
    phase_timing.around_model_forward(original, draft, uniform)
    gpu.done_until = gpu.now
    timer.flush()
    assert written(timer.path)["draft_short/8"][0] == 2 and written(timer.path)["draft/8"][0] == 4


def test_each_phase_also_records_the_host_time_its_launch_took(tmp_path: Path) -> None:
    """An eager forward that takes longer to launch than its kernels run shows as host time at or above the
    events' GPU time; a graph replay launches in a fraction of it."""
    gpu, clock = FakeGpu(), Clock()
    timer = PhaseTimer(tmp_path, make_event=gpu.event, clock=clock)

    def launch(host_ms: float, gpu_ms: float):
        def run() -> None:
            clock.now += host_ms / 1000
            gpu.run(gpu_ms)

        return run

    for _ in range(3):
        timer.timed("draft_short/128", launch(7.5, 2.5))  # eager: launch-bound
        timer.timed("draft/128", launch(0.2, 6.0))  # graph replay
    gpu.done_until = gpu.now
    timer.flush()
    totals = json.loads(timer.path.read_text())
    assert totals["draft_short_host/128"] == [3, pytest.approx(22.5)]
    assert totals["draft_host/128"] == [3, pytest.approx(0.6)]
    assert totals["draft_short/128"] == [3, pytest.approx(7.5)] and totals["draft/128"][0] == 3


def test_garbage_collector_passes_are_timed_at_the_batch_size_of_the_last_step(tmp_path: Path) -> None:
    """A real ``gc.collect`` between steps: its pass is recorded under the generation it collected and the
    batch size of the step launched last, and nothing more once the timer stops watching."""
    import gc

    clock = Clock()
    timer = PhaseTimer(tmp_path, make_event=FakeGpu().event, clock=clock)
    timer.watch_gc()
    timer.watch_gc()  # once only
    try:
        timer.step_launched(96)

        def slow_pass(phase: str, info: dict) -> None:  # runs after the timer's own callback
            clock.now += 0.012 if phase == "start" else 0.0

        gc.callbacks.append(slow_pass)
        try:
            gc.collect(2)
        finally:
            gc.callbacks.remove(slow_pass)
        assert timer.totals["gc_gen2/96"] == [1, pytest.approx(12.0)]
    finally:
        timer.unwatch_gc()
    gc.collect(2)
    assert timer.totals["gc_gen2/96"][0] == 1
    assert timer._on_gc not in gc.callbacks


def test_every_write_carries_the_allocators_running_counters(tmp_path: Path) -> None:
    """The counters are snapshots, not sums: two writes with a retry between them differ by that retry, and a
    write with nothing new to say does not read them."""
    gpu, reads = FakeGpu(), []
    counters = {"alloc_retries": 3, "device_allocs": 40, "device_frees": 7}

    def read() -> dict[str, int]:
        reads.append(dict(counters))
        return dict(counters)

    timer = PhaseTimer(tmp_path, make_event=gpu.event, clock=Clock(), allocator_counters=read)
    timer.timed("context_kv/96", forward(gpu, 0.4))
    gpu.done_until = gpu.now
    timer.flush()
    first = json.loads(timer.path.read_text())
    counters.update(alloc_retries=4, device_allocs=45, device_frees=11)
    timer.timed("context_kv/95", forward(gpu, 0.4))
    gpu.done_until = gpu.now
    timer.flush()
    second = json.loads(timer.path.read_text())
    assert first["allocator_alloc_retries/all"] == [3, 0.0]
    assert second["allocator_alloc_retries/all"] == [4, 0.0]
    assert second["allocator_device_allocs/all"][0] - first["allocator_device_allocs/all"][0] == 5
    assert second["allocator_device_frees/all"] == [11, 0.0]
    timer.flush()  # nothing new: no write, no read
    assert len(reads) == 2


def test_tritons_compilations_and_kernel_loads_are_timed_at_the_batch_size_of_the_last_step(
    tmp_path: Path,
) -> None:
    """Triton's hooks called as its runtime calls them (the JIT hooks with keywords, kept as one optional
    callable; the kernel-load hooks positionally, kept as chains): each span lands under the batch size of
    the step launched last, and a JIT cache hook already installed keeps its say over the compilation."""
    knobs = pytest.importorskip("triton.knobs")
    clock = Clock()
    timer = PhaseTimer(tmp_path, make_event=FakeGpu().event, clock=clock)
    runtime = SimpleNamespace(
        jit_cache_hook=lambda **kwargs: kwargs["key"] == "cached elsewhere",  # true: skip the compilation
        jit_post_compile_hook=None,
        kernel_load_start_hook=knobs.HookChain(),
        kernel_load_end_hook=knobs.HookChain(reversed=True),
    )
    assert timer.watch_triton(runtime)
    timer.step_launched(37)
    assert runtime.jit_cache_hook(key="k", repr="kernel", already_compiled=False) is False
    clock.now += 0.030
    runtime.jit_post_compile_hook(key="k", repr="kernel", already_compiled=True)
    runtime.kernel_load_start_hook("module", "function", "kernel", {}, "hash")
    clock.now += 0.004
    runtime.kernel_load_end_hook("module", "function", "kernel", {}, "hash")
    assert timer.totals["triton_jit/37"] == [1, pytest.approx(30.0)]
    assert timer.totals["triton_load/37"] == [1, pytest.approx(4.0)]
    assert runtime.jit_cache_hook(key="cached elsewhere") is True
    assert not timer.watch_triton(SimpleNamespace(jit_cache_hook=None))  # a Triton without these hooks
