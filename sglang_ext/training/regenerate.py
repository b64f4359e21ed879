"""Regenerate the corpus responses with the target, as the DFlash/DFlare recipe prescribes.

A drafter is trained to predict what *the target* would say, so the assistant spans it learns from are
the target's own generations, not the corpus text. Following the recipe, each generation draws its
temperature from {0.0: 4, 0.3: 1, 0.5: 1, 0.7: 1, 1.0: 3} (weights); here the draw is per batch and
stratified (each run of 10 batches is one shuffled copy of the mix), so a short run with large batches
still follows the mix instead of drawing, say, mostly temperature-1 batches. A
generation that hits ``max_new_tokens`` without ending its turn is dropped (a looping tail would teach
the drafter, and inflate acceptance on, text no one asked for).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from sglang_ext.training.data import TokenizedChats

logger = logging.getLogger(__name__)

RECIPE_TEMPERATURES: tuple[tuple[float, int], ...] = ((0.0, 4), (0.3, 1), (0.5, 1), (0.7, 1), (1.0, 3))


@dataclass(frozen=True)
class Decoding:
    """How one batch is generated (``temperature`` 0 = greedy); ``keep_unfinished`` keeps generations cut
    at ``max_new_tokens`` instead of dropping them."""

    temperature: float
    max_new_tokens: int
    eos_id: int
    pad_id: int
    keep_unfinished: bool = False


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], decoding: Decoding
) -> list[list[int] | None]:
    """Left-padded batched ``generate``; a row's continuation up to and including eos, else None
    (or, with ``keep_unfinished``, the truncated continuation)."""
    temperature, eos_id = decoding.temperature, decoding.eos_id
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), decoding.pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    sampling = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {}
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=decoding.max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=decoding.pad_id,
        do_sample=temperature > 0,
        **sampling,
    )
    results: list[list[int] | None] = []
    for row in out[:, width:].tolist():
        if eos_id in row:
            results.append(row[: row.index(eos_id) + 1])
        else:
            results.append(row if decoding.keep_unfinished else None)
    return results


def temperature_schedule(temperatures: Sequence[tuple[float, int]], rng: random.Random) -> Iterator[float]:
    """Endless per-batch temperatures: each run of sum(weights) batches is one shuffled copy of the mix."""
    mix = [t for t, w in temperatures for _ in range(w)]
    while True:
        yield from rng.sample(mix, len(mix))


def generate_halving_on_oom(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], decoding: Decoding
) -> list[list[int] | None]:
    """``generate_batch``, retried as two halves when the GPU runs out of memory.

    Large batches are what make regeneration of a small target fast (it is per-step overhead bound), but
    a batch's memory depends on its longest prompt; halving on OOM keeps a long batch from ending the run.
    """
    try:
        return generate_batch(model, prompts, decoding)
    except torch.OutOfMemoryError:
        if len(prompts) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(prompts) // 2
        logger.warning("out of memory at batch %d: generating it as two halves", len(prompts))
        return [
            *generate_halving_on_oom(model, prompts[:half], decoding),
            *generate_halving_on_oom(model, prompts[half:], decoding),
        ]


def regenerate(
    model: torch.nn.Module,
    chats: TokenizedChats,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int = 384,
    batch_size: int = 256,
    time_budget: float | None = None,
    seed: int = 0,
    temperatures: Sequence[tuple[float, int]] = RECIPE_TEMPERATURES,
    keep_unfinished: bool = False,
) -> tuple[TokenizedChats, dict[str, float]]:
    """Target-generated version of ``chats`` (prompts kept), in a seeded random order.

    With ``time_budget`` (seconds) generation stops after the batch that crosses it, so the result may
    cover only part of the prompts. Returns the new samples and counts for the log.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    order = list(range(len(chats)))
    rng.shuffle(order)
    schedule = temperature_schedule(temperatures, rng)
    samples, prompt_lens, keys = [], [], []
    dropped = 0
    start = time.perf_counter()
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(batches, desc="regenerate", mininterval=2.0)
    for batch in bar:
        if time_budget is not None and time.perf_counter() - start > time_budget:
            break
        batch = sorted(batch, key=lambda i: len(chats.samples[i]))
        temperature = next(schedule)
        prompts = [chats.prompt(i) for i in batch]
        decoding = Decoding(temperature, max_new_tokens, eos_id, pad_id, keep_unfinished)
        responses = generate_halving_on_oom(model, prompts, decoding)
        for i, response in zip(batch, responses, strict=True):
            if response is None or len(response) < 2:
                dropped += 1
                continue
            samples.append(chats.prompt(i) + response)
            prompt_lens.append(chats.prompt_lens[i])
            keys.append(chats.keys[i])
        bar.set_postfix(kept=len(samples), dropped=dropped)
    stats = {
        "prompts_seen": len(samples) + dropped,
        "kept": len(samples),
        "dropped_unfinished": dropped,
        "seconds": time.perf_counter() - start,
    }
    logger.info("regenerated %s", stats)
    return TokenizedChats(samples, prompt_lens, keys), stats
