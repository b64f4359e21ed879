"""Greedy tau and per-position acceptance of drafters at several block sizes on the demo target.

A script, not a test: compares drafters (e.g. two trainings, with ``--drafter NAME=DIR`` each) and block
sizes; docs/demo.md cites its DFlash vs DFlare run at blocks shorter than the trained 16:

    python tests/perf/drafter_acceptance.py --drafter dflare=sglang_ext/demo/dflare \\
        --drafter dflash=sglang_ext/demo/dflash --blocks 16,12,8,4 --num-prompts 32 --max-tokens 96
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sglang_ext import demo
from sglang_ext.reference.bench import load_prompts
from sglang_ext.reference.loader import load_engine
from sglang_ext.reference.pair import encode_prompt, eos_ids
from sglang_ext.reference.sampling import SamplingParams
from sglang_ext.stats import total


def measure(drafter: Path, block: int, confidence: float, args: argparse.Namespace) -> dict[str, object]:
    engine = load_engine(demo.target_path(), drafter, block_size=block, min_draft_confidence=confidence)
    texts = load_prompts(None, demo=True)[: args.num_prompts]
    prompts = [encode_prompt(engine.tokenizer, t, chat=True) for t in texts]
    params = SamplingParams(max_tokens=args.max_tokens, stop_token_ids=eos_ids(engine.tokenizer))
    stats = total(r.stats for r in engine.generate(prompts, params) if r.stats is not None)
    assert stats is not None
    steps = stats.verify_steps
    return {
        "block": block,
        "min_draft_confidence": confidence,
        "tau": round(stats.acceptance_length, 3),
        "accepted_at_positions_1_4": [round(n / steps, 3) for n in stats.accepted_per_position[:4]],
        "verified_drafts_per_step": round(stats.draft_tokens / steps, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafter", action="append", required=True, help="NAME=DIR, repeatable")
    p.add_argument("--blocks", default="16,8")
    p.add_argument("--confidences", default="0", help="min_draft_confidence values, comma-separated")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.drafter:
        name, path = spec.split("=", 1)
        for block in (int(b) for b in args.blocks.split(",")):
            for confidence in (float(c) for c in args.confidences.split(",")):
                row = {"drafter": name, **measure(Path(path), block, confidence, args)}
                print(json.dumps(row))
                rows.append(row)
    if args.out is not None:
        args.out.write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
