"""How an eager draft of a block shorter than the configured one reaches the draft attention backend.

SGLang sizes a uniform target-verify batch (what a draft forward is) by the block the server was started
with, a backend attribute. A draft of ``width`` < block positions per request can be handed over two ways:

* as a ragged layout of equal lengths riding the spec input: every backend that runs adaptive verify reads
  it in eager forwards, but FA3 then reads the layout's longest sequence back from the GPU
  (``cache_seqlens_int32.max().item()``). The host waits there for the previous verify to finish, every
  step, and the GPU idles while the host prepares the draft and the verify: on an H100 at batch 128, 3.5 ms
  of a 35 ms step, and 53 % of the scheduler's samples (``docs/benchmarks.md``);
* as a uniform batch of ``width`` per request, with the backend's configured width set to ``width`` for
  that forward: FA3 then sizes it from the host's sequence lengths, no read-back, and builds the same
  attention metadata (``tests/plugin/test_short_draft.py`` compares them).

FA3 takes the second way; any other backend keeps the ragged layout.

On FA3 with CUDA graphs on, each shorter width also gets CUDA graphs of its own (``capture_graphs``): a
second graph runner of SGLang's on the draft model runner, captured at that width with an FA3 backend of
its own (graph runners keep attention metadata per batch size, so two widths cannot share one backend),
without the block's fused greedy head (it reads a whole block per request; a shorter draft's ids come
from the same head outside the graph). ``replaying`` hands the draft runner that width's graphs and
backend for one forward. Why: an eager forward of the drafter launches its kernels one by one from the
host, which the whole block's draft, replayed from a graph, does not; where the launches take longer than
the kernels, the GPU waits (``<phase>_host`` in phase_timing.py shows it). The GPU check of the demo pair
compares their output with AR's (``tests/gpu/check_adaptive.py``). ``DFLARE_SHORT_DRAFT_GRAPHS=0`` keeps
shorter drafts eager.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

GRAPHS_ENV = "DFLARE_SHORT_DRAFT_GRAPHS"

logger = logging.getLogger(__name__)


def sized_on_host(backend: Any) -> bool:
    """Whether ``backend`` sizes a uniform target-verify batch from the host (SGLang's FA3 backend), so a
    shorter draft runs as a uniform batch under ``uniform_width`` instead of a ragged layout."""
    try:
        from sglang.srt.layers.attention.flashattention_backend import FlashAttentionBackend
    except ImportError:  # no FA3 in this SGLang build
        return False
    return isinstance(backend, FlashAttentionBackend)


@contextmanager
def uniform_width(backend: Any, width: int) -> Iterator[None]:
    """``backend`` sizes uniform target-verify batches at ``width`` tokens per request while inside (the
    forward of one shorter draft), and at its configured width again after, whatever happens inside."""
    configured = backend.speculative_num_draft_tokens
    backend.speculative_num_draft_tokens = int(width)
    try:
        yield
    finally:
        backend.speculative_num_draft_tokens = configured


@dataclass(frozen=True)
class WidthGraphs:
    """CUDA graphs of the draft forward at one shorter width, and the attention backend they were captured
    with (its metadata buffers are the graphs' inputs)."""

    width: int
    backend: Any
    runner: Any  # SGLang's DecodeCudaGraphRunner, captured at ``width`` tokens per request


def graphs_wanted(environ: dict[str, str] | None = None) -> bool:
    """Whether shorter drafts get CUDA graphs (``DFLARE_SHORT_DRAFT_GRAPHS``: on unless ``0``)."""
    env = os.environ if environ is None else environ
    return env.get(GRAPHS_ENV, "1").strip() != "0"


def capture_graphs(model_runner: Any, widths: Sequence[int]) -> dict[int, WidthGraphs]:
    """CUDA graphs of ``model_runner``'s (the drafter's) forward at each of ``widths`` tokens per request,
    for every batch size its own graphs cover. Call after the runner captured its whole-block graphs.

    A capture that fails (GPU memory) is logged and leaves that width eager: slower, never wrong."""
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    graphs: dict[int, WidthGraphs] = {}
    hooks = model_runner.capture_tail_hooks
    model_runner.capture_tail_hooks = []  # the block's fused greedy head assumes the block's width
    try:
        for width in sorted({int(w) for w in widths}, reverse=True):  # larger first: smaller reuse its pool
            try:
                backend = model_runner._get_attention_backend()
                backend.speculative_num_draft_tokens = width
                runner = DecodeCudaGraphRunner(
                    model_runner, attn_backend=backend, speculative_num_draft_tokens=width
                )
            except Exception:  # any capture failure: keep this width eager, and say so
                logger.exception("DFLARE: CUDA graphs of draft block %d failed; it stays eager", width)
                continue
            graphs[width] = WidthGraphs(width, backend, runner)
            logger.info("DFLARE: CUDA graphs of draft block %d captured (batch sizes up to %d)",
                        width, max(runner.capture_bs))  # fmt: skip
    finally:
        model_runner.capture_tail_hooks = hooks
    return graphs


@contextmanager
def replaying(model_runner: Any, graphs: WidthGraphs) -> Iterator[None]:
    """``model_runner`` forwards through ``graphs`` (and their attention backend) while inside, so a draft
    of that width replays a graph where its batch size was captured and runs eagerly at that width
    elsewhere; its own whole-block graphs and backend come back after, whatever happens inside."""
    saved = model_runner.decode_cuda_graph_runner, model_runner.attn_backend
    model_runner.decode_cuda_graph_runner, model_runner.attn_backend = graphs.runner, graphs.backend
    try:
        yield
    finally:
        model_runner.decode_cuda_graph_runner, model_runner.attn_backend = saved
