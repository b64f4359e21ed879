"""The drafter's top-1 probabilities from SGLang's LM head, whole or split over tensor-parallel ranks.

The adaptive step's confidences are the softmax maximum of the drafter's logits under the target's LM head
(``adaptive.top1_probabilities`` for a whole head). Under tensor parallelism SGLang's ``ParallelLMHead``
(a ``VocabParallelEmbedding``) holds one vocab shard per rank, laid out as in SGLang 0.5.17's
``VocabParallelEmbeddingShardIndices``: the shard's base-vocab rows ``[0, num_org_elements)``, base padding
up to ``num_org_elements_padded``, then the added (LoRA) rows ``[num_org_elements_padded,
num_org_elements_padded + num_added_elements)`` and their padding. Padding rows are zero-filled, not
tokens: counted, they would add ``exp(0)`` terms to the softmax and could even be its maximum, so only the
real rows count (SGLang's own vocab-parallel greedy draft sampler,
``_greedy_sample_from_vocab_parallel_head``, reads the same two ranges).

Each rank reduces its shard to two numbers per row, the largest logit ``m_r`` and the log-sum-exp
``l_r``; one all-gather over the TP group hands every rank all of them, and the softmax maximum of the
whole vocab is ``exp(max_r m_r - logsumexp_r l_r)``. One collective of ``[rows, 2]`` floats instead of
an all-reduce of the maximum followed by one of the shifted sums, which would be two round trips.
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_ext.sglang_plugin.adaptive import top1_probabilities


def vocab_rows(shard: Any) -> list[tuple[int, int]]:
    """The local row ranges of ``lm_head.weight`` that are tokens (SGLang's ``shard_indices``), padding
    left out."""
    base = int(shard.num_org_elements)
    added_start = int(shard.num_org_elements_padded)
    return [(0, base), (added_start, added_start + int(shard.num_added_elements))]


def shard_top1_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: list[tuple[int, int]],
    bias: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """[n, 2] float32: per row of ``hidden`` [n, H], the largest logit and the log-sum-exp of the logits
    over the ``rows`` of ``weight`` [V_local, H] (``-inf`` both for a shard without tokens), in chunks so
    no [n, V_local] logits live at once."""
    parts = [(weight[a:b], None if bias is None else bias[a:b]) for a, b in rows if b > a]
    stats = torch.full((hidden.shape[0], 2), float("-inf"), dtype=torch.float32, device=hidden.device)
    if not parts:
        return stats
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk].to(weight.dtype)
        pieces = [torch.matmul(h, w.T) if b is None else torch.matmul(h, w.T) + b for w, b in parts]
        logits = torch.cat(pieces, dim=-1).float()
        stats[start : start + chunk, 0] = logits.max(dim=-1).values
        stats[start : start + chunk, 1] = torch.logsumexp(logits, dim=-1)
    return stats


def combine_top1_stats(stats: torch.Tensor) -> torch.Tensor:
    """[ranks, n, 2] per-shard (max, log-sum-exp) -> [n] softmax maximum over the union of the shards."""
    return torch.exp(stats[..., 0].max(dim=0).values - torch.logsumexp(stats[..., 1], dim=0))


def lm_head_top1_probabilities(hidden: torch.Tensor, lm_head: Any, chunk: int = 1024) -> torch.Tensor:
    """float32 [n]: the top-1 probability of each row of ``hidden`` [n, H] (replicated on every TP rank,
    as the drafter's hidden states are) under the whole vocab of ``lm_head``. With the head split over
    ranks this is a collective: every rank of the TP group must call it with the same rows, and every rank
    gets the same result."""
    shard = getattr(lm_head, "shard_indices", None)
    if shard is None:  # a plain weight: every row is a token
        return top1_probabilities(hidden, lm_head.weight, chunk)
    stats = shard_top1_stats(hidden, lm_head.weight, vocab_rows(shard), getattr(lm_head, "bias", None), chunk)
    shards = int(getattr(lm_head, "tp_size", 1))
    if shards == 1:
        return combine_top1_stats(stats[None])
    from sglang.srt.distributed import get_tp_group

    group = get_tp_group()
    if int(group.world_size) != shards:  # a head split over the attention-TP group: DP attention
        raise RuntimeError(f"LM head split over {shards} ranks, TP group of {group.world_size}")
    gathered = group.all_gather(stats, dim=0)  # [shards * n, 2], rank by rank
    return combine_top1_stats(gathered.view(shards, -1, 2))
