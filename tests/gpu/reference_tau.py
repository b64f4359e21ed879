"""The reference engine's tau on the prompts of a GPU check run (CPU is enough: the demo pair is tiny).

``python tests/gpu/reference_tau.py GREEDY_OUTPUTS.json OUT.json [--dtype float32]`` reads the prompts and
SGLang's greedy outputs saved by ``check_sglang_dflare.py``, decodes the same prompts greedily with
``sglang_ext.reference`` (same token budget), and writes tau (1 + accepted/verify steps) and how many
outputs equal SGLang AR's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sglang_ext.demo import drafter_path, target_path
from sglang_ext.reference import SamplingParams, load_engine
from sglang_ext.reference.engine import CPU_MIN_DRAFT_CONFIDENCE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("outputs", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    saved = json.loads(args.outputs.read_text())
    prompts, ar = saved["prompts"], saved["ar"]
    max_new = len(ar[0])
    # the fixed threshold, not the timing-dependent policy: tau comparable from run to run
    engine = load_engine(
        target_path(),
        drafter_path("dflare"),
        dtype=args.dtype,
        device="cpu",
        max_batch=8,
        min_draft_confidence=CPU_MIN_DRAFT_CONFIDENCE,
    )
    t0 = time.time()
    results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new))
    steps = sum(r.stats.verify_steps for r in results)
    accepted = sum(r.stats.accepted_tokens for r in results)
    same = sum(r.output_ids == a for r, a in zip(results, ar, strict=True))
    report = {
        "dtype": args.dtype,
        "prompts": len(prompts),
        "max_new_tokens": max_new,
        "tau": 1 + accepted / steps,
        "verify_steps": steps,
        "accepted": accepted,
        "outputs_equal_sglang_ar": same,
        "seconds": round(time.time() - t0, 1),
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(report)


if __name__ == "__main__":
    main()
