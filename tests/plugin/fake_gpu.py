"""A scripted GPU timeline with stand-in CUDA events (``record``, ``query``, ``elapsed_time``,
``synchronize``), for host code that must read GPU times without waiting: ``run(ms)`` queues work,
``done_until`` is how far the GPU got, and ``synchronize`` fails the test (under overlap scheduling a
wait drains the GPU queue)."""

from __future__ import annotations


class FakeGpu:
    def __init__(self) -> None:
        self.now = 0.0  # ms of GPU work queued so far
        self.done_until = 0.0

    def run(self, ms: float) -> None:
        self.now += ms

    def event(self) -> FakeEvent:
        return FakeEvent(self)


class FakeEvent:
    def __init__(self, gpu: FakeGpu) -> None:
        self.gpu, self.at = gpu, None

    def record(self) -> None:
        self.at = self.gpu.now

    def query(self) -> bool:
        return self.at is not None and self.at <= self.gpu.done_until

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.query() and end.query(), "read before the GPU passed both events"
        return end.at - self.at

    def synchronize(self) -> None:
        raise AssertionError("the host waited for the GPU")
