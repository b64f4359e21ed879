"""How much of each drafted block the target verifies: per request a width, or a plain decode step.

A speculative step costs a drafter forward plus a target forward over every verified token, and that cost
grows with the batch and with the tokens checked, while what it buys (accepted drafts) depends on how sure
the drafter is about each request. One block size fixed at start cannot serve a lone user and a full server,
so each step :class:`VerifyWidthPolicy` picks the widths that maximise expected committed tokens per ms:

- :class:`StepCostModel` measured cost (ms) of the draft, the verify and a plain decode step by batch and
  tokens, from a table (a profile at engine start or a stored JSON per card, model and block);
- :class:`AcceptanceCalibration` maps the drafter's top-1 probability at a block position to the chance the
  target accepts that draft when all before it were accepted, learnt from what the target really accepts
  (binned, with a prior and exponential forgetting, so a drifting drafter or a shifted workload is followed);
- :class:`VerifyWidthPolicy` turns both into a :class:`VerifyPlan`.

Verifying fewer drafts never changes what is committed (the target checks every committed draft), so any
plan is lossless; the policy only trades speed. This module imports torch only: the reference engine and the
SGLang plugin share it.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# ---- cost model ----------------------------------------------------------------------------------------


def _interp(x: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Piecewise-linear ``ys(xs)`` at ``x``; beyond the ends the end segments continue, never downwards
    (a cost does not fall as work grows), and one point is a constant. NumPy: thousands of points in
    microseconds, which a plan at batch 256 needs."""
    if xs.size == 1:
        return np.full_like(x, ys[0])
    y = np.interp(x, xs, ys)
    low = max(0.0, (ys[1] - ys[0]) / (xs[1] - xs[0]))
    high = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
    y += np.where(x < xs[0], low * (x - xs[0]), 0.0) + np.where(x > xs[-1], high * (x - xs[-1]), 0.0)
    return np.maximum(y, 0.0)


def _table(rows: Iterable[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (x, y) arrays, y made non-decreasing in x: more work never costs less, so a noisy profile
    (a shared machine) must not teach the policy that verifying more is cheaper. Repeated x are averaged,
    then violators pooled (pool-adjacent-violators: the least-squares non-decreasing fit)."""
    acc: dict[float, list[float]] = {}
    for x, y in rows:
        acc.setdefault(float(x), []).append(float(y))
    xs = sorted(acc)
    if not xs:
        raise ValueError("a cost table needs at least one measured point")
    blocks: list[list[float]] = []  # [mean, weight, count of xs]
    for x in xs:
        blocks.append([sum(acc[x]) / len(acc[x]), float(len(acc[x])), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, w1, n1), (m2, w2, n2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2]
    ys = [m for m, _, n in blocks for _ in range(int(n))]
    return np.array(xs), np.array(ys)


class StepCostModel:
    """Measured ms of a speculative step's parts as functions of batch size and tokens.

    ``verify_ms(batch, verified_tokens)``: the target forward that verifies, where ``verified_tokens`` is
    what the target processes in total (sum over requests of width + 1); ``draft_ms(batch, block)``: one
    drafter forward drafting ``block`` slots per request (its context update included where profiled);
    ``decode_ms(batch)``: a plain decode step (measured, else ``verify_ms(batch, batch)``).

    Each measured curve is made non-decreasing (see ``_table``). Between measured points the cost is
    linear: in tokens at a measured batch, and across batches at the same tokens per request (so a table
    measured at width k applies at width k for any batch). Outside the table the end segments continue
    upwards (never down); a single measured batch is used for every batch as a function of total tokens
    (the cost of a forward is set by the tokens it processes).
    """

    def __init__(
        self,
        verify: Iterable[tuple[int, int, float]],
        draft: Iterable[tuple[int, int, float]],
        decode: Iterable[tuple[int, float]] = (),
        *,
        device: str = "unknown",
        model: str = "unknown",
        block_size: int = 0,
    ) -> None:
        """From measured points: ``verify`` (batch, verified tokens, ms), ``draft`` (batch, block, ms),
        ``decode`` (batch, ms); ``device``/``model``/``block_size`` name what was measured."""
        self.device, self.model, self.block_size = device, model, int(block_size)
        self._verify_points = sorted((int(b), int(t), float(ms)) for b, t, ms in verify)
        self._draft_points = sorted((int(b), int(k), float(ms)) for b, k, ms in draft)
        self._decode_points = sorted((int(b), float(ms)) for b, ms in decode)
        if not self._verify_points or not self._draft_points:
            raise ValueError("a step cost model needs measured verify and draft points")
        if any(ms < 0 for *_, ms in self._verify_points + self._draft_points + self._decode_points):
            raise ValueError("measured costs must be >= 0 ms")
        self._verify = self._by_batch(self._verify_points)
        self._draft = self._by_batch(self._draft_points)
        self._decode = _table(self._decode_points) if self._decode_points else None

    @staticmethod
    def _by_batch(points: list[tuple[int, int, float]]) -> list[tuple[int, np.ndarray, np.ndarray]]:
        batches = sorted({b for b, _, _ in points})
        return [(b, *_table((x, ms) for bb, x, ms in points if bb == b)) for b in batches]

    @staticmethod
    def _across_batches(
        tables: list[tuple[int, np.ndarray, np.ndarray]], batch: int, x: np.ndarray, per_request: bool
    ) -> np.ndarray:
        """Evaluate the two measured batches nearest ``batch`` (at the same x per request when
        ``per_request``) and interpolate linearly in batch (extrapolating upwards only)."""
        if len(tables) == 1:
            _, xs, ys = tables[0]
            return _interp(x, xs, ys)
        hi = min(max(bisect.bisect_left([b for b, _, _ in tables], batch), 1), len(tables) - 1)
        (b0, xs0, ys0), (b1, xs1, ys1) = tables[hi - 1], tables[hi]
        scale0 = b0 / batch if per_request else 1.0
        scale1 = b1 / batch if per_request else 1.0
        y0, y1 = _interp(x * scale0, xs0, ys0), _interp(x * scale1, xs1, ys1)
        slope = (y1 - y0) / (b1 - b0)
        if not b0 <= batch <= b1:
            slope = np.maximum(slope, 0.0)
        return np.maximum(y0 + slope * (batch - b0), 0.0)

    def verify_ms_many(self, batch: int, verified_tokens: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``verify_ms`` for many token totals at one batch size (a float64 CPU tensor)."""
        x = np.asarray(
            verified_tokens.detach().cpu() if isinstance(verified_tokens, torch.Tensor) else verified_tokens,
            dtype=np.float64,
        )
        return torch.from_numpy(self._across_batches(self._verify, batch, x, per_request=True))

    def verify_ms(self, batch: int, verified_tokens: int) -> float:
        return float(self._across_batches(self._verify, batch, np.array([float(verified_tokens)]), True)[0])

    def draft_ms(self, batch: int, block: int) -> float:
        return float(self._across_batches(self._draft, batch, np.array([float(block)]), False)[0])

    def decode_ms(self, batch: int) -> float:
        if self._decode is None:
            return self.verify_ms(batch, batch)
        xs, ys = self._decode
        return float(_interp(np.array([float(batch)]), xs, ys)[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "model": self.model,
            "block_size": self.block_size,
            "verify": [{"batch": b, "tokens": t, "ms": ms} for b, t, ms in self._verify_points],
            "draft": [{"batch": b, "block": k, "ms": ms} for b, k, ms in self._draft_points],
            "decode": [{"batch": b, "ms": ms} for b, ms in self._decode_points],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepCostModel:
        return cls(
            [(p["batch"], p["tokens"], p["ms"]) for p in data["verify"]],
            [(p["batch"], p["block"], p["ms"]) for p in data["draft"]],
            [(p["batch"], p["ms"]) for p in data.get("decode", [])],
            device=data.get("device", "unknown"),
            model=data.get("model", "unknown"),
            block_size=data.get("block_size", 0),
        )

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> StepCostModel:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---- acceptance calibration ----------------------------------------------------------------------------


class AcceptanceCalibration:
    """P(the target accepts a draft | every earlier draft of its block was accepted), from the drafter's
    top-1 probability at that position.

    ``bins`` equal bins over [0, 1]; each bin's estimate is its (forgetting-weighted) accept rate, pulled
    towards ``prior`` by ``prior_strength`` pseudo-observations. ``prior`` defaults to the bin's centre (the
    drafter taken at its word until the target says otherwise), shifted by the mean of (accepted -
    confidence) over all observations: a policy that stops verifying low-confidence drafts never observes
    their bins again, and an underconfident drafter (the demo pair's is, by about 0.18) would otherwise stay
    judged by its own word there. Forgetting is by observations, not calls:
    every observed position multiplies older evidence by ``0.5 ** (1 / half_life)``, so a batch of 256 and
    a batch of 1 follow a shift after the same amount of evidence.

    ``position_rates(n)`` is what plans use before confidences exist: the recent accept rate at each block
    position (given all before accepted), pulled towards ``prior_rate``.
    """

    def __init__(
        self,
        bins: int = 20,
        half_life: float = 2000.0,
        prior_strength: float = 4.0,
        prior: Sequence[float] | None = None,
        prior_rate: float = 0.5,
    ) -> None:
        if bins < 1 or half_life <= 0 or prior_strength <= 0:
            raise ValueError("bins >= 1, half_life > 0 and prior_strength > 0 are required")
        self.bins, self.half_life = bins, half_life
        self.prior_strength, self.prior_rate = prior_strength, prior_rate
        centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
        self.prior = centres if prior is None else torch.tensor(list(prior), dtype=torch.float64)
        if self.prior.shape != (bins,):
            raise ValueError(f"prior needs {bins} values")
        self._decay_per_obs = 0.5 ** (1.0 / half_life)
        # forgetting-weighted sums per bin: observations, accepts, raw confidences, predictions made before
        # the observation (out of sample, for calibration_error)
        self._count = torch.zeros(bins, dtype=torch.float64)
        self._accepted = torch.zeros(bins, dtype=torch.float64)
        self._confidence = torch.zeros(bins, dtype=torch.float64)
        self._predicted = torch.zeros(bins, dtype=torch.float64)
        self._pos_count = torch.zeros(0, dtype=torch.float64)  # per block position (grown on demand)
        self._pos_accepted = torch.zeros(0, dtype=torch.float64)
        self._cell_count = torch.zeros(0, bins, dtype=torch.float64)  # per (position, bin)
        self._cell_accepted = torch.zeros(0, bins, dtype=torch.float64)
        self.observations = 0  # positions observed over the calibration's life

    def _bin(self, confidences: torch.Tensor) -> torch.Tensor:
        return (confidences.to(torch.float64) * self.bins).long().clamp_(0, self.bins - 1)

    def _table(self) -> torch.Tensor:
        total = float(self._count.sum())
        prior = self.prior
        if total > 0:  # shifted by the drafter's mean miscalibration seen in every bin (see the docstring)
            bias = float(self._accepted.sum() - self._confidence.sum()) / total
            prior = (prior + bias * total / (total + self.prior_strength)).clamp(0.0, 1.0)
        return (self._accepted + self.prior_strength * prior) / (self._count + self.prior_strength)

    def predict(self, confidences: torch.Tensor) -> torch.Tensor:
        """Accept probabilities, same shape as ``confidences`` (float64, on the CPU). For [n, k] input,
        column j is block position j + 1 and each (position, bin) estimate is pulled towards the bin's
        estimate over all positions by ``prior_strength`` pseudo-observations (the same confidence
        means more at the first draft than at the eighth); 1-D input gets the all-positions estimate."""
        pooled = self._table()
        bins = self._bin(confidences.detach().cpu())
        if bins.dim() != 2:
            return pooled[bins]
        k = bins.shape[1]
        count, acc = self._cells(k)
        cells = (acc + self.prior_strength * pooled) / (count + self.prior_strength)  # [k, bins]
        return cells.gather(1, bins.T).T

    def _cells(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(position, bin) counts and accepts for positions 1..k, zero rows where never observed."""
        if k > self._cell_count.shape[0]:
            grow = torch.zeros(k - self._cell_count.shape[0], self.bins, dtype=torch.float64)
            self._cell_count = torch.cat([self._cell_count, grow])
            self._cell_accepted = torch.cat([self._cell_accepted, grow])
        return self._cell_count[:k], self._cell_accepted[:k]

    def position_rates(self, n: int) -> torch.Tensor:
        """[n] recent accept rate at block positions 1..n given all before accepted (float64)."""
        count, acc = self._pos_count[:n], self._pos_accepted[:n]
        pad = n - count.numel()
        if pad > 0:
            z = torch.zeros(pad, dtype=torch.float64)
            count, acc = torch.cat([count, z]), torch.cat([acc, z])
        return (acc + self.prior_strength * self.prior_rate) / (count + self.prior_strength)

    def observe(
        self,
        confidences: torch.Tensor,
        widths: torch.Tensor | Sequence[int],
        accepted: torch.Tensor | Sequence[int],
    ) -> None:
        """Learn from one verify: ``confidences`` [n, k] of the drafts, ``widths`` [n] drafts verified per
        request, ``accepted`` [n] drafts accepted. Positions 1..min(accepted + 1, width) are observed: the
        accepted ones as successes, the first rejected one (if verified) as a failure; later positions say
        nothing (their prefix was wrong)."""
        conf = confidences.detach().to("cpu", torch.float64)
        n, k = conf.shape
        width = torch.as_tensor(widths, dtype=torch.long).cpu().clamp(0, k).view(n, 1)
        acc = torch.as_tensor(accepted, dtype=torch.long).cpu().view(n, 1)
        pos = torch.arange(1, k + 1).view(1, k)
        seen = pos <= torch.minimum(acc + 1, width)
        success = (pos <= acc) & seen
        m = int(seen.sum())
        if m == 0:
            return
        bins = self._bin(conf)[seen]
        hits = success[seen].to(torch.float64)
        predicted = self.predict(conf)[seen]  # before this outcome is learnt
        keep = self._decay_per_obs**m
        for total, add in (
            (self._count, torch.ones_like(hits)),
            (self._accepted, hits),
            (self._confidence, conf[seen]),
            (self._predicted, predicted),
        ):
            total.mul_(keep).index_add_(0, bins, add)
        grow = torch.zeros(max(0, k - self._pos_count.numel()), dtype=torch.float64)
        self._pos_count = torch.cat([self._pos_count, grow])
        self._pos_accepted = torch.cat([self._pos_accepted, grow])
        self._pos_count.mul_(keep)[:k] += seen.sum(0).to(torch.float64)
        self._pos_accepted.mul_(keep)[:k] += success.sum(0).to(torch.float64)
        self._cells(k)
        cell = (torch.arange(k).view(1, k).expand(n, k)[seen] * self.bins + bins).view(-1)
        self._cell_count.mul_(keep).view(-1).index_add_(0, cell, torch.ones_like(hits))
        self._cell_accepted.mul_(keep).view(-1).index_add_(0, cell, hits)
        self.observations += m

    def calibration_error(self) -> float:
        """Expected calibration error of recent predictions: per bin |predicted - accepted| summed, over
        the observations (forgetting-weighted). Each prediction is the one made BEFORE its outcome was
        learnt, so this is how wrong the policy's beliefs were, not a fit to the data itself."""
        total = float(self._count.sum())
        return float((self._predicted - self._accepted).abs().sum()) / total if total > 0 else 0.0

    def confidence_error(self) -> float:
        """Expected calibration error of the raw confidences (how far the drafter's own probabilities are
        from the target's accept rate), over recent observations."""
        total = float(self._count.sum())
        return float((self._confidence - self._accepted).abs().sum()) / total if total > 0 else 0.0


# ---- the policy ----------------------------------------------------------------------------------------


@dataclass
class VerifyPlan:
    """One step's decision. ``widths[i]``: drafts request i's target verifies (0..block-1; 0 = only the
    bonus token, a decode of that row); ``plain_decode``: the whole batch takes a plain decode step (no
    draft forward at all; widths are then all 0); ``draft_block``: the block the drafter drafts next (may be
    shorter than the configured block when that pays); ``expected_tokens`` committed and ``expected_ms``
    the step's modelled cost."""

    widths: list[int]
    plain_decode: bool
    draft_block: int
    expected_tokens: float
    expected_ms: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_ms(self) -> float:
        return self.expected_tokens / self.expected_ms if self.expected_ms > 0 else math.inf


class VerifyWidthPolicy:
    """Chooses per step and per request how many drafts to verify, or a plain decode step, to maximise
    expected committed tokens per ms (see the module docstring).

    With calibrated accept probabilities ``p`` per position, a request verifying k drafts commits in
    expectation ``1 + sum_{j<=k} q_j`` tokens, ``q_j = prod_{l<=j} p_l`` (1 = the bonus token). A step costs
    ``draft_ms(batch, block) + verify_ms(batch, sum_i (k_i + 1))``, a plain decode step ``decode_ms(batch)``
    for ``batch`` tokens. Since every ``q`` row is non-increasing, taking (request, position) increments in
    order of gain is optimal for each total of verified drafts, so one sort and one cumulative sum value
    every total at once.

    Which total: the one maximising ``tokens - R x ms``, where R is the rate the policy has been achieving
    (``long_run_rate``: a moving average of its plans' speedup over plain decoding, never below plain
    decoding). Over many steps that maximises tokens per ms; choosing each step's own best ratio would not
    (it verifies too much of poor drafts and too little of good ones). Two decisions, two moments:
    ``plan_for_batch(batch)``, before drafting, drafts only if recent drafted steps (their expected tokens
    and verified tokens per request, so a batch change carries over) beat a plain decode step by that
    measure; with no history it drafts (a cold start explores, and the plan() after it verifies at least
    one draft per request). ``plan(confidences)``, after drafting,
    treats the draft as paid and sets ``plain_decode`` when no width beats verifying none (widths are then
    0 and the step decodes every row).

    ``ragged=False`` is for engines that pad every request to the longest verified row (the reference
    engine): the verify then costs ``batch * (max width + 1)`` tokens and all rows take the same width.
    ``draft_blocks``: the blocks the drafter may be asked to draft (default: only ``block_size``); a shorter
    one is chosen when its cheaper draft pays for the widths it rules out (assuming the drafter's first
    positions are as good in a shorter block: measure that before listing shorter blocks).

    Inputs and lag (overlap scheduling): ``plan(confidences)`` needs the CURRENT step's confidences (the
    draft the target is about to verify); the calibration may lag: ``observe`` one or two steps late only
    delays learning. ``plan_for_batch`` needs nothing current. After ``probe_interval`` plain decode plans
    in a row, ``plan_for_batch`` asks for one speculative step (and the ``plan()`` after it verifies at
    least one draft per request), so acceptance keeps being measured.

    Cost: ``plan()`` at batch 256, block 16 takes about 0.7 ms (batch 1: 0.4 ms), one torch thread on a
    loaded 2-core x86 CPU (sort + cumulative sum + NumPy interpolation, no per-request Python loop);
    ``tests/core/test_verify_policy.py`` prints it.
    """

    def __init__(
        self,
        cost: StepCostModel,
        calibration: AcceptanceCalibration,
        block_size: int,
        *,
        ragged: bool = True,
        draft_blocks: Sequence[int] | None = None,
        probe_interval: int = 32,
        recent_weight: float = 0.1,
    ) -> None:
        if block_size < 2:
            raise ValueError(f"a verify-width policy needs block_size >= 2, got {block_size}")
        blocks = sorted(set(draft_blocks or [block_size]))
        if any(not 2 <= b <= block_size for b in blocks):
            raise ValueError(f"draft_blocks must be in 2..{block_size}, got {blocks}")
        self.cost, self.calibration, self.block_size = cost, calibration, block_size
        self.ragged, self.draft_blocks, self.probe_interval = ragged, blocks, probe_interval
        self.recent_weight = recent_weight
        # drafted steps' plans, per request, moving averages: expected tokens, verified tokens; the block
        self._recent: tuple[float, float] | None = None
        self._recent_block = block_size
        # moving averages of tokens and of ms in plain-decode tokens' time: their ratio is the speedup
        self._speedup = (0.0, 0.0)
        self._plain_in_row = 0
        self._probing = False  # plan_for_batch asked for a probe: the next plan() verifies >= 1 draft

    # -- public ------------------------------------------------------------------------------------------
    def long_run_rate(self, batch: int) -> float:
        """R: the tokens per ms this policy has been achieving, as a multiple of plain decoding's rate at
        ``batch`` (never below plain decoding). Each decision maximises tokens - R x ms, which over many
        steps maximises tokens per ms (a per-step best ratio would not: it over-verifies poor steps)."""
        speedup = self._speedup[0] / self._speedup[1] if self._speedup[1] > 0 else 1.0
        return max(speedup, 1.0) * batch / self.cost.decode_ms(batch)

    def plan(self, confidences: torch.Tensor) -> VerifyPlan:
        """Plan the verify of a drafted batch: ``confidences`` [batch, block-1], the drafter's top-1
        probability at each draft position of each request (current step). The draft is paid by now, so
        widths maximise tokens - R x verify ms; ``plain_decode`` when no width beats verifying none."""
        bs, n = confidences.shape
        if n < 1 or n > self.block_size - 1:
            raise ValueError(f"confidences need 1..{self.block_size - 1} positions, got {n}")
        prefix = self.calibration.predict(confidences).cumprod(dim=1)  # [bs, n], non-increasing rows
        rate = self.long_run_rate(bs)
        if self._probing:  # this draft was asked for to measure acceptance: verify some of it
            self._probing = False
            plan = self._best(prefix, drafted=n + 1, rate=rate, uniform=True, min_width=1)
            plan.extra["probe"] = True
        else:
            plan = self._best(prefix, drafted=n + 1, rate=rate)
            plan.plain_decode = max(plan.widths) == 0
        self._remember(plan, bs, drafted=True)
        self._plain_in_row = self._plain_in_row + 1 if plan.plain_decode else 0
        return plan

    def plan_for_batch(self, batch: int) -> VerifyPlan:
        """Plan before any confidences of this step exist: whether to draft at all, and which block (see
        the class docstring). Widths are uniform (what the recent plans verified per request)."""
        plain = VerifyPlan([0] * batch, True, self._recent_block, float(batch), self.cost.decode_ms(batch))
        rate = self.long_run_rate(batch)
        if self._recent is None:  # nothing drafted yet: draft, the calibration's rates say how wide
            n = self.block_size - 1
            prefix = self.calibration.position_rates(n).cumprod(0).expand(batch, n)
            plan = self._best(prefix, drafted=self.block_size, rate=rate, uniform=True, min_width=1)
            self._probing = True  # a cold start explores: a prior alone must not rule drafting out
            return plan
        else:
            tokens, verified = self._recent
            width = max(0, round(verified) - 1)
            ms = self.cost.draft_ms(batch, self._recent_block) + self.cost.verify_ms(
                batch, round(batch * verified)
            )
            plan = VerifyPlan([width] * batch, False, self._recent_block, batch * tokens, ms)
        gain = (plan.expected_tokens - rate * plan.expected_ms) - (
            plain.expected_tokens - rate * plain.expected_ms
        )
        if gain > 0:
            return plan
        if self._plain_in_row >= self.probe_interval:
            self._plain_in_row, self._probing = 0, True
            plan.extra["probe"] = True
            plan.widths = [max(1, w) for w in plan.widths]
            return plan
        self._plain_in_row += 1
        self._remember(plain, batch, drafted=False)
        return plain

    # -- internals ---------------------------------------------------------------------------------------
    def _remember(self, plan: VerifyPlan, bs: int, drafted: bool) -> None:
        """Fold a step's plan into the averages: the speedup over plain decoding behind R, and for drafted
        steps the per-request tokens and verified tokens plan_for_batch reads."""
        w = self.recent_weight
        plain_ms = self.cost.decode_ms(bs) / bs  # ms per token of plain decoding at this batch
        tokens, cost = self._speedup
        self._speedup = (
            w * plan.expected_tokens + (1 - w) * tokens,
            w * plan.expected_ms / plain_ms + (1 - w) * cost,
        )
        if not drafted:
            return
        widths = torch.tensor(plan.widths, dtype=torch.float64)
        verified = float((widths.max() if not self.ragged else widths.mean()) + 1)
        now = (plan.expected_tokens / bs, verified)
        self._recent = (
            now
            if self._recent is None
            else tuple(w * a + (1 - w) * b for a, b in zip(now, self._recent, strict=True))
        )
        self._recent_block = plan.draft_block

    def _best(
        self,
        prefix: torch.Tensor,
        drafted: int,
        rate: float,
        uniform: bool = False,
        min_width: int = 0,
        with_draft: bool = False,
    ) -> VerifyPlan:
        """The plan maximising tokens - ``rate`` x ms for q = ``prefix`` [bs, n], over the draft blocks that
        fit ``drafted`` (the block whose confidences are known; a block's draft cost decides between blocks
        and, ``with_draft``, counts in the score: before drafting); widths >= ``min_width``."""
        bs = prefix.shape[0]
        best: tuple[float, VerifyPlan] | None = None
        for block in self.draft_blocks:
            if block > drafted:
                continue
            draft_ms = self.cost.draft_ms(bs, block)
            q = prefix[:, : block - 1]
            if uniform or not self.ragged:
                tokens, ms, widths = self._totals_uniform(q)
            else:
                tokens, ms, widths = self._totals_ragged(q)
            score = tokens - rate * ms
            t = min_width + int(torch.argmax(score[min_width:]))
            value = float(score[t]) - (rate * draft_ms if with_draft or len(self.draft_blocks) > 1 else 0.0)
            if best is None or value > best[0]:
                best = (value, VerifyPlan(widths(t), False, block, float(tokens[t]), float(ms[t]) + draft_ms))
        assert best is not None
        return best[1]

    def _totals_ragged(self, q: torch.Tensor):
        """Expected tokens and verify ms at every total T of verified drafts (best allocation for each T),
        and a function T -> widths."""
        bs, n = q.shape
        # stable over the row-major flattening: equal gains keep j ascending within a row (prefixes)
        gains, order = torch.sort(q.reshape(-1), descending=True, stable=True)
        totals = torch.arange(bs * n + 1, dtype=torch.float64)
        tokens = bs + torch.cat([torch.zeros(1, dtype=torch.float64), gains.cumsum(0)])
        ms = self.cost.verify_ms_many(bs, bs + totals)
        return tokens, ms, lambda t: torch.bincount(order[:t] // n, minlength=bs).tolist()

    def _totals_uniform(self, q: torch.Tensor):
        """The same for one width m for every request (padded verify, or no per-request confidences):
        index m."""
        bs, n = q.shape
        tokens = bs + torch.cat([torch.zeros(1, dtype=torch.float64), q.sum(0).cumsum(0)])  # [n + 1]
        ms = self.cost.verify_ms_many(bs, bs * (torch.arange(n + 1, dtype=torch.float64) + 1))
        return tokens, ms, lambda m: [m] * bs
