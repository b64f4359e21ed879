"""Opt-in timing of decode-step phases, for benchmarks: ``DFLARE_PHASE_TIMING=<dir>``.

When the variable is set, the plugin wraps SGLang's ``ModelRunner.forward`` (target decode, target
verify, draft forward) and the speculative workers' context-KV materialisation with CUDA events, and
each scheduler process keeps writing ``<dir>/phases_<pid>.json``: ``{"<phase>/<batch size>": [count,
total_ms]}``. It applies to AR, built-in DFLASH and DFLARE alike, which is what a side-by-side needs.
Prefill forwards are not timed. Adaptive verify's shorter drafts (``DFLARE_DRAFT_BLOCKS``) are
``draft_short``, apart from the whole block's ``draft``. Each timed phase also gets the
host time its launching call took, ``<phase>_host/<batch size>``, and the scheduler's garbage-collector
passes are timed too (``gc_gen<generation>/<batch size>``). Each write also carries the CUDA caching
allocator's running counters, ``allocator_<counter>/all``: ``[value, 0]`` (``alloc_retries``: allocations
that found the device full and freed the allocator's whole cache, synchronising the device, before trying
again; ``device_allocs``/``device_frees``: its cudaMalloc/cudaFree calls), so a reader that subtracts two
snapshots gets what happened between them. Triton's kernel compilations (or loads from its disk cache) and
its loads of compiled kernels onto the GPU are timed as ``triton_jit/<batch size>`` and
``triton_load/<batch size>``.

Two things make it fit for measuring host overhead:

* Events are read only once the GPU has passed them (``query``), never waited for: a ``synchronize`` here
  would drain the queue that overlap scheduling keeps full, and the GPU would idle for a whole host
  iteration each time (every ~21 steps of a speculative step's three records), charging the benchmark's
  speculative rows with host time that only the timer caused.
* ``step_wall/<batch size>`` is the host's wall time from one target decode/verify launch to the next at
  the same batch size with no prefill between: under overlap scheduling, the steady-state step period at
  that batch, whatever bounds it (GPU or host). Against the timed GPU phases it separates per-step host time
  from what a closed batch adds outside the steps (the prefill, and the tail in which requests that
  accept less keep running at smaller batches after the others finished).
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "DFLARE_PHASE_TIMING"
_FLUSH_EVERY = 64
STEP_WALL = "step_wall"


def _cuda_timing_event() -> Any:
    import torch

    return torch.cuda.Event(enable_timing=True)


ALLOCATOR_COUNTERS = {"alloc_retries": "num_alloc_retries", "device_allocs": "num_device_alloc",
                      "device_frees": "num_device_free"}  # fmt: skip


def _cuda_allocator_counters() -> dict[str, int]:
    """The caching allocator's counters of this process's device. A host stall inside a step that the
    step's kernels do not explain can be the allocator: when a new tensor shape finds no cached block and
    the device has no free memory left (SGLang gives most of it to the KV pool), it frees its cache, which
    waits for the whole GPU queue, and retries."""
    import torch

    stats = torch.cuda.memory_stats()
    return {name: int(stats.get(key, 0)) for name, key in ALLOCATOR_COUNTERS.items()}


def _triton_runtime_knobs() -> Any | None:
    """Triton's runtime knobs (Triton >= 3.4), where its JIT and kernel-load hooks live; None without them."""
    try:
        from triton import knobs
    except ImportError:
        return None
    return getattr(knobs, "runtime", None)


def _chain_hook(owner: Any, name: str, hook: Callable[..., Any]) -> None:
    """Add ``hook`` to the hook ``name`` of ``owner``: Triton keeps some hooks as a chain (``add``), others
    as one optional callable, which then runs before ours and keeps its return value (a JIT cache hook that
    returns true skips the compilation)."""
    current = getattr(owner, name)
    if hasattr(current, "add"):
        current.add(hook)
        return

    def both(*args: Any, **kwargs: Any) -> Any:
        result = current(*args, **kwargs) if current is not None else None
        hook(*args, **kwargs)
        return result

    setattr(owner, name, both)


class PhaseTimer:
    """Accumulates CUDA-event durations and host step periods per (phase, batch size) and mirrors them to a
    JSON file."""

    def __init__(
        self,
        out_dir: Path,
        make_event: Callable[[], Any] = _cuda_timing_event,
        clock: Callable[[], float] = time.perf_counter,
        allocator_counters: Callable[[], dict[str, int]] = _cuda_allocator_counters,
    ) -> None:
        self.path = out_dir / f"phases_{os.getpid()}.json"
        self.make_event = make_event
        self.clock = clock
        self.allocator_counters = allocator_counters
        self.pending: deque[tuple[str, Any, Any]] = deque()
        self.totals: dict[str, list[float]] = {}
        self._last_launch: tuple[int, float] | None = None  # (batch size, clock) of the last target step
        self._dirty = False
        self._since_flush = 0  # records since the last flush: one flush (a file write at most) per 64
        self._started: dict[str, float] = {}  # a GC pass or Triton work under way: when it began
        self._last_batch = 0  # batch size of the last target step launched, prefills between or not

    def timed(self, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` between two CUDA events recorded as ``key`` (``<phase>/<batch size>``), and add the host
        time the call took as ``<phase>_host/<batch size>``: a graph replay launches in well under a
        millisecond, an eager forward launches kernel by kernel, and where that launch time reaches the
        events' GPU time the phase waits for the host, not for its kernels."""
        start, end = self.make_event(), self.make_event()
        launched = self.clock()
        start.record()
        out = fn(*args, **kwargs)
        end.record()
        phase, _, bs = key.partition("/")
        self._add(f"{phase}_host/{bs}", (self.clock() - launched) * 1000.0)
        self.pending.append((key, start, end))
        self._since_flush += 1
        if self._since_flush >= _FLUSH_EVERY:
            self.flush()
        return out

    def step_launched(self, batch_size: int) -> None:
        """A target decode/verify step is being launched: add the period since the previous one at the same
        batch size."""
        now = self.clock()
        self._last_batch = batch_size
        last = self._last_launch
        if last is not None and last[0] == batch_size:
            self._add(f"{STEP_WALL}/{batch_size}", (now - last[1]) * 1000.0)
        self._last_launch = (batch_size, now)

    def other_forward(self) -> None:
        """A prefill (or other non-step) forward ran: the next step's period would include it."""
        self._last_launch = None

    def watch_gc(self) -> None:
        """Also time this process's garbage-collector passes: ``gc_gen<generation>/<batch size>``, the batch
        size being that of the last step launched (0 before any). A full pass scans every live object, so
        it grows with the running requests, and it stops the scheduler wherever it lands, a step's launch
        included: these records tell such pauses from the steps' own host work."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._begin("gc")
        else:
            self._end("gc", f"gc_gen{info['generation']}")

    def watch_triton(self, runtime: Any | None = None) -> bool:
        """Also time Triton's work on this process's kernels, at the batch size of the last step launched:
        ``triton_jit`` from a JIT cache miss to the compiled kernel (a compilation, or a load from Triton's
        disk cache), ``triton_load`` the compiled kernel's load onto the GPU at its first launch. A kernel
        meets a new specialisation only at some batch sizes (an integer argument changing class, a new
        constexpr), and that work stops the scheduler inside a step: these records tell such stalls from
        the allocator's and the garbage collector's. False where this Triton has no such hooks."""
        runtime = runtime if runtime is not None else _triton_runtime_knobs()
        names = ("jit_cache_hook", "jit_post_compile_hook", "kernel_load_start_hook", "kernel_load_end_hook")
        if runtime is None or not all(hasattr(runtime, n) for n in names):
            return False
        _chain_hook(runtime, "jit_cache_hook", lambda *a, **k: self._begin("triton_jit"))
        _chain_hook(runtime, "jit_post_compile_hook", lambda *a, **k: self._end("triton_jit"))
        _chain_hook(runtime, "kernel_load_start_hook", lambda *a, **k: self._begin("triton_load"))
        _chain_hook(runtime, "kernel_load_end_hook", lambda *a, **k: self._end("triton_load"))
        return True

    def _begin(self, what: str) -> None:
        self._started[what] = self.clock()

    def _end(self, what: str, name: str | None = None) -> None:
        """Record the span of ``what`` begun last as ``<name or what>/<batch size of the last step>``."""
        began = self._started.pop(what, None)
        if began is not None:
            self._add(f"{name or what}/{self._last_batch}", (self.clock() - began) * 1000.0)

    def _add(self, key: str, ms: float) -> None:
        entry = self.totals.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += ms
        self._dirty = True

    def flush(self) -> None:
        """Add the records whose end the GPU has passed (in launch order, one stream) and rewrite the file;
        later records wait for a later flush."""
        self._since_flush = 0
        while self.pending and self.pending[0][2].query():
            key, start, end = self.pending.popleft()
            self._add(key, start.elapsed_time(end))
        if not self._dirty:
            return
        self._dirty = False
        for name, value in self.allocator_counters().items():
            self.totals[f"allocator_{name}/all"] = [value, 0.0]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.totals))
        tmp.replace(self.path)


_timer: PhaseTimer | None = None


def _get_timer() -> PhaseTimer:
    global _timer
    if _timer is None:
        out = Path(os.environ[ENV])
        out.mkdir(parents=True, exist_ok=True)
        _timer = PhaseTimer(out)
        _timer.watch_gc()
        _timer.watch_triton()
    return _timer


def is_short_draft(runner: Any, forward_batch: Any) -> bool:
    """Whether a draft forward is adaptive verify's shorter draft (``DFLARE_DRAFT_BLOCKS``): one
    carrying a ragged layout, or a uniform batch of fewer positions per request than the server's block
    (how FA3 gets it, short_draft.py)."""
    if getattr(getattr(forward_batch, "spec_info", None), "ragged_verify_layout", None) is not None:
        return True
    block = getattr(getattr(runner, "server_args", None), "speculative_num_draft_tokens", None)
    input_ids, bs = getattr(forward_batch, "input_ids", None), int(forward_batch.batch_size)
    return bool(block) and input_ids is not None and bs > 0 and input_ids.numel() < bs * int(block)


def around_model_forward(original: Any, runner: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
    mode = forward_batch.forward_mode
    timer = _get_timer()
    if getattr(runner, "is_draft_worker", False):
        phase = "draft_short" if is_short_draft(runner, forward_batch) else "draft"
    elif mode.is_target_verify():
        phase = "verify"
    elif mode.is_decode():
        phase = "decode"
    else:
        if not mode.is_idle():
            timer.other_forward()
        return original(runner, forward_batch, *args, **kwargs)
    bs = int(forward_batch.batch_size)
    if phase in ("verify", "decode"):  # one launch per step: a draft, short or whole, belongs to its verify
        timer.step_launched(bs)
    return timer.timed(f"{phase}/{bs}", original, runner, forward_batch, *args, **kwargs)


def around_context_kv(original: Any, worker: Any, *args: Any, **kwargs: Any) -> Any:
    commit_lens = kwargs.get("commit_lens")
    if commit_lens is None:  # prefill materialisation
        return original(worker, *args, **kwargs)
    key = f"context_kv/{int(commit_lens.shape[0])}"
    return _get_timer().timed(key, original, worker, *args, **kwargs)


HOOKS = (
    ("sglang.srt.model_executor.model_runner.ModelRunner.forward", around_model_forward, "AROUND"),
    (
        "sglang.srt.speculative.dflash_worker_v2.DFlashWorkerV2._append_target_hidden_to_draft_kv_by_loc",
        around_context_kv,
        "AROUND",
    ),
    (
        "sglang_ext.sglang_plugin.worker.DFlareWorkerV2._append_target_hidden_to_draft_kv_by_loc",
        around_context_kv,
        "AROUND",
    ),
)


def enabled() -> bool:
    return bool(os.environ.get(ENV))
