"""``QwenDFlareDraftModel`` on SGLang's layers: the DFlash draft stack plus DFlare's context path.

DFlare differs from DFlash only in how the context (the target's tapped hidden states) enters the
draft KV cache (docs/core.md, "The drafter in formulas"): no ``fc``; each draft layer mixes the T taps
with its own softmax row of ``layer_fusion_weights`` (one shared ``hidden_norm`` after the mix) and projects
the result with its own ``k_proj_target`` / ``v_proj_target``. Block tokens keep the DFlash path
(``qkv_proj`` + RadixAttention), so the forward, CUDA graphs and verify are SGLang's own.

The math comes from :mod:`sglang_ext.dflare.ops` (shared with the reference engine); this module only
adapts it to SGLang's parameter layout, tensor parallelism and kernels.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

import torch
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.models.dflash import DFlashDecoderLayer, DFlashDraftModel
from sglang.srt.runtime_context import get_parallel
from sglang.srt.speculative.dflash_utils import parse_dflash_draft_config
from torch import nn

from sglang_ext.dflare import ops
from sglang_ext.sglang_plugin import draft_capture

logger = logging.getLogger(__name__)

# Exact checkpoint names (after an optional "model." prefix). Matching whole names, not substrings,
# keeps ".k_proj" from swallowing ".k_proj_target" (the stock DFlash loader's stacking rule would).
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_STACKED = {  # checkpoint suffix -> (SGLang parameter suffix, shard id)
    "self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", "q"),
    "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", "k"),
    "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", "v"),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0),
    "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", 1),
}
_CONTEXT_KV = {"self_attn.k_proj_target.weight": 0, "self_attn.v_proj_target.weight": 1}
_ANGELSPEC_NAMES = ("context_norm", "final_norm", "context_proj", "embed_tokens")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # HF rotary caches some exporters write


class DFlareWeightError(ValueError):
    """A draft checkpoint whose tensors do not match the DFlare layout exactly."""


def _kv_head_range(total_kv_heads: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """KV heads owned by ``tp_rank``, with the same convention as SGLang's ``QKVParallelLinear``
    (sharded when there are at least ``tp_size`` heads, replicated otherwise)."""
    if total_kv_heads >= tp_size:
        per_rank = total_kv_heads // tp_size
        return tp_rank * per_rank, per_rank
    replicas = tp_size // total_kv_heads
    return tp_rank // replicas, 1


class DFlareDraftModel(DFlashDraftModel):
    """SGLang DFlare draft model (no embeddings, no LM head: the target's are used).

    Parameters beyond DFlash's layers: ``layer_fusion_weights`` [D, T] (float32 logits; their softmax
    is taken once, at load), ``hidden_norm`` and ``context_kv_weight`` [D, 2*kv, H]: every layer's
    ``k_proj_target`` and ``v_proj_target`` stacked so the context K/V of all layers is ONE bmm.
    """

    decoder_layer_cls = DFlashDecoderLayer
    # SGLang's fused path projects ONE shared feature with the block K/V weights; ours replaces it.
    supports_fused_context_kv = False

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        nn.Module.__init__(self)  # not DFlashDraftModel.__init__: it would allocate the unused fc
        if quant_config is not None:
            raise ValueError("DFLARE drafters are served unquantised (the context bmm reads raw weights)")
        self.config = config
        hidden_size = int(config.hidden_size)
        num_layers = int(config.num_hidden_layers)
        self.rms_norm_eps = float(getattr(config, "rms_norm_eps", 1e-6))
        self.layers = nn.ModuleList(
            [self.decoder_layer_cls(config=config, layer_id=i, quant_config=None) for i in range(num_layers)]
        )
        self.norm = RMSNorm(hidden_size, eps=self.rms_norm_eps)
        draft_config = parse_dflash_draft_config(draft_hf_config=config)
        if draft_config.target_layer_ids is None:
            raise ValueError("DFLARE needs dflash_config.target_layer_ids in the draft config")
        self.target_layer_ids = [int(i) for i in draft_config.target_layer_ids]
        self.num_context_features = len(self.target_layer_ids)
        self.block_size = draft_config.resolve_block_size(default=16)
        self.hidden_norm = RMSNorm(hidden_size, eps=self.rms_norm_eps)
        self.layer_fusion_weights = nn.Parameter(
            torch.zeros(num_layers, self.num_context_features, dtype=torch.float32), requires_grad=False
        )

        attn = self.layers[0].self_attn
        parallel = get_parallel()
        self.tp_rank, self.tp_size = int(parallel.tp_rank), int(parallel.tp_size)
        self.num_kv_heads, self.head_dim = int(attn.num_kv_heads), int(attn.head_dim)
        self.total_kv_heads = int(attn.total_num_kv_heads)
        kv = self.num_kv_heads * self.head_dim
        self.context_kv_weight = nn.Parameter(
            torch.empty(num_layers, 2 * kv, hidden_size), requires_grad=False
        )
        self._fusion_probs: torch.Tensor | None = None
        self._mix_cache: torch.Tensor | None = None

    def forward(
        self,
        input_ids,
        positions,
        forward_batch,
        input_embeds=None,
        get_embedding: bool = False,
        pp_proxy_tensors=None,
    ):
        """DFlash's block forward; with ``DFLARE_DRAFT_CAPTURE`` set its outputs are also recorded.

        The parameters spell out the parent's on purpose: SGLang's CUDA-graph runner passes the draft
        ``input_embeds`` only if ``inspect.signature(forward)`` names them (a ``*args, **kwargs`` override
        made every DFLARE server with CUDA graphs fail at capture)."""
        args = (input_ids, positions, forward_batch, input_embeds, get_embedding, pp_proxy_tensors)
        out = super().forward(*args)
        if draft_capture.enabled():
            draft_capture.record(positions, out.hidden_states)
        return out

    # ---- context path ---------------------------------------------------------------------------
    @property
    def fusion_probs(self) -> torch.Tensor:
        """[D, T] float32 softmax of the fusion logits (computed at load; lazily after a dummy load)."""
        if self._fusion_probs is None or self._fusion_probs.device != self.layer_fusion_weights.device:
            self._fusion_probs = ops.fusion_probabilities(self.layer_fusion_weights)
            self._mix_cache = None
        return self._fusion_probs

    def _mix_weights(self, dtype: torch.dtype) -> torch.Tensor:
        probs = self.fusion_probs
        if self._mix_cache is None or self._mix_cache.dtype != dtype:
            self._mix_cache = probs.to(dtype)  # cast once, not per step
        return self._mix_cache

    def project_target_hidden(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """[N, T*H] concatenated taps -> [N, D, H] per-layer fused context features (after hidden_norm).

        ``ops.fuse_context``'s math (mix with the softmax rows, then the shared norm), with SGLang's
        fused RMSNorm kernel for the norm: one matmul + one norm kernel per step on the GPU.
        """
        hidden = int(self.config.hidden_size)
        expected = self.num_context_features * hidden
        if target_hidden.ndim != 2 or int(target_hidden.shape[-1]) != expected:
            raise ValueError(
                f"DFLARE expects captured target features [N, {expected}] "
                f"({self.num_context_features} taps x hidden {hidden}), got {tuple(target_hidden.shape)}: "
                "the target captures a different tap set than dflash_config.target_layer_ids"
            )
        taps = target_hidden.view(-1, self.num_context_features, hidden)
        mixed = torch.matmul(self._mix_weights(taps.dtype), taps)  # [D, T] @ [N, T, H] -> [N, D, H]
        return self.hidden_norm(mixed.view(-1, hidden)).view(mixed.shape)

    def context_kv_projection(self, features: torch.Tensor) -> torch.Tensor:
        """[N, D, H] features -> [D, N, 2*kv] raw context K|V of every layer, in ONE bmm."""
        k, v = ops.context_kv(features, self.context_kv_weight.transpose(1, 2))
        size = k.shape[-1]
        if k.stride(-2) == 2 * size and v.data_ptr() == k.data_ptr() + size * k.element_size():
            # k and v are the two halves of the bmm output: view it whole instead of copying
            return k.as_strided((*k.shape[:-1], 2 * size), k.stride(), k.storage_offset())
        return torch.cat([k, v], dim=-1)

    def context_kv(
        self, features: torch.Tensor, positions: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer context (k, v), each [N, nkv, hd], after the layer's ``k_norm`` and RoPE.

        Portable path (SGLang's per-layer norm/RoPE ops; runs on CPU, used by the CPU tests and as the
        GPU fallback). The worker's GPU path does the same with one fused Triton kernel.
        """
        kv = self.context_kv_projection(features)
        size = self.num_kv_heads * self.head_dim
        out = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            k = attn.apply_k_rope(positions, attn.apply_k_norm(kv[i, :, :size].contiguous()))
            v = kv[i, :, size:]
            out.append(
                (
                    k.view(-1, self.num_kv_heads, self.head_dim),
                    v.reshape(-1, self.num_kv_heads, self.head_dim),
                )
            )
        return out

    # ---- weights --------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Strict loader: every parameter must be filled exactly once and no tensor may be left over."""
        params = dict(self.named_parameters())
        expected: dict[str, set] = {name: {None} for name in params}
        for layer_idx in range(len(self.layers)):
            expected[f"layers.{layer_idx}.self_attn.qkv_proj.weight"] = {"q", "k", "v"}
            expected[f"layers.{layer_idx}.mlp.gate_up_proj.weight"] = {0, 1}
            expected[f"context_kv_weight/{layer_idx}"] = {0, 1}
        del expected["context_kv_weight"]
        loaded: dict[str, set] = {}
        unexpected: list[str] = []

        def mark(key: str, shard) -> None:
            got = loaded.setdefault(key, set())
            if shard in got:
                raise DFlareWeightError(
                    f"DFLARE draft checkpoint: tensor for {key} (shard {shard}) given twice"
                )
            got.add(shard)

        for raw_name, tensor in weights:
            name = raw_name[len("model.") :] if raw_name.startswith("model.") else raw_name
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name.split(".")[0] in _ANGELSPEC_NAMES:
                raise DFlareWeightError(
                    f"DFLARE draft checkpoint has AngelSpec tensor {raw_name!r}: convert the checkpoint with "
                    "`dflare convert` first"
                )
            handled = self._load_one(name, tensor, params, mark)
            if not handled:
                unexpected.append(raw_name)
        missing = sorted(
            f"{key} (shards {sorted(map(str, want - loaded.get(key, set())))})" if want != {None} else key
            for key, want in expected.items()
            if not want <= loaded.get(key, set())
        )
        if unexpected or missing:
            raise DFlareWeightError(
                "DFLARE draft checkpoint does not match QwenDFlareDraftModel: "
                f"unexpected tensors {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}; "
                f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}"
            )
        self._fusion_probs = ops.fusion_probabilities(self.layer_fusion_weights)
        self._mix_cache = None
        logger.info(
            "DFLARE draft weights loaded: %d layers, %d taps %s, fusion entropy per layer %s",
            len(self.layers),
            self.num_context_features,
            self.target_layer_ids,
            [
                round(float(x), 3)
                for x in -(self._fusion_probs * self._fusion_probs.clamp_min(1e-12).log()).sum(-1)
            ],
        )

    def _load_one(
        self,
        name: str,
        tensor: torch.Tensor,
        params: dict[str, nn.Parameter],
        mark: Callable[[str, object], None],
    ) -> bool:
        match = _LAYER_RE.match(name)
        if match is not None:
            layer_idx, suffix = int(match.group(1)), match.group(2)
            if layer_idx >= len(self.layers):
                return False
            if suffix in _CONTEXT_KV:
                self._load_context_kv(layer_idx, _CONTEXT_KV[suffix], tensor)
                mark(f"context_kv_weight/{layer_idx}", _CONTEXT_KV[suffix])
                return True
            if suffix in _STACKED:
                param_suffix, shard = _STACKED[suffix]
                key = f"layers.{layer_idx}.{param_suffix}"
                param = params[key]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard)
                mark(key, shard)
                return True
        if name in params and name != "context_kv_weight":
            param = params[name]
            if tuple(param.shape) != tuple(tensor.shape) and not hasattr(param, "weight_loader"):
                raise DFlareWeightError(
                    f"DFLARE draft tensor {name}: shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                )
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            mark(name, None)
            return True
        return False

    def _load_context_kv(self, layer_idx: int, which: int, tensor: torch.Tensor) -> None:
        """Copy this rank's KV heads of ``k_proj_target`` (which=0) / ``v_proj_target`` (1) into the stack."""
        full = (self.total_kv_heads * self.head_dim, int(self.config.hidden_size))
        if tuple(tensor.shape) != full:
            raise DFlareWeightError(
                f"DFLARE layers.{layer_idx} {'kv'[which]}_proj_target: shape {tuple(tensor.shape)}, "
                f"expected {full}"
            )
        first, count = _kv_head_range(self.total_kv_heads, self.tp_rank, self.tp_size)
        shard = tensor.narrow(0, first * self.head_dim, count * self.head_dim)
        size = self.num_kv_heads * self.head_dim
        self.context_kv_weight.data[layer_idx, which * size : (which + 1) * size].copy_(shard)


EntryClass = [DFlareDraftModel]
