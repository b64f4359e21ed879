"""``--warmups dflare``: decode a few small batches before the engine listens, so that its first users do not
wait while the speculative step's kernels compile.

Triton compiles a kernel once per specialisation of its integer arguments (equal to 1, a multiple of 16,
anything else), and a DFLARE step launches several kernels outside the CUDA graphs (the block's
preparation, accept and commit, the ragged verify's window) with batch sizes, token counts and lengths as
arguments. SGLang's own start-up request decodes a batch of one, so the first batch of 16 or of 3 requests
pays for compiling the rest. On an H100 a load benchmark's first requests at batch 32 ran at 1.08x plain
decoding where the same server, warmed up, ran at 1.68x (docs/benchmarks.md; how much of that this
warm-up recovers is for ``WARMUP=1`` in the load benchmark to measure). This warm-up decodes batches of
1, 3 and 16 requests with prompts of several lengths, greedy and sampled, in every class.

SGLang runs the functions named by ``--warmups`` before its HTTP server accepts requests, so a pod's
startup probe passes only once it is warm. A failure is logged and swallowed: a warm-up is an
optimisation, and it must never keep an engine from serving.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

NAME = "dflare"
BATCHES = (1, 3, 16)  # Triton's integer classes: 1, a multiple of 16, anything else
PROMPT_LENGTHS = (17, 48, 96, 131)
NEW_TOKENS = 24
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 50}


def prompt(index: int, vocab_size: int) -> list[int]:
    """Token ids of the ``index``-th warm-up prompt: a length from PROMPT_LENGTHS, ids inside the vocab,
    different from one prompt to the next (no prefix-cache hit turns the prefill into a no-op)."""
    length = PROMPT_LENGTHS[index % len(PROMPT_LENGTHS)]
    low = min(100, vocab_size // 2)
    span = max(1, min(vocab_size - low, 5000))
    return [low + (index * 7919 + 31 * i) % span for i in range(length)]


def batches(vocab_size: int) -> list[tuple[list[list[int]], dict[str, Any]]]:
    """(prompts, sampling params) of each warm-up batch: every size of BATCHES, greedy then sampled."""
    out, index = [], 0
    for size in BATCHES:
        for extra in ({"temperature": 0.0}, SAMPLING):
            params = {"max_new_tokens": NEW_TOKENS, "ignore_eos": True, **extra}
            out.append(([prompt(index + i, vocab_size) for i in range(size)], params))
            index += size
    return out


async def run(disaggregation_mode: str, tokenizer_manager: Any) -> None:
    """The ``--warmups dflare`` function (SGLang's warm-up signature): each batch of ``batches`` as one
    batched request through the tokenizer manager, drained to the end."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    started = time.monotonic()
    vocab_size = int(getattr(getattr(tokenizer_manager, "model_config", None), "vocab_size", 0) or 32000)
    try:
        for prompts, params in batches(vocab_size):
            request = GenerateReqInput(input_ids=prompts, sampling_params=params, log_metrics=False)
            if disaggregation_mode != "null":  # as SGLang's own warm-ups: a prefill server wants a room
                from sglang.srt.disaggregation.utils import FAKE_BOOTSTRAP_HOST

                request.bootstrap_room = list(range(len(prompts)))
                request.bootstrap_host = [FAKE_BOOTSTRAP_HOST] * len(prompts)
            async for _ in tokenizer_manager.generate_request(request, None):
                pass
    except Exception:
        logger.exception("DFLARE warm-up failed; serving without it (first requests may be slower)")
        return
    logger.info("DFLARE warm-up: batches of %s decoded in %.1f s", BATCHES, time.monotonic() - started)


def register() -> None:
    """Make ``--warmups dflare`` known to SGLang (its warm-up registry is a module-level dict)."""
    from sglang.srt.entrypoints.warmup import warmup

    warmup(NAME)(run)
