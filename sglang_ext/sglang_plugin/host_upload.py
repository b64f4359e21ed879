"""Small host lists to the GPU without stalling the host on the GPU's queue.

``torch.tensor(values, device="cuda")`` copies from pageable memory, and a pageable copy is only staged when
the stream reaches it: the host waits for every kernel queued before it. In a decode step that is a full
wait on the previous step, which undoes SGLang's overlap scheduling (the scheduler's work for the next step
no longer runs while the GPU computes). :func:`to_device` copies through a ring of pinned buffers with
``non_blocking=True``; a buffer is reused only after its last copy finished (an event, long since passed).
On the CPU it is a plain ``torch.tensor``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_RING = 8


class _PinnedRing:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: list[torch.Tensor | None] = [None] * _RING
        self.events: list[torch.cuda.Event | None] = [None] * _RING
        self.next = 0

    def upload(self, values: Sequence[int | float], dtype: torch.dtype) -> torch.Tensor:
        slot = self.next
        self.next = (slot + 1) % _RING
        event = self.events[slot]
        if event is not None:
            event.synchronize()  # the copy that last used this buffer (several steps ago)
        buf = self.buffers[slot]
        n = len(values)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.empty(max(n, 512), dtype=dtype, pin_memory=True)
            self.buffers[slot] = buf
        buf[:n].copy_(torch.as_tensor(values, dtype=dtype))
        out = buf[:n].to(self.device, non_blocking=True)
        self.events[slot] = torch.cuda.Event()
        self.events[slot].record()
        return out


_rings: dict[tuple[str, int | None], _PinnedRing] = {}


def to_device(values: Sequence[int | float], device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """``values`` as a 1-D ``dtype`` tensor on ``device``, without waiting for the device's queue."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(list(values), dtype=dtype, device=device)
    key = (device.type, device.index)
    ring = _rings.get(key)
    if ring is None:
        ring = _rings[key] = _PinnedRing(device)
    return ring.upload(values, dtype)
