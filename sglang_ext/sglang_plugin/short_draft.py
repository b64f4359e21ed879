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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


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
