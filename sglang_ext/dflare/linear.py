"""``StackedLinear``: several ``nn.Linear`` layers that read the same input, run as one product.

Small models decode on CPU at a few rows per step, where each op's fixed cost dominates: stacking the
rows of q/k/v (or gate/up) into one weight turns three products into one. The copy is stored transposed
([in, out], contiguous): for the 1-16 row products of CPU decoding and verification ``x @ W_t`` is
mostly faster than ``F.linear(x, W)`` (which hands MKL a transposed operand), up to 2.3x for the LM head at
8 rows, at the cost of float rounding-level differences from ``F.linear``. It is a copy, so big models
(memory) and training (gradients must reach the modules' own weights) use the modules directly and
concatenate their outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

COPY_BELOW_PARAMS = 300_000_000  # models this small get stacked copies of their weights


class StackedLinear:
    """``x -> cat([lin(x) for lin in linears], -1)``; with ``copy`` from one stacked, transposed weight."""

    def __init__(self, linears: list[nn.Linear], copy: bool) -> None:
        self.linears = linears
        self.weight_t: torch.Tensor | None = None  # [in, sum of outs], contiguous (``copy`` only)
        self.bias: torch.Tensor | None = None
        if copy:
            with torch.no_grad():
                self.weight_t = torch.cat([lin.weight for lin in linears]).t().contiguous()
                if linears[0].bias is not None:
                    self.bias = torch.cat([lin.bias for lin in linears])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_t is not None:
            out = torch.matmul(x, self.weight_t)
            return out if self.bias is None else out + self.bias
        if len(self.linears) == 1:
            return F.linear(x, self.linears[0].weight, self.linears[0].bias)
        return torch.cat([F.linear(x, lin.weight, lin.bias) for lin in self.linears], dim=-1)


@dataclass
class DecoderLayerWeights:
    """One Llama/Qwen-style decoder layer's weights in the form the CPU forwards use them: the target's
    (``reference.target``) and the drafter's (``dflare.model``) layers have the same module names."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qk_norm: torch.Tensor | None  # [heads + kv_heads, hd]: q_norm per query head, then k_norm per key head
    qkv: StackedLinear
    o: StackedLinear
    gate_up: StackedLinear
    down: StackedLinear

    @classmethod
    def of(
        cls, layer: nn.Module, num_heads: int, num_kv_heads: int, copy: bool, trainable: bool = False
    ) -> DecoderLayerWeights:
        """``layer``'s weights; ``copy`` stacks q|k|v and gate|up into new tensors (small models, no
        gradients). The joint q/k norm weight keeps its autograd graph only for a ``trainable`` layer."""
        attn, mlp = layer.self_attn, layer.mlp
        qk_norm = None
        if hasattr(attn, "q_norm"):
            qk_norm = torch.cat(
                [attn.q_norm.weight.expand(num_heads, -1), attn.k_norm.weight.expand(num_kv_heads, -1)]
            )
            if not trainable:
                qk_norm = qk_norm.detach()
        return cls(
            input_norm=layer.input_layernorm.weight,
            post_norm=layer.post_attention_layernorm.weight,
            qk_norm=qk_norm,
            qkv=StackedLinear([attn.q_proj, attn.k_proj, attn.v_proj], copy),
            o=StackedLinear([attn.o_proj], copy),
            gate_up=StackedLinear([mlp.gate_proj, mlp.up_proj], copy),
            down=StackedLinear([mlp.down_proj], copy),
        )
