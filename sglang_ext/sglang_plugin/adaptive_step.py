"""One adaptive DFLARE decode step in SGLang: draft (or not), a ragged target verify, accept, commit.

SGLang's DFlash step verifies the whole block for every request. Here the verify-width policy
(``sglang_ext.dflare.verify_policy``) decides per step:

* before drafting (``plan_for_batch``): a plain decode step for the whole batch (greedy batches only): the
  drafter does not run and every request verifies just its last committed token (one target token each,
  the bonus is the target's next token), after which the drafter's context K/V still get every committed
  token (the commit below writes it, as after any verify); or, with ``DFLARE_DRAFT_BLOCKS``, a shorter
  block to draft: a drafter forward over the first positions of the block, from CUDA graphs of that width
  on FA3 and eager elsewhere, handed to the attention backend as short_draft.py says;
* after drafting (``plan`` on the drafter's top-1 probabilities): how many drafts each request's target
  verifies. Greedy batches get per-request widths; a batch with sampled requests verifies one width for all
  (SGLang's sampling verify kernel takes one window per call: with window n, "all n - 1 drafts accepted"
  samples the bonus from the target's own distribution at that position, which keeps sampling exact).

The target runs SGLang's compact ragged verify (per-request lengths, CUDA graphs by token count on FA3),
built with SGLang's own window/scatter kernels; hidden states come back in the strided [bs, block] layout
the context-K/V commit uses. A greedy batch takes the argmax of the compact logits and scatters only the
token ids; the whole logits are scattered only for sampling or logit adjustments (penalties, bias,
grammar), which work on the strided rows.

Acceptance is learnt by the policy's calibration one step late (the previous step's accept lengths are
read after this step's draft, when they are certainly computed), so the only host sync a step adds is the
[bs, block - 1] confidences before the verify. With trace replay (benchmarks on dummy weights) the
confidences and accept decisions come from the traces.

Under tensor parallelism only the TP group's rank 0 plans (policy, calibration, step clock); it sends the
plain-step flag before the draft and the widths before the verify (plan_broadcast.py), so every rank builds
the same ragged layout. The confidences come from the vocab-parallel LM head (vocab_parallel.py), a
collective every rank joins. Trace replay needs no broadcast: a replay's accepted lengths depend only on
the requests it was given, in order, and the widths (its cursors advance only in ``accepted_lengths``;
``peek_steps`` creates a new request's cursor just as the next ``accepted_lengths`` would), and every rank
replays the same batches in the same order with the agreed widths, so every rank commits the same.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch

from sglang_ext.dflare.verify_policy import AcceptanceCalibration, VerifyPlan, VerifyWidthPolicy
from sglang_ext.sglang_plugin import (
    adaptive,
    host_upload,
    learnt_costs,
    short_draft,
    trace_replay,
    vocab_parallel,
)
from sglang_ext.sglang_plugin.confident_sampler import ConfidentDraftSampler
from sglang_ext.sglang_plugin.plan_broadcast import PlanBroadcast
from sglang_ext.sglang_plugin.step_clock import StepClock

# steps between rebuilds of the learnt step costs the policy reads (StepCostModel.learn_every; every step
# still teaches). The plan runs between the draft's confidences and the verify's launch, while the GPU
# waits, and a rebuild after every step made each plan recompute its verify costs (tests/perf/
# policy_plan_time.py: 0.45-0.85 ms more host time per step at batch 32-256); 16 steps are half a second of
# steps at batch 128
LEARN_EVERY = 16

logger = logging.getLogger(__name__)


class AdaptiveStep:
    """The policy state of one DFLARE worker and its decode step (``run``)."""

    def __init__(
        self,
        worker: Any,
        cost: Any | None,
        dspark_planner: bool = False,
        share: PlanBroadcast | None = None,
        draft_blocks: Sequence[int] = (),
    ) -> None:
        """``dspark_planner``: widths from SGLang's DSPARK planner (dspark_planner.py) instead of our policy,
        the benchmark's comparison; it never takes a plain decode step and learns no step costs.
        ``share``: the TP group's plan broadcast (None on one rank); only its rank 0 needs ``cost``, and
        whether steps are planned at all is rank 0's answer (a construction-time collective).
        ``draft_blocks``: shorter blocks our policy may ask the drafter for (greedy batches; rank 0's)."""
        self.worker = worker
        self.block = int(worker.block_size)
        self.share = share
        self.leads = share is None or share.leads
        self.calibration = AcceptanceCalibration()
        self.greedy_policy: VerifyWidthPolicy | Any | None = None  # None: no cost table, or not rank 0
        self.sampling_policy: VerifyWidthPolicy | Any | None = None
        self.clock: StepClock | None = None
        self.costs_dump: learnt_costs.LearntCostsDump | None = None  # DFLARE_LEARNT_COSTS (learnt_costs.py)
        if not self.leads:
            cost = None
        self.planned = bool(self._agree([int(cost is not None)] if self.leads else None, 1)[0])
        if cost is not None and dspark_planner:
            from sglang_ext.sglang_plugin.dspark_planner import DsparkPlannerPolicy

            self.greedy_policy = self.sampling_policy = DsparkPlannerPolicy(cost, self.block)
        elif cost is not None:
            cost.learn_every = LEARN_EVERY
            self.greedy_policy = VerifyWidthPolicy(
                cost, self.calibration, self.block, ragged=True, draft_blocks=[*draft_blocks, self.block]
            )
            self.sampling_policy = VerifyWidthPolicy(cost, self.calibration, self.block, ragged=False)
            if torch.cuda.is_available():  # the steps' own GPU wall times correct the table (step_clock.py)
                self.clock = StepClock(lambda: torch.cuda.Event(enable_timing=True))
            self.costs_dump = learnt_costs.from_environment(cost, [*draft_blocks, self.block])
        self._pending: tuple[torch.Tensor, list[int], Any] | None = None  # conf, widths, accepted (lagged)
        self._warned_no_hidden = False
        self._tiers: list[int] | None = None  # token counts of the target's ragged verify graphs
        self._short_drafts: dict[tuple[int, int], Any] = {}  # (bs, width) -> spec input of a shorter draft
        self._short_graphs: dict[int, short_draft.WidthGraphs] = {}  # width -> its CUDA graphs (FA3)
        self._drafted_blocks: set[int] = set()  # blocks drafted so far (the first of each is logged)

    # -- the step ------------------------------------------------------------------------------------------
    def run(self, batch: Any, on_publish: Any, replay: trace_replay.TraceReplay | None) -> Any:
        from sglang.srt.managers.scheduler import GenerationBatchResult
        from sglang.srt.speculative.dflash_info_v2 import DFlashDraftInputV2

        w = self.worker
        if batch.spec_info is None:
            batch.spec_info = DFlashDraftInputV2.create_idle_input(device=w.device)
        draft_input = batch.spec_info
        batch.seq_lens.record_stream(torch.get_device_module(w.device).current_stream())
        bs, block, device = len(batch.seq_lens), self.block, w.device
        sampling_info = batch.sampling_info
        greedy = sampling_info is None or sampling_info.is_all_greedy

        if self._tiers is None:  # the target's ragged verify graphs exist by the first decode step
            self._tiers = self._captured_tiers()
            for policy in (self.greedy_policy, self.sampling_policy):
                if isinstance(policy, VerifyWidthPolicy):
                    policy.set_token_grid(self._tiers)
        block_ids, positions_2d, cache_loc_2d = self._prepare_block(batch, draft_input, bs)
        plain, drafted = self._agreed_start(greedy, bs)
        confidences = None
        if plain:
            draft_tokens = block_ids
            widths = [0] * bs
        else:
            if drafted not in self._drafted_blocks:
                self._drafted_blocks.add(drafted)
                eager = drafted < block and drafted not in self._short_graphs
                how = " (eager: no CUDA graph at this block)" if eager else ""
                logger.info("DFLARE adaptive: first draft of block %d, at batch %d%s", drafted, bs, how)
            draft_tokens, hidden, fused = self._draft(
                batch, draft_input, block_ids, positions_2d, cache_loc_2d, bs, drafted
            )
            if self.planned:
                if self.leads:
                    self._learn_lagged()
                # every rank: a collective unless the draft graph computed them (then on every rank)
                confidences = self._confidences(batch.reqs, hidden, bs, replay, drafted - 1, fused)
            widths = self._agreed_widths(confidences, greedy, bs)
            if not self.leads:
                confidences = None  # only rank 0's calibration learns
        verify_lens = [x + 1 for x in widths]

        layout = self._layout(verify_lens)
        logits_output, can_run_graph, hidden_states = self._verify(
            batch, draft_input, draft_tokens, layout, bs
        )
        lens = layout.verify_lens
        if greedy and not adaptive.needs_logit_adjustments(sampling_info):
            predict = adaptive.strided_argmax(logits_output.next_token_logits, layout, block)
            accepted, bonus = adaptive.windowed_greedy_accept(draft_tokens, predict, lens)
        elif greedy:  # penalties, logit bias, a grammar: they can move the argmax
            from sglang.srt.speculative.dflash_utils import apply_dflash_verify_logits_adjustments

            logits = self._strided(logits_output.next_token_logits, layout)
            apply_dflash_verify_logits_adjustments(
                next_token_logits=logits, sampling_info=sampling_info, draft_token_num=block
            )
            predict = torch.argmax(logits, dim=-1).view(bs, block)
            accepted, bonus = adaptive.windowed_greedy_accept(draft_tokens, predict, lens)
        else:
            logits = self._strided(logits_output.next_token_logits, layout)
            accepted, bonus, predict = self._sampling_accept(
                draft_tokens, logits, sampling_info, draft_input, verify_lens[0], bs
            )
        if replay is not None and not plain:
            replayed = replay.accepted_lengths(batch.reqs, widths)
            accepted = host_upload.to_device(replayed, device, torch.int32)
            bonus = predict.gather(1, accepted.to(torch.int64)[:, None]).squeeze(1).to(torch.int64)
            accepted_host: Any = replayed
        else:
            accepted_host = accepted
        if confidences is not None:
            self._pending = (confidences, widths, accepted_host)
        commit_lens = accepted + 1
        new_seq_lens = batch.seq_lens + commit_lens.to(batch.seq_lens.dtype)
        if on_publish is not None:
            on_publish(new_seq_lens)

        # every commit (accepted + 1) fits its window: the columns past the longest window are never written
        context, slots, context_positions = adaptive.committable_columns(
            hidden_states, cache_loc_2d, positions_2d, max(verify_lens)
        )
        w._append_target_hidden_to_draft_kv_by_loc(
            target_hidden=context,
            cache_loc=slots.reshape(-1),
            cache_loc_2d=slots,
            positions=context_positions.reshape(-1),
            commit_lens=commit_lens,
        )
        logits_output.hidden_states = None
        w.record_step(batch.reqs, widths, plain)
        self._learn_step_costs(bs, None if plain else layout.graph_num_tokens, drafted)  # what the graph ran
        if self.costs_dump is not None:
            self.costs_dump.record(None if plain else drafted)
        return GenerationBatchResult(
            logits_output=logits_output,
            next_token_ids=adaptive.out_tokens(draft_tokens, accepted, bonus).reshape(-1),
            accept_lens=commit_lens,
            can_run_cuda_graph=can_run_graph,
            next_draft_input=w._make_next_draft_input_decode(bonus_tokens=bonus, new_seq_lens=new_seq_lens),
            speculative_num_draft_tokens=block,
            new_seq_lens=new_seq_lens,
        )

    def other_work(self) -> None:
        """A prefill ran between decode steps: the next step's measured time includes it."""
        if self.clock is not None:
            self.clock.other_work()

    # -- one plan for every rank ----------------------------------------------------------------------------
    def _agree(self, values: list[int] | None, count: int) -> list[int]:
        """Rank 0's ``values`` on every rank (plan_broadcast.py); on one rank, the values themselves."""
        return list(values) if self.share is None else self.share.agree(values, count)

    def _agreed_start(self, greedy: bool, bs: int) -> tuple[bool, int]:
        """(whether the batch takes a plain decode step, the block to draft otherwise), for greedy batches
        of a planned step (else a drafted whole block): rank 0's policy decides, before the draft."""
        if not (greedy and self.planned):
            return False, self.block
        decided = None
        if self.leads:
            plan = self.greedy_policy.plan_for_batch(bs)
            decided = [int(plan.plain_decode), int(plan.draft_block)]
        plain, drafted = self._agree(decided, 2)
        return bool(plain), int(drafted)

    def _agreed_widths(self, confidences: torch.Tensor | None, greedy: bool, bs: int) -> list[int]:
        """Drafts each request verifies, planned by rank 0 from its ``confidences``; the whole block when
        rank 0 has no cost table (nothing to plan, nothing to send)."""
        if not self.planned:
            return [self.block - 1] * bs
        policy = self.greedy_policy if greedy else self.sampling_policy
        return self._agree(self._widths(policy, confidences, greedy, bs) if self.leads else None, bs)

    def _learn_step_costs(self, bs: int, verified_tokens: int | None, drafted: int) -> None:
        if self.clock is None:
            return
        self.clock.step_done(bs, verified_tokens, None if verified_tokens is None else drafted)
        for batch, tokens, ms, clean, block in self.clock.completed():
            self.greedy_policy.observe_step(batch, tokens, ms, clean, draft_block=block)

    # -- parts ---------------------------------------------------------------------------------------------
    def _prepare_block(self, batch: Any, draft_input: Any, bs: int):
        """Block ids (last committed token + mask tokens), positions and cache slots of the whole block."""
        from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs_func

        w, block = self.worker, self.block
        w._ensure_draft_block_buffers(bs)
        block_ids = w._draft_block_ids_buf[:bs]
        positions_2d = w._draft_block_positions_buf[:bs]
        cache_loc_2d = w._draft_verify_out_cache_loc_buf[:bs]
        block_ids.fill_(int(w._mask_token_id))
        block_ids[:, 0].copy_(draft_input.bonus_tokens)
        torch.add(batch.seq_lens.unsqueeze(1), w._block_pos_offsets, out=positions_2d)
        locs = assign_extend_cache_locs_func(
            req_pool_indices=batch.req_pool_indices,
            req_to_token=w.model_runner.req_to_token_pool.req_to_token,
            start_offset=batch.seq_lens,
            end_offset=batch.seq_lens + block,
            batch_size=bs,
            draft_token_num=block,
            device=w.device,
        )
        cache_loc_2d.copy_(locs.view(bs, block))
        return block_ids, positions_2d, cache_loc_2d

    def _draft(
        self, batch: Any, draft_input: Any, block_ids, positions_2d, cache_loc_2d, bs: int, width: int
    ):
        """The drafter's forward over the first ``width`` positions of the block (SGLang's DFlash draft
        call; a shorter width from its own graphs or eagerly, see short_draft.py): draft tokens [bs, block],
        of which columns ``width``.. are stale, the draft hidden states of positions 1..width-1 (None when the
        CUDA-graph sampler kept them inside), and the drafts' top-1 probabilities [bs, width - 1] on the
        device when the graph's head computed them (confident_sampler.py), else None."""
        from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        w, block = self.worker, self.block
        spec_info = w._draft_block_spec_info
        if width < block:
            block_ids = block_ids[:, :width].contiguous()
            positions_2d = positions_2d[:, :width].contiguous()
            cache_loc_2d = cache_loc_2d[:, :width].contiguous()
            spec_info = self._short_draft_input(bs, width)
        target_model = w.target_worker.model_runner.model
        embeds = target_model.get_input_embeddings()(block_ids)
        seq_lens_cpu = w._draft_seq_lens_cpu_buf[:bs]
        if batch.seq_lens_cpu is not None:  # host bound = committed prefix + the drafted block
            seq_lens_cpu.copy_(batch.seq_lens_cpu)
            seq_lens_cpu.add_(width)
        elif draft_input.reserved_seq_lens_cpu is not None:  # a safe over-estimate, no device read
            seq_lens_cpu.copy_(draft_input.reserved_seq_lens_cpu)
        else:
            seq_lens_cpu.copy_(batch.seq_lens.to("cpu", dtype=torch.int32) + width)
        forward_batch = ForwardBatch(
            forward_mode=ForwardMode.TARGET_VERIFY,
            batch_size=bs,
            input_ids=block_ids.flatten(),
            req_pool_indices=batch.req_pool_indices,
            seq_lens=batch.seq_lens,
            out_cache_loc=cache_loc_2d.reshape(-1),
            seq_lens_sum=int(seq_lens_cpu.sum()),
            seq_lens_cpu=seq_lens_cpu,
            positions=positions_2d.reshape(-1),
            input_embeds=embeds.view(-1, embeds.shape[-1]),
            spec_algorithm=SpeculativeAlgorithm.DFLASH,
            spec_info=spec_info,
            capture_hidden_mode=CaptureHiddenMode.NULL,
        )
        short = width < block
        graphs = self._short_graphs.get(width) if short else None
        if graphs is not None:  # this width's own graphs and FA3 backend (eager where a bs is not captured)
            route = short_draft.replaying(w.draft_model_runner, graphs)
        elif short and self._uniform_short_drafts:
            route = short_draft.uniform_width(w.draft_model_runner.attn_backend, width)
        else:
            route = contextlib.nullcontext()
        with torch.inference_mode(), route:
            if short and w._step_profiler is not None:  # DFLARE_STEP_PROFILE: one short draft per bs, alone
                out = w._step_profiler.run_short_draft(bs, width, w.draft_model_runner.forward, forward_batch)
            else:
                out = w.draft_model_runner.forward(forward_batch)
        hidden = out.logits_output.hidden_states
        hidden = None if hidden is None else hidden.view(bs, width, -1)[:, 1:, :]
        fused = None
        confident = isinstance(w._draft_sampler, ConfidentDraftSampler)
        if w._draft_sampler is not None and out.can_run_graph and width == block:
            draft_next = w._draft_sampler.out[: bs * (block - 1)].view(bs, block - 1)
            fused = w._draft_sampler.top1[: bs * (block - 1)].view(bs, block - 1) if confident else None
        elif confident and hidden is not None and bs * (width - 1) <= w._draft_sampler.out.numel():
            # a draft of a shorter block: ids and confidences in one LM-head product, through the
            # graph's head outside the graph (its buffers hold up to the graphs' largest batch)
            ids, top1 = w._draft_sampler.draft(hidden.reshape(-1, hidden.shape[-1]))
            draft_next, fused = ids.view(bs, width - 1), top1.view(bs, width - 1)
        else:
            if hidden is None:
                raise RuntimeError("DFLARE draft model returned no hidden states")
            draft_next = w._greedy_sample_from_vocab_parallel_head(
                hidden_states=hidden.reshape(-1, hidden.shape[-1]), lm_head=target_model.lm_head
            ).view(bs, width - 1)
        tokens = w._draft_block_tokens_buf[:bs]
        tokens[:, 0].copy_(block_ids[:, 0])
        tokens[:, 1:width].copy_(draft_next)
        return tokens, hidden, fused

    def capture_short_draft_graphs(self, widths: Sequence[int]) -> None:
        """CUDA graphs for the shorter drafts ``widths`` (short_draft.py), once the drafter's whole-block
        graphs exist: on FA3 with the drafter's graphs on, unless ``DFLARE_SHORT_DRAFT_GRAPHS=0``. Every TP
        rank captures the same widths (the env's), so each runs a planned width alike."""
        runner = self.worker.draft_model_runner
        if not widths or getattr(runner, "decode_cuda_graph_runner", None) is None:
            return
        if not (self._uniform_short_drafts and short_draft.graphs_wanted()):
            logger.info("DFLARE adaptive: shorter drafts %s run eagerly (graphs need FA3 and %s unset or 1)",
                        list(widths), short_draft.GRAPHS_ENV)  # fmt: skip
            return
        self._short_graphs = short_draft.capture_graphs(runner, widths)

    @functools.cached_property
    def _uniform_short_drafts(self) -> bool:
        """Whether shorter drafts reach the draft attention backend as a uniform batch of their width
        (short_draft.py); the backend is the server's, so this is decided once."""
        return short_draft.sized_on_host(self.worker.draft_model_runner.attn_backend)

    def _short_draft_input(self, bs: int, width: int) -> Any:
        """The spec input of a draft of ``width`` positions per request (short_draft.py): a uniform batch of
        that width where the draft attention backend sizes it on the host (FA3: that width's graphs replay
        it), else a ragged layout of equal lengths riding it, which the whole block's graphs do not take.
        Kept per (bs, width): a layout is a few small device tensors."""
        key = (bs, width)
        spec = self._short_drafts.get(key)
        if spec is None:  # SGLang's draft-block spec input, at this width
            from sglang.srt.speculative.draft_worker_common import make_draft_block_spec_info

            spec = make_draft_block_spec_info(draft_token_num=width, device=self.worker.device)
            if not self._uniform_short_drafts:
                spec.ragged_verify_layout = self._layout([width] * bs, padded=False)
            self._short_drafts[key] = spec
        return spec

    def _confidences(
        self, reqs: Any, hidden: torch.Tensor | None, bs: int, replay: Any, n: int, fused: Any = None
    ) -> torch.Tensor:
        """[bs, n] top-1 probabilities of the ``n`` drafts, on the CPU (the step's one host sync): the
        trace's under trace replay, the draft graph's (``fused``) when its head computed them, else from the
        draft hidden states through the LM head."""
        if replay is not None:
            steps = replay.peek_steps(reqs)
            return torch.tensor([list(s.confidences[:n]) for s in steps], dtype=torch.float64)
        if fused is not None:
            return fused.to("cpu", torch.float64)
        if hidden is None:
            if not self._warned_no_hidden:
                logger.warning("DFLARE adaptive: no draft hidden states; widths from acceptance by position")
                self._warned_no_hidden = True
            return self.calibration.position_rates(n).expand(bs, n).clone()
        lm_head = self.worker.target_worker.model_runner.model.lm_head
        probs = vocab_parallel.lm_head_top1_probabilities(hidden.reshape(-1, hidden.shape[-1]), lm_head)
        return probs.view(bs, n).to("cpu", torch.float64)

    def _widths(self, policy: VerifyWidthPolicy, confidences: torch.Tensor, greedy: bool, bs: int):
        plan: VerifyPlan = policy.plan(confidences)
        if greedy:
            return list(plan.widths)
        return [adaptive.uniform_width(list(plan.widths))] * bs

    def _learn_lagged(self) -> None:
        """Teach the calibration what the target accepted in the previous drafted step."""
        if self._pending is None:
            return
        confidences, widths, accepted = self._pending
        self._pending = None
        if isinstance(accepted, torch.Tensor):
            accepted = accepted.tolist()
        self.calibration.observe(confidences, widths, accepted)

    def _layout(self, verify_lens: list[int], padded: bool = True):
        """SGLang's ragged layout for these lengths, padded to the smallest captured token tier (``padded``:
        a graph replays it; else an eager forward runs it as it is); the lengths reach the GPU through a
        pinned buffer (host_upload: no wait on the previous step)."""
        from sglang.srt.speculative.ragged_verify import RaggedVerifyLayout, round_up_grid

        w = self.worker
        tiers = (self._tiers or []) if padded else []
        total = sum(verify_lens)
        graph_tokens = round_up_grid(total, tiers) if tiers and total <= tiers[-1] else total
        return RaggedVerifyLayout._assemble_device(  # the public builders copy the lengths pageable
            verify_lens=host_upload.to_device(verify_lens, w.device, torch.int32),
            graph_num_tokens=graph_tokens,
            verify_lens_cpu=list(verify_lens),
            total_verify_tokens=total,
        )

    def _captured_tiers(self) -> list[int]:
        runner = self.worker.target_worker.model_runner.decode_cuda_graph_runner
        return list(getattr(runner, "capture_num_tokens", None) or [])

    def _verify(self, batch: Any, draft_input: Any, draft_tokens, layout, bs: int):
        """The ragged target verify: its output (logits compact, one row per verified token: the accept
        scatters only what it needs) and the hidden states scattered back to [bs * block] rows."""
        from sglang.kernels.ops.speculative.dspark.dspark_verify_window import BuildRaggedVerifyWindow
        from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
        from sglang.srt.speculative.dflash_info import DFlashVerifyInput

        w, block = self.worker, self.block
        verify_lens = layout.verify_lens_cpu
        anchors, drafts = adaptive.window_inputs(draft_tokens)
        window = BuildRaggedVerifyWindow.execute(
            batch=batch,
            layout=layout,
            draft_block_ids=anchors,
            draft_tokens=drafts,
            bs=bs,
            device=w.device,
            verify_num_draft_tokens=block,
            model_runner=w.model_runner,
        )
        verify_input = DFlashVerifyInput(
            draft_token=window.verify_ids,
            positions=window.positions,
            draft_token_num=block,
            custom_mask=None,
            capture_hidden_mode=CaptureHiddenMode.FULL,
            ragged_verify_layout=layout,
        )
        batch.out_cache_loc = window.verify_cache_loc
        seq_lens_cpu, seq_lens_sum = batch.seq_lens_cpu, batch.seq_lens_sum
        if seq_lens_cpu is not None:
            batch.seq_lens_cpu = seq_lens_cpu + torch.tensor(verify_lens, dtype=seq_lens_cpu.dtype)
            batch.seq_lens_sum = int(batch.seq_lens_cpu.sum())
        elif draft_input.reserved_seq_lens_cpu is not None:
            batch.seq_lens_cpu = draft_input.reserved_seq_lens_cpu
            batch.seq_lens_sum = int(draft_input.reserved_seq_lens_sum)
        try:
            forward_batch, _ = verify_input.prepare_for_verify(batch, w.target_worker)
        finally:
            batch.seq_lens_cpu, batch.seq_lens_sum = seq_lens_cpu, seq_lens_sum
        out = w.target_worker.forward_batch_generation(
            batch=None, forward_batch=forward_batch, is_verify=True, skip_attn_backend_init=True
        )
        logits_output = out.logits_output
        if logits_output.hidden_states is None:
            raise RuntimeError("DFLARE verify requires target hidden states, got None")
        return logits_output, out.can_run_cuda_graph, self._strided(logits_output.hidden_states, layout)

    def _strided(self, compact: torch.Tensor, layout: Any) -> torch.Tensor:
        """Compact ragged rows [tokens, D] in the strided [bs * block, D] layout (0 past each window)."""
        from sglang.kernels.ops.speculative.dspark.dspark_verify_window import ScatterCompactToStrided

        rows = len(layout.verify_lens_cpu) * self.block
        return ScatterCompactToStrided.execute(
            compact=compact, layout=layout, fill_value=0.0, verify_num_draft_tokens=self.block
        )[:rows]

    def _sampling_accept(self, draft_tokens, logits, sampling_info, draft_input, window: int, bs: int):
        """SGLang's sampling verify over the batch's one window of ``window`` columns (exact: see the module
        docstring). Returns (accepted, bonus, the target's argmax [bs, block] for trace replay)."""
        from sglang.srt.speculative.dflash_utils import (
            apply_dflash_verify_logits_adjustments,
            compute_dflash_sampling_correct_drafts_and_bonus,
        )

        block = self.block
        vocab = logits.shape[-1]
        windowed = logits.view(bs, block, vocab)[:, :window, :].reshape(bs * window, vocab).contiguous()
        apply_dflash_verify_logits_adjustments(
            next_token_logits=windowed, sampling_info=sampling_info, draft_token_num=window
        )
        accepted, bonus = compute_dflash_sampling_correct_drafts_and_bonus(
            candidates=draft_tokens[:, :window].contiguous(),
            next_token_logits=windowed,
            sampling_info=sampling_info,
            max_top_k=draft_input.max_top_k,
            uniform_top_k_value=draft_input.uniform_top_k_value,
        )
        predict = torch.argmax(logits, dim=-1).view(bs, block)
        return accepted.to(torch.int32), bonus.to(torch.int64), predict
