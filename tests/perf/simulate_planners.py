"""What each verify planner would commit per ms, from a step-cost table and an acceptance trace (no GPU).

A prediction, not a measurement: each step's time is the cost table's (draft + verify of the tokens a
planner chose, or a plain decode step), each request's acceptance is its trace's. It answers, before any
GPU time is spent, what a planner change is worth and whether a cost table makes sense: AR, static blocks
(every request verifies the first k - 1 drafts), our verify-width policy
(``sglang_ext.dflare.verify_policy``) and SGLang's DSPARK planner (``DFLARE_VERIFY=dspark_planner``).

Draft costs are per block: the draft points of every table of the same card (``--draft-tables``, by default
the shipped tables for other blocks) join the main table's, so a static block k pays the draft of block k
(a server started at block k drafts k slots), not the main table's block. ``adaptive_draft_<blocks>`` is
the policy allowed to draft the shorter measured blocks (``draft_blocks``): what a plugin that drafts the
block the policy asks for would reach. A static block below every measured draft extrapolates its draft
cost from the two smallest (``"draft_cost": "extrapolated"`` in its rows). ``oracle`` knows what every
request will accept and verifies only that (``oracle_step``): the most any planner could commit per ms on
these costs, the yardstick for how much a better planner can still win. The trace gives a shorter
block the acceptance of its first positions, as trace replay does on the GPU; a real drafter trained at
block 16 loses some of it (docs/demo.md).

Each planner keeps its state from batch size to batch size, as a server does (the policy's history is
re-costed at each batch); the policy first warms up at ``--warmup-batch``. Requests start at random steps
of random trace requests (seeded) and advance one trace step per drafted step.

    python tests/perf/simulate_planners.py --trace synthetic \\
        --out docs/results/planner_simulation_synthetic.json \\
        --plot docs/results/planner_simulation_synthetic.png
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sglang_ext.dflare.verify_policy import AcceptanceCalibration, StepCostModel, VerifyWidthPolicy
from sglang_ext.sglang_plugin.adaptive import SHIPPED_TABLES, with_draft_costs
from sglang_ext.traces.format import AcceptanceTrace, accepted_in_window
from sglang_ext.traces.shipped import load_shipped_trace

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TABLE = SHIPPED_TABLES / "nvidia-h100-80gb-hbm3_b16.json"
BATCHES = (1, 8, 32, 64, 128, 256)


def sglang_token_grid(max_batch: int, block: int) -> list[int]:
    """The token counts SGLang 0.5.17 captures compact ragged verify graphs at: ``block`` x each batch size
    it captures for speculative decoding (1-8, then steps of 2 to 32, 4 to 64, 8 to 256, 16 beyond, and
    the maximum), the grid a ragged verify pads its total to."""
    sizes = [
        *range(1, 9),
        *range(10, 33, 2),
        *range(40, 65, 4),
        *range(72, 257, 8),
        *range(272, max_batch + 1, 16),
    ]
    sizes = [b for b in sizes if b <= max_batch]
    if max_batch not in sizes:
        sizes.append(max_batch)
    return [b * block for b in sizes]


STATIC_BLOCKS = (2, 4, 8, 16)


def pad_to_grid(tokens: int, grid: Sequence[int]) -> int:
    """The verify tokens a ragged verify of ``tokens`` pays for: the smallest value of the sorted ``grid``
    at least that large (unchanged past its end)."""
    return next((g for g in grid if g >= tokens), tokens)


def simulate(
    cost: StepCostModel,
    trace: AcceptanceTrace,
    batch: int,
    steps: int,
    block: int,
    planner: Any | None = None,
    static_block: int | None = None,
    seed: int = 0,
    token_grid: Sequence[int] | None = None,
    oracle_blocks: Sequence[int] = (),
) -> dict[str, float]:
    """Tokens per ms of ``steps`` steps at ``batch``: a planner (``plan_for_batch`` / ``plan`` /
    ``observe_step``), a static block (``static_block``; 1 = AR), verifying drafts of a ``block`` draft,
    or the oracle (``oracle_blocks``: see ``oracle_step``). A planner's ragged verify pays for its total
    rounded up to ``token_grid`` (static blocks run graphs of their own shape)."""
    grid = sorted(token_grid or [])
    padded = functools.partial(pad_to_grid, grid=grid)
    rng = np.random.default_rng(seed)
    requests = trace.requests
    cursors = [[int(rng.integers(len(requests))), int(rng.integers(64))] for _ in range(batch)]
    tokens = ms = verified = plain_steps = 0.0
    calibration = getattr(planner, "calibration", None)
    for _ in range(steps):
        trace_steps = [requests[r][s % len(requests[r])] for r, s in cursors]
        if oracle_blocks:
            widths, plain, step_ms = oracle_step(cost, trace_steps, oracle_blocks, grid)
        elif static_block == 1:
            widths, plain, step_ms = [0] * batch, True, cost.decode_ms(batch)
        elif static_block is not None:
            widths, plain = [static_block - 1] * batch, False
            step_ms = cost.draft_ms(batch, static_block) + cost.verify_ms(batch, batch * static_block)
        elif (before := planner.plan_for_batch(batch)).plain_decode:
            widths, plain, step_ms = [0] * batch, True, cost.decode_ms(batch)
        else:
            drafted = before.draft_block  # the block the drafter drafts this step
            rows = [s.confidences[: drafted - 1] for s in trace_steps]
            confidences = torch.tensor(rows, dtype=torch.float64)
            widths, plain = planner.plan(confidences).widths, False
            step_ms = cost.draft_ms(batch, drafted) + cost.verify_ms(batch, padded(batch + sum(widths)))
        accepted = [accepted_in_window(s, w) for s, w in zip(trace_steps, widths, strict=True)]
        if planner is not None and not plain:
            if calibration is not None:
                calibration.observe(confidences, widths, accepted)
            planner.observe_step(batch, padded(batch + sum(widths)), step_ms, True)
        elif planner is not None:
            planner.observe_step(batch, None, step_ms, True)
        tokens += batch + sum(accepted)
        ms += step_ms
        verified += sum(widths)
        plain_steps += plain
        if not plain:
            for cursor in cursors:
                cursor[1] += 1
        elif oracle_blocks:  # the oracle's plain token passes a spot where no draft would be accepted
            for cursor, step in zip(cursors, trace_steps, strict=True):
                cursor[1] += step.accepted == 0
    return {
        "tok_per_ms": tokens / ms,
        "verified_per_req": 1 + verified / (steps * batch),
        "plain_step_share": plain_steps / steps,
    }


def sibling_tables(cost_path: Path) -> list[Path]:
    """The other blocks' tables of the same card beside ``cost_path`` (``<card>_b<block>.json``)."""
    card = cost_path.name.rsplit("_b", 1)[0]
    return sorted(p for p in cost_path.parent.glob(f"{card}_b*.json") if p != cost_path)


def run(
    cost_path: Path,
    trace: AcceptanceTrace,
    batches: Sequence[int],
    steps: int,
    warmup_batch: int = 64,
    draft_tables: Sequence[Path] | None = None,
    eager_factor: float = 1.0,
) -> dict[str, Any]:
    """``eager_factor``: what a shorter block's draft costs the policy that drafts it (eagerly, in SGLang)
    over the table's (a CUDA graph, as a static server of that block drafts)."""
    from sglang_ext.sglang_plugin.dspark_planner import DsparkPlannerPolicy

    extra = sibling_tables(cost_path) if draft_tables is None else draft_tables
    data = with_draft_costs(json.loads(cost_path.read_text()), extra)
    full = int(data.get("block_size") or 16)
    eager = dict(
        data, draft=[p if p["block"] == full else {**p, "ms": p["ms"] * eager_factor} for p in data["draft"]]
    )

    def table(source: dict[str, Any] = data) -> StepCostModel:  # each planner learns into its own copy
        return StepCostModel.from_dict(source)

    block = int(table().block_size or 16)
    grid = sglang_token_grid(max(batches), block)
    measured = {p["block"] for p in data["draft"]}
    shorter = sorted(b for b in measured if 2 <= b < block)
    policies = {"adaptive": VerifyWidthPolicy(table(), AcceptanceCalibration(), block, ragged=True)}
    if shorter:
        name = "adaptive_draft_" + "_".join(map(str, [*shorter, block]))
        policies[name] = VerifyWidthPolicy(
            table(eager), AcceptanceCalibration(), block, ragged=True, draft_blocks=[*shorter, block]
        )
    for policy in policies.values():
        policy.set_token_grid(grid)
        simulate(policy.cost, trace, warmup_batch, steps, block, planner=policy, token_grid=grid)
    dspark = DsparkPlannerPolicy(table(), block)
    rows = []
    for batch in tqdm(batches, desc="batch sizes"):
        ar = simulate(table(), trace, batch, steps, block, static_block=1)["tok_per_ms"]
        found = {"ar": {"tok_per_ms": ar, "verified_per_req": 1.0, "plain_step_share": 1.0}}
        for k in STATIC_BLOCKS:
            if k <= block:
                found[f"static_{k}"] = simulate(table(), trace, batch, steps, block, static_block=k)
        for name, policy in policies.items():
            found[name] = simulate(policy.cost, trace, batch, steps, block, planner=policy, token_grid=grid)
        found["dspark_planner"] = simulate(
            dspark.cost, trace, batch, steps, block, planner=dspark, token_grid=grid
        )
        found["oracle"] = simulate(  # an upper bound: see oracle_step
            table(eager), trace, batch, steps, block, token_grid=grid, oracle_blocks=[*shorter, block]
        )
        for name, result in found.items():
            row = {"batch": batch, "planner": name, **result, "x_ar": result["tok_per_ms"] / ar}
            if name.startswith("static_") and int(name.split("_")[1]) not in measured:
                row["draft_cost"] = "extrapolated"  # below the smallest block a draft was measured at
            rows.append(row)
    return {
        "cost_table": shown_path(cost_path),
        "draft_blocks": sorted(measured),
        "eager_factor": eager_factor,
        "trace": trace.source,
        "steps": steps,
        "block": block,
        "rows": rows,
    }


def shown_path(path: Path) -> str:
    """``path`` relative to the repository when inside it: results name the table, not the machine."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def oracle_step(
    cost: StepCostModel, trace_steps: Sequence[Any], blocks: Sequence[int], grid: Sequence[int]
) -> tuple[list[int], bool, float]:
    """(widths, plain, ms) of the step an oracle takes: it knows how many drafts each request's target
    will accept, so it verifies only drafts that will be accepted, drafts the block (of ``blocks``) and
    the total that commit the most tokens per ms, or decodes plainly when that is faster. No planner that
    reads confidences can commit more per step on the same costs: an upper bound, not a policy. Totals are
    tried at every ``grid`` value (a ragged verify pays for its total rounded up to the grid) below what
    the requests will accept, and at that."""
    batch = len(trace_steps)
    padded = functools.partial(pad_to_grid, grid=grid)
    best = ([0] * batch, True, cost.decode_ms(batch), batch / cost.decode_ms(batch))
    for b in blocks:
        sure = [accepted_in_window(s, b - 1) for s in trace_steps]  # drafts that will be accepted
        draft = cost.draft_ms(batch, b)
        order = sorted(range(batch), key=lambda i: -sure[i])
        for total in sorted({sum(sure), *(g - batch for g in grid if batch < g < batch + sum(sure))}):
            widths, left = [0] * batch, total
            for i in order:  # any split of the total commits it all; the grid decides the cost
                widths[i] = min(sure[i], left)
                left -= widths[i]
            ms = draft + cost.verify_ms(batch, padded(batch + total))
            if (batch + total) / ms > best[3]:
                best = (widths, False, ms, (batch + total) / ms)
    return best[0], best[1], best[2]


def with_known_rates(trace: AcceptanceTrace) -> AcceptanceTrace:
    """``trace`` with every confidence of a request replaced by its mean confidence over the trace: on the
    synthetic trace (confidence = the request's acceptance rate + noise) the rate itself, what a planner
    could know at best from confidences that say how well a request drafts but not which draft fails."""
    requests = []
    for request in trace.requests:
        rate = float(np.mean([c for step in request for c in step.confidences]))
        requests.append([dataclasses.replace(s, confidences=(rate,) * len(s.confidences)) for s in request])
    return dataclasses.replace(trace, requests=requests)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["planner"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["planner"] == name]
        guessed = any("draft_cost" in r for r in rows)
        label = f"{name} (draft extrapolated)" if guessed else name
        style = "--" if guessed else "-"
        ax.plot([r["batch"] for r in rows], [r["x_ar"] for r in rows], style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("x AR (predicted)")
    ax.set_title(f"Predicted from {Path(result['cost_table']).name}, {result['trace']} trace")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cost-table", type=Path, default=DEFAULT_TABLE)
    parser.add_argument(
        "--draft-tables", type=Path, nargs="*", help="tables whose draft costs join (default: same card's)"
    )
    parser.add_argument("--trace", default="synthetic", help="a shipped trace name or a trace file")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument(
        "--eager-factor",
        type=float,
        default=1.0,
        help="shorter drafts' cost over the table's (eager in SGLang)",
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--known-rates",
        action="store_true",
        help="each request's confidences = its mean confidence (the synthetic trace's rate, no noise)",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    path = Path(args.trace)
    trace = AcceptanceTrace.load(path) if path.is_file() else load_shipped_trace(args.trace)
    if args.known_rates:
        trace = with_known_rates(trace)
    batches = [int(b) for b in args.batches.split(",")]
    result = run(
        args.cost_table,
        trace,
        batches,
        args.steps,
        draft_tables=args.draft_tables,
        eager_factor=args.eager_factor,
    )
    for batch in dict.fromkeys(r["batch"] for r in result["rows"]):
        cells = [f"{r['planner']} {r['x_ar']:.2f}" for r in result["rows"] if r["batch"] == batch]
        print(f"batch {batch}: " + ", ".join(cells))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
