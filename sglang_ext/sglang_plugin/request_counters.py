"""Per-request ``spec_num_verified_drafts`` and ``spec_num_plain_steps`` in SGLang 0.5.17's ``meta_info``.

SGLang counts a request's verify steps, accepted drafts and their histogram itself, but has no field
for the drafts a step actually let the target check (fewer than ``B - 1`` when the verify width is
chosen per request) nor for the decode steps that checked none. The DFLARE worker tells us both, and
these hooks carry them to ``meta_info`` with the meaning ``SpecStats.from_sglang_meta_info`` reads:

1. Scheduler process, worker: :func:`record_step` once per decode step, at launch (with overlap
   scheduling the step's result is processed one step later, so the step is only queued).
2. Scheduler process, result processing: an AROUND hook on
   ``SchedulerBatchResultProcessor._resolve_spec_v2_tokens`` takes the step recorded for the batch and
   adds it to the counters of each request that SGLang itself counted in that call (its
   ``spec_verify_ct`` went up; a finished or retracted request is skipped by SGLang and by us), so the
   two counts can never cover steps SGLang's own do not. SGLang counts every step as a verify step;
   a request that verified no draft took a *plain* step (``sglang_ext.stats``), so that count is moved:
   ``spec_verify_ct`` and ``spec_correct_drafts_histogram[0]`` go down by one, the plain steps up.
3. The counters ride in ``Req.customized_info`` under :data:`KEY`, SGLang's per-request extension
   that the output streamer slices into every output it sends and the detokenizer passes through.
4. Tokenizer manager (HTTP server process): a BEFORE hook on ``_handle_batch_output`` takes
   :data:`KEY` out of ``customized_info`` (so SGLang never copies it into ``meta_info``) and keeps the
   latest counters on the request's state; an AFTER hook on ``_calculate_spec_decoding_metrics``, which
   SGLang runs once a request finishes, writes the two fields (and, for a request that only took plain
   steps, the speculative fields SGLang leaves out when ``spec_verify_ct`` is 0).

Requests the worker never recorded (other algorithms, a request finished at prefill) are left alone.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

KEY = "dflare_spec_counters"
# Steps recorded but not yet processed: 1 without overlap scheduling, 2 with it; more means steps whose
# results never reached result processing (a recording outside decode), dropped with a warning.
_MAX_IN_FLIGHT = 8

_PROCESSOR = "sglang.srt.managers.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor"
_TOKENIZER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"


@dataclass
class RequestCounters:
    """One request's running totals, kept in ``req.customized_info[KEY]``."""

    verified_drafts: int = 0
    plain_steps: int = 0

    def __getitem__(self, _tokens: slice) -> list[tuple[int, int]]:
        """SGLang's output streamer slices each ``customized_info`` value by the tokens it sends; the
        counters are not per token, so every output carries one snapshot of the totals."""
        return [(self.verified_drafts, self.plain_steps)]


class _Step:
    """One recorded decode step: its requests (batch order) and the drafts each one verified."""

    def __init__(self, reqs: Sequence[Any], verified: Sequence[int] | torch.Tensor, plain: bool) -> None:
        self.reqs = list(reqs)
        self.plain = plain
        self._values: list[int] | None = None
        self._ready: torch.cuda.Event | None = None
        if isinstance(verified, torch.Tensor):
            if tuple(verified.shape) != (len(self.reqs),):
                raise ValueError(
                    f"verified_drafts has shape {tuple(verified.shape)}, expected ({len(self.reqs)},)"
                )
            if verified.is_cuda:  # copied behind the step's kernels: no host sync at launch
                self._host = torch.empty(verified.shape, dtype=verified.dtype, pin_memory=True)
                self._host.copy_(verified, non_blocking=True)
                self._ready = torch.cuda.Event()
                self._ready.record()
            else:
                self._values = [int(v) for v in verified.tolist()]
        else:
            if len(verified) != len(self.reqs):
                raise ValueError(f"{len(verified)} verified_drafts for {len(self.reqs)} requests")
            self._values = [int(v) for v in verified]
        if self._values is not None:
            _check_values(self._values, plain)

    def values(self) -> list[int]:
        """The per-request counts (waits for the device copy the first time, at result processing; values
        out of range are reported by :func:`settle`, which must not stop the scheduler)."""
        if self._values is None:
            assert self._ready is not None
            self._ready.synchronize()
            self._values = [int(v) for v in self._host.tolist()]
        return self._values

    def is_for(self, reqs: Sequence[Any]) -> bool:
        return len(reqs) == len(self.reqs) and all(a is b for a, b in zip(reqs, self.reqs, strict=True))


def _check_values(values: list[int], plain: bool) -> None:
    """Host values are checked at launch: a wrong count there is a bug of the worker, found by its tests."""
    if any(v < 0 for v in values):
        raise ValueError(f"negative verified_drafts: {values}")
    if plain and any(values):
        raise ValueError(f"a plain step verifies no drafts, got {values}")


_pending: deque[_Step] = deque()


def record_step(reqs: Sequence[Any], verified_drafts: Sequence[int] | torch.Tensor, plain: bool) -> None:
    """Record one decode/verify step of the DFLARE worker; call it once per step, in the scheduler process.

    ``reqs`` are the step's ``ScheduleBatch.reqs`` in batch order; ``verified_drafts[i]`` the drafts
    request ``i``'s window let the target check (``B - 1`` for a whole block, 0 for none); ``plain`` that
    the whole batch ran without speculation (all 0). A device tensor is copied without a host sync.
    Never for prefill (extend) or idle batches: their results are processed elsewhere.
    """
    if not reqs:
        return
    if len(_pending) >= _MAX_IN_FLIGHT:
        logger.warning(
            "DFLARE: %d recorded steps never reached result processing; dropping the oldest", len(_pending)
        )
        _pending.popleft()
    _pending.append(_Step(reqs, verified_drafts, plain))


def _take_step(reqs: Sequence[Any]) -> _Step | None:
    """The recorded step of this batch; older unmatched steps are dropped, newer ones kept (overlap)."""
    for k, step in enumerate(_pending):
        if step.is_for(reqs):
            if k:
                logger.warning("DFLARE: dropping %d recorded steps whose results were never processed", k)
            for _ in range(k + 1):
                matched = _pending.popleft()
            return matched
    return None


_reported: set[str] = set()


def _report_once(kind: str, message: str, *args: Any) -> None:
    """Log a worker bug once per process (it would otherwise repeat every step)."""
    if kind not in _reported:
        _reported.add(kind)
        logger.error(message + " (reported once)", *args)


def counters_of(req: Any) -> RequestCounters:
    """The request's counters, created in its ``customized_info`` on first use."""
    if req.customized_info is None:
        req.customized_info = {}
    counters = req.customized_info.get(KEY)
    if counters is None:
        counters = req.customized_info[KEY] = RequestCounters()
    return counters


def settle(
    step: _Step, reqs: Sequence[Any], verify_ct_before: Sequence[int], correct: Sequence[int], block_size: int
) -> None:
    """Add ``step`` to the requests SGLang counted (``spec_verify_ct`` rose) and move plain steps out of
    SGLang's verify count."""
    for req, before, verified, accepted in zip(reqs, verify_ct_before, step.values(), correct, strict=True):
        if req.spec_verify_ct == before:  # finished or retracted: SGLang did not count this step either
            continue
        counters = counters_of(req)
        if not accepted <= verified <= block_size - 1:
            believed = max(accepted, min(verified, block_size - 1))
            _report_once(
                "range",
                "DFLARE: request %s verified %d drafts but accepted %d (block %d); counted as %d",
                req.rid, verified, accepted, block_size, believed,
            )  # fmt: skip
            verified = believed
        if verified == 0:
            req.spec_verify_ct -= 1
            req.spec_correct_drafts_histogram[0] -= 1
            counters.plain_steps += 1
        else:
            counters.verified_drafts += verified


def around_resolve_spec_v2_tokens(
    original: Any, processor: Any, result: Any, batch: Any, *args: Any, **kwargs: Any
) -> Any:
    """AROUND hook of ``SchedulerBatchResultProcessor._resolve_spec_v2_tokens`` (decode results only)."""
    if not _pending:  # nothing recorded in this process: not a DFLARE scheduler
        return original(processor, result, batch, *args, **kwargs)
    reqs = batch.reqs
    before = [req.spec_verify_ct for req in reqs]
    out = original(processor, result, batch, *args, **kwargs)
    step = _take_step(reqs)
    if step is None:
        _report_once("unrecorded", "DFLARE: a decode step of %d requests was never recorded", len(reqs))
        return out
    block_size = int(processor.server_args.speculative_num_draft_tokens)
    settle(step, reqs, before, result.num_correct_drafts_per_req_cpu, block_size)
    return out


# ---- tokenizer manager (HTTP server process) -------------------------------------------------------


def latest_counters(chunk: Sequence[Any]) -> tuple[int, int] | None:
    """The newest snapshot in one request's ``customized_info[KEY]`` chunk (padding entries are None)."""
    for item in reversed(chunk):
        if item is not None:
            return int(item[0]), int(item[1])
    return None


def before_handle_batch_output(manager: Any, recv_obj: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE hook of ``TokenizerManager._handle_batch_output``: keep our counters on the requests'
    states and take them out of ``customized_info``."""
    packed = getattr(recv_obj, "customized_info", None)
    if packed is None:
        return None
    from sglang.srt.managers.io_struct import unwrap_from_pickle, wrap_as_pickle

    info = unwrap_from_pickle(packed)
    chunks = info.pop(KEY, None) if isinstance(info, dict) else None
    if chunks is None:
        return None
    recv_obj.customized_info = wrap_as_pickle(info) if info else None
    for rid, chunk in zip(recv_obj.rids, chunks, strict=True):
        latest = latest_counters(chunk)
        state = manager.rid_to_state.get(rid)
        if latest is not None and state is not None:
            setattr(state, KEY, latest)
    return None


def after_spec_decoding_metrics(
    _result: Any,
    manager: Any,
    meta_info: MutableMapping[str, Any],
    recv_obj: Any,
    i: int,
    *args: Any,
    **kwargs: Any,
) -> None:
    """AFTER hook of ``TokenizerManager._calculate_spec_decoding_metrics`` (a finished request)."""
    counters = getattr(manager.rid_to_state.get(recv_obj.rids[i]), KEY, None)
    if counters is not None:
        add_to_meta_info(
            meta_info,
            verified_drafts=counters[0],
            plain_steps=counters[1],
            block_size=int(manager.server_args.speculative_num_draft_tokens),
        )
    return None


def add_to_meta_info(
    meta_info: MutableMapping[str, Any], *, verified_drafts: int, plain_steps: int, block_size: int
) -> None:
    """Add our two counts to the speculative fields SGLang wrote, as our engine-server's ``meta_info``
    has them: ``spec_accept_rate`` becomes accepted / verified; a request that only took plain steps
    gets the whole set with ``spec_verify_ct`` 0 (SGLang writes none of it then)."""
    steps = int(meta_info.get("spec_verify_ct") or 0)
    if steps == 0 and plain_steps == 0:
        return
    if steps == 0:
        hist = [0] * block_size
        meta_info.update(
            spec_verify_ct=0,
            spec_num_correct_drafts=0,
            spec_num_proposed_drafts=0,
            spec_accept_length=0.0,
            spec_correct_drafts_histogram=hist,
            spec_accept_histogram=hist,
            spec_accepted_drafts=0,
            spec_proposed_drafts=0,
        )
    correct = int(meta_info.get("spec_num_correct_drafts") or 0)
    meta_info["spec_num_verified_drafts"] = verified_drafts
    meta_info["spec_num_plain_steps"] = plain_steps
    meta_info["spec_accept_rate"] = correct / verified_drafts if verified_drafts else 0.0


HOOKS = (
    (f"{_PROCESSOR}._resolve_spec_v2_tokens", around_resolve_spec_v2_tokens, "AROUND"),
    (f"{_TOKENIZER}._handle_batch_output", before_handle_batch_output, "BEFORE"),
    (f"{_TOKENIZER}._calculate_spec_decoding_metrics", after_spec_decoding_metrics, "AFTER"),
)
