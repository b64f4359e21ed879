"""Per-request speculative decoding statistics, shared by the engine, the plugin and the gateway.

This module must import without torch or SGLang: the gateway image has neither.

One definition of acceptance everywhere: a *verify step* is one target forward over a drafted block
(the prefill is not one); in a step the verifier accepts ``a`` of the ``B - 1`` drafted tokens
(longest matching prefix) and adds one bonus token, so the acceptance length of a request is
``tau = 1 + accepted_tokens / verify_steps`` and, over many requests,
``1 + sum(accepted) / sum(verify_steps)``. Drafts are counted as the verifier accepted them, before
any cut at a stop token or ``max_tokens``. ``draft_tokens`` counts the drafts the verifier checked:
``B - 1`` per step on SGLang, fewer where an engine verifies only a confident prefix of the block (the
reference engine's adaptive draft length), so ``acceptance_rate`` is always accepted / verified.

A *plain step* is a decode step of the request that verified no draft (the verify-width policy chose
width 0 for it, or a plain decode step for the whole batch): it commits one token, like a step of
autoregressive decoding, and is not a verify step, so tau stays the acceptance of the steps that did
speculate while ``plain_steps`` says how often the request did not. Engines without such a policy
(stock SGLang) never take one: 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SpecStats:
    """Counts of one request (or a sum of requests) decoded speculatively with block size ``B``.

    ``histogram[k]`` is the number of verify steps that accepted exactly ``k`` drafts, ``k`` in
    ``0..B-1``. Everything else is derived from it, so it cannot disagree with the totals, except the
    drafts verified when some step verified fewer than ``B - 1``: ``verified_drafts`` holds that count
    then (``None`` while every step verified the whole block, so such stats equal SGLang's).
    ``plain_steps`` counts the request's decode steps that verified no draft (module docstring).
    """

    block_size: int
    histogram: list[int] = field(default_factory=list)
    verified_drafts: int | None = None
    plain_steps: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not self.histogram:
            self.histogram = [0] * self.block_size
        if len(self.histogram) != self.block_size:
            raise ValueError(
                f"histogram has {len(self.histogram)} bins, expected block_size={self.block_size}"
            )
        whole = self.verified_drafts is not None and self.verified_drafts == sum(self.histogram) * (
            self.block_size - 1
        )
        if self.plain_steps < 0:
            raise ValueError(f"plain_steps must be >= 0, got {self.plain_steps}")
        if whole:  # whole blocks: the SGLang form, equal to stats without the count
            self.verified_drafts = None

    # ---- recording -------------------------------------------------------------------------
    def record_step(self, accepted: int, verified: int | None = None) -> None:
        """Record one verify step in which the verifier accepted ``accepted`` of the ``verified`` drafts
        it was given (default: the whole block's ``B - 1``)."""
        full = self.block_size - 1
        if verified is None:
            verified = full
        if not 0 <= accepted <= verified <= full:
            raise ValueError(f"accepted={accepted} of verified={verified} outside 0..{full}")
        if verified != full or self.verified_drafts is not None:
            self.verified_drafts = self.draft_tokens + verified
        self.histogram[accepted] += 1

    def record_plain_step(self) -> None:
        """Record one decode step that verified no draft (one token committed without speculation)."""
        self.plain_steps += 1

    def merge(self, other: SpecStats) -> SpecStats:
        """Sum of two stats (aggregation over requests); block sizes may differ (padded)."""
        size = max(self.block_size, other.block_size)
        hist = [0] * size
        for src in (self.histogram, other.histogram):
            for k, n in enumerate(src):
                hist[k] += n
        verified = self.draft_tokens + other.draft_tokens  # each side's own B - 1 per whole-block step
        plain = self.plain_steps + other.plain_steps
        return SpecStats(block_size=size, histogram=hist, verified_drafts=verified, plain_steps=plain)

    # ---- derived quantities ----------------------------------------------------------------
    @property
    def verify_steps(self) -> int:
        return sum(self.histogram)

    @property
    def draft_tokens(self) -> int:
        """Drafts the verifier checked: ``B - 1`` per verify step unless ``verified_drafts`` says fewer."""
        if self.verified_drafts is not None:
            return self.verified_drafts
        return self.verify_steps * (self.block_size - 1)

    @property
    def accepted_tokens(self) -> int:
        """Accepted drafts, bonus tokens excluded."""
        return sum(k * n for k, n in enumerate(self.histogram))

    @property
    def accepted_per_position(self) -> list[int]:
        """For draft position ``i`` (0-based, ``B - 1`` entries): steps that accepted it.

        Acceptance is a prefix, so position ``i`` was accepted exactly when more than ``i`` drafts were.
        """
        tail = 0
        counts = [0] * (self.block_size - 1)
        for i in range(self.block_size - 2, -1, -1):
            tail += self.histogram[i + 1]
            counts[i] = tail
        return counts

    @property
    def acceptance_length(self) -> float:
        """tau = 1 + accepted / verify steps; 1.0 before any verify step (plain decoding)."""
        steps = self.verify_steps
        return 1.0 + self.accepted_tokens / steps if steps else 1.0

    @property
    def acceptance_rate(self) -> float:
        proposed = self.draft_tokens
        return self.accepted_tokens / proposed if proposed else 0.0

    # ---- wire formats ----------------------------------------------------------------------
    def to_usage(self) -> dict[str, Any]:
        """The ``usage.speculative`` object of our OpenAI-compatible responses."""
        return {
            "block_size": self.block_size,
            "verify_steps": self.verify_steps,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_length": round(self.acceptance_length, 4),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "accepted_per_position": self.accepted_per_position,
            "histogram": list(self.histogram),
            "plain_decode_steps": self.plain_steps,
        }

    @classmethod
    def from_usage(cls, usage: Mapping[str, Any]) -> SpecStats:
        """Inverse of :meth:`to_usage` (the gateway reads what an engine sent)."""
        hist = [int(n) for n in usage["histogram"]]
        block_size = int(usage.get("block_size", len(hist)))
        steps = sum(hist)
        if steps != int(usage.get("verify_steps", steps)):
            raise ValueError("usage.speculative: verify_steps disagrees with histogram")
        verified = _verified(usage.get("draft_tokens"), hist, block_size, "draft_tokens")
        return cls(block_size, hist, verified, _plain(usage.get("plain_decode_steps"), "plain_decode_steps"))

    @classmethod
    def from_sglang_meta_info(
        cls, meta: Mapping[str, Any], block_size: int | None = None
    ) -> SpecStats | None:
        """Convert SGLang 0.5.17 ``meta_info`` speculative fields; ``None`` if it did not speculate.

        SGLang's ``spec_correct_drafts_histogram[k]`` counts verify steps that accepted ``k`` drafts,
        the same meaning as ours. Its ``spec_accept_length`` counts the prefill token, so it is not used:
        tau here is ``1 + spec_num_correct_drafts / spec_verify_ct``. Our engine-server adds
        ``spec_num_plain_steps`` (decode steps without speculation; absent from SGLang's: 0), and sends
        the fields for a request that only took plain steps too (``spec_verify_ct`` 0).
        """
        steps = int(meta.get("spec_verify_ct") or 0)
        plain = _plain(meta.get("spec_num_plain_steps"), "spec_num_plain_steps")
        if steps <= 0 and plain == 0:
            return None
        hist = meta.get("spec_correct_drafts_histogram") or meta.get("spec_accept_histogram")
        proposed = meta.get("spec_num_proposed_drafts") or meta.get("spec_proposed_drafts")
        if block_size is None:
            if proposed and steps > 0:
                block_size = int(proposed) // steps + 1
            elif hist:
                block_size = len(hist)
            else:
                raise ValueError("meta_info lacks the block size (no proposed drafts, no histogram)")
        if hist is None:
            correct = int(meta.get("spec_num_correct_drafts") or 0)
            raise ValueError(f"meta_info has spec_verify_ct={steps}, correct={correct} but no histogram")
        padded = [int(n) for n in hist][:block_size]
        padded += [0] * (block_size - len(padded))
        verified = _verified(
            meta.get("spec_num_verified_drafts"), padded, block_size, "spec_num_verified_drafts"
        )
        stats = cls(block_size=block_size, histogram=padded, verified_drafts=verified, plain_steps=plain)
        correct = meta.get("spec_num_correct_drafts")
        if correct is not None and int(correct) != stats.accepted_tokens:
            raise ValueError(
                f"meta_info spec_num_correct_drafts={correct} disagrees with its histogram "
                f"({stats.accepted_tokens})"
            )
        return stats


def _verified(sent: Any, hist: list[int], block_size: int, name: str) -> int | None:
    """A sent count of verified drafts for stats with this histogram, refused outside accepted..whole
    blocks (the constructor turns whole blocks into ``None``)."""
    if sent is None:
        return None
    sent, whole = int(sent), sum(hist) * (block_size - 1)
    accepted = sum(k * n for k, n in enumerate(hist))
    if not accepted <= sent <= whole:
        raise ValueError(f"{name}={sent} outside accepted {accepted}..{whole} (B - 1 per verify step)")
    return sent


def _plain(sent: Any, name: str) -> int:
    """A sent count of plain steps; absent (stats from stock SGLang or an older engine) means none."""
    plain = int(sent or 0)
    if plain < 0:
        raise ValueError(f"{name}={plain} is negative")
    return plain


def total(stats: Iterable[SpecStats]) -> SpecStats | None:
    """Aggregate over requests; ``None`` for an empty input."""
    result: SpecStats | None = None
    for s in stats:
        result = s if result is None else result.merge(s)
    return result
