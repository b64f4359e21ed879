"""The reference speculative engine: continuous batching, greedy and exact sampling, on any device.

One ``step()`` = (for rows already decoding) ONE drafter forward proposing ``B - 1`` tokens per row, then ONE
target forward over every row's block (new requests are prefilled in the same forward), the longest
accepted prefix + a bonus token committed per row, and both KV caches trimmed by setting row lengths.
Block size 1 is plain autoregressive decoding through the same code (the baseline of every benchmark).

Adaptive draft length (``min_draft_confidence``): the target verifies a row's drafts only as far as the
drafter believes in them, i.e. while the product of its top-token probabilities over drafts ``1..i`` stays
at or above the threshold (at least one draft). Deep drafts are rarely right unless the drafter is sure, and
on a CPU every verified row costs target compute, so this keeps most of tau at about half the verified
rows. It is lossless for any threshold: whatever is committed was checked by the target.

Observing verify steps (``step_observer``): a callback receives every verify step's drafter confidences
and accept counts (acceptance traces are recorded this way, :mod:`sglang_ext.traces.record`). Without one
the engine computes nothing extra.

Verify-width policy (``verify_policy``; the CLIs' CPU default, ``--verify-policy``; see
:mod:`sglang_ext.dflare.verify_policy`): instead of a fixed threshold, each step picks the verified width
that commits the most expected tokens per ms from the drafter's confidences, a calibration learnt from
what the target accepts, and a cost model of this machine's steps (profiled at start,
:mod:`sglang_ext.reference.step_profile`, then corrected by every step's measured time, which the engine
reports to the policy); when drafting does not pay, the step is a plain decode (no drafter forward; the
drafter's context catches up on the next drafted step). Equally lossless: it only chooses how much the
target checks.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sglang_ext.dflare import ops
from sglang_ext.dflare.verify_policy import VerifyPlan, VerifyWidthPolicy
from sglang_ext.reference.sampling import SamplingParams, greedy_tokens, sample_rows
from sglang_ext.reference.target import TargetRunner
from sglang_ext.stats import SpecStats

if TYPE_CHECKING:
    from sglang_ext.dflare.model import DFlareDrafter

FinishReason = Literal["stop", "length", "abort"]

# The fixed threshold the CLIs offer (``--min-draft-confidence``, ``--no-verify-policy``) instead of their
# CPU default, the verify-width policy: on the demo pair it keeps tau within ~3 % of verifying the whole
# block at about half the verified rows (docs/benchmarks.md). The engine's own default, 0 and no policy,
# verifies every draft: the drafter's acceptance as trained, which is what `dflare eval` measures.
CPU_MIN_DRAFT_CONFIDENCE = 0.02


def draft_confidences(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy drafts of draft logits [rows, n, V] and the drafter's top-1 probability of each ([rows, n],
    the max of the softmax; float32 at least, whatever the logits' dtype)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    top = logits.max(dim=-1)
    return top.indices, (top.values - logits.logsumexp(dim=-1)).exp()


def confident_drafts(logits: torch.Tensor, log_min_confidence: float) -> tuple[torch.Tensor, list[int]]:
    """Greedy drafts of draft logits [rows, n, V] and how many of each row to verify: the longest prefix
    whose believed probability of being right throughout (product of the top-token probabilities) is at
    least ``exp(log_min_confidence)``, and at least one. Returns ([rows, max length] drafts, lengths)."""
    rows, n = logits.shape[:2]
    if log_min_confidence == -math.inf:
        return greedy_tokens(logits), [n] * rows
    top = logits.max(dim=-1)  # the greedy drafts (as greedy_tokens) and their logits
    believed = (top.values - logits.logsumexp(dim=-1)).cumsum(dim=-1)  # log P(1..i right), non-increasing
    lengths = (believed >= log_min_confidence).sum(dim=-1).clamp_(min=1).tolist()
    return top.indices[:, : max(lengths)], lengths


@dataclass(frozen=True)
class VerifyObservation:
    """One verify step of the rows that were decoding, in row order (what ``step_observer`` receives).

    ``confidences[r, j]``: the drafter's top-1 probability at draft position ``j`` (all ``B - 1`` of the
    block, verified or not); ``accepted[r]`` of the first ``verified[r]`` drafts were accepted (bonus token
    not counted; equal to what the row's :class:`SpecStats` records for the step)."""

    request_ids: list[str]
    confidences: torch.Tensor
    accepted: list[int]
    verified: list[int]


@dataclass
class Request:
    """One generation request; ``on_tokens`` is called from ``step()`` with each step's new tokens."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    on_tokens: Callable[[list[int]], None] | None = None


@dataclass
class Result:
    """A finished request. ``output_ids`` exclude a matched stop token id (kept in ``matched_stop``); after
    a stop STRING they end with the token that completed it, and ``text`` (set when the engine has a
    tokenizer) is cut before it."""

    request_id: str
    prompt_tokens: int
    output_ids: list[int]
    finish_reason: FinishReason
    stats: SpecStats | None
    text: str | None = None
    matched_stop: int | None = None

    @property
    def completion_tokens(self) -> int:
        """Generated tokens, counting a matched stop token id as SGLang does (its ``completion_tokens``
        and ``output_ids`` include the end-of-turn token), so both backends report the same usage."""
        return len(self.output_ids) + (self.matched_stop is not None)


@dataclass
class _Slot:
    """Decoding state of one active request (one row of both KV caches)."""

    req: Request
    seed: int | None  # of a sampling request (its own or a random one); None when greedy
    stats: SpecStats | None
    output: list[int] = field(default_factory=list)
    length: int = 0  # tokens in the target cache = position of the next block's first slot
    pending: int = -1  # last committed token: the next block's slot 0, not yet seen by the target
    ctx: list[torch.Tensor] = field(default_factory=list)  # taps [n, T, H] not yet in the draft cache
    prefilled: bool = False
    finish: FinishReason | None = None
    matched_stop: int | None = None  # the stop token id that ended it (not in ``output``)
    text: str | None = None


class SpeculativeEngine:
    """See the module docstring; API contract in docs/architecture.md ("sglang_ext.reference")."""

    def __init__(
        self,
        target: nn.Module,
        drafter: DFlareDrafter | None,
        block_size: int | None = None,
        tokenizer: Any = None,
        max_batch: int = 8,
        min_draft_confidence: float = 0.0,
        step_observer: Callable[[VerifyObservation], None] | None = None,
        verify_policy: VerifyWidthPolicy | None = None,
    ) -> None:
        if block_size is None:
            block_size = drafter.config.block_size if drafter is not None else 1
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if block_size > 1 and drafter is None:
            raise ValueError(f"block_size={block_size} needs a drafter (block size 1 = plain decoding)")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not 0.0 <= min_draft_confidence <= 1.0:
            raise ValueError(f"min_draft_confidence must be in [0, 1], got {min_draft_confidence}")
        if verify_policy is not None and min_draft_confidence > 0:
            raise ValueError("min_draft_confidence and verify_policy are alternatives: pass one")
        # log of the threshold; -inf (threshold 0) verifies every draft
        self._log_min_confidence = math.log(min_draft_confidence) if min_draft_confidence > 0 else -math.inf
        self.verify_policy = verify_policy  # may be set after construction (it profiles this engine)
        self._confidences: torch.Tensor | None = None  # of the drafts being verified, for the calibration
        self._pre_plan: VerifyPlan | None = None  # the policy's plan before drafting (which block to draft)
        self.verified_drafts = 0  # drafts the target checked, over the engine's life (benchmarks report it)
        self.plain_decode_steps = 0  # steps the policy ran without a draft (or verified no draft)
        self._prompt_context = False  # this step fed a new request's prompt to the drafter
        # verify_widths[k]: rows' decode steps that verified k drafts over the engine's life (k = 0: the row
        # decoded without speculation); engine-server exports them (width histogram, plain-step counter)
        self.verify_widths = [0] * block_size
        self.block_size, self.tokenizer, self.max_batch = block_size, tokenizer, max_batch
        self.step_observer = step_observer
        self._observed_confidences: torch.Tensor | None = None  # this step's, only with an observer
        self.drafter = drafter if block_size > 1 else None
        taps = self.drafter.config.target_layer_ids if self.drafter is not None else []
        self.runner = target if isinstance(target, TargetRunner) else TargetRunner(target, taps)
        if self.drafter is not None:
            self._check_pair(self.drafter)
            self.drafter.bind_target(self.runner.embed_tokens, self.runner.lm_head)
            self.draft_cache = self.drafter.new_cache(max_batch, self.runner.dtype, self.runner.device)
        self._draft_head = self._subset_head()
        self.cache = self.runner.new_cache(max_batch)
        self._slots: list[_Slot] = []
        self._waiting: deque[Request] = deque()
        self._aborted: set[str] = set()
        self._lock = threading.Lock()

    def _check_pair(self, drafter: DFlareDrafter) -> None:
        cfg, tcfg = drafter.config, self.runner.config
        if cfg.hidden_size != tcfg.hidden_size:
            raise ValueError(f"drafter hidden_size {cfg.hidden_size} != target's {tcfg.hidden_size}")
        if list(self.runner.tap_layers) != list(cfg.target_layer_ids):
            raise ValueError("target runner taps differ from the drafter's target_layer_ids")
        if not 0 <= cfg.mask_token_id < tcfg.vocab_size:
            raise ValueError(f"drafter mask_token_id {cfg.mask_token_id} outside the target vocabulary")
        dtype = drafter.norm.weight.dtype
        if dtype != self.runner.dtype:
            raise ValueError(f"drafter dtype {dtype} != target dtype {self.runner.dtype}")
        if drafter.draft_vocab is not None:
            drafter.draft_vocab.check_target(tcfg.vocab_size)

    def _subset_head(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
        """(weight, bias, target ids) of the LM-head rows the drafter may propose, when its checkpoint
        has a draft vocabulary (draft_vocab.py); None: it drafts over the whole head."""
        vocab = self.drafter.draft_vocab if self.drafter is not None else None
        if vocab is None:
            return None
        head = self.runner.lm_head
        bias = getattr(head, "bias", None)
        ids = vocab.ids.to(head.weight.device)
        return vocab.head(head.weight), None if bias is None else bias.index_select(0, ids), ids

    def _draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The drafter's logits of ``hidden``: over its draft vocabulary when it has one, else the whole
        target head. Indices into the last dim map to target ids through :meth:`_target_ids`."""
        if self._draft_head is None:
            return self.runner.logits(hidden)
        weight, bias, _ = self._draft_head
        return F.linear(hidden, weight, bias)

    def _target_ids(self, drafts: torch.Tensor) -> torch.Tensor:
        return drafts if self._draft_head is None else self._draft_head[2][drafts]

    @property
    def max_context(self) -> int:
        return self.runner.max_context

    # ---- request admission -------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue a request; it joins the batch at the next ``step()`` with a free row."""
        vocab = self.runner.config.vocab_size
        if not req.prompt_ids:
            raise ValueError("prompt_ids is empty")
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(req.prompt_ids) + self.block_size > self.max_context:
            raise ValueError(
                f"prompt of {len(req.prompt_ids)} tokens leaves no room in the context of {self.max_context}"
            )
        if req.params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        with self._lock:
            busy = {s.req.request_id for s in self._slots} | {r.request_id for r in self._waiting}
            if req.request_id in busy:
                raise ValueError(f"request id {req.request_id!r} is already in the engine")
            self._aborted.discard(req.request_id)
            self._waiting.append(req)

    def abort(self, request_id: str) -> None:
        """Abort a queued or running request; its ``Result`` (reason "abort") comes from the next step."""
        with self._lock:
            self._aborted.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._slots or self._waiting)

    def _admit(self) -> list[Result]:
        aborted: list[Result] = []
        with self._lock:
            for i in range(len(self._slots) - 1, -1, -1):
                if self._slots[i].req.request_id in self._aborted:
                    self._slots[i].finish = "abort"
            keep: deque[Request] = deque()
            for req in self._waiting:
                if req.request_id in self._aborted:
                    aborted.append(Result(req.request_id, len(req.prompt_ids), [], "abort", None))
                else:
                    keep.append(req)
            self._waiting = keep
            self._aborted.clear()
        for i in range(len(self._slots) - 1, -1, -1):
            if self._slots[i].finish == "abort":
                aborted.append(self._finish_row(i))
        with self._lock:
            while self._waiting and len(self._slots) < self.max_batch:
                self._slots.append(self._new_slot(self._waiting.popleft()))
        return aborted

    def _new_slot(self, req: Request) -> _Slot:
        seed = None
        if not req.params.greedy:
            seed = req.params.seed if req.params.seed is not None else random.SystemRandom().randrange(2**63)
        stats = SpecStats(self.block_size) if self.block_size > 1 else None
        row = len(self._slots)
        self.cache.lengths[row] = 0
        if self.drafter is not None:
            self.draft_cache.lengths[row] = 0
        return _Slot(req=req, seed=seed, stats=stats)

    # ---- one engine step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Result]:
        """Advance every active request by one verify step (or its prefill); return finished ones."""
        start = time.perf_counter()
        results = self._admit()
        slots = self._slots
        if not slots:
            return results
        decoding = sum(s.prefilled for s in slots)  # prefilled rows come first (new rows are appended)
        drafts, lengths, drafted = None, [0] * decoding, False
        self._prompt_context = False
        if self.block_size > 1 and decoding and self._drafts_pay(decoding):
            drafts, lengths = self._propose(decoding)  # [k, n] drafts, n = the longest verified length
            drafted = True
            if max(lengths) == 0:  # the policy chose a plain decode after seeing the drafts
                drafts = None
        if decoding and drafts is None and self.block_size > 1:
            self.plain_decode_steps += 1
        blk = 1 + (drafts.shape[1] if drafts is not None else 0)  # verified block: pending token + drafts
        qlen = max(blk if s.prefilled else len(s.req.prompt_ids) for s in slots)
        rows = [[s.pending] if s.prefilled else s.req.prompt_ids for s in slots]
        ids = torch.tensor([[*row, *[0] * (qlen - len(row))] for row in rows], device=self.runner.device)
        if drafts is not None:
            ids[:decoding, 1:blk] = drafts
        starts = [s.length if s.prefilled else 0 for s in slots]
        hidden, taps = self.runner.forward(self.cache, ids, starts)
        if decoding:
            accepted = self._verify(slots[:decoding], hidden[:decoding, :blk], taps, drafts, lengths)
            if self.step_observer is not None and drafts is not None:
                self._observe(slots[:decoding], accepted, lengths)
        if decoding < len(slots):
            self._first_tokens(slots, decoding, hidden, taps)
        for r in range(len(slots) - 1, -1, -1):
            if slots[r].finish is not None:
                results.append(self._finish_row(r))
        if self.verify_policy is not None and decoding:  # its cost model learns from the engine's own steps
            self.verify_policy.observe_step(
                decoding,
                decoding * blk if drafted else None,
                (time.perf_counter() - start) * 1e3,
                clean=decoding == len(slots) and not self._prompt_context,
            )
        return results

    def _drafts_pay(self, rows: int) -> bool:
        """False when the verify-width policy expects a plain decode step to beat any draft this step."""
        if self.verify_policy is None:
            return True
        self._pre_plan = self.verify_policy.plan_for_batch(rows)
        return not self._pre_plan.plain_decode

    def _propose(self, rows: int) -> tuple[torch.Tensor, list[int]]:
        """Greedy drafts for rows ``0..rows-1`` from ONE drafter forward of the whole block, and how many of
        each row's drafts the target verifies (see the module docstring): ([rows, n], lengths), where
        n = max(lengths) <= B-1 (drafts past a row's length are not verified)."""
        drafter, cache = self.drafter, self.draft_cache
        assert drafter is not None
        pending_rows: list[int] = []
        positions: list[int] = []
        taps: list[torch.Tensor] = []
        for r, s in enumerate(self._slots[:rows]):
            start = cache.lengths[r]
            self._prompt_context |= start == 0 and bool(s.ctx)  # a new request's prompt: not a usual step
            for chunk in s.ctx:
                n = chunk.shape[0]
                pending_rows += [r] * n
                positions += range(start, start + n)
                taps.append(chunk)
                start += n
            cache.lengths[r] = start
            s.ctx = []
        if taps:
            cache.ensure_capacity(max(cache.lengths[:rows]) + self.block_size)
            drafter.append_context(
                cache,
                torch.tensor(pending_rows),
                torch.tensor(positions),
                taps[0] if len(taps) == 1 else torch.cat(taps),
            )
        size = self._pre_plan.draft_block if self.verify_policy and self._pre_plan else self.block_size
        masks = [drafter.config.mask_token_id] * (size - 1)
        block = torch.tensor([[s.pending, *masks] for s in self._slots[:rows]], device=self.runner.device)
        hidden = drafter.draft_hidden(cache, block, cache.lengths[:rows])
        logits = self._draft_logits(hidden[:, 1:])  # the target's LM head (or its draft-vocabulary rows)
        if self.verify_policy is None:
            if self.step_observer is not None:
                self._observed_confidences = draft_confidences(logits)[1]
            drafts, lengths = confident_drafts(logits, self._log_min_confidence)
            return self._target_ids(drafts), lengths
        drafts, self._confidences = draft_confidences(logits)
        self._observed_confidences = self._confidences
        lengths = self.verify_policy.plan(self._confidences).widths
        return self._target_ids(drafts[:, : max(lengths)]), lengths

    def _observe(self, slots: Sequence[_Slot], accepted: list[int], lengths: list[int]) -> None:
        """Hand this verify step to the observer (before finished rows leave the batch)."""
        assert self.step_observer is not None
        confidences, self._observed_confidences = self._observed_confidences, None
        if confidences is None:
            raise RuntimeError("a step observer needs _propose to record the drafter's confidences")
        ids = [s.req.request_id for s in slots]
        self.step_observer(VerifyObservation(ids, confidences.cpu(), accepted, list(lengths)))

    @staticmethod
    def _kept_length(start: int, accepted: int) -> int:
        """Target-cache length after a verify step: block slot 0 (the pending token) + accepted drafts."""
        return start + accepted + 1

    def _verify(
        self,
        slots: Sequence[_Slot],
        hidden: torch.Tensor,
        taps: torch.Tensor | None,
        drafts: torch.Tensor | None,
        lengths: list[int],
    ) -> list[int]:
        """Sample the target at every verified block slot, accept the longest matching prefix of each row's
        ``lengths[r]`` verified drafts, commit, crop. Returns each row's accepted drafts."""
        params = [s.req.params for s in slots]
        counts = [n + 1 for n in lengths]  # slots sampled per row: its own, so draws do not depend on others
        seeds = [s.seed for s in slots]
        # slot j of a row predicts the token after its pending one: sequence position length + 1 + j
        post = sample_rows(self.runner.logits(hidden), params, seeds, [s.length + 1 for s in slots], counts)
        if drafts is not None:
            accepted = ops.accept_lengths(drafts, post[:, :-1]).tolist()
        else:
            accepted = [0] * len(slots)
        self.verified_drafts += sum(lengths)
        if self.verify_policy is not None and drafts is not None:  # learn what the target really accepts
            assert self._confidences is not None
            taken = [min(a, n) for a, n in zip(accepted, lengths, strict=True)]
            self.verify_policy.calibration.observe(self._confidences, lengths, taken)
        post_rows = post.tolist()
        for r, s in enumerate(slots):
            a = accepted[r] = min(accepted[r], lengths[r])
            if s.stats is not None and lengths[r]:
                s.stats.record_step(a, lengths[r])  # the drafts the target checked
            elif s.stats is not None:
                s.stats.record_plain_step()  # no draft checked: a decode step without speculation
            self.verify_widths[lengths[r]] += 1
            if taps is not None:
                s.ctx.append(taps[r, : a + 1])  # taps of block slots 0..a: the drafter's next context
            s.length = self._kept_length(s.length, a)
            self.cache.lengths[r] = s.length
            new = post_rows[r][: a + 1]  # accepted drafts equal the target's own tokens, + the bonus
            s.pending = new[-1]
            self._emit(s, new)
        return accepted

    def _first_tokens(
        self, slots: list[_Slot], first_new: int, hidden: torch.Tensor, taps: torch.Tensor | None
    ) -> None:
        """Prefill rows: sample the first token from the last prompt position."""
        rows = range(first_new, len(slots))
        last = torch.tensor([len(slots[r].req.prompt_ids) - 1 for r in rows], device=hidden.device)
        picked = hidden[first_new:][torch.arange(len(last), device=hidden.device), last]
        logits = self.runner.logits(picked)[:, None]  # [m, 1, V]
        tokens = sample_rows(
            logits,
            [slots[r].req.params for r in rows],
            [slots[r].seed for r in rows],
            [len(slots[r].req.prompt_ids) for r in rows],  # the first token's position
        )
        for r, tok in zip(rows, tokens[:, 0].tolist(), strict=True):
            s = slots[r]
            n = len(s.req.prompt_ids)
            s.length, s.pending, s.prefilled = n, tok, True
            self.cache.lengths[r] = n
            if taps is not None:
                s.ctx.append(taps[r, :n])
            self._emit(s, [tok])

    # ---- output handling ---------------------------------------------------------------------------
    def _emit(self, s: _Slot, tokens: list[int]) -> None:
        """Append committed tokens, applying max_tokens, stop token ids and stop strings; stream them."""
        p = s.req.params
        kept: list[int] = []
        for t in tokens[: p.max_tokens - len(s.output)]:
            if t in p.stop_token_ids:
                s.finish, s.matched_stop = "stop", t
                break
            kept.append(t)
        s.output.extend(kept)
        if p.stop and kept:
            kept = self._apply_stop_strings(s, len(kept))
        if s.finish is None and len(s.output) >= p.max_tokens:
            s.finish = "length"
        if s.finish is None and s.length + self.block_size > self.max_context:
            s.finish = "length"  # no room for another verify block
        if kept and s.req.on_tokens is not None:
            s.req.on_tokens(kept)

    def _apply_stop_strings(self, s: _Slot, n_new: int) -> list[int]:
        """Cut at the first stop string; returns the new tokens that remain to be streamed."""
        text = self.tokenizer.decode(s.output)
        hits = [i for i in (text.find(stop) for stop in s.req.params.stop) if i >= 0]
        if not hits:
            return s.output[len(s.output) - n_new :]
        cut = min(hits)
        s.finish, s.text = "stop", text[:cut]
        old = len(s.output) - n_new
        for end in range(old + 1, len(s.output) + 1):  # shortest prefix that contains a stop string
            prefix = self.tokenizer.decode(s.output[:end])
            if any(stop in prefix for stop in s.req.params.stop):
                del s.output[end:]
                break
        return s.output[old:]

    def _finish_row(self, r: int) -> Result:
        """Remove row r (the last row moves into it, keeping rows contiguous) and build its Result."""
        s = self._slots[r]
        text = s.text
        if text is None and self.tokenizer is not None:
            text = self.tokenizer.decode(s.output)
        last = len(self._slots) - 1
        if r != last:
            self.cache.move_row(last, r)
            if self.drafter is not None:
                self.draft_cache.move_row(last, r)
            self._slots[r] = self._slots[last]
        self._slots.pop()
        reason: FinishReason = s.finish or "abort"
        return Result(
            s.req.request_id, len(s.req.prompt_ids), list(s.output), reason, s.stats, text, s.matched_stop
        )

    # ---- convenience -------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Result]:
        """Run prompts to completion through the continuous batch; results in prompt order.

        A convenience for scripts and tests: it drives ``step()`` itself, so do not mix it with callers that
        also add requests and step the same engine (their results would be consumed here).
        """
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        ids = [f"gen-{id(self)}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params, strict=True):
            self.add_request(Request(rid, list(prompt), p))
        done: dict[str, Result] = {}
        while len(done) < len(ids):
            for res in self.step():
                done[res.request_id] = res
        return [done[rid] for rid in ids]
