"""The frozen synthetic model: tau 7.3 +- 0.1 at block 16, Beta(concentration 20) spread of the requests'
acceptance rates, geometric acceptance within a request, confidences = rate + N(0, 0.05)."""

from __future__ import annotations

import numpy as np
import pytest

from sglang_ext.traces.synthetic import (
    CONCENTRATION,
    expected_tau,
    solve_mean,
    synthetic_trace,
)


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(seed=0)  # the shipped trace's arguments


def _per_request(trace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per request: the acceptance-rate MLE of its steps (accepted drafts / coin flips), the mean and the
    sd of its confidences."""
    drafts = trace.block_size - 1
    rates, conf_mean, conf_sd = [], [], []
    for steps in trace.requests:
        acc = np.array([s.accepted for s in steps])
        failures = (acc < drafts).sum()  # each step ends on one rejected coin unless all drafts pass
        rates.append(acc.sum() / (acc.sum() + failures))
        conf = np.array([s.confidences for s in steps])
        conf_mean.append(conf.mean())
        conf_sd.append(conf.std())
    return np.array(rates), np.array(conf_mean), np.array(conf_sd)


def test_expected_tau_is_the_beta_expectation() -> None:
    """The closed form against Monte Carlo of 1 + sum a^j with a drawn from the Beta."""
    mean = 0.8
    a = np.random.default_rng(1).beta(CONCENTRATION * mean, CONCENTRATION * (1 - mean), 400_000)
    monte_carlo = (1 + sum(a**j for j in range(1, 16))).mean()
    assert expected_tau(mean) == pytest.approx(monte_carlo, abs=0.02)
    assert expected_tau(solve_mean()) == pytest.approx(7.3, abs=1e-9)
    assert solve_mean() == pytest.approx(0.8611, abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tau_at_block_16_is_7_3(seed: int) -> None:
    t = synthetic_trace(seed=seed)
    accepted = np.array([s.accepted for steps in t.requests for s in steps])
    assert t.block_size == 16 and len(accepted) == 128 * 128
    assert 1 + accepted.mean() == pytest.approx(7.3, abs=0.1)


def test_request_rates_spread_like_beta_concentration_20(trace) -> None:
    mean = solve_mean()
    rates, _, _ = _per_request(trace)
    beta_var = mean * (1 - mean) / (CONCENTRATION + 1)
    assert rates.mean() == pytest.approx(mean, abs=0.01)
    # concentration 15 or 27 would be off by a third; estimation noise from 128 steps adds ~3 %
    assert rates.var() == pytest.approx(beta_var, rel=0.15)


def test_steps_and_confidences_follow_each_requests_rate(trace) -> None:
    """Against the rates the generator drew (kept in meta): acceptance within a request is geometric with
    that rate, and confidences are the rate plus N(0, 0.05) noise."""
    true = np.array(trace.meta["request_rates"])
    rates, conf_mean, conf_sd = _per_request(trace)
    assert np.abs(rates - true).mean() < 0.015  # MLE from ~800 coin flips: sd ~0.012
    assert np.abs(conf_mean - true).mean() < 0.004  # noise of 1,920 draws ~0.001, plus clipping at 1
    unclipped = true < 0.8  # 4 sd below 1: clipping does not shrink the noise
    assert unclipped.sum() >= 10
    assert conf_sd[unclipped].mean() == pytest.approx(0.05, abs=0.003)


def test_seeded_and_deterministic() -> None:
    a, b, c = synthetic_trace(8, 8, seed=5), synthetic_trace(8, 8, seed=5), synthetic_trace(8, 8, seed=6)
    assert a == b
    assert a.requests != c.requests
