"""When and how long to wait before retrying a request on another backend.

Only failures *before the first byte reached the client* are retried: connection errors and the
statuses SGLang's own gateway retries (408, 429 and 5xx), which the single-URL backend reports as a
``BackendUnavailable`` with ``retryable`` set. After that the client has part of an answer and a
retry would duplicate or contradict it. Delays grow exponentially with "equal jitter"
(half fixed, half random) so that a fleet of gateways does not retry in lock-step, and are capped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class RetryPolicy:
    max_attempts: int = 3  # total tries, the first included
    backoff_base_s: float = 0.05
    backoff_max_s: float = 2.0
    rng: random.Random = field(default_factory=random.Random)

    def should_retry(self, attempt: int) -> bool:
        """``attempt`` counts tries made so far (1 after the first failure)."""
        return attempt < self.max_attempts

    def delay(self, attempt: int) -> float:
        """Wait before try number ``attempt + 1``: in [d/2, d], d = min(max, base * 2**(attempt-1))."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2 ** max(attempt - 1, 0)))
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)
