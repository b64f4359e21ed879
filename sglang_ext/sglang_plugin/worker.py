"""``DFlareWorkerV2``: SGLang's DFlash spec-v2 worker with DFlare's context-KV materialisation.

Everything except writing context K/V into the draft cache is inherited: target capture of the taps,
draft forward (CUDA graphs), verify, accept, overlap scheduling. The one override is
``_append_target_hidden_to_draft_kv_by_loc``, used at prefill and after every verify (commit of the
accepted prefix): per-layer fused features -> ONE bmm through the stacked ``k_proj_target`` /
``v_proj_target`` -> ``k_norm`` + RoPE (SGLang's fused Triton kernel on GPU) -> KV pool.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from sglang.srt.speculative.dflash_worker_v2 import DFlashWorkerV2
from sglang.srt.utils import is_cuda

from sglang_ext.dflare.draft_vocab import DraftVocab
from sglang_ext.sglang_plugin import (
    adaptive,
    request_counters,
    step_profile,
    top_p,
    trace_replay,
    verify_metrics,
)
from sglang_ext.sglang_plugin.adaptive_step import AdaptiveStep
from sglang_ext.sglang_plugin.confident_sampler import ConfidentDraftSampler
from sglang_ext.sglang_plugin.model import DFlareDraftModel
from sglang_ext.sglang_plugin.plan_broadcast import PlanBroadcast

logger = logging.getLogger(__name__)

DRAFT_VOCAB_ENV = "DFLARE_DRAFT_VOCAB"


class FusedNormRope:
    """All layers' context ``k_norm`` + RoPE in one launch of SGLang's DFlash Triton kernel.

    SGLang's own ``FusedKVMaterializeHelper`` also stacks the block ``qkv_proj`` K/V weights (the
    DFlash context projection); only its norm/RoPE kernel is reused here.
    """

    def __init__(self, model: DFlareDraftModel, device: torch.device, max_position: int) -> None:
        attns = [layer.self_attn for layer in model.layers]
        rope = attns[0].rotary_emb
        self.rotary_emb = rope
        self.rotary_dim = int(getattr(rope, "rotary_dim", model.head_dim))
        for attn in attns:
            if not getattr(attn.rotary_emb, "is_neox_style", True):
                raise NotImplementedError("fused context RoPE needs neox-style RoPE")
            if int(getattr(attn.rotary_emb, "rotary_dim", model.head_dim)) != self.rotary_dim:
                raise ValueError("draft layers disagree on rotary_dim")
            for scale in (getattr(attn.attn, "k_scale", None), getattr(attn.attn, "v_scale", None)):
                if scale is not None and not math.isclose(float(scale), 1.0):
                    raise ValueError("fused context KV needs unit k/v scales")
        self.num_kv_heads, self.head_dim = model.num_kv_heads, model.head_dim
        self.k_norm_weights = torch.stack([a.k_norm.weight for a in attns]).contiguous()
        self.eps = torch.tensor(
            [float(a.k_norm.variance_epsilon) for a in attns], dtype=torch.float32, device=device
        )
        ensure = getattr(rope, "_ensure_cos_sin_cache_length", None)
        if callable(ensure):
            ensure(max_position)
        if int(rope.cos_sin_cache.shape[0]) <= max_position:
            raise RuntimeError(f"RoPE cache shorter than max position {max_position}")
        self.cos_sin_cache = rope.cos_sin_cache.to(device)

    def __call__(self, kv: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv [D, N, 2*kv] -> k, v [D, N, nkv, hd]."""
        from sglang.kernels.ops.speculative.fused_kv_materialize import _fused_norm_rope_stacked

        return _fused_norm_rope_stacked(
            kv.transpose(0, 1),  # [N, D, 2*kv] view: the kernel takes explicit strides
            self.k_norm_weights,
            self.eps,
            self.cos_sin_cache,
            positions,
            self.num_kv_heads,
            self.head_dim,
            self.rotary_dim,
        )


class DFlareWorkerV2(DFlashWorkerV2):
    """DFlash worker whose context K/V come from the DFlare per-layer projections."""

    _dflare_norm_rope: FusedNormRope | None = None  # set on CUDA by _init_fused_kv_helper

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.draft_model, DFlareDraftModel):
            raise TypeError(
                f"DFLARE resolved the draft checkpoint to {type(self.draft_model).__name__}, not "
                "DFlareDraftModel: its config.json must declare architectures=['QwenDFlareDraftModel']"
            )
        torch_top_p = top_p.install()
        self._trace_replay = trace_replay.from_environment(self.server_args)
        self._replay_reqs: list = []
        if self._trace_replay is not None:
            self._install_trace_replay()
        self._step_profiler = step_profile.from_environment()
        model_name = self.server_args.served_model_name or self.server_args.model_path
        first_rank = getattr(getattr(self, "ps", None), "tp_rank", 0) == 0  # every TP rank runs this step
        self._verify_metrics = (
            verify_metrics.from_environment(str(model_name), int(self.block_size)) if first_rank else None
        )
        self._adaptive: AdaptiveStep | None = None
        mode = adaptive.ragged_mode()
        if mode is not None:  # under TP only the group's rank 0 plans (plan_broadcast.py), with its table
            share = PlanBroadcast.for_tp_group()
            cost, shorter = None, []
            if share is None or share.leads:
                card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
                block = int(self.block_size)
                cost, shorter = adaptive.load_cost_table(card, block, adaptive.draft_blocks(block))
            self._adaptive = AdaptiveStep(
                self, cost, dspark_planner=mode == "dspark_planner", share=share, draft_blocks=shorter
            )
        logger.info(
            "DFLARE worker ready: draft=%s.%s, %d layers, taps=%s, block=%d, verify=%s, fused norm/rope=%s, "
            "top-p renorm in PyTorch=%s",
            type(self.draft_model).__module__,
            type(self.draft_model).__qualname__,
            len(self.draft_model.layers),
            self.draft_model.target_layer_ids,
            self.block_size,
            mode or "static",
            self._dflare_norm_rope is not None,
            torch_top_p,
        )

    def init_cuda_graphs(self) -> None:
        """SGLang's target and drafter graphs, then the adaptive step's graphs of shorter drafts
        (``DFLARE_DRAFT_BLOCKS``, short_draft.py)."""
        super().init_cuda_graphs()
        head_outside_graphs = self._draft_sampler is None  # graphs off, or a head SGLang keeps eager
        if head_outside_graphs and self._draft_vocab() is not None:
            logger.warning("DFLARE draft vocabulary unused: the draft head is not in the draft CUDA graphs")
        if self._adaptive is not None:
            self._adaptive.capture_short_draft_graphs(adaptive.draft_blocks(int(self.block_size)))

    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None):
        """SGLang's DFlash step, or in adaptive mode our adaptive decode step (adaptive_step.py); with trace
        replay on, the batch's requests are kept for the accept step, and with step profiling on, chosen
        decode batch sizes run under the torch profiler."""
        decode = not (batch.forward_mode.is_extend() or batch.is_extend_in_batch)
        step = self._static_decode if decode else super().forward_batch_generation
        if decode and self._adaptive_fits(batch):
            step = self._adaptive_decode
        elif self._adaptive is not None:  # a prefill, an idle or a full-block step: not a measured step
            self._adaptive.other_work()
        if self._trace_replay is not None and decode:
            self._replay_reqs = list(batch.reqs)
        if self._step_profiler is not None and decode:
            return self._step_profiler.run(len(batch.seq_lens), step, batch, on_publish, grammar_barrier)
        return step(batch, on_publish, grammar_barrier)

    def _adaptive_fits(self, batch) -> bool:
        """Adaptive steps cover plain decoder targets with the full draft cache; a grammar-constrained
        batch, a windowed draft cache or a Mamba-style target keeps SGLang's full-block step (which in the
        ragged verify mode runs its verify without CUDA graphs)."""
        return (
            self._adaptive is not None
            and not batch.forward_mode.is_idle()
            and not batch.has_grammar
            and not self.use_compact_draft_cache
            and not self._need_mamba_verify_commit
        )

    def _maybe_build_draft_sampler(self):
        """SGLang's in-graph greedy draft head; ours (confident_sampler.py) with adaptive verify (or the
        DSPARK planner), which also writes each draft's top-1 probability so confidences cost no second
        LM-head product, or with a draft vocabulary, whose rows alone it reads."""
        sampler = super()._maybe_build_draft_sampler()
        if sampler is None:  # init_cuda_graphs says whether a vocabulary goes unused
            return None
        vocab = self._draft_vocab()
        if vocab is not None:
            logger.info("DFLARE draft vocabulary: drafting over %d of %d tokens (coverage %s)",
                        vocab.size, vocab.target_vocab_size, vocab.coverage)  # fmt: skip
            return ConfidentDraftSampler.over_draft_vocab(sampler, vocab)
        if adaptive.ragged_mode() is None:  # the static block needs no confidences
            return sampler
        logger.info("DFLARE adaptive: the draft graph's greedy head also computes the drafts' confidences")
        return ConfidentDraftSampler.replacing(sampler)

    def _draft_vocab(self) -> DraftVocab | None:
        """The draft vocabulary named by ``DFLARE_DRAFT_VOCAB`` (a file, e.g. a mounted ConfigMap: the chart's
        ``engine.speculative.draftVocab``), else the drafter checkpoint's ``draft_vocab.json``; checked
        against the target."""
        named = os.environ.get(DRAFT_VOCAB_ENV)
        if named:
            vocab = DraftVocab.read(named)
        else:
            vocab = DraftVocab.load(self.server_args.speculative_draft_model_path)
        if vocab is not None:
            vocab.check_target(int(self.model_runner.model_config.vocab_size))
        return vocab

    def _greedy_sample_from_vocab_parallel_head(self, *, hidden_states, lm_head, chunk_size: int = 256):
        """SGLang's eager draft head (a batch the draft graphs do not hold); over the draft vocabulary
        through the graph's head when the server has one, in slices its buffers hold."""
        head = self._draft_sampler
        if not isinstance(head, ConfidentDraftSampler) or head.id_map is None:
            return super()._greedy_sample_from_vocab_parallel_head(
                hidden_states=hidden_states, lm_head=lm_head, chunk_size=chunk_size
            )
        if hidden_states.numel() == 0:
            return hidden_states.new_empty((0,), dtype=torch.long)
        step = int(head.out.numel())
        return torch.cat([head.draft(part)[0].clone() for part in hidden_states.split(step)])

    def record_step(self, reqs, widths: list[int], plain: bool) -> None:
        """Per-request widths of one decode step into meta_info (request_counters) and /metrics (with the
        adaptive policy's calibration error, computed only when metrics are exported)."""
        request_counters.record_step(reqs, widths, plain)
        if self._verify_metrics is not None:
            planned = self._adaptive is not None and self._adaptive.greedy_policy is not None
            error = self._adaptive.calibration.calibration_error() if planned else None
            self._verify_metrics.record(widths, error)

    def _static_decode(self, batch, on_publish=None, grammar_barrier=None):
        """SGLang's DFlash step: every request verifies the whole block."""
        result = super().forward_batch_generation(batch, on_publish, grammar_barrier)
        if not batch.forward_mode.is_idle():
            self.record_step(batch.reqs, [int(self.block_size) - 1] * len(batch.reqs), False)
        return result

    def _adaptive_decode(self, batch, on_publish=None, grammar_barrier=None):
        if getattr(batch, "return_logprob", False):
            raise ValueError("DFLASH speculative decoding does not support return_logprob yet.")
        self._validate_phase1_sampling_support(batch)
        return self._adaptive.run(batch, on_publish, self._trace_replay)

    def _install_trace_replay(self) -> None:
        """Route SGLang's simulated-acceptance branch of the verify step to the trace replay.

        The DFlash step calls ``apply_dflash_simulated_acceptance`` (a module global) after its own accept
        whenever ``SIMULATE_ACC_LEN > 0``; both globals of that module are replaced in this process only.
        """
        from sglang.srt.speculative import dflash_worker_v2 as base

        base.SIMULATE_ACC_LEN = 1.0
        base.apply_dflash_simulated_acceptance = self._replay_acceptance

    def _replay_acceptance(self, *, candidates: torch.Tensor, **outputs: torch.Tensor) -> None:
        bs, block = candidates.shape
        if len(self._replay_reqs) != bs:
            raise RuntimeError(f"trace replay: {len(self._replay_reqs)} requests for {bs} verify rows")
        accepted = self._trace_replay.accepted_lengths(self._replay_reqs, [block - 1] * bs)
        trace_replay.write_replayed_acceptance(
            accepted,
            candidates=candidates,
            target_predict=outputs["target_predict"],
            accept_len=outputs["accept_len"],
            commit_lens=outputs["commit_lens"],
            bonus=outputs["bonus"],
            out_tokens=outputs["out_tokens"],
        )

    def _init_fused_kv_helper(self) -> None:
        """Replace DFlash's shared-feature fused helper by DFlare's (bmm + the same norm/RoPE kernel)."""
        self._fused_kv_helper = None
        self._use_fused_kv_materialize = False
        self._dflare_norm_rope: FusedNormRope | None = None
        if not is_cuda():
            return
        try:
            max_position = int(self.target_worker.model_runner.model_config.context_len) + int(
                self.block_size
            )
            self._dflare_norm_rope = FusedNormRope(self.draft_model, self.device, max_position)
        except Exception as exc:  # unusual RoPE/quantisation: the per-layer path is exact, only slower
            logger.warning("DFLARE fused context norm/RoPE disabled, using per-layer ops: %s", exc)

    def _append_target_hidden_to_draft_kv_by_loc(
        self,
        *,
        target_hidden: torch.Tensor,
        cache_loc: torch.Tensor,
        positions: torch.Tensor,
        cache_loc_2d: torch.Tensor | None = None,
        commit_lens: torch.Tensor | None = None,
    ) -> None:
        """Write context K/V of ``target_hidden`` rows (all layers) at ``cache_loc``.

        With ``cache_loc_2d`` [bs, B] + ``commit_lens`` (post-verify), only each request's accepted prefix
        and bonus rows are written, exactly like the DFlash worker.
        """
        if target_hidden is None:
            raise RuntimeError("DFLARE missing target hidden context features")
        num_tokens = int(target_hidden.shape[0])
        if num_tokens == 0:
            return
        if int(cache_loc.numel()) != num_tokens or int(positions.numel()) != num_tokens:
            raise ValueError(
                f"DFLARE context rows {num_tokens}, cache_loc {int(cache_loc.numel())}, positions "
                f"{int(positions.numel())} disagree"
            )
        if cache_loc_2d is not None and commit_lens is None:
            raise ValueError("DFLARE cache_loc_2d requires commit_lens")
        device = self.model_runner.device
        target_hidden = target_hidden.to(device, non_blocking=True)
        cache_loc = cache_loc.to(device=device, dtype=torch.int64, non_blocking=True)
        positions = positions.to(device=device, dtype=torch.int64, non_blocking=True)
        if cache_loc_2d is not None:
            cache_loc_2d = cache_loc_2d.to(device=device, dtype=torch.int64, non_blocking=True)
            commit_lens = commit_lens.to(device=device, dtype=torch.int32, non_blocking=True)
            if int(commit_lens.shape[0]) == 0:
                return

        with torch.inference_mode():
            model = self.draft_model
            features = model.project_target_hidden(target_hidden)
            per_layer = None
            if self._dflare_norm_rope is not None:
                try:
                    k_all, v_all = self._dflare_norm_rope(model.context_kv_projection(features), positions)
                    per_layer = list(zip(k_all, v_all, strict=True))
                except Exception as exc:
                    logger.warning("DFLARE fused context norm/RoPE failed, using per-layer ops: %s", exc)
                    self._dflare_norm_rope = None
            if per_layer is None:
                per_layer = model.context_kv(features, positions)
            pool = self.draft_model_runner.token_to_kv_pool
            for layer, (k, v) in zip(model.layers, per_layer, strict=True):
                attn = layer.self_attn.attn
                if cache_loc_2d is not None:
                    pool.set_kv_buffer_prefix_valid(
                        attn, cache_loc_2d, commit_lens, k, v, attn.k_scale, attn.v_scale
                    )
                else:
                    pool.set_kv_buffer(attn, cache_loc, k, v, attn.k_scale, attn.v_scale)
