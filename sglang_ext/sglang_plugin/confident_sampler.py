"""The draft's greedy head inside the draft CUDA graph, with each draft's top-1 probability as well.

SGLang's DFlash worker folds the drafter's greedy head into the draft CUDA graph (its
``_DflashDraftSampler``: the target's LM head over the drafted positions, an argmax, under tensor
parallelism a per-shard (max, id) all-gather). Adaptive verify also needs each draft's top-1 probability,
the confidence the policy plans with; computed apart, it is a second LM-head product over every drafted
position (at batch 128 and block 16, 1,920 rows x 152 k tokens: a few ms per step). This head computes it
from the same logits: after the argmax, the logits are shifted by their maximum and exponentiated in
place (no second [rows, vocab] tensor), and their sum gives the probability of the maximum,
``1 / sum(exp(logit - max))``. Under tensor parallelism each rank's (max, log-sum-exp) joins the all-gather
of the ids and ``vocab_parallel.combine_top1_stats`` combines them, as for the confidences computed apart.

With a draft vocabulary (``draft_vocab.json`` in the drafter's checkpoint, sglang_ext.dflare.draft_vocab)
the head is that subset's rows of each rank's shard, and ``id_map`` turns an argmax over them back into
target ids: the same kernels over a fifth of the rows for a 32k subset of Qwen3's 152k tokens.

Same contract as SGLang's head, so the worker and SGLang's capture hook use it unchanged: called with the
draft's hidden states [bs * block, H], it writes the draft tokens to ``out`` (and here the probabilities to
``top1``), static buffers that CUDA-graph replays fill in place. Ties in the argmax resolve as SGLang's do
(the first maximum; across ranks the lowest rank, which holds the lowest ids).
"""

from __future__ import annotations

from typing import Any

import torch

from sglang_ext.dflare.draft_vocab import DraftVocab
from sglang_ext.sglang_plugin.vocab_parallel import combine_top1_stats


class ConfidentDraftSampler:
    """Greedy draft tokens (``out``) and their top-1 probabilities (``top1``, float32) of every drafted
    position, for up to ``max_tokens`` positions (max batch x (block - 1))."""

    def __init__(
        self,
        *,
        weight: torch.Tensor,
        block_size: int,
        num_org: int,
        org_vocab_start: int,
        max_tokens: int,
        tp_group: Any | None = None,
        id_map: torch.Tensor | None = None,
    ) -> None:
        self.weight, self.block_size = weight, int(block_size)
        self.num_org, self.org_vocab_start = int(num_org), int(org_vocab_start)
        self.id_map = id_map  # [num_org] target id of each head row (a draft vocabulary), else consecutive
        self.tp_group = tp_group
        self.tp_size = int(tp_group.world_size) if tp_group is not None else 1
        device = weight.device
        self.out = torch.empty((max_tokens,), dtype=torch.int64, device=device)
        self.top1 = torch.empty((max_tokens,), dtype=torch.float32, device=device)
        if self.tp_size > 1:  # fixed addresses: a replayed graph's collectives write where it captured them
            gathered = self.tp_size * max_tokens
            self.local_stats = torch.empty((max_tokens, 2), dtype=torch.float32, device=device)
            self.local_ids = torch.empty((max_tokens,), dtype=torch.int64, device=device)
            self.gathered_stats = torch.empty((gathered, 2), dtype=torch.float32, device=device)
            self.gathered_ids = torch.empty((gathered,), dtype=torch.int64, device=device)

    @classmethod
    def replacing(cls, sampler: Any) -> ConfidentDraftSampler:
        """This head in place of SGLang's ``_DflashDraftSampler`` ``sampler``, on the same LM head shard."""
        return cls(
            weight=sampler.weight,
            block_size=sampler.block_size,
            num_org=sampler.num_org,
            org_vocab_start=sampler.org_vocab_start,
            max_tokens=int(sampler.out.numel()),
            tp_group=sampler.tp_group,
        )

    @classmethod
    def over_draft_vocab(cls, sampler: Any, vocab: DraftVocab) -> ConfidentDraftSampler:
        """This head over ``vocab``'s rows of ``sampler``'s LM-head shard (a contiguous copy, made once)."""
        rows, ids = vocab.shard(int(sampler.org_vocab_start), int(sampler.num_org))
        device = sampler.weight.device
        head = sampler.weight.detach().index_select(0, rows.to(device)).contiguous()
        return cls(
            weight=head,
            block_size=sampler.block_size,
            num_org=int(head.shape[0]),
            org_vocab_start=0,
            max_tokens=int(sampler.out.numel()),
            tp_group=sampler.tp_group,
            id_map=ids.to(device),
        )

    def __call__(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None = None) -> None:
        """The graph's call: ``hidden_states`` [bs * block, H] of whole blocks; position 0 of each block is
        the committed token, the others are drafted."""
        block = self.block_size
        bs = hidden_states.shape[0] // block
        self.draft(hidden_states.view(bs, block, -1)[:, 1:, :].reshape(-1, hidden_states.shape[-1]))

    def draft(self, drafted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and top-1 probabilities of the drafted rows ``drafted`` [n, H] (n up to ``max_tokens``),
        written to ``out[:n]`` and ``top1[:n]`` and returned as those views: also what an eager draft of a
        shorter block calls, so it too pays one LM-head product."""
        n = drafted.shape[0]
        logits = torch.matmul(drafted.to(self.weight.dtype), self.weight[: self.num_org].T)
        ids = torch.argmax(logits, dim=-1)
        top = logits.gather(1, ids[:, None])
        shifted_sum = logits.sub_(top).exp_().sum(dim=-1, dtype=torch.float32)  # in place: no second logits
        ids = self.id_map[ids] if self.id_map is not None else ids + self.org_vocab_start
        if self.tp_size == 1:
            self.out[:n].copy_(ids)
            self.top1[:n].copy_(shifted_sum.reciprocal())
            return self.out[:n], self.top1[:n]
        stats, local_ids = self.local_stats[:n], self.local_ids[:n]
        stats[:, 0].copy_(top.squeeze(1))
        stats[:, 1].copy_(top.squeeze(1).float() + shifted_sum.log())
        local_ids.copy_(ids)
        gathered_stats = self.gathered_stats[: self.tp_size * n]
        gathered_ids = self.gathered_ids[: self.tp_size * n]
        self.tp_group.all_gather_into_tensor(gathered_stats, stats)
        self.tp_group.all_gather_into_tensor(gathered_ids, local_ids)
        per_rank = gathered_stats.view(self.tp_size, n, 2)
        best_rank = torch.argmax(per_rank[..., 0], dim=0)  # first maximum: the lowest rank's ids
        self.out[:n].copy_(gathered_ids.view(self.tp_size, n).gather(0, best_rank[None]).squeeze(0))
        self.top1[:n].copy_(combine_top1_stats(per_rank))
        return self.out[:n], self.top1[:n]
