"""Opt-in GPU timing of decode-step phases, for benchmarks: ``DFLARE_PHASE_TIMING=<dir>``.

When the variable is set, the plugin wraps SGLang's ``ModelRunner.forward`` (target decode, target
verify, draft forward) and the speculative workers' context-KV materialisation with CUDA events, and
each scheduler process keeps writing ``<dir>/phases_<pid>.json``: ``{"<phase>/<batch size>": [count,
total_ms]}``. Events are resolved every 64 records (one host sync), so the cost is a short stall per
64 forwards. It applies to AR, built-in DFLASH and DFLARE alike, which is what a side-by-side needs.
Prefill forwards are not recorded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV = "DFLARE_PHASE_TIMING"
_FLUSH_EVERY = 64


class PhaseTimer:
    """Accumulates CUDA-event durations per (phase, batch size) and mirrors them to a JSON file."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / f"phases_{os.getpid()}.json"
        self.pending: list[tuple[str, Any, Any]] = []
        self.totals: dict[str, list[float]] = {}

    def timed(self, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args, **kwargs)
        end.record()
        self.pending.append((key, start, end))
        if len(self.pending) >= _FLUSH_EVERY:
            self.flush()
        return out

    def flush(self) -> None:
        if not self.pending:
            return
        self.pending[-1][2].synchronize()
        for key, start, end in self.pending:
            entry = self.totals.setdefault(key, [0, 0.0])
            entry[0] += 1
            entry[1] += start.elapsed_time(end)
        self.pending.clear()
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
    return _timer


def around_model_forward(original: Any, runner: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
    mode = forward_batch.forward_mode
    if getattr(runner, "is_draft_worker", False):
        phase = "draft"
    elif mode.is_target_verify():
        phase = "verify"
    elif mode.is_decode():
        phase = "decode"
    else:
        return original(runner, forward_batch, *args, **kwargs)
    key = f"{phase}/{int(forward_batch.batch_size)}"
    return _get_timer().timed(key, original, runner, forward_batch, *args, **kwargs)


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
