"""Load shapes as data: stages in fractions of the run time and of the peak user count (`-u`).

Pure (no locust import, so tests can load it without gevent's monkey-patching); the locustfile's
`StagesShape` drives locust from it.

`--shape steady` holds `-u` users for `--run-time`; `ramp` climbs to `-u` in four steps; `spike`
holds a quarter of `-u`, jumps to `-u` for the middle fifth of the run, then falls back.
"""

from __future__ import annotations

import math

# shape -> [(end of stage as a fraction of run time, users as a fraction of -u)]
STAGES: dict[str, list[tuple[float, float]]] = {
    "steady": [(1.0, 1.0)],
    "ramp": [(0.25, 0.25), (0.5, 0.5), (0.75, 0.75), (1.0, 1.0)],
    "spike": [(0.4, 0.25), (0.6, 1.0), (1.0, 0.25)],
}
DEFAULT_RUN_TIME_S = 60.0


def users_at(shape: str, elapsed_s: float, run_time_s: float, peak_users: int) -> int | None:
    """Users wanted ``elapsed_s`` into the run, or None when the run is over."""
    if elapsed_s >= run_time_s:
        return None
    progress = elapsed_s / run_time_s
    for end, fraction in STAGES[shape]:
        if progress < end:
            return max(1, math.ceil(fraction * peak_users))
    return None
