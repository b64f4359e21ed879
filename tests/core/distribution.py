"""The target distribution of the sampling tests, computed independently of the engine: a tiny float64
target with a peaked head, the exact joint distribution of its first ``N_TOKENS`` tokens after
transformers' own temperature / top-k / top-p warpers (full forwards, no cache), the engine's samples of
the same prompt (one seed each) and a chi-square test between them."""

from __future__ import annotations

import functools
from collections import Counter

import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sglang_ext.reference.engine import SpeculativeEngine
from sglang_ext.reference.sampling import SamplingParams
from sglang_ext.reference.tiny import tiny_target

VOCAB, PROMPT, N_TOKENS, SAMPLES = 8, [3, 1, 4], 3, 3000


@functools.cache
def small_target() -> torch.nn.Module:
    model = tiny_target(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        seed=5,
        dtype=torch.float64,
        max_position_embeddings=64,
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(15.0)  # random init is nearly uniform; make it peaked like a real LM
    return model


def hf_probs(prefix: tuple[int, ...], params: SamplingParams) -> torch.Tensor:
    """Next-token distribution of the target after transformers' own warpers."""
    with torch.inference_mode():
        logits = small_target()(torch.tensor([prefix])).logits[:, -1]
    warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    return torch.softmax(warpers(torch.tensor([prefix]), logits), dim=-1)[0]


def expected_joint(params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(x1, x2, x3 | prompt) by enumerating the (filtered) tree."""
    joint: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(N_TOKENS):
        nxt: dict[tuple[int, ...], float] = {}
        for seq, p in joint.items():
            probs = hf_probs(tuple(PROMPT) + seq, params)
            for tok in torch.nonzero(probs).flatten().tolist():
                nxt[(*seq, tok)] = p * float(probs[tok])
        joint = nxt
    return joint


def sample_counts(engine: SpeculativeEngine, params: SamplingParams) -> Counter:
    batch = [
        SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            max_tokens=N_TOKENS,
            seed=10_000 + i,
        )
        for i in range(SAMPLES)
    ]
    results = engine.generate([PROMPT] * SAMPLES, batch)
    return Counter(tuple(r.output_ids) for r in results), results


def chi_square_pvalue(counts: Counter, expected: dict[tuple[int, ...], float]) -> float:
    """Chi-square goodness of fit; cells with expected count < 5 are pooled into one."""
    assert set(counts) <= set(expected), f"impossible sequences sampled: {set(counts) - set(expected)}"
    obs, exp, pooled_obs, pooled_exp = [], [], 0, 0.0
    for seq, p in expected.items():
        if p * SAMPLES >= 5:
            obs.append(counts.get(seq, 0))
            exp.append(p * SAMPLES)
        else:
            pooled_obs += counts.get(seq, 0)
            pooled_exp += p * SAMPLES
    if pooled_exp > 0:
        obs.append(pooled_obs)
        exp.append(pooled_exp)
    scale = sum(obs) / sum(exp)
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)
