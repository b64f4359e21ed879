"""How much one closed batch of trace-replayed requests adds to the load benchmark's time per step (no GPU).

The load benchmark (tests/gpu/bench_sglang_load.py) sends ``batch`` requests of ``new_tokens`` each and
divides their tokens by the time until the LAST one finished. AR requests all take ``new_tokens`` steps;
under trace replay each request accepts what its own trace request accepted, so the ones that accept least
run on, at ever smaller batches, long after the mean request finished. "Time per step" read off tok/s
(``batch * tau / tok_s``) then exceeds the step's cost at the full batch even with zero host time. This
replays the trace exactly as the plugin does (requests dealt round robin from ``--first``, cursors
advancing one trace step per verify, ``min(accepted, block - 1)`` drafts per step) with each step costing
the table's draft + verify at the batch still running, and prints the inflation per batch size.

    python tests/perf/closed_batch_tail.py --trace synthetic --block 8 --out tail.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sglang_ext.dflare.verify_policy import StepCostModel
from sglang_ext.sglang_plugin.adaptive import SHIPPED_TABLES
from sglang_ext.traces.format import TraceStep, accepted_in_window
from sglang_ext.traces.shipped import load_shipped_trace


def closed_batch(
    requests: Sequence[Sequence[TraceStep]],
    batch: int,
    new_tokens: int,
    block: int,
    step_ms: Callable[[int], float],
    first: int = 0,
) -> dict[str, float]:
    """One closed batch replayed step by step. ``step_ms(running)`` is a step's cost at that running batch;
    the first token of each request comes from its prefill (not timed: a cached prompt costs little)."""
    cursors = [[(first + i) % len(requests), 0] for i in range(batch)]
    left = [new_tokens - 1] * batch
    elapsed = 0.0
    server_steps = request_steps = accepted = 0
    while True:
        running = [i for i in range(batch) if left[i] > 0]
        if not running:
            break
        elapsed += step_ms(len(running))
        server_steps += 1
        for i in running:
            trace_request = requests[cursors[i][0]]
            drafts = accepted_in_window(trace_request[cursors[i][1] % len(trace_request)], block - 1)
            cursors[i][1] += 1
            request_steps += 1
            accepted += drafts
            left[i] -= drafts + 1
    tau = 1 + accepted / request_steps
    tok_s = batch * new_tokens / elapsed * 1000.0
    return {
        "tau": round(tau, 3),
        "server_steps": server_steps,
        "mean_request_steps": round(request_steps / batch, 1),
        "full_batch_step_ms": round(step_ms(batch), 3),
        "apparent_step_ms": round(batch * tau / tok_s * 1000.0, 3),  # the benchmark's batch * tau / tok_s
    }


def run(table: Path, trace_name: str, block: int, batches: Sequence[int], rounds: int) -> dict[str, Any]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
    from bench_sglang_load import new_tokens

    cost = StepCostModel.from_json(table)
    requests = load_shipped_trace(trace_name).requests

    def step_ms(running: int) -> float:
        return cost.draft_ms(running, block) + cost.verify_ms(running, running * block)

    rows = []
    dealt = 0  # the replay deals trace requests round robin across measurements, as the server does
    for bs in batches:
        for r in range(rounds):
            row = closed_batch(requests, bs, new_tokens(bs), block, step_ms, first=dealt)
            dealt += bs
            inflation = row["apparent_step_ms"] / row["full_batch_step_ms"]
            row.update(batch=bs, round=r, inflation=round(inflation, 3))
            rows.append(row)
    return {"table": table.name, "device": cost.device, "trace": trace_name, "block": block, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default="synthetic")
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--table", type=Path, default=None, help="default: the shipped H100 table of --block")
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    table = args.table or SHIPPED_TABLES / f"nvidia-h100-80gb-hbm3_b{args.block}.json"
    result = run(table, args.trace, args.block, [int(b) for b in args.batches.split(",")], args.rounds)
    for row in result["rows"]:
        print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
