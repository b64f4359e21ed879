"""Pieces both training commands share: device choice, the LR schedule, and sizing a run to a time budget.

A time budget exists because GPU time is rationed: instead of guessing a step count, a run times a few
throw-away steps and derives the number of steps that fits, then follows an ordinary cosine schedule
over exactly that many steps (so the schedule still ends at its floor).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cosine_with_warmup(step: int, total: int, warmup_frac: float, floor: float = 0.1) -> float:
    """LR multiplier: linear warmup from ``1/warmup`` (counting from step+1), then cosine to ``floor``."""
    warmup = max(1, round(total * warmup_frac))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def steps_for_budget(
    step_fn: Callable[[], None], budget_s: float, device: torch.device, probe_steps: int = 4
) -> tuple[int, float]:
    """Steps of ``step_fn`` that fit in ``budget_s`` seconds, and the measured seconds per step.

    ``step_fn`` must leave no trace (the caller zeroes gradients); two untimed calls warm kernels up.
    """
    for _ in range(2):
        step_fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(probe_steps):
        step_fn()
    _sync(device)
    per_step = (time.perf_counter() - start) / probe_steps
    return max(1, int(budget_s / per_step)), per_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on GPU (fp32 master weights and moments); plain fp32 on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
