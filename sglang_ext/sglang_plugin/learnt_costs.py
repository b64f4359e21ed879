"""What the adaptive policy plans with, written to a file as the server runs (``DFLARE_LEARNT_COSTS=<path>``).

The policy chooses the block to draft from step costs it keeps learning from the engine's own steps
(``StepCostModel.observe_step``); a benchmark row only shows what it chose. When a choice looks wrong on a
GPU (an adaptive block-8 server drafting block 8 at batch 128 where static block 4's steps commit 20 %
more tokens per ms), the question is which cost it learnt. Every ``every`` decode steps this writes the
cost model (its table and every learnt cell), the steps run per drafted block (0 = plain decode), and
the whole step each allowed block costs at each learnt batch size as the policy reads it now. Off unless
the variable is set; the load benchmark sets it for its adaptive servers.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sglang_ext.dflare.verify_policy import StepCostModel

LEARNT_COSTS_ENV = "DFLARE_LEARNT_COSTS"


class LearntCostsDump:
    """Counts decode steps by drafted block and rewrites ``path`` every ``every`` steps."""

    def __init__(self, path: Path, cost: StepCostModel, blocks: Sequence[int], every: int = 256) -> None:
        self.path, self.cost, self.blocks, self.every = Path(path), cost, sorted(set(blocks)), int(every)
        self.steps: Counter[int] = Counter()

    def record(self, drafted_block: int | None) -> None:
        """One decode step: the block it drafted, None for a plain decode step."""
        self.steps[drafted_block or 0] += 1
        if self.steps.total() % self.every == 0:
            self.write()

    def snapshot(self) -> dict[str, Any]:
        table = self.cost.to_dict()
        batches = sorted({cell["batch"] for cell in table["learnt"]["steps"]})
        planned: dict[str, dict[str, dict[str, float]]] = {}
        for b in batches:
            for k in self.blocks:
                draft = self.cost.draft_ms(b, k)
                step = draft + self.cost.verify_ms(b, b * k)
                planned.setdefault(str(b), {})[str(k)] = {
                    "draft_ms": round(draft, 4),
                    "step_ms_whole_block": round(step, 4),
                }
        steps = {str(k): n for k, n in sorted(self.steps.items())}
        return {"steps_by_drafted_block": steps, "planned": planned, "cost_model": table}

    def write(self) -> None:
        """The snapshot, replacing the file whole (a reader never sees half of one)."""
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.snapshot(), indent=1))
        os.replace(partial, self.path)


def from_environment(
    cost: StepCostModel | None, blocks: Sequence[int], environ: dict[str, str] | None = None
) -> LearntCostsDump | None:
    """The dump ``DFLARE_LEARNT_COSTS`` asks for (None when unset or without a cost model to dump)."""
    path = (os.environ if environ is None else environ).get(LEARNT_COSTS_ENV)
    if not path or cost is None:
        return None
    return LearntCostsDump(Path(path), cost, blocks)
