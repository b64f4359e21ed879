"""Opt-in torch-profiler capture of DFLARE decode steps, for finding what a step spends beyond matrix work.

``DFLARE_STEP_PROFILE=<dir>`` with ``DFLARE_STEP_PROFILE_BATCHES=1,32,128`` (the default): the first
``WARMUP`` decode steps at each listed batch size run as usual, the next one runs under ``torch.profiler``
(CPU + CUDA) and synchronised, and the scheduler writes ``<dir>/step_profile_bs<N>.json``: the step's wall
time, its GPU busy time (sum of kernel times), whether the target verify replayed a CUDA graph, and the
top operators and kernels by GPU and by host time.
The gap between wall and busy time is host work the GPU waited for. Each batch size is captured once per
process. Off unless the variable is set.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "DFLARE_STEP_PROFILE"
BATCHES_ENV = "DFLARE_STEP_PROFILE_BATCHES"
WARMUP = 20
TOP = 40


class StepProfiler:
    """Counts decode steps per batch size and profiles a window of them once."""

    def __init__(self, out_dir: Path, batch_sizes: set[int]) -> None:
        self.out_dir = out_dir
        self.pending = set(batch_sizes)
        self.seen: dict[int, int] = {}

    def run(self, bs: int, step: Callable[..., Any], *args: Any) -> Any:
        if bs not in self.pending:
            return step(*args)
        count = self.seen[bs] = self.seen.get(bs, 0) + 1
        if count <= WARMUP:
            return step(*args)
        self.pending.discard(bs)
        return self._profile(bs, step, args)

    def _profile(self, bs: int, step: Callable[..., Any], args: tuple) -> Any:
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            out = step(*args)
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1000
        self._write(bs, prof, wall_ms, getattr(out, "can_run_cuda_graph", None))
        return out

    def _write(self, bs: int, prof: Any, wall_ms: float, verify_graph: bool | None) -> None:
        events = prof.key_averages()

        def rows(key: str) -> list[dict[str, Any]]:
            ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:TOP]
            return [
                {
                    "name": e.key[:160],
                    "count": e.count,
                    "device_ms": round(getattr(e, "self_device_time_total", 0.0) / 1000, 4),
                    "cpu_ms": round(e.self_cpu_time_total / 1000, 4),
                }
                for e in ranked
            ]

        busy_ms = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1000  # kernels only
        report = {
            "batch_size": bs,
            "wall_ms": round(wall_ms, 3),
            "gpu_busy_ms": round(busy_ms, 3),
            "verify_cuda_graph": verify_graph,
            "top_by_device": rows("self_device_time_total"),
            "top_by_cpu": rows("self_cpu_time_total"),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"step_profile_bs{bs}.json").write_text(json.dumps(report, indent=1))


def from_environment() -> StepProfiler | None:
    directory = os.environ.get(ENV)
    if not directory:
        return None
    sizes = {int(x) for x in os.environ.get(BATCHES_ENV, "1,32,128").split(",") if x.strip()}
    return StepProfiler(Path(directory), sizes)
