"""One verify plan for every tensor-parallel rank: rank 0 decides, every other rank runs its decision.

Under tensor parallelism each rank runs the adaptive step on the same batch, but the plan's inputs are not
the same everywhere: the step clock times each rank's own GPU, and the policy's state (step costs learnt
online, the calibration, its probe counters) would drift apart. Ranks that chose different widths would
build different ragged verifies (other token counts, other CUDA graphs), and the collectives inside the
target's forward would pair tensors of different shapes: a hang or garbage. Likewise a plain decode step
skips the drafter, whose forward has collectives too. So only rank 0 (of the TP group) plans; it sends
each decision as a few int32 values, and the others wait for it before they act on it.

The decisions go over the TP group's CPU (gloo) group, not its GPU one: both ends are host values (rank
0's policy returns a Python list; SGLang's ragged layout is built from host lengths, ``verify_lens_cpu``),
so a GPU broadcast would add a copy to the device on rank 0 and a device-to-host wait on every other rank,
behind whatever the GPU still has queued. SGLang's scheduler runs the forward in the thread of its event
loop, the thread that issues its own collectives on that group, so every rank issues them in one order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class PlanBroadcast:
    """Rank 0's integers to every rank of one TP group (SGLang's ``GroupCoordinator``)."""

    def __init__(self, group: Any) -> None:
        self.cpu_group = group.cpu_group
        self.source = int(group.ranks[0])  # the global rank of the group's rank 0
        self.leads = int(group.rank_in_group) == 0

    @classmethod
    def for_tp_group(cls) -> PlanBroadcast | None:
        """The broadcast of this process's TP group, or None on a single rank (nothing to agree on)."""
        from sglang.srt.distributed import get_tp_group

        group = get_tp_group()
        return cls(group) if int(group.world_size) > 1 else None

    def agree(self, values: Sequence[int] | None, count: int) -> list[int]:
        """Rank 0 passes its ``count`` values, the others None; every rank gets rank 0's. A collective:
        every rank of the group must call it, in the same order."""
        if self.leads:
            if values is None or len(values) != count:
                raise ValueError(f"rank 0 must send {count} values, got {values!r}")
            message = torch.tensor(list(values), dtype=torch.int32)
        else:
            message = torch.empty(count, dtype=torch.int32)
        torch.distributed.broadcast(message, src=self.source, group=self.cpu_group)
        return message.tolist()
