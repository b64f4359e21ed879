"""Sampling parameters and the target-side sampler of the reference engine.

Speculative sampling here uses a *point-mass* draft: the drafter proposes one token per slot, the target
draws its own token from its (temperature / top-k / top-p filtered) distribution with the request's
seed, and a draft is accepted iff it equals that draw. The accept probability is p(draft) and after a
mismatch the target's draw is distributed as p restricted to tokens != draft, so the output distribution is
exactly the target's (no residual distribution needs to be formed).

Each sampled token's uniform is a hash of (request seed, the position it is drawn for), not the next draw of
a stream: which positions a step verifies (widths chosen per step by the engine's policy) then never moves
a later token's randomness, so a seeded request gives the same output at any width, block or batch. Still
exact: the token at a position is decided by the one draw whose prefix was committed; draws for the same
position under a prefix that was rejected were discarded unseen (a rejection is decided by earlier
positions only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters; ``temperature == 0`` is greedy, ``top_k == 0`` disables top-k."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 128
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        # accept lists from JSON callers, store tuples (the dataclass is hashable and immutable)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(str(s) for s in self.stop))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Target distribution after temperature, then top-k, then top-p (SGLang/HF order), in float32+.

    logits [..., V] -> probabilities [..., V] summing to 1 over the kept tokens.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scores = logits.to(dtype) / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        drop_sorted = mass_before >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over the last dim (first maximum on ties, NaN counts as the maximum, as ``argmax``).

    ``max(-1).indices`` is the same result at half of ``argmax``'s CPU time on a 4096-token vocabulary."""
    return logits.max(dim=-1).indices


_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment


def position_uniforms(seed: int, first: int, n: int) -> torch.Tensor:
    """Uniforms in [0, 1) (float64, [n]) for positions ``first..first+n-1`` of a request seeded ``seed``:
    outputs ``first+1..`` of the SplitMix64 stream seeded ``seed``, computed directly (counter-based), so a
    position's uniform does not depend on how many were drawn before it."""
    out = []
    for pos in range(first, first + n):
        z = (seed + (pos + 1) * _GAMMA) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        out.append(((z ^ (z >> 31)) >> 11) * 2.0**-53)
    return torch.tensor(out, dtype=torch.float64)


def sample_rows(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int | None],
    firsts: list[int],
    counts: list[int] | None = None,
) -> torch.Tensor:
    """One token per position: logits [b, n, V] -> tokens [b, n] (row r uses ``params[r]``).

    Greedy rows take the argmax; sampling rows draw by inverse CDF from :func:`position_uniforms` of their
    seed, slot j of row r being sequence position ``firsts[r] + j``, so a request's draws depend neither on
    the batch nor on how its positions were grouped into steps. ``counts[r]`` (default n) limits row r's
    draws to its first positions (the rest stay argmax, unused): rows verify blocks of their own length.
    """
    tokens = greedy_tokens(logits)
    for r, p in enumerate(params):
        if p.greedy:
            continue
        n = logits.shape[1] if counts is None else counts[r]
        probs = filtered_probs(logits[r, :n], p.temperature, p.top_k, p.top_p)  # [n, V]
        cdf = torch.cumsum(probs, dim=-1)
        seed = seeds[r]
        assert seed is not None, "a sampling row needs a seed"
        # computed on the CPU in float64: the same seed gives the same draws on any device
        u = position_uniforms(seed, firsts[r], n).to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
        drawn = torch.searchsorted(cdf, u, right=True).squeeze(-1)
        tokens[r, :n] = drawn.clamp_(max=probs.shape[-1] - 1)
    return tokens
