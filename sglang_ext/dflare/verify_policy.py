"""How much of each drafted block the target verifies: per request a width, or a plain decode step.

A speculative step costs a drafter forward plus a target forward over every verified token, and that cost
grows with the batch and with the tokens checked, while what it buys (accepted drafts) depends on how sure
the drafter is about each request. One block size fixed at start cannot serve a lone user and a full server,
so each step :class:`VerifyWidthPolicy` picks the widths that commit the most expected tokens per ms:

- :class:`StepCostModel` measured cost (ms) of the draft, the verify and a plain decode step by batch and
  tokens, from a table (a profile at engine start or a stored JSON per card, model and block), corrected
  online by the engine's measured steps;
- :class:`AcceptanceCalibration` maps the drafter's top-1 probability at a block position to the chance the
  target accepts that draft when all before it were accepted, learnt from what the target really accepts
  (binned, with a prior and exponential forgetting, so a drifting drafter or a shifted workload is followed);
- :class:`VerifyWidthPolicy` turns both into a :class:`VerifyPlan`.

Verifying fewer drafts never changes what is committed (the target checks every committed draft), so any
plan is lossless; the policy only trades speed. This module imports NumPy and torch only: the reference
engine and the SGLang plugin share it.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import operator
from collections import deque
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
    ``decode_ms(batch)``: a plain decode step (measured, else ``verify_ms(batch, batch)``). Draft costs are
    interpolated over batch sizes per block first, then over blocks.

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
        learn_every: int = 1,
    ) -> None:
        """From measured points: ``verify`` (batch, verified tokens, ms), ``draft`` (batch, block, ms),
        ``decode`` (batch, ms); ``device``/``model``/``block_size`` name what was measured;
        ``learn_every``: see ``observe_step``."""
        self.device, self.model, self.block_size = device, model, int(block_size)
        self._verify_points = sorted((int(b), int(t), float(ms)) for b, t, ms in verify)
        self._draft_points = sorted((int(b), int(k), float(ms)) for b, k, ms in draft)
        self._decode_points = sorted((int(b), float(ms)) for b, ms in decode)
        if not self._verify_points or not self._draft_points:
            raise ValueError("a step cost model needs measured verify and draft points")
        if any(ms < 0 for *_, ms in self._verify_points + self._draft_points + self._decode_points):
            raise ValueError("measured costs must be >= 0 ms")
        self._prior_verify = self._by_batch(self._verify_points)
        # per drafted block, its cost over batch sizes (blocks are often measured at different batches)
        self._draft = {
            k: _table((b, ms) for b, kk, ms in self._draft_points if kk == k)
            for k in sorted({k for _, k, _ in self._draft_points})
        }
        self._prior_decode = _table(self._decode_points) if self._decode_points else None
        self._verify, self._decode = self._prior_verify, self._prior_decode
        # online learning (``observe_step``): per batch, per verified tokens, [ms estimate, weight] of whole
        # drafted steps; per batch, [ms, weight] of plain steps. ``version`` changes with every lesson.
        # A cell is [estimate, weight, the profile's prediction, the draft's ms in it, that draft's block].
        self._learnt_steps: dict[int, dict[int, list[float]]] = {}
        self._learnt_decode: dict[int, list[float]] = {}
        self._outliers: dict[tuple[int, int | None], int] = {}  # outlier steps in a row, by cell
        self._largest_block = max(k for _, k, _ in self._draft_points)
        self._grids: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
        self._tables = {b: (xs, ys) for b, xs, ys in self._prior_verify}
        self._scales: dict[int, float] = {}  # per learnt batch: measured / profiled steps (geometric mean)
        self._stale: set[int] = set()  # batches that learnt since their table was built
        # the tables are rebuilt (and ``version`` moves) every ``learn_every`` lessons: at batch 1 on a CPU
        # a step is a few ms, and rebuilding every step would cost the policy a measurable share of it
        self.learn_every, self._lessons, self._due = learn_every, 0, False
        self.version = 0

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

    def verify_ms_array(self, batch: int, verified_tokens: np.ndarray) -> np.ndarray:
        """``verify_ms`` for many token totals at one batch size (float64 NumPy, the policy's hot path)."""
        self._refresh()
        return self._across_batches(self._verify, batch, np.asarray(verified_tokens, np.float64), True)

    def verify_ms_many(self, batch: int, verified_tokens: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``verify_ms`` for many token totals at one batch size (a float64 CPU tensor)."""
        x = (
            verified_tokens.detach().cpu().numpy()
            if isinstance(verified_tokens, torch.Tensor)
            else verified_tokens
        )
        return torch.from_numpy(self.verify_ms_array(batch, x))

    def verify_ms(self, batch: int, verified_tokens: int) -> float:
        return float(self.verify_ms_array(batch, np.array([float(verified_tokens)]))[0])

    def draft_ms(self, batch: int, block: int) -> float:
        """Each measured block's cost at ``batch`` (over its measured batches), then over blocks: a block
        measured at other batch sizes than another keeps its own curve."""
        at = np.array([float(batch)])
        costs = [(k, float(_interp(at, xs, ys)[0])) for k, (xs, ys) in self._draft.items()]
        if len(costs) == 1:
            return costs[0][1]
        xs, ys = _table(costs)
        return float(_interp(np.array([float(block)]), xs, ys)[0])

    def decode_ms(self, batch: int) -> float:
        self._refresh()
        if self._decode is None:
            return self.verify_ms(batch, batch)
        xs, ys = self._decode
        return float(_interp(np.array([float(batch)]), xs, ys)[0])

    # -- online learning ---------------------------------------------------------------------------------
    def observe_step(
        self,
        batch: int,
        verified_tokens: int | None,
        ms: float,
        *,
        draft_block: int | None = None,
        horizon: float = 64.0,
        prior_weight: float = 2.0,
    ) -> None:
        """Learn from one measured engine step: a plain decode step (``verified_tokens`` None) or a drafted
        step (the draft of ``draft_block``, default the largest profiled, plus the verify of
        ``verified_tokens``), ``ms`` its whole wall time.

        A profile taken at start on a shared machine is off by about as much as the choices it informs differ
        (1-3 ms at batch 1 on a 2-core CPU), and the machine's load moves afterwards, so the engine's own
        steps correct it: per (batch, verified tokens) a moving average of the measured step, starting from
        the profile's prediction worth ``prior_weight`` steps and following the last ``horizon`` steps (each
        measurement clipped to 0.5x..2x the estimate, so one preempted step does not teach a slowdown; a step
        over ``OUTLIER`` x its cell's estimate teaches nothing until ``OUTLIER_RUN`` such steps in a row in
        that cell say the cost really moved: the first eager draft of a new shape compiles kernels and takes
        many times its step, and learnt even clipped, two of them could rule a block out for good at batch
        128). What a step does beyond the forwards (sampling, accepting, the policy itself) is counted because
        it is measured. The curve read back: the profile's, moved and stretched to fit all measured cells of
        the batch (``_fit``: a load change slows every kind of step alike, and one curve is less noisy than
        any cell), and at each measured cell its own average pulled towards that curve by ``SHRINK``
        pseudo-steps (where the profile's shape was wrong, enough steps correct it). Lessons reach the costs
        read back every ``learn_every`` steps. A cell holds the steps of every draft block at its verified
        tokens: each is moved by the profiled difference between its draft and the cell's first, so the cell
        learns the verify and the host time, and the draft of each block stays the profile's."""
        if ms <= 0 or not math.isfinite(ms):
            return
        if verified_tokens is None:
            cell = self._learnt_decode.get(batch)
            if cell is None:
                prior = self._prior_decode_ms(batch)
                cell = self._learnt_decode[batch] = [prior, prior_weight, prior, 0.0]
        else:
            cells = self._learnt_steps.get(batch)
            if cells is None:
                cells = self._learnt_steps[batch] = {}
                self._grids[batch] = self._grid(batch)
            cell = cells.get(verified_tokens)
            block = draft_block or self._largest_block
            if cell is None:
                draft = self.draft_ms(batch, block)
                prior = draft + self._prior_verify_ms(batch, verified_tokens)
                cell = cells[verified_tokens] = [prior, prior_weight, prior, draft, block]
            elif block != cell[4]:  # a step of another draft block: as if it had drafted the cell's
                ms += cell[3] - self.draft_ms(batch, block)
        estimate, weight = cell[0], cell[1]
        key = (batch, verified_tokens)
        if ms > self.OUTLIER * estimate:
            run = self._outliers[key] = self._outliers.get(key, 0) + 1
            if run < self.OUTLIER_RUN:
                return
        else:
            self._outliers.pop(key, None)
        sample = min(max(ms, 0.5 * estimate), 2.0 * estimate)
        weight = min(weight + 1.0, horizon)
        cell[0], cell[1] = estimate + (sample - estimate) / weight, weight
        self._stale.add(batch)
        self._lessons += 1
        if self._lessons >= self.learn_every:
            self._lessons, self._due = 0, True
            self.version += 1

    def _prior_verify_ms(self, batch: int, tokens: int) -> float:
        return float(self._across_batches(self._prior_verify, batch, np.array([float(tokens)]), True)[0])

    def _prior_decode_ms(self, batch: int) -> float:
        if self._prior_decode is None:
            return self._prior_verify_ms(batch, batch)
        xs, ys = self._prior_decode
        return float(_interp(np.array([float(batch)]), xs, ys)[0])

    def _grid(self, batch: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Where a learnt batch's table has points before any is measured: every width of the largest
        block (tokens), the profile's whole-step ms there, and the draft's ms."""
        draft = self.draft_ms(batch, self._largest_block)
        tokens = batch * (np.arange(max(self.block_size, self._largest_block)) + 1.0)
        return tokens, draft + self._across_batches(self._prior_verify, batch, tokens, True), draft

    # pseudo-steps of the fitted curve in each measured cell's estimate
    SHRINK = 8.0
    # a step this many times its cell's estimate is an outlier, learnt only as the OUTLIER_RUN-th in a row
    OUTLIER, OUTLIER_RUN = 3.0, 3

    @staticmethod
    def _fit(cells: list[list[float]], scale: float) -> tuple[float, float]:
        """(a, b) of measured ms = a + b x profiled ms over a batch's learnt cells, least squares weighted
        by each cell's evidence: the profile's shape, moved and stretched by what the steps measured. One
        curve through all cells, not each cell on its own: a cell's average over its last steps is as
        noisy as the differences between widths the policy acts on (a shared 2-core machine). Cells all
        at one profiled cost: ``scale`` x the profile."""
        total = sum(c[1] for c in cells)
        mean_x = sum(c[1] * c[2] for c in cells) / total
        mean_y = sum(c[1] * c[0] for c in cells) / total
        spread = sum(c[1] * (c[2] - mean_x) ** 2 for c in cells)
        if spread < 1e-9 * total * mean_x * mean_x:
            return 0.0, scale
        slope = max(sum(c[1] * (c[2] - mean_x) * (c[0] - mean_y) for c in cells) / spread, 0.0)
        return mean_y - slope * mean_x, slope

    def _refresh(self) -> None:
        """Rebuild the tables of the batches that learnt since the last use (a few dozen points)."""
        if not self._due:
            return
        self._due = False
        for batch in self._stale:
            cells = self._learnt_steps.get(batch)
            if cells:
                tokens, prior, draft = self._grids[batch]
                weight = sum(c[1] for c in cells.values())
                log_ratio = sum(c[1] * math.log(c[0] / c[2]) for c in cells.values()) / weight
                self._scales[batch] = math.exp(log_ratio)
                offset, slope = self._fit(list(cells.values()), self._scales[batch])
                points = {
                    t: offset + slope * p - draft
                    for t, p in zip(tokens.tolist(), prior.tolist(), strict=True)
                }
                for t, (ms, weight, profiled, cell_draft, _) in cells.items():  # its own steps, as they weigh
                    fitted = offset + slope * profiled
                    points[t] = (weight * ms + self.SHRINK * fitted) / (weight + self.SHRINK) - cell_draft
                self._tables[batch] = _table(points.items())
        self._stale.clear()
        self._verify = [(b, *self._tables[b]) for b in sorted(self._tables)]
        decodes = {b: ms for b, ms in self._decode_points}
        for batch, scale in self._scales.items():
            if batch not in self._learnt_decode:
                decodes[batch] = scale * self._prior_decode_ms(batch)
        decodes.update({b: c[0] for b, c in self._learnt_decode.items()})
        self._decode = _table(decodes.items()) if decodes else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "model": self.model,
            "block_size": self.block_size,
            "verify": [{"batch": b, "tokens": t, "ms": ms} for b, t, ms in self._verify_points],
            "draft": [{"batch": b, "block": k, "ms": ms} for b, k, ms in self._draft_points],
            "decode": [{"batch": b, "ms": ms} for b, ms in self._decode_points],
            "learnt": {  # what the engine's own steps taught (``observe_step``); not read back
                "steps": [
                    {
                        "batch": b,
                        "tokens": t,
                        "ms": round(c[0], 4),
                        "profiled_ms": round(c[2], 4),
                        "weight": round(c[1], 2),
                        "draft_block": int(c[4]),
                    }
                    for b, cells in sorted(self._learnt_steps.items())
                    for t, c in sorted(cells.items())
                ],
                "decode": [
                    {"batch": b, "ms": round(c[0], 4), "profiled_ms": round(c[2], 4)}
                    for b, c in sorted(self._learnt_decode.items())
                ],
            },
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

    The estimate is the confidence itself plus a correction learnt per bin (``bins`` equal bins over [0,
    1]): the bin's (forgetting-weighted) mean of accepted - confidence, pulled towards the prior's by
    ``prior_strength`` pseudo-observations. A correction rather than a rate per bin, so a well-calibrated
    drafter keeps the resolution of its own numbers (a rate per bin of width 0.05 planned visibly worse than
    the raw confidences of a calibrated drafter at batch 64-128) while a miscalibrated one is still
    corrected bin by bin. ``prior`` (accept rates per bin) defaults to the bin's centre (the drafter taken
    at its word until the target says otherwise); its correction is shifted by the mean of (accepted -
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
        fold_every: int = 1,
    ) -> None:
        if bins < 1 or half_life <= 0 or prior_strength <= 0 or fold_every < 1:
            raise ValueError("bins >= 1, half_life > 0, prior_strength > 0 and fold_every >= 1 are required")
        self.bins, self.half_life = bins, half_life
        self.prior_strength, self.prior_rate = prior_strength, prior_rate
        self._centres = (np.arange(bins, dtype=np.float64) + 0.5) / bins
        self._prior = self._centres if prior is None else np.array(list(prior), dtype=np.float64)
        if self._prior.shape != (bins,):
            raise ValueError(f"prior needs {bins} values")
        self._decay_per_obs = 0.5 ** (1.0 / half_life)
        # forgetting-weighted sums per bin: observations, accepts, raw confidences, predictions made before
        # the observation (out of sample, for calibration_error). NumPy, not torch: every step reads and
        # updates these few dozen numbers, and a small torch op costs several times a NumPy one.
        self._count = np.zeros(bins)
        self._accepted = np.zeros(bins)
        self._confidence = np.zeros(bins)
        self._predicted = np.zeros(bins)
        self._pos_count = np.zeros(0)  # per block position (grown on demand)
        self._pos_accepted = np.zeros(0)
        self._cell_count = np.zeros((0, bins))  # per (position, bin)
        self._cell_accepted = np.zeros((0, bins))
        self._cell_confidence = np.zeros((0, bins))
        self._cells_table: np.ndarray | None = None  # the (position, bin) corrections, until the next fold
        self._cells_rows: list[list[float]] | None = None  # the same as Python lists (``predict_row``)
        self._observations = 0
        # verifies observed but not yet learnt: at batch 1 a CPU step is a few ms and folding costs tens of
        # microseconds however many verifies it folds, so the engine's policy folds every few steps
        self.fold_every = fold_every
        self._waiting: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    @property
    def prior(self) -> torch.Tensor:
        return torch.from_numpy(self._prior)

    def _bin(self, confidences: np.ndarray) -> np.ndarray:
        return np.minimum((confidences * self.bins).astype(np.int64), self.bins - 1)  # confidences >= 0

    def _table(self) -> np.ndarray:
        """The correction (accept probability - confidence) of each bin."""
        total = float(self._count.sum())
        prior = self._prior - self._centres
        if total > 0:  # shifted by the drafter's mean miscalibration seen in every bin (see the docstring)
            bias = float(self._accepted.sum() - self._confidence.sum()) / total
            prior = prior + bias * total / (total + self.prior_strength)
        observed = self._accepted - self._confidence
        return (observed + self.prior_strength * prior) / (self._count + self.prior_strength)

    def predict(self, confidences: torch.Tensor) -> torch.Tensor:
        """Accept probabilities, same shape as ``confidences`` (float64, on the CPU). For [n, k] input,
        column j is block position j + 1 and each (position, bin) estimate is pulled towards the bin's
        estimate over all positions by ``prior_strength`` pseudo-observations (the same confidence
        means more at the first draft than at the eighth); 1-D input gets the all-positions estimate."""
        self._fold()
        return torch.from_numpy(self.predict_array(_numpy(confidences)))

    def predict_array(self, confidences: np.ndarray) -> np.ndarray:
        """``predict`` on NumPy, without folding waiting verifies in (the policy's hot path: a table
        lookup between two folds)."""
        bins = self._bin(confidences)
        if bins.ndim != 2:
            return np.clip(confidences + self._table()[bins], 0.0, 1.0)
        k = bins.shape[1]
        if self._cells_table is None or self._cells_table.shape[0] < k:
            count, acc, conf = self._cells(max(k, self._cell_count.shape[0]))
            pulled = acc - conf + self.prior_strength * self._table()
            self._cells_table = pulled / (count + self.prior_strength)
        return np.clip(confidences + self._cells_table[np.arange(k), bins], 0.0, 1.0)

    def predict_row(self, confidences: list[float]) -> list[float]:
        """``predict_array`` of one request's confidences (positions 1..k) on Python floats: between two
        forwards of a CPU engine each NumPy call on a few numbers costs 10-20 us (cold caches), so a batch
        of one is looked up without any."""
        k = len(confidences)
        if self._cells_rows is None or len(self._cells_rows) < k:
            self.predict_array(np.zeros((1, k)))  # builds the table
            assert self._cells_table is not None
            self._cells_rows = self._cells_table.tolist()
        top, rows = self.bins - 1, self._cells_rows
        corrected = (c + rows[j][min(int(c * self.bins), top)] for j, c in enumerate(confidences))
        return [min(1.0, max(0.0, x)) for x in corrected]

    def _cells(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position, bin) counts, accepts and confidence sums for positions 1..k, zero rows where never
        observed."""
        if k > self._cell_count.shape[0]:
            grow = np.zeros((k - self._cell_count.shape[0], self.bins))
            self._cell_count = np.concatenate([self._cell_count, grow])
            self._cell_accepted = np.concatenate([self._cell_accepted, grow])
            self._cell_confidence = np.concatenate([self._cell_confidence, grow])
        return self._cell_count[:k], self._cell_accepted[:k], self._cell_confidence[:k]

    def position_rates(self, n: int) -> torch.Tensor:
        """[n] recent accept rate at block positions 1..n given all before accepted (float64)."""
        self._fold()
        count, acc = np.zeros(n), np.zeros(n)
        m = min(n, self._pos_count.size)
        count[:m], acc[:m] = self._pos_count[:m], self._pos_accepted[:m]
        return torch.from_numpy((acc + self.prior_strength * self.prior_rate) / (count + self.prior_strength))

    def observe(
        self,
        confidences: torch.Tensor | np.ndarray,
        widths: torch.Tensor | Sequence[int],
        accepted: torch.Tensor | Sequence[int],
    ) -> None:
        """Learn from one verify: ``confidences`` [n, k] of the drafts, ``widths`` [n] drafts verified per
        request, ``accepted`` [n] drafts accepted. Positions 1..min(accepted + 1, width) are observed: the
        accepted ones as successes, the first rejected one (if verified) as a failure; later positions say
        nothing (their prefix was wrong). Folded in once ``fold_every`` verifies are waiting; until then
        the arguments are kept as they are (not copied: every array operation costs a CPU engine at batch
        1 measurably), so they must not be changed in place after the call."""
        self._waiting.append((confidences, widths, accepted))
        if len(self._waiting) >= self.fold_every:
            self._fold()

    def _fold(self) -> None:
        """Learn the waiting verifies at once (one set of array operations for all of them)."""
        if not self._waiting:
            return
        waiting, self._waiting = self._waiting, []
        confs = [_numpy(c, np.float64) for c, _, _ in waiting]
        k = max(c.shape[1] for c in confs)  # shorter blocks padded: never seen (widths clipped to their own)
        conf = np.zeros((sum(c.shape[0] for c in confs), k))
        width = np.zeros(len(conf), dtype=np.int64)
        row = 0
        for c, (_, w, _) in zip(confs, waiting, strict=True):
            conf[row : row + c.shape[0], : c.shape[1]] = c
            width[row : row + c.shape[0]] = np.minimum(_numpy(w, np.int64), c.shape[1])
            row += c.shape[0]
        acc = np.concatenate([_numpy(a, np.int64).reshape(-1) for _, _, a in waiting])
        n, k = conf.shape
        width, acc = width.reshape(n, 1), acc.reshape(n, 1)
        pos = np.arange(1, k + 1).reshape(1, k)
        seen = pos <= np.minimum(acc + 1, width)
        success = (pos <= acc) & seen
        m = int(seen.sum())
        if m == 0:
            return
        bins = self._bin(conf[seen])
        hits = success[seen].astype(np.float64)
        predicted = self.predict_array(conf)[seen]  # before this outcome is learnt
        keep = self._decay_per_obs**m
        for total, add in (
            (self._count, np.ones_like(hits)),
            (self._accepted, hits),
            (self._confidence, conf[seen]),
            (self._predicted, predicted),
        ):
            total *= keep
            np.add.at(total, bins, add)
        if k > self._pos_count.size:
            grow = np.zeros(k - self._pos_count.size)
            self._pos_count = np.concatenate([self._pos_count, grow])
            self._pos_accepted = np.concatenate([self._pos_accepted, grow])
        self._pos_count *= keep
        self._pos_count[:k] += seen.sum(0)
        self._pos_accepted *= keep
        self._pos_accepted[:k] += success.sum(0)
        self._cells(k)
        self._cell_count *= keep
        self._cell_accepted *= keep
        self._cell_confidence *= keep
        rows = np.broadcast_to(np.arange(k), (n, k))[seen]
        np.add.at(self._cell_count, (rows, bins), 1.0)
        np.add.at(self._cell_accepted, (rows, bins), hits)
        np.add.at(self._cell_confidence, (rows, bins), conf[seen])
        self._cells_table = self._cells_rows = None
        self._observations += m

    @property
    def observations(self) -> int:
        """Positions observed over the calibration's life."""
        self._fold()
        return self._observations

    def calibration_error(self) -> float:
        """Expected calibration error of recent predictions: per bin |predicted - accepted| summed, over
        the observations (forgetting-weighted). Each prediction is the one made BEFORE its outcome was
        learnt, so this is how wrong the policy's beliefs were, not a fit to the data itself."""
        self._fold()
        total = float(self._count.sum())
        return float(np.abs(self._predicted - self._accepted).sum()) / total if total > 0 else 0.0

    def confidence_error(self) -> float:
        """Expected calibration error of the raw confidences (how far the drafter's own probabilities are
        from the target's accept rate), over recent observations."""
        self._fold()
        total = float(self._count.sum())
        return float(np.abs(self._confidence - self._accepted).sum()) / total if total > 0 else 0.0


def _numpy(values: torch.Tensor | np.ndarray | Sequence[float], dtype: type | None = None) -> np.ndarray:
    """A CPU NumPy array of ``values`` (a tensor from any device, an array or a sequence); ``dtype``
    None keeps a tensor's or array's own (no copy of a CPU tensor)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


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
    """Chooses per step and per request how many drafts to verify, or a plain decode step, so that text
    is committed at the most tokens per ms (see the module docstring).

    With calibrated accept probabilities ``p`` per position, a request verifying k drafts commits in
    expectation ``1 + sum_{j<=k} q_j`` tokens, ``q_j = prod_{l<=j} p_l`` (1 = the bonus token). A step costs
    ``draft_ms(batch, block) + verify_ms(batch, sum_i (k_i + 1))``, a plain decode step ``decode_ms(batch)``
    for ``batch`` tokens. Since every ``q`` row is non-increasing, taking (request, position) increments in
    order of gain is optimal for each total of verified drafts, so one sort and one cumulative sum value
    every total at once.

    Which total: the one with the most expected tokens per ms for the step itself, draft included. A
    generation's easy and hard stretches last longer than a step (on the demo pair, after a step that
    verified the whole block two in three next steps do too), and a plain step does not move past a hard
    stretch any faster, so what a stretch costs is its time per token, step by step. (Maximising
    tokens - R x ms with R the long-run rate, right when each step's difficulty is drawn afresh, judged
    hard stretches against a rate only easy ones reach: it decoded them plainly at a worse time per token
    than drafting, and lost 8-11 % to the fixed threshold.) When a plain decode step's rate R_plain is
    better than any width's, the draft already made is sunk, and the widths maximise
    tokens - R_plain x verify ms: what still pays at plain decoding's rate; none, and the step decodes
    every row (``plain_decode``).

    Two decisions, two moments: ``plan(confidences)`` after drafting (above), and ``plan_for_batch(batch)``
    before drafting, without this step's confidences: it drafts when the expected rate of a drafted step
    beats plain decoding's. That rate is the tokens over the ms of the last ``recent`` drafted steps, each
    at its best width, blended with those of the last ``history`` drafted steps (their per-request q
    re-costed at today's batch every ``decide_every`` steps); each plain step since the last drafted one
    multiplies the recent steps' weight by ``recent_trust``, since it shows nothing new (without that, a
    poor stretch would stop drafting until a probe). With fewer than ``min_history`` drafted steps, or none,
    it drafts (a cold start explores, and the plan() after it verifies at least one draft per request).

    Costs are measured twice: the start-up profile (``cost``) and, when the engine reports its steps
    (``observe_step``), each step's own wall time, which corrects the profile online (see
    ``StepCostModel.observe_step``).

    ``ragged=False`` is for engines that pad every request to the longest verified row (the reference
    engine): the verify then costs ``batch * (max width + 1)`` tokens and all rows take the same width.
    ``draft_blocks``: the blocks the drafter may be asked to draft (default: only ``block_size``).
    ``plan_for_batch`` names the block to draft (``draft_block``): the one whose draft cost and history give
    the best long-run rate, assuming the drafter's first positions are as good in a shorter block (measure
    that before listing shorter blocks). Steps that drafted a shorter block say nothing of the positions
    past it, so their history rows are completed from the longer drafts in the history (each missing q is
    the row's last known q times the mean survival from the position before, over the rows that drafted
    it; the calibration's rate by position when none did), and after ``block_probe_interval`` drafted steps
    in a row on a shorter block one step drafts the longest, so a tail that became worth drafting is seen.
    Likewise after ``cost_probe_interval`` drafted steps in a row on one block, one step drafts another
    allowed block (each in turn), so the cost model keeps measuring every block it may choose: a block
    whose costs it once learnt too high (a new shape's first eager draft compiles kernels; two such steps
    at batch 128 were enough, in ``tests/core/test_verify_policy.py``) would otherwise never be drafted
    again, and never corrected.
    ``plan(confidences)`` plans the step that was drafted, whatever its block.

    Inputs and lag (overlap scheduling): ``plan(confidences)`` needs the CURRENT step's confidences (the
    draft the target is about to verify); the calibration may lag: ``observe`` one or two steps late only
    delays learning. ``plan_for_batch`` needs nothing current. After ``probe_interval`` plain decode plans
    in a row (times the probe's cost in plain steps, so probes take the same share of time at any batch:
    at batch 256 a drafted step costs about five plain ones), ``plan_for_batch`` asks for one speculative
    step (and the ``plan()`` after it verifies at least one draft per request), so acceptance keeps being
    measured.

    Cost of the policy itself: NumPy on a few dozen numbers per step (no per-request Python loop, no small
    torch ops, the verify costs of every width cached until the cost model learns); ``plan()`` at batch
    256, block 16 is timed by ``tests/core/test_verify_policy.py``. At batch 1 on a CPU a step is a few ms,
    so tens of microseconds matter.
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
        block_probe_interval: int = 16,
        cost_probe_interval: int = 64,
        history: int = 256,
        min_history: int = 16,
        recent: int = 4,
        recent_trust: float = 0.6,
        decide_every: int = 16,
        learn_costs: bool = True,
    ) -> None:
        if block_size < 2:
            raise ValueError(f"a verify-width policy needs block_size >= 2, got {block_size}")
        if not 1 <= min_history <= history or recent < 1 or decide_every < 1:
            raise ValueError("1 <= min_history <= history, recent >= 1 and decide_every >= 1 are required")
        blocks = sorted(set(draft_blocks or [block_size]))
        if any(not 2 <= b <= block_size for b in blocks):
            raise ValueError(f"draft_blocks must be in 2..{block_size}, got {blocks}")
        self.cost, self.calibration, self.block_size = cost, calibration, block_size
        self.ragged, self.draft_blocks, self.probe_interval = ragged, blocks, probe_interval
        self.block_probe_interval, self.cost_probe_interval = block_probe_interval, cost_probe_interval
        self.min_history, self.recent, self.recent_trust = min_history, recent, recent_trust
        self.decide_every, self.learn_costs = decide_every, learn_costs
        # the last ``history`` drafted steps' q [HISTORY_GROUPS, block - 1] (NaN past the positions drafted)
        # (the groups: see HISTORY_GROUPS; one, the mean request, for an engine that verifies one width)
        self._groups = self.HISTORY_GROUPS if ragged else 1
        self._history = np.full((history, self._groups, block_size - 1), math.nan)
        self._history_count, self._history_next = 0, 0
        # (batch, steps left, tokens per ms of drafting over the history, its plan): see decide_every
        self._long_run: tuple[int, int, float, VerifyPlan] | None = None
        # the last ``recent`` drafted steps at their best widths: (tokens / batch, ms / plain ms) each
        self._recent_steps: deque[tuple[float, float]] = deque(maxlen=recent)
        self._undrafted = 0  # plain steps since the last drafted one
        self._recent_block = block_size  # the block of the last drafted step
        self._short_in_row = 0  # drafted steps in a row on a block shorter than the longest allowed
        self._same_in_row = 0  # drafted steps in a row on the same block (see cost_probe_interval)
        self._cost_probes = 0  # cost probes so far: which other block the next one drafts
        self._plain_in_row = 0
        self._probing = False  # plan_for_batch asked for a probe: the next plan() verifies >= 1 draft
        # verify ms by (batch, drafts, uniform; None: uniform as Python floats), with the cost model's version
        self._verify_cache: dict[tuple[int, int, bool | None], tuple[int, Any]] = {}
        self.token_grid: np.ndarray | None = None  # see set_token_grid
        self._scalar_cache: dict[tuple[int, int], tuple[int, float, float]] = {}

    # -- public ------------------------------------------------------------------------------------------
    def plain_ms(self, batch: int) -> float:
        """A plain decode step's cost at ``batch``."""
        return self._costs(batch, self.block_size)[0]

    def plan(self, confidences: torch.Tensor | np.ndarray) -> VerifyPlan:
        """Plan the verify of a drafted batch: ``confidences`` [batch, block-1], the drafter's top-1
        probability at each draft position of each request (current step). Widths with the step's best
        rate, unless plain decoding's is better: then what pays at that rate (see the class docstring);
        ``plain_decode`` when no draft is worth verifying."""
        bs, n = confidences.shape
        if n < 1 or n > self.block_size - 1:
            raise ValueError(f"confidences need 1..{self.block_size - 1} positions, got {n}")
        probing, self._probing = self._probing, False  # a draft asked for to measure acceptance
        if bs == 1:  # Python floats: see AcceptanceCalibration.predict_row
            q = list(
                itertools.accumulate(self.calibration.predict_row(confidences.tolist()[0]), operator.mul)
            )
            plan = self._best_one(q, [n + 1], min_width=int(probing))
            groups: Any = q
        else:
            prefix = np.cumprod(
                self.calibration.predict_array(_numpy(confidences)), axis=1
            )  # rows non-increasing
            plan = self._best(prefix, [n + 1], uniform=probing, min_width=int(probing))
            groups = self._group_means(prefix) if self._groups > 1 else prefix.mean(axis=0)
        row = self._history[self._history_next]
        row[:, :n] = groups
        row[:, n:] = math.nan  # positions not drafted
        self._history_count = min(self._history_count + 1, len(self._history))
        self._history_next = (self._history_next + 1) % len(self._history)
        plan.plain_decode = max(plan.widths) == 0
        if probing:
            plan.extra["probe"] = True
        best_tokens, best_ms = plan.extra.pop("best_step")
        self._recent_steps.append((best_tokens / bs, best_ms / self.plain_ms(bs)))
        self._undrafted = 0
        if n + 1 > self._recent_block:  # positions the history lacks were just seen: re-cost it at once
            self._long_run = None
        self._same_in_row = self._same_in_row + 1 if n + 1 == self._recent_block else 1
        self._recent_block = n + 1
        self._short_in_row = self._short_in_row + 1 if n + 1 < self.draft_blocks[-1] else 0
        self._plain_in_row = self._plain_in_row + 1 if plan.plain_decode else 0
        return plan

    def plan_for_batch(self, batch: int) -> VerifyPlan:
        """Plan before any confidences of this step exist: whether to draft at all, and which block (see
        the class docstring). Widths are uniform (the best single width over the recent history)."""
        plain_ms = self.plain_ms(batch)
        plain = VerifyPlan([0] * batch, True, self._recent_block, float(batch), plain_ms)
        if self._history_count == 0:  # nothing drafted yet: draft, the calibration's rates say how wide
            prefix = self.calibration.position_rates(self.block_size - 1).cumprod(0).numpy()
            self._probing = True  # a cold start explores: a prior alone must not rule drafting out
            plan = self._best(np.broadcast_to(prefix, (batch, prefix.size)), self.draft_blocks, True, 1)
            del plan.extra["best_step"]
            return plan
        long_run = self._long_run
        if long_run is None or long_run[0] != batch or long_run[1] <= 0:
            long_run = self._long_run_rate(batch)
        self._long_run = long_run = (batch, long_run[1] - 1, long_run[2], long_run[3])
        speedup, plan = long_run[2] * plain_ms / batch, long_run[3]  # drafting's rate over plain's
        trust = self.recent_trust**self._undrafted  # plain steps show nothing new: back to the long run
        if trust > 1e-3:
            tokens = sum(t for t, _ in self._recent_steps)
            cost = sum(c for _, c in self._recent_steps)
            speedup = trust * tokens / cost + (1 - trust) * speedup
        if self._history_count < self.min_history or speedup > 1.0:
            return self._with_block_probe(plan)
        if self._plain_in_row >= self.probe_interval * max(1.0, plan.expected_ms / plain_ms):
            self._plain_in_row, self._probing = 0, True
            plan.extra["probe"] = True
            plan.widths = [max(1, w) for w in plan.widths]
            return self._with_block_probe(plan)
        self._plain_in_row += 1
        self._undrafted += 1
        return plain

    def observe_step(
        self,
        batch: int,
        verified_tokens: int | None,
        ms: float,
        clean: bool = True,
        draft_block: int | None = None,
    ) -> None:
        """The engine's measured step: ``batch`` decoding requests, a plain decode step (``verified_tokens``
        None) or a drafted one (the tokens its target forward verified: pending tokens + drafts, padded
        where the engine pads), ``ms`` its wall time; the cost model learns from it (see
        ``StepCostModel.observe_step``). ``clean=False``: the step also did other work (a prefill, a new
        request's first context for the drafter), so it teaches nothing. ``draft_block``: the block that
        step drafted, when the engine reports steps late (default: the last step planned). ``learn_costs=
        False``: the cost model given is taken as it is."""
        if self.learn_costs and clean:
            self.cost.observe_step(batch, verified_tokens, ms, draft_block=draft_block or self._recent_block)

    def set_token_grid(self, grid: Sequence[int] | None) -> None:
        """The token counts the engine's verify really runs at: a verify of t tokens costs the smallest grid
        value >= t (an engine that replays CUDA graphs captured at those counts pads to them; SGLang's
        compact ragged verify captures block x each captured batch size). With a grid the planned totals
        settle on its values instead of paying for padding they do not use."""
        self.token_grid = None if not grid else np.array(sorted(set(grid)), dtype=np.float64)
        self._verify_cache.clear()
        self._long_run = None

    def padded_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """``tokens`` rounded up to the token grid (unchanged past its end, or without one)."""
        grid = self.token_grid
        if grid is None:
            return tokens
        index = np.searchsorted(grid, tokens, side="left")
        inside = index < grid.size
        return np.where(inside, grid[np.minimum(index, grid.size - 1)], tokens)

    # -- internals ---------------------------------------------------------------------------------------
    def _with_block_probe(self, plan: VerifyPlan) -> VerifyPlan:
        """``plan``, or a copy drafting the longest block when ``block_probe_interval`` drafted steps in a
        row drafted shorter ones, or another allowed block (each in turn) when ``cost_probe_interval`` in a
        row drafted the same one (see the class docstring)."""
        longest = self.draft_blocks[-1]
        if plan.draft_block < longest and self._short_in_row >= self.block_probe_interval:
            block = longest
        elif len(self.draft_blocks) > 1 and self._same_in_row >= self.cost_probe_interval:
            others = [b for b in self.draft_blocks if b != self._recent_block]
            block = others[self._cost_probes % len(others)]
            self._cost_probes += 1
            self._same_in_row = 0
        else:
            return plan
        widths = [min(w, block - 1) for w in plan.widths]
        probe = VerifyPlan(widths, False, block, plan.expected_tokens, plan.expected_ms)
        probe.extra = {**plan.extra, "block_probe": True}
        return probe

    def _costs(self, batch: int, block: int) -> tuple[float, float]:
        """(decode ms, draft ms of ``block``) at ``batch``, cached until the cost model learns."""
        key = (batch, block)
        hit = self._scalar_cache.get(key)
        if hit is None or hit[0] != self.cost.version:
            if len(self._scalar_cache) > 64:
                self._scalar_cache.clear()
            hit = self._scalar_cache[key] = (
                self.cost.version,
                self.cost.decode_ms(batch),
                self.cost.draft_ms(batch, block),
            )
        return hit[1], hit[2]

    # requests of a drafted step kept in the history as this many groups (by expected tokens), each its
    # mean q: enough to re-cost what per-request widths gain over one width for all
    HISTORY_GROUPS = 4

    def _group_means(self, prefix: np.ndarray) -> np.ndarray:
        """[HISTORY_GROUPS, n]: the mean q of the requests in each quantile of expected tokens (a batch
        smaller than the groups repeats its requests in proportion)."""
        bs, groups = prefix.shape[0], self._groups
        order = np.argsort(prefix.sum(axis=1), kind="stable")
        if bs < groups:
            return prefix[order[(np.arange(groups) * bs) // groups]]
        return np.stack([prefix[part].mean(axis=0) for part in np.array_split(order, groups)])

    def _long_run_rate(self, batch: int) -> tuple[int, int, float, VerifyPlan]:
        """Drafting's tokens per ms over the history, re-costed at ``batch`` for each draft block, each step
        at its own best widths (per request, by group, when the engine verifies ragged; else one width):
        the best block's rate, and a plan drafting that block at the single width best over the history."""
        history = self._completed_history()  # [steps, groups, block - 1]
        count, groups = history.shape[:2]
        mean = history.mean(axis=1)
        best: tuple[float, VerifyPlan] | None = None
        for block in self.draft_blocks:
            n = block - 1
            draft = self._costs(batch, block)[1]
            zeros = np.zeros((count, 1))
            tokens = batch * (1.0 + np.concatenate([zeros, mean[:, :n].cumsum(axis=1)], axis=1))
            ms = draft + self._verify_costs(batch, n, uniform=True)
            if self.ragged:  # each group's increments in order of gain, a group being batch / groups rows
                gains = -np.sort(-history[:, :, :n].reshape(count, groups * n), axis=1)
                step_tokens = batch * (1.0 + np.concatenate([zeros, gains.cumsum(axis=1) / groups], axis=1))
                drafts = np.rint(np.arange(groups * n + 1) * batch / groups).astype(np.int64)
                step_ms = draft + self._verify_costs(batch, n, uniform=False)[drafts]
            else:
                step_tokens, step_ms = tokens, ms
            per_step = (step_tokens / step_ms).argmax(axis=1)
            rate = float(step_tokens[np.arange(count), per_step].sum() / step_ms[per_step].sum())
            if best is None or rate > best[0]:
                width = int(np.argmax(tokens.sum(axis=0) / ms))
                expected = float(tokens[:, width].sum()) / count
                best = (rate, VerifyPlan([width] * batch, False, block, expected, float(ms[width])))
        assert best is not None
        steps_left = min(self.decide_every, self._history_count)  # early on, each drafted step moves it a lot
        return batch, steps_left, best[0], best[1]

    def _completed_history(self) -> np.ndarray:
        """The history [steps, groups, block - 1] with the positions a step did not draft (NaN) filled in:
        the row's last q times the survival from the position before, over the rows that drafted both (the
        calibration's rate at that position when none did)."""
        stacked = self._history[: self._history_count]
        if not np.isnan(stacked).any():
            return stacked  # every step drafted the whole block: nothing to fill in
        stacked = stacked.copy()
        history = stacked.reshape(-1, stacked.shape[-1])
        rates: np.ndarray | None = None
        for j in range(1, history.shape[1]):
            column, before = history[:, j], history[:, j - 1]
            missing = np.isnan(column)
            if not missing.any():
                continue
            seen_before = before[~missing].sum()
            if seen_before > 0:
                survival = column[~missing].sum() / seen_before
            else:
                if rates is None:
                    rates = self.calibration.position_rates(history.shape[1]).numpy()
                survival = float(rates[j])
            history[missing, j] = before[missing] * survival
        return history.reshape(stacked.shape)

    def _verify_costs(self, bs: int, n: int, uniform: bool) -> np.ndarray:
        """Verify ms at every width 0..n (``uniform``: the same width for all ``bs`` rows) or at every
        total 0..bs*n of verified drafts; cached until the cost model learns."""
        key = (bs, n, uniform)
        hit = self._verify_cache.get(key)
        if hit is not None and hit[0] == self.cost.version:
            return hit[1]
        tokens = bs * (np.arange(n + 1) + 1.0) if uniform else bs + np.arange(bs * n + 1, dtype=np.float64)
        ms = self.cost.verify_ms_array(bs, self.padded_tokens(tokens))
        if len(self._verify_cache) > 64:
            self._verify_cache.clear()
        self._verify_cache[key] = (self.cost.version, ms)
        return ms

    def _best(
        self, prefix: np.ndarray, blocks: Sequence[int], uniform: bool = False, min_width: int = 0
    ) -> VerifyPlan:
        """The plan for q = ``prefix`` [bs, n] over draft ``blocks`` (each at most n + 1), widths >=
        ``min_width``: the block and widths with the best step rate
        (tokens / (draft + verify ms)); if plain decoding's rate R is better, the draft is sunk and the
        widths maximise tokens - R x verify ms. ``extra["best_step"]``: (tokens, ms) of the best-rate
        step, what a drafted step in this state is worth."""
        bs = prefix.shape[0]
        plain_rate = bs / self.plain_ms(bs)
        best: tuple[float, int, np.ndarray, np.ndarray, float, Any] | None = None
        for block in blocks:
            draft_ms = self._costs(bs, block)[1]
            q = prefix[:, : block - 1]
            tokens, ms, widths = (
                self._totals_uniform(q) if uniform or not self.ragged else self._totals_ragged(q)
            )
            rates = tokens[min_width:] / (draft_ms + ms[min_width:])
            t = min_width + int(np.argmax(rates))
            if best is None or rates[t - min_width] > best[0]:
                best = (float(rates[t - min_width]), t, tokens, ms, draft_ms, widths, block)
        assert best is not None
        rate, t, tokens, ms, draft_ms, widths, block = best
        best_step = (float(tokens[t]), float(ms[t]) + draft_ms)
        if rate < plain_rate:  # the draft is sunk: verify what pays at plain decoding's rate
            t = min_width + int(np.argmax(tokens[min_width:] - plain_rate * ms[min_width:]))
        plan = VerifyPlan(widths(t), False, block, float(tokens[t]), float(ms[t]) + draft_ms)
        plan.extra["best_step"] = best_step
        return plan

    def _best_one(self, q: list[float], blocks: Sequence[int], min_width: int = 0) -> VerifyPlan:
        """``_best`` for a batch of one (``q``: its prefix probabilities) on Python floats."""
        plain_rate = 1.0 / self.plain_ms(1)
        best: tuple[float, int, list[float], list[float], float, int] | None = None
        for block in blocks:
            draft_ms = self._costs(1, block)[1]
            ms = self._verify_list(1, block - 1)
            tokens = list(itertools.accumulate(q[: block - 1], initial=1.0))  # width 0..block-1
            t = max(range(min_width, block), key=lambda w: tokens[w] / (draft_ms + ms[w]))
            rate = tokens[t] / (draft_ms + ms[t])
            if best is None or rate > best[0]:
                best = (rate, t, tokens, ms, draft_ms, block)
        assert best is not None
        rate, t, tokens, ms, draft_ms, block = best
        best_step = (tokens[t], ms[t] + draft_ms)
        if rate < plain_rate:  # the draft is sunk: verify what pays at plain decoding's rate
            t = max(range(min_width, len(tokens)), key=lambda w: tokens[w] - plain_rate * ms[w])
        plan = VerifyPlan([t], False, block, tokens[t], ms[t] + draft_ms)
        plan.extra["best_step"] = best_step
        return plan

    def _verify_list(self, bs: int, n: int) -> list[float]:
        """``_verify_costs`` (uniform) as Python floats, cached alike."""
        key = (bs, n, None)
        hit = self._verify_cache.get(key)
        if hit is None or hit[0] != self.cost.version:
            hit = self._verify_cache[key] = (
                self.cost.version,
                self._verify_costs(bs, n, uniform=True).tolist(),
            )
        return hit[1]

    def _totals_ragged(self, q: np.ndarray):
        """Expected tokens and verify ms at every total T of verified drafts (best allocation for each T),
        and a function T -> widths."""
        bs, n = q.shape
        # stable over the row-major flattening: equal gains keep j ascending within a row (prefixes)
        order = np.argsort(-q.reshape(-1), kind="stable")
        tokens = bs + np.concatenate([[0.0], q.reshape(-1)[order].cumsum()])
        ms = self._verify_costs(bs, n, uniform=False)
        return tokens, ms, lambda t: np.bincount(order[:t] // n, minlength=bs).tolist()

    def _totals_uniform(self, q: np.ndarray):
        """The same for one width m for every request (padded verify, or no per-request confidences):
        index m."""
        bs, n = q.shape
        tokens = np.concatenate([[0.0], (q[0] if bs == 1 else q.sum(axis=0)).cumsum()])  # [n + 1]
        tokens += bs
        return tokens, self._verify_costs(bs, n, uniform=True), lambda m: [m] * bs
