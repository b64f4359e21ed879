"""``StackedLinear``: several ``nn.Linear`` layers that read the same input, run as one product.

Small models decode on CPU at a few rows per step, where each op's fixed cost dominates. Stacking the
rows of q/k/v (or gate/up) into one weight turns three products into one, and keeping that weight
transposed (contiguous W.T) lets MKL run the few-row product ~1.5x faster than ``F.linear`` does with its
transposed operand. Both are copies, so big models (memory) and training (gradients must reach the
modules' own weights) use the modules directly and concatenate their outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

COPY_BELOW_PARAMS = 300_000_000  # models this small get stacked, transposed copies of their weights


class StackedLinear:
    """``x -> cat([lin(x) for lin in linears], -1)``; with ``copy`` from one stored ``W.T`` (and bias)."""

    def __init__(self, linears: list[nn.Linear], copy: bool) -> None:
        self.linears = linears
        self.weight_t: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        if copy:
            with torch.no_grad():
                self.weight_t = torch.cat([lin.weight for lin in linears]).t().contiguous()
                if linears[0].bias is not None:
                    self.bias = torch.cat([lin.bias for lin in linears])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_t is None:
            outs = [F.linear(x, lin.weight, lin.bias) for lin in self.linears]
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias
