"""StepClock: decode-step wall times from GPU events, read only once the GPU finished them (stand-in events
with the CUDA event interface: ``record``, ``query``, ``elapsed_time``)."""

from __future__ import annotations

from sglang_ext.sglang_plugin.step_clock import StepClock
from tests.plugin.fake_gpu import FakeGpu


def test_steps_are_timed_end_to_end_and_only_once_the_gpu_finished() -> None:
    gpu = FakeGpu()
    clock = StepClock(gpu.event)
    for bs, tokens, ms, block in [(8, 64, 10.0, 16), (8, 40, 7.0, 8), (8, None, 5.0, None)]:
        gpu.run(ms)
        clock.step_done(bs, tokens, block)
    assert clock.completed() == []  # nothing finished yet: no waiting, no reading
    gpu.done_until = 17.0  # the first two steps finished
    assert clock.completed() == [(8, 40, 7.0, True, 8)]  # the first step has no start to measure from
    gpu.done_until = 99.0
    assert clock.completed() == [(8, None, 5.0, True, None)]


def test_a_prefill_in_between_makes_the_next_step_teach_nothing() -> None:
    gpu = FakeGpu()
    clock = StepClock(gpu.event)
    gpu.run(10.0)
    clock.step_done(4, 32)
    clock.other_work()
    gpu.run(50.0)  # the prefill and the step
    clock.step_done(4, 32)
    gpu.run(10.0)
    clock.step_done(4, 32)
    gpu.done_until = 1e9
    assert clock.completed() == [(4, 32, 50.0, False, None), (4, 32, 10.0, True, None)]
