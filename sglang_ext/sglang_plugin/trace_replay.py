"""Acceptance-trace replay for benchmarks on dummy weights: ``DFLARE_TRACE_REPLAY=<dir of traces>``.

With random weights the target accepts nothing a drafter proposes, so a load benchmark of a random
Qwen3-8B-shaped pair needs acceptance from elsewhere. SGLang's own knob (``SGLANG_SIMULATE_ACC_LEN``) draws
one length per step for the whole batch and clamps it to the block: every request accepts alike and a
block of 8 keeps the acceptance of a block of 16. Replay instead gives each request one request of a
recorded (or synthetic) acceptance trace and, at every verify step, accepts exactly what that trace step
accepted within the verified window (``min(accepted, window)``, never a clamp of a long-block length).

The trace is chosen per request through SGLang's ``custom_params``: ``{"dflare_trace": "<name>"}`` picks
``<name>.json[.gz]`` in the directory (default: ``synthetic`` when present, else the first name), and the
optional ``"dflare_trace_request": i`` pins which trace request it replays (else they are dealt round
robin). A request that outlives its trace request starts it again.

Replay is a benchmark device: it is off unless the variable is set, it refuses to start unless the
weights are dummy (``--load-format dummy``), and it logs a warning at start and every 1,000 steps. The Helm
chart has no value that sets it.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sglang_ext.sglang_plugin import host_upload
from sglang_ext.traces.format import AcceptanceTrace, TraceStep, accepted_in_window

logger = logging.getLogger(__name__)

ENV = "DFLARE_TRACE_REPLAY"
TRACE_PARAM = "dflare_trace"
REQUEST_PARAM = "dflare_trace_request"
_MAX_TRACKED = 8192  # cursors of requests not seen for this many newer requests are dropped
_WARN_EVERY = 1000
_FIXED_TOKEN = 100  # the token SGLang's simulated acceptance writes when no target token is at hand


class TraceReplayError(ValueError):
    """Replay was asked for in a way that cannot work (no traces, real weights, unknown trace name)."""


def load_traces(directory: Path) -> dict[str, AcceptanceTrace]:
    """Every ``*.json`` / ``*.json.gz`` trace in ``directory``, keyed by file name without the suffixes."""
    traces = {}
    for path in sorted(directory.iterdir()):
        for suffix in (".json.gz", ".json"):
            if path.name.endswith(suffix):
                traces[path.name[: -len(suffix)]] = AcceptanceTrace.load(path)
                break
    if not traces:
        raise TraceReplayError(f"{ENV}={directory}: no *.json or *.json.gz acceptance traces there")
    return traces


class TraceReplay:
    """Per-request cursors into acceptance traces; turns a verify step's window into accepted lengths."""

    def __init__(self, traces: dict[str, AcceptanceTrace], default: str | None = None) -> None:
        if not traces:
            raise TraceReplayError("trace replay needs at least one trace")
        self.traces = traces
        self.default = default or ("synthetic" if "synthetic" in traces else next(iter(traces)))
        if self.default not in traces:
            raise TraceReplayError(f"default trace {self.default!r} is not one of {sorted(traces)}")
        self._dealt = dict.fromkeys(traces, 0)
        self._cursors: OrderedDict[str, list[Any]] = OrderedDict()  # rid -> [trace name, request, step]
        self.steps = 0

    def _cursor(self, req: Any) -> list[Any]:
        rid = str(req.rid)
        cursor = self._cursors.get(rid)
        if cursor is not None:
            self._cursors.move_to_end(rid)
            return cursor
        params = getattr(req.sampling_params, "custom_params", None) or {}
        name = str(params.get(TRACE_PARAM, self.default))
        if name not in self.traces:
            raise TraceReplayError(f"request {rid}: unknown trace {name!r}; have {sorted(self.traces)}")
        n_requests = len(self.traces[name].requests)
        if REQUEST_PARAM in params:
            index = int(params[REQUEST_PARAM]) % n_requests
        else:
            index = self._dealt[name] % n_requests
            self._dealt[name] += 1
        cursor = self._cursors[rid] = [name, index, 0]
        if len(self._cursors) > _MAX_TRACKED:
            self._cursors.popitem(last=False)
        return cursor

    def peek_steps(self, reqs: Sequence[Any]) -> list[TraceStep]:
        """The trace step each request's next verify will replay (cursors stay): the confidences an
        adaptive step plans with before it verifies."""
        steps = []
        for req in reqs:
            name, index, step = self._cursor(req)
            trace_request = self.traces[name].requests[index]
            steps.append(trace_request[step % len(trace_request)])
        return steps

    def next_steps(self, reqs: Sequence[Any]) -> list[TraceStep]:
        """This verify step's trace step of every request (cursors advance: call once per step)."""
        steps = []
        for req in reqs:
            cursor = self._cursor(req)
            name, index, step = cursor
            trace_request = self.traces[name].requests[index]
            steps.append(trace_request[step % len(trace_request)])
            cursor[2] = step + 1
        self.steps += 1
        if self.steps % _WARN_EVERY == 0:
            logger.warning("DFLARE trace replay active: %d verify steps replayed from traces", self.steps)
        return steps

    def accepted_lengths(self, reqs: Sequence[Any], windows: Sequence[int]) -> list[int]:
        """Drafts accepted per request when request ``r`` verifies ``windows[r]`` drafts this step."""
        return [
            accepted_in_window(step, int(w)) for step, w in zip(self.next_steps(reqs), windows, strict=True)
        ]


def write_replayed_acceptance(
    accepted: list[int],
    *,
    candidates: torch.Tensor,
    target_predict: torch.Tensor | None,
    accept_len: torch.Tensor,
    commit_lens: torch.Tensor,
    bonus: torch.Tensor,
    out_tokens: torch.Tensor,
) -> None:
    """Overwrite a verify step's outputs in place as if the target had accepted ``accepted[r]`` drafts.

    The same tensors and meaning as SGLang's simulated acceptance: ``out_tokens[r]`` = the accepted drafts,
    then the bonus token (the target's own token at that position when known).
    """
    bs, block = candidates.shape
    acc = host_upload.to_device(accepted, candidates.device, torch.int64)
    accept_len.copy_(acc)
    commit_lens.copy_(acc + 1)
    if target_predict is not None:
        new_bonus = target_predict.view(bs, block).gather(1, acc[:, None]).squeeze(1)
    else:
        new_bonus = torch.full((bs,), _FIXED_TOKEN, dtype=torch.int64, device=candidates.device)
    bonus.copy_(new_bonus.to(bonus.dtype))
    out_tokens.zero_()  # the scheduler reads the first accept + 1 entries of each row
    if block > 1:
        out_tokens[:, : block - 1].copy_(candidates[:, 1:])
    out_tokens.scatter_(1, acc[:, None], new_bonus[:, None].to(out_tokens.dtype))


def from_environment(server_args: Any) -> TraceReplay | None:
    """The replay the environment asks for, or None. Refuses real weights: replay would silently replace
    a real drafter's acceptance, so only a dummy-weight benchmark may use it."""
    directory = os.environ.get(ENV)
    if not directory:
        return None
    if str(getattr(server_args, "load_format", "")) != "dummy":
        raise TraceReplayError(
            f"{ENV} replays recorded acceptance instead of the target's own decisions: it is only for "
            "benchmarks on dummy weights (--load-format dummy)"
        )
    replay = TraceReplay(load_traces(Path(directory)))
    logger.warning(
        "DFLARE TRACE REPLAY ON (%s=%s): acceptance comes from traces %s, not from the target; "
        "outputs are meaningless, only for speed benchmarks",
        ENV,
        directory,
        sorted(replay.traces),
    )
    return replay
