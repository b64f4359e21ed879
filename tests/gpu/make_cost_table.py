"""A DFLARE step-cost table (what the adaptive verify policy plans with) from a load benchmark's rows.

``python tests/gpu/make_cost_table.py RESULTS.json --block 16 --attention fa3 [-o FILE]``: from
``bench_sglang_load.py`` results of one card (``docs/results/sglang_bench_load.json``), the
:class:`StepCostModel` of a server drafting ``block`` tokens, written by default to
``sglang_ext/sglang_plugin/cost_tables/<card>_b<block>.json`` where the plugin finds it for that card:

* verify: every static row's verify plus context-KV ms at ``batch x block'`` tokens (each static block b' is
  a verify of b' tokens per request), and the AR decode step at ``batch`` tokens (a verify of the last
  committed token only: the adaptive plain step);
* draft: the ``block`` static server's draft ms by batch (a CUDA graph at the whole block), and where an
  adaptive server with one shorter draft block ran (``BLOCKS=s<block>``, ``SHORT_DRAFTS=8``), its eager
  drafts' ms (``draft_short_ms``) as that shorter block's draft;
* decode: the AR step by batch.

Rows of both traces are averaged (the costs do not depend on what is accepted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from sglang_ext.dflare.verify_policy import StepCostModel  # noqa: E402
from sglang_ext.sglang_plugin.adaptive import SHIPPED_TABLES, card_slug  # noqa: E402


def cost_model(results: dict, block: int, attention: str) -> StepCostModel:
    rows = [r for r in results["rows"] if r.get("attention", attention) == attention and not r.get("partial")]
    verify: dict[tuple[int, int], list[float]] = defaultdict(list)
    draft: dict[tuple[int, int], list[float]] = defaultdict(list)
    decode: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        bs = int(r["batch"])
        if r["mode"] == "ar" and r.get("ar_step_ms"):
            decode[bs].append(float(r["ar_step_ms"]))
            verify[(bs, bs)].append(float(r["ar_step_ms"]))
        elif r["mode"] == "static" and r.get("verify_ms"):
            kv = float(r.get("context_kv_ms") or 0)
            verify[(bs, bs * int(r["block"]))].append(float(r["verify_ms"]) + kv)
            if int(r["block"]) == block and r.get("draft_ms"):
                draft[(bs, block)].append(float(r["draft_ms"]))
        elif r["mode"] == "adaptive_draft" and int(r["block"]) == block and r.get("draft_short_ms"):
            shorter = str(r.get("short_drafts", ""))
            if shorter.isdigit():  # one shorter block: its drafts are all of that block
                draft[(bs, int(shorter))].append(float(r["draft_short_ms"]))
    if not any(b == block for _, b in draft):
        raise SystemExit(f"no static block-{block} rows with draft_ms for attention {attention}")
    return StepCostModel(
        [(b, t, statistics.mean(v)) for (b, t), v in verify.items()],
        [(b, k, statistics.mean(v)) for (b, k), v in draft.items()],
        [(b, statistics.mean(v)) for b, v in decode.items()],
        device=results["device"],
        model=results.get("model", "Qwen3-8B shapes"),
        block_size=block,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--attention", default="fa3")
    parser.add_argument("-o", "--out", type=Path)
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    model = cost_model(results, args.block, args.attention)
    out = args.out or SHIPPED_TABLES / f"{card_slug(results['device'])}_b{args.block}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    model.to_json(out)
    points = model.to_dict()
    print(f"wrote {out}: {len(points['verify'])} verify, {len(points['draft'])} draft points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
