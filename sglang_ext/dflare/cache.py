"""A KV cache whose rows (requests) each have their own length: what continuous batching needs.

Storage per layer is [rows, nkv, capacity, hd]; row r's valid keys are positions ``0..lengths[r]-1``.
Positions past a row's length are scratch: a forward may write there (padding, a draft block) and the
next write simply overwrites them, so "cropping" a row is setting its length.
"""

from __future__ import annotations

import torch

_GROW = 256  # capacity grows in multiples of this many positions


class RowKVCache:
    """K/V of ``num_layers`` attention layers for up to ``rows`` sequences of independent lengths."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        rows: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        capacity: int = _GROW,
    ) -> None:
        self.num_layers = num_layers
        self.shape = (rows, num_kv_heads, 0, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.lengths: list[int] = [0] * rows
        # zeros, not empty: masked-out keys still meet a 0 * value product in attention, and NaN * 0 = NaN.
        self.k = [self._zeros(capacity) for _ in range(num_layers)]
        self.v = [self._zeros(capacity) for _ in range(num_layers)]

    def _zeros(self, capacity: int) -> torch.Tensor:
        rows, nkv, _, hd = self.shape
        return torch.zeros(rows, nkv, capacity, hd, dtype=self.dtype, device=self.device)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def rows(self) -> int:
        return self.shape[0]

    def ensure_capacity(self, needed: int) -> None:
        """Grow every layer so that positions ``< needed`` exist (amortised: at least doubles)."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        new_cap = -(-new_cap // _GROW) * _GROW
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                grown = self._zeros(new_cap)
                grown[:, :, : old.shape[2]] = old
                store[i] = grown

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor | int) -> None:
        """Store k/v [b, nkv, q, hd] of rows ``0..b-1`` at positions ``offsets[r] + 0..q-1``."""
        b, _, q, _ = k.shape
        if isinstance(offsets, int):
            self.k[layer][:b, :, offsets : offsets + q] = k
            self.v[layer][:b, :, offsets : offsets + q] = v
            return
        rows = torch.arange(b, device=k.device)[:, None]
        pos = offsets[:, None] + torch.arange(q, device=k.device)[None, :]  # [b, q]
        self.k[layer].transpose(1, 2)[rows, pos] = k.transpose(1, 2)
        self.v[layer].transpose(1, 2)[rows, pos] = v.transpose(1, 2)

    def write_packed(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """Store packed k/v [N, nkv, hd] of tokens at (``rows[n]``, ``positions[n]``)."""
        self.k[layer].transpose(1, 2)[rows, positions] = k
        self.v[layer].transpose(1, 2)[rows, positions] = v

    def view(self, layer: int, batch: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of rows ``0..batch-1``, positions ``0..upto-1`` (a view, no copy)."""
        return self.k[layer][:batch, :, :upto], self.v[layer][:batch, :, :upto]

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` into row ``dst`` (keeps active rows contiguous when a request leaves)."""
        if src == dst:
            return
        n = self.lengths[src]
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst] = n

    def lengths_tensor(self, batch: int) -> torch.Tensor:
        return torch.tensor(self.lengths[:batch], dtype=torch.int64, device=self.device)
