"""Shared builders and the lossless check for the core tests (float64 so near-ties cannot flip an argmax)."""

from __future__ import annotations

import functools

import torch

from sglang_ext.reference.engine import SpeculativeEngine
from sglang_ext.reference.sampling import SamplingParams
from sglang_ext.reference.tiny import tiny_drafter, tiny_target

F64 = torch.float64


@functools.cache
def target(seed: int, vocab: int = 48) -> torch.nn.Module:
    return tiny_target(
        vocab_size=vocab,
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        seed=seed,
        dtype=F64,
        max_position_embeddings=512,
    )


@functools.cache
def reference_greedy(seed: int, prompt: tuple[int, ...], n: int, vocab: int = 48) -> tuple[int, ...]:
    """The target's own greedy continuation from transformers' ``generate`` (the oracle)."""
    model = target(seed, vocab)
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        # explicit mask: generate would otherwise treat prompt ids equal to pad_token_id as padding
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return tuple(out[0, len(prompt) :].tolist())


def prompts_for(seed: int, count: int, vocab: int = 48) -> list[list[int]]:
    """Prompts of assorted lengths (1..17 tokens), ids below the mask id (vocab - 1)."""
    g = torch.Generator().manual_seed(1000 + seed)
    lengths = [1, 5, 17, 9, 2, 12, 3, 7][:count]
    return [torch.randint(0, vocab - 1, (n,), generator=g).tolist() for n in lengths]


class OracleEngine(SpeculativeEngine):
    """Drafts the target's true greedy tokens with draft position ``j`` corrupted, ``j`` cycling through
    ``0..B-1`` per row (``j == B-1``: nothing corrupted), so accept lengths 0..B-1 all occur."""

    def __init__(self, *args, references: dict[tuple[int, ...], tuple[int, ...]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.references = references
        self.vocab = self.runner.config.vocab_size
        self.steps: dict[str, int] = {}

    def _propose(self, rows: int) -> tuple[torch.Tensor, list[int]]:
        blk = self.block_size
        drafts = torch.zeros(rows, blk - 1, dtype=torch.int64)
        for r, s in enumerate(self._slots[:rows]):
            ref = self.references[tuple(s.req.prompt_ids)]
            done = len(s.output)  # tokens committed so far; ref[done-1] is the pending token
            true = list(ref[done : done + blk - 1])
            true += [0] * (blk - 1 - len(true))
            j = self.steps.get(s.req.request_id, 0) % blk
            self.steps[s.req.request_id] = j + 1
            if j < blk - 1:
                true[j] = (true[j] + 1) % (self.vocab - 1)
            drafts[r] = torch.tensor(true)
        return drafts, [blk - 1] * rows  # every draft verified


def greedy_mismatches(engine: SpeculativeEngine, seed: int, prompts: list[list[int]], n: int) -> list[str]:
    """Rows whose speculative greedy output differs from transformers' greedy output of that prompt alone."""
    results = engine.generate(prompts, SamplingParams(max_tokens=n))
    bad = []
    for prompt, res in zip(prompts, results, strict=True):
        ref = list(reference_greedy(seed, tuple(prompt), n, engine.runner.config.vocab_size))
        if res.output_ids != ref:
            bad.append(f"prompt {prompt}: engine {res.output_ids} != generate {ref}")
    return bad


def oracle_run(block_size: int, batch: int, seed: int = 2, n: int | None = None) -> tuple[list[str], list]:
    """Decode with :class:`OracleEngine`; returns (mismatches vs generate, results)."""
    n = n or max(40, block_size * (block_size + 1) // 2 + block_size)  # enough steps to cycle every length
    model = target(seed)
    prompts = prompts_for(seed, 4)
    refs = {tuple(p): reference_greedy(seed, tuple(p), n + block_size) for p in prompts}
    engine = OracleEngine(
        model, tiny_drafter(model, block_size=block_size), block_size, max_batch=batch, references=refs
    )
    results = engine.generate(prompts, SamplingParams(max_tokens=n))
    bad = [
        f"prompt {p}: engine {r.output_ids} != generate {list(refs[tuple(p)][:n])}"
        for p, r in zip(prompts, results, strict=True)
        if r.output_ids != list(refs[tuple(p)][:n])
    ]
    return bad, results
