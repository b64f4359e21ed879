"""Each adaptive decode step's wall time on the GPU, read without waiting, for the policy's online step costs.

The verify-width policy corrects its step-cost table with the engine's own steps
(``VerifyWidthPolicy.observe_step``): a table measured on another card, another model or another load is only
a start. A step's cost is the GPU time between the end of the previous decode step and the end of this one
(CUDA events recorded on the step's stream), which counts whatever the GPU waited for, as a step's wall time
should. Events are read when ``query()`` says they completed, a step or two later, so the host never waits.
A step is not *clean* (teaches nothing) when other GPU work ran since the previous step (a prefill) or there
was no previous step to measure from.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_MAX_PENDING = 16  # events not yet completed; older ones are dropped (they only delay learning)


@dataclass
class _Mark:
    event: Any
    batch: int
    verified_tokens: int | None  # None: a plain decode step
    clean: bool
    draft_block: int | None  # the block the step drafted (None: plain)


class StepClock:
    """Marks the end of every decode step; :meth:`completed` yields (batch, verified tokens, ms, clean, draft
    block) of the steps whose interval the GPU finished, oldest first."""

    def __init__(self, make_event: Callable[[], Any]) -> None:
        self.make_event = make_event
        self._marks: deque[_Mark] = deque()
        self._previous: _Mark | None = None
        self._interrupted = True  # nothing to measure the first step from

    def other_work(self) -> None:
        """A non-decode forward (a prefill) ran: the next step's interval includes it."""
        self._interrupted = True

    def step_done(self, batch: int, verified_tokens: int | None, draft_block: int | None = None) -> None:
        """Call at the end of a decode step, after its last kernel was queued."""
        event = self.make_event()
        event.record()
        self._marks.append(_Mark(event, batch, verified_tokens, not self._interrupted, draft_block))
        self._interrupted = False
        while len(self._marks) > _MAX_PENDING:
            self._previous = self._marks.popleft()

    def completed(self) -> list[tuple[int, int | None, float, bool, int | None]]:
        out = []
        while self._marks and self._marks[0].event.query():
            mark = self._marks.popleft()
            if self._previous is not None:
                ms = float(self._previous.event.elapsed_time(mark.event))
                out.append((mark.batch, mark.verified_tokens, ms, mark.clean, mark.draft_block))
            self._previous = mark
        return out
