"""Re-measure, on CPU in float32, the target's top-2 margin at every greedy divergence of a GPU check.

``python tests/gpu/recheck_margins.py CHECK.json GREEDY_OUTPUTS.json OUT.json [--target DIR]``

Why: the check of 2026-11-28 08:44 measured batch-8 margins on the batch-1 AR prefix, but SGLang's bf16
AR output itself differs between batch 1 and batch 8, so two batch-8 "margins" (8.9, 8.4) were taken at
the wrong text. The check now saves batch-8 outputs and uses them; this script repairs the old record
without a GPU. Only batch-1 outputs were saved then, so a batch-8 divergence is re-measured at the spec
run's batch-1 prefix, and that prefix is accepted only when both recorded tokens (AR's and the spec
run's) are exactly the target's top two there: a wrong prefix would not reproduce that pair.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

DEMO_TARGET = Path(__file__).resolve().parents[2] / "sglang_ext" / "demo" / "target"


def recheck(check: dict, outputs: dict, model: torch.nn.Module) -> dict:
    rows, unverified = [], 0
    for run, result in check["greedy_lossless"].items():
        name, _, batch = run.rpartition("_bs")
        for d in result.get("divergences", []):
            p, j = d["prompt"], d["position"]
            source = "ar" if batch == "1" else name
            ids = outputs["prompts"][p] + outputs[source][p][:j]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1].float()
            top2 = torch.topk(logits, 2).indices.tolist()
            top2_is_pair = set(top2) == {d["ar"][0], d["spec"][0]}
            ok = batch == "1" or top2_is_pair  # a batch-1 prefix is AR's own, exact by construction
            unverified += not ok
            rows.append(
                {
                    "run": run,
                    "prompt": p,
                    "position": j,
                    "prefix_from": f"{source} batch 1",
                    "prefix_verified": ok,
                    "top2_is_pair": top2_is_pair,
                    "margin_ar_vs_spec": round(float(logits[d["ar"][0]] - logits[d["spec"][0]]), 4),
                    "gpu_recorded_margin": d.get("top2_margin"),
                }
            )
    verified = [abs(r["margin_ar_vs_spec"]) for r in rows if r["prefix_verified"]]
    return {
        "divergences": rows,
        "verified": len(verified),
        "unverified_prefix": unverified,
        "max_verified_margin": max(verified, default=None),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("check", type=Path)
    ap.add_argument("outputs", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--target", type=Path, default=DEMO_TARGET)
    args = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(str(args.target), dtype=torch.float32).eval()
    report = recheck(json.loads(args.check.read_text()), json.loads(args.outputs.read_text()), model)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print({k: v for k, v in report.items() if k != "divergences"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
