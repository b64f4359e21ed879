"""The synthetic acceptance trace: a FROZEN, seeded model of a drafter, for benchmarks and policies.

The model (change it only with a reason stated in the commit; benchmarks compare runs across time on it):

- each request draws its own acceptance rate ``a ~ Beta(20 m, 20 (1 - m))`` (concentration 20, mean m);
- in every verify step draft ``j`` is accepted with probability ``a`` when drafts ``1..j-1`` all were, so a
  step accepts ``min(Geometric, B - 1)`` drafts and acceptance falls with the draft position;
- the confidence reported at each draft position is ``a + N(0, 0.05)``, clipped to [0, 1];
- ``m`` is solved so that the expected tau at block 16, bonus token included,
  ``E[1 + sum_{j=1..15} a^j]``, is 7.3 (the acceptance length SGLang's constant simulator was run at).
  The expectation is exact: ``E[a^j]`` of a Beta is ``prod_{i<j} (alpha + i) / (alpha + beta + i)``, and
  it rises with ``m``, so bisection finds ``m`` (0.8611).

The rates of the requests are drawn stratified: request ``i`` of ``n`` gets the Beta quantile of
``(s_i + u_i) / n`` with ``s`` a random permutation of ``0..n-1`` and ``u_i`` uniform. Each rate is still
Beta-distributed, but the spread of tau over requests (sd 2.6 at block 16) no longer moves the trace's
mean tau by +-0.2 from seed to seed with 128 requests, so every seed's trace has tau 7.3 +- 0.1.
Every request has the same number of steps (so the pooled tau is the mean of the requests' tau).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sglang_ext.traces.format import AcceptanceTrace, TraceStep

CONCENTRATION = 20.0
TARGET_TAU = 7.3
TARGET_BLOCK = 16
CONFIDENCE_NOISE_SD = 0.05


def expected_tau(mean: float, block_size: int = TARGET_BLOCK, concentration: float = CONCENTRATION) -> float:
    """Exact ``E[1 + sum_{j=1..B-1} a^j]`` for ``a ~ Beta(c * mean, c * (1 - mean))``."""
    alpha, beta = concentration * mean, concentration * (1.0 - mean)
    tau, moment = 1.0, 1.0
    for j in range(block_size - 1):
        moment *= (alpha + j) / (alpha + beta + j)  # E[a^(j+1)]
        tau += moment
    return tau


def solve_mean(
    tau: float = TARGET_TAU, block_size: int = TARGET_BLOCK, concentration: float = CONCENTRATION
) -> float:
    """The Beta mean ``m`` whose expected tau at ``block_size`` is ``tau`` (bisection; tau rises with m)."""
    if not 1.0 < tau < block_size:
        raise ValueError(f"tau must be in (1, {block_size}) at block {block_size}, got {tau}")
    lo, hi = 0.0, 1.0
    for _ in range(60):  # 2^-60: far below float noise in tau
        mid = (lo + hi) / 2
        if expected_tau(mid, block_size, concentration) < tau:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def request_rates(num_requests: int, mean: float, rng: np.random.Generator) -> np.ndarray:
    """Stratified Beta draws (module docstring): one acceptance rate per request."""
    from scipy.special import betaincinv  # the Beta quantile function

    strata = (rng.permutation(num_requests) + rng.random(num_requests)) / num_requests
    return betaincinv(CONCENTRATION * mean, CONCENTRATION * (1.0 - mean), strata)


def synthetic_trace(
    num_requests: int = 128, steps_per_request: int = 128, block_size: int = TARGET_BLOCK, seed: int = 0
) -> AcceptanceTrace:
    """The frozen model's trace (module docstring); the same arguments give the same trace."""
    if num_requests < 1 or steps_per_request < 1:
        raise ValueError("num_requests and steps_per_request must be >= 1")
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    rng = np.random.default_rng(seed)
    mean = solve_mean()
    rates = request_rates(num_requests, mean, rng)
    drafts = block_size - 1
    requests = []
    for a in rates:
        accepts = rng.random((steps_per_request, drafts)) < a  # draft j's coin, used while all before hit
        accepted = np.where(accepts.all(axis=1), drafts, np.argmin(accepts, axis=1))  # leading successes
        noisy = a + rng.normal(0.0, CONFIDENCE_NOISE_SD, (steps_per_request, drafts))
        confidences = np.clip(noisy, 0.0, 1.0).round(4).tolist()
        requests.append(
            [TraceStep(int(n), tuple(c)) for n, c in zip(accepted.tolist(), confidences, strict=True)]
        )
    meta = {
        "model": (
            f"a ~ Beta({CONCENTRATION:g} m, {CONCENTRATION:g} (1 - m)) per request (stratified), drafts "
            f"accepted with probability a while all before were, confidence = a + N(0, "
            f"{CONFIDENCE_NOISE_SD:g}) clipped to [0, 1]"
        ),
        "beta_mean": round(mean, 6),
        "concentration": CONCENTRATION,
        "expected_tau_block16": round(expected_tau(mean), 4),
        "seed": seed,
        "request_rates": [round(float(a), 4) for a in rates],
    }
    return AcceptanceTrace("synthetic", block_size, 0.0, requests, meta)


# ---- CLI: dflare trace synthetic -----------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="trace file (.json or .json.gz)")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--steps", type=int, default=128, help="verify steps per request")
    parser.add_argument("--block-size", type=int, default=TARGET_BLOCK)
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    trace = synthetic_trace(args.requests, args.steps, args.block_size, args.seed)
    trace.save(args.out)
    accepted = sum(s.accepted for steps in trace.requests for s in steps)
    print(
        f"{args.out}: {len(trace.requests)} requests x {args.steps} steps, block {trace.block_size}, "
        f"tau {1 + accepted / trace.num_steps:.3f} (model: {trace.meta['expected_tau_block16']} at block 16)"
    )
    return 0
