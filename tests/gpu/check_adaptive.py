"""GPU check of adaptive DFLARE (per-request verify widths, plain decode steps) on the demo pair.

``bash tests/gpu/run_on_gpu.sh adaptive``. FA3 attention (ragged-verify CUDA graphs), bfloat16, five servers
side by side: SGLang AR, DFLARE static (the whole block every step), DFLARE adaptive, the same step
planned by SGLang's DSPARK planner (``dspark_planner``), both with a step-cost table (``COST_TABLE``,
default the shipped Qwen3-8B-shape table of this card, else the first shipped one: any table exercises
every width; only speed depends on it), and adaptive with shorter drafts (``adaptive_draft``:
``DFLARE_DRAFT_BLOCKS=8`` and that table with the whole block's draft made 8x dearer, so the policy
drafts block 8 most steps, from CUDA graphs of that width on FA3: its log says when it captured them
and when it first drafted block 8). Checks:

* greedy adaptive (dspark_planner, adaptive_draft) == AR token for token on the demo held-out prompts at
  batch 1, 8 and 32 (divergences reported with the target's top-2 logit margin; the static server's own
  divergences from bf16 AR are the yardstick for numerics), with the widths the policy chose and the
  plain decode steps it took (``spec_num_verified_drafts`` / ``spec_num_plain_steps``), and tau;
* sampled requests (temperature 0.8) complete and their statistics are consistent;
* the worker logged ``verify=adaptive``; the adaptive server starts with ``--warmups dflare`` and its
  log says how long the warm-up took (or why it failed).

Env: PROMPTS (48), SIZES (1,8,32), COST_TABLE, SERVERS (all: ar,static,adaptive,dspark_planner,adaptive_draft;
AR always runs). Writes $OUT/adaptive.json as it goes.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_sglang_dflare import (
    MAX_NEW,
    N_PROMPTS,
    compare,
    load_prompts,
    margins,
    sampling_consistency,
    servable_target,
    spec_tau,
)
from sglang_harness import OUT, SPEC, Results, generate, start_all

REPO = Path(__file__).resolve().parents[2]
TABLES = REPO / "sglang_ext" / "sglang_plugin" / "cost_tables"
SIZES = tuple(int(x) for x in os.environ.get("SIZES", "1,8,32").split(","))


def cost_table(card: str) -> Path:
    from sglang_ext.sglang_plugin.adaptive import card_slug

    if os.environ.get("COST_TABLE"):
        return Path(os.environ["COST_TABLE"])
    own = sorted(TABLES.glob(f"{card_slug(card)}_b*.json"))
    return (own or sorted(TABLES.glob("*.json")))[0]


def short_draft_table(table: Path, out: Path) -> Path:
    """``table`` with the whole block's draft 8x dearer and block 8's draft at the whole block's price
    (where ``table`` has no block-8 point): a policy allowed block 8 drafts it at once."""
    data = json.loads(table.read_text())
    block = int(data.get("block_size") or 16)
    whole = [p for p in data["draft"] if p["block"] == block]
    short = [{**p, "block": 8} for p in whole if not any(q["block"] == 8 for q in data["draft"])]
    data["draft"] = [{**p, "ms": 8 * p["ms"]} if p["block"] == block else p for p in data["draft"]] + short
    out.write_text(json.dumps(data))
    return out


def width_stats(outs: list[dict]) -> dict:
    meta = [o["meta_info"] for o in outs]
    steps = sum(m.get("spec_verify_ct", 0) for m in meta)
    verified = [m.get("spec_num_verified_drafts") for m in meta]
    plain = [m.get("spec_num_plain_steps") for m in meta]
    return {
        "verify_steps": steps,
        "verified_drafts": None if None in verified else sum(verified),
        "plain_steps": None if None in plain else sum(plain),
    }


def main() -> int:
    import torch

    demo = REPO / "sglang_ext" / "demo"
    target, _ = servable_target(Path(os.environ.get("TARGET", demo / "target")))
    dflare = Path(os.environ.get("DFLARE", demo / "dflare"))
    res = Results(OUT / "adaptive.json")
    card = torch.cuda.get_device_name(0)
    table = cost_table(card)
    res["device"], res["cost_table"] = card, str(table)
    prompts = load_prompts(target, int(os.environ.get("PROMPTS", N_PROMPTS)))
    base = ["--model-path", str(target), "--dtype", "bfloat16", "--mem-fraction-static", "0.8"]
    base += ["--max-total-tokens", "65536", "--max-running-requests", "32", "--cuda-graph-max-bs", "32"]
    base += ["--attention-backend", "fa3"]
    spec = [*SPEC, "--speculative-algorithm", "DFLARE", "--speculative-draft-model-path", str(dflare)]
    spec += ["--speculative-draft-attention-backend", "fa3"]
    adaptive_env = {"DFLARE_VERIFY": "adaptive", "DFLARE_COST_TABLE": str(table)}
    short_table = short_draft_table(table, Path("/tmp/dflare_short_draft_table.json"))
    short_env = {**adaptive_env, "DFLARE_COST_TABLE": str(short_table), "DFLARE_DRAFT_BLOCKS": "8"}
    every = [
        ("ar", 31100, base, {}),
        ("static", 31101, [*base, *spec], {"DFLARE_VERIFY": "static"}),
        ("adaptive", 31102, [*base, *spec, "--warmups", "dflare"], adaptive_env),
        ("dspark_planner", 31103, [*base, *spec], {**adaptive_env, "DFLARE_VERIFY": "dspark_planner"}),
        ("adaptive_draft", 31104, [*base, *spec], short_env),
    ]
    chosen = set(os.environ.get("SERVERS", ",".join(name for name, *_ in every)).split(",")) | {"ar"}
    servers = start_all([server for server in every if server[0] in chosen])
    res["servers"] = {n: ok for n, (_, ok) in servers.items()}
    try:
        up = {n: s.url for n, (s, ok) in servers.items() if ok}
        if "adaptive" in servers:
            res["worker_log"] = servers["adaptive"][0].log_grep("DFLARE worker ready")[-1:]
            res["adaptive_log"] = servers["adaptive"][0].log_grep("DFLARE adaptive")[-3:]
            res["warmup_log"] = servers["adaptive"][0].log_grep("warm-up")[-3:]
        if "adaptive_draft" in servers:
            log = servers["adaptive_draft"][0].log_grep
            res["adaptive_draft_log"] = log("DFLARE adaptive")[-6:] + log("CUDA graphs of draft block")[-3:]
        failed = [n for n, (_, ok) in servers.items() if not ok]
        if failed:
            res["server_errors"] = {n: servers[n][0].log_tail(60) for n in failed}
        greedy = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}

        def runs(name: str) -> dict[int, list[dict]]:
            return {bs: generate(up[name], prompts, greedy, bs) for bs in SIZES}

        with cf.ThreadPoolExecutor(len(up)) as pool:
            out = dict(zip(up, pool.map(runs, up), strict=True))
        lossless = {}
        for name in ("static", "adaptive", "dspark_planner", "adaptive_draft"):
            for bs in SIZES:
                if name in out and "ar" in out:
                    diffs = compare(out["ar"][bs], out[name][bs])
                    try:
                        margins(target, prompts, out["ar"][bs], diffs)
                    except Exception:
                        res["margin_error"] = traceback.format_exc()[-1500:]
                    lossless[f"{name}_bs{bs}"] = {
                        "identical": not diffs,
                        "divergences": diffs,
                        **spec_tau(out[name][bs]),
                        **width_stats(out[name][bs]),
                    }
        res["greedy_lossless"] = lossless
        if "adaptive" in up:
            params = {"temperature": 0.8, "top_p": 1.0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
            sampled = generate(up["adaptive"], prompts[:16], params, 8, timeout=120)
            block = int(json.loads((dflare / "config.json").read_text())["block_size"])
            res["sampling"] = {**sampling_consistency(sampled, block), **width_stats(sampled)}
    except Exception:
        res["error"] = traceback.format_exc()[-3000:]
    finally:
        for srv, _ in servers.values():
            srv.stop()
        res["logs_tail"] = {n: s.log_tail(25) for n, (s, _) in servers.items()}
    return 0


if __name__ == "__main__":
    sys.exit(main())
