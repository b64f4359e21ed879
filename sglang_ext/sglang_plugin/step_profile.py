"""Opt-in torch-profiler capture of DFLARE decode steps, for finding what a step spends beyond matrix work.

``DFLARE_STEP_PROFILE=<dir>`` with ``DFLARE_STEP_PROFILE_BATCHES=1,32,128`` (the default): the first
``WARMUP`` decode steps at each listed batch size run as usual, the next one runs under ``torch.profiler``
(CPU + CUDA) and synchronised, and the scheduler writes ``<dir>/step_profile_bs<N>.json``: the step's wall
time, its GPU busy time (sum of kernel times), whether the target verify replayed a CUDA graph, and the
top operators and kernels by GPU and by host time. The adaptive step's shorter drafts
(``DFLARE_DRAFT_BLOCKS``) are profiled apart, the drafter's forward alone, after ``SHORT_WARMUP`` of them:
``<dir>/draft_short_w<width>_bs<N>.json``.
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
SHORT_WARMUP = 5
TOP = 40


class StepProfiler:
    """Counts decode steps (and the adaptive step's shorter drafts) per batch size and profiles one of each
    once."""

    def __init__(self, out_dir: Path, batch_sizes: set[int]) -> None:
        self.out_dir = out_dir
        self.pending: set[tuple[str, int]] = {(kind, bs) for bs in batch_sizes for kind in ("step", "short")}
        self.seen: dict[tuple[str, int], int] = {}

    def run(self, bs: int, step: Callable[..., Any], *args: Any) -> Any:
        """A whole decode step at batch ``bs``: ``step_profile_bs<bs>.json``."""
        return self._run(("step", bs), WARMUP, f"step_profile_bs{bs}", step, args)

    def run_short_draft(self, bs: int, width: int, draft: Callable[..., Any], *args: Any) -> Any:
        """The drafter's forward of a block of ``width`` shorter than the server's
        (``DFLARE_DRAFT_BLOCKS``), alone: ``draft_short_w<width>_bs<bs>.json``. The policy drafts it in some
        steps only, so fewer are skipped first (``SHORT_WARMUP``); the first ones also warm up kernels."""
        return self._run(("short", bs), SHORT_WARMUP, f"draft_short_w{width}_bs{bs}", draft, args)

    def _run(self, key: tuple[str, int], warmup: int, name: str, fn: Callable[..., Any], args: tuple) -> Any:
        if key not in self.pending:
            return fn(*args)
        count = self.seen[key] = self.seen.get(key, 0) + 1
        if count <= warmup:
            return fn(*args)
        self.pending.discard(key)
        return self._profile(key[1], name, fn, args)

    def _profile(self, bs: int, name: str, fn: Callable[..., Any], args: tuple) -> Any:
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            out = fn(*args)
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1000
        self._write(bs, name, prof, wall_ms, getattr(out, "can_run_cuda_graph", None))
        return out

    def _write(self, bs: int, name: str, prof: Any, wall_ms: float, verify_graph: bool | None) -> None:
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
        (self.out_dir / f"{name}.json").write_text(json.dumps(report, indent=1))


def from_environment() -> StepProfiler | None:
    directory = os.environ.get(ENV)
    if not directory:
        return None
    sizes = {int(x) for x in os.environ.get(BATCHES_ENV, "1,32,128").split(",") if x.strip()}
    return StepProfiler(Path(directory), sizes)
