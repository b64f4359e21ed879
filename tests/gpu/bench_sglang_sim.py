"""GPU benchmark: SGLang AR vs built-in DFLASH vs DFLARE on Qwen3-8B shapes under simulated acceptance.

Random (dummy) weights are fine here: ``SGLANG_SIMULATE_ACC_LEN`` forces the acceptance length, so the
run measures the cost of a decode step, not the drafter's quality. Servers: AR; DFLASH and DFLARE with
DFlare's depth and taps (7 layers, 9 taps); DFLASH with the published 5-layer/5-tap shape (for
information). Each speculative server times its phases with ``DFLARE_PHASE_TIMING`` (CUDA events
around target verify, draft forward, context-KV materialisation; AR decode on the AR server) and we
report tokens/s, achieved tau = 1 + correct/verify_ct, and the bound tau * t_AR / (t_verify + t_draft).

Env: ACC (7.3), BS (1,8,32), NEW (1024), ROUNDS (3). Writes $OUT/bench_sim.json as it goes.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_harness import OUT, SPEC, Results, generate, start_all, stop_on_sigterm, timed

ROOT = Path("/tmp/q8")
PROMPT = list(range(1000, 1128))
LOG_NEEDLES = ("folded", "fused", "DFLARE worker ready", "eager", "Capture cuda graph end")
TAPS9 = [1, 5, 9, 13, 17, 21, 25, 29, 33]
TAPS5 = [1, 9, 17, 25, 33]
TARGET = dict(
    architectures=["Qwen3ForCausalLM"],
    model_type="qwen3",
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
    bos_token_id=151643,
    eos_token_id=151645,
    hidden_act="silu",
    attention_bias=False,
)


def draft(arch: str, layers: int, taps: list[int]) -> dict:
    return dict(
        TARGET,
        architectures=[arch],
        num_hidden_layers=layers,
        num_target_layers=36,
        block_size=16,
        dflash_config={"block_size": 16, "mask_token_id": 151669, "target_layer_ids": taps},
    )


def phase_totals(directory: Path) -> dict[str, list[float]]:
    totals: dict[str, list[float]] = {}
    for f in directory.glob("phases_*.json"):
        for key, (n, ms) in json.loads(f.read_text()).items():
            entry = totals.setdefault(key, [0, 0.0])
            entry[0] += n
            entry[1] += ms
    return totals


def snapshot_delta(before: dict, after: dict, key: str) -> tuple[float, float]:
    """(count, ms) that ``key`` gained between two phase snapshots (a key absent from one counts as 0)."""
    (n0, ms0), (n1, ms1) = before.get(key, (0, 0.0)), after.get(key, (0, 0.0))
    return n1 - n0, ms1 - ms0


def mean_ms(before: dict, after: dict, phase: str, bs: int) -> float | None:
    n, ms = snapshot_delta(before, after, f"{phase}/{bs}")
    return round(ms / n, 4) if n > 0 else None


def warm(url: str) -> None:
    generate(url, [PROMPT] * 2, {"temperature": 0, "max_new_tokens": 64, "ignore_eos": True}, 2)


def measure(url: str, phases: Path, bs: int, new: int) -> dict:
    """One timed batch of ``bs`` identical requests, with the phase times the server logged meanwhile."""
    sampling = {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}
    before = phase_totals(phases)
    outs, secs = timed(lambda: generate(url, [PROMPT] * bs, sampling, bs))
    time.sleep(0.6)  # let the scheduler flush its last event batch
    after = phase_totals(phases)
    toks = sum(o["meta_info"]["completion_tokens"] for o in outs)
    steps = sum(o["meta_info"].get("spec_verify_ct", 0) for o in outs)
    correct = sum(o["meta_info"].get("spec_num_correct_drafts", 0) for o in outs)
    row = {"tok_s": round(toks / secs, 1), "seconds": round(secs, 3)}
    row["tau"] = round(1 + correct / steps, 3) if steps else None
    for phase in ("decode", "verify", "draft", "context_kv"):
        row[f"{phase}_ms"] = mean_ms(before, after, phase, bs)
    return row


def median_row(rounds: list[dict]) -> dict:
    """Per-field median over rounds; the rounds themselves are kept for the spread."""
    row: dict = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds if r[key] is not None]
        row[key] = round(statistics.median(values), 4) if values else None
    row["tok_s_rounds"] = [r["tok_s"] for r in rounds]
    return row


def run_interleaved(urls: dict[str, str], sizes: list[int], new: int, rounds: int) -> dict:
    """Every server measured at every batch size, ROUNDS times, servers interleaved (order rotated each
    round): a slow moment of the machine then hits all of them alike, and the median drops it. One short
    batch-1 run per server (the first version) left a 6 % DFLARE/DFLASH gap that no phase time explained.
    """
    for url in urls.values():
        warm(url)
    raw: dict[str, dict[int, list[dict]]] = {n: {bs: [] for bs in sizes} for n in urls}
    names = list(urls)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for bs in sizes:
            for name in order:
                row = measure(urls[name], Path(f"/tmp/phases/{name}"), bs, new)
                raw[name][bs].append(row)
                print(f"round {r} {name} bs={bs}", row, flush=True)
    return {n: {bs: median_row(rows) for bs, rows in per.items()} for n, per in raw.items()}


def main() -> int:
    acc = os.environ.get("ACC", "7.3")
    sizes = [int(x) for x in os.environ.get("BS", "1,8,32").split(",")]
    new = int(os.environ.get("NEW", "1024"))
    rounds = int(os.environ.get("ROUNDS", "3"))
    import torch

    stop_on_sigterm()
    res = Results(OUT / "bench_sim.json")
    res["device"] = torch.cuda.get_device_name(0)
    total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    res["setup"] = {
        "acc": float(acc),
        "batch_sizes": sizes,
        "new_tokens": new,
        "rounds": rounds,
        "prompt_tokens": 128,
        "attention": "triton",
        "dtype": "bfloat16",
        "weights": "dummy (random)",
    }
    configs = {
        "target": TARGET,
        "dflash7": draft("DFlashDraftModel", 7, TAPS9),
        "dflare7": draft("QwenDFlareDraftModel", 7, TAPS9),
        "dflash5": draft("DFlashDraftModel", 5, TAPS5),
    }
    for name, cfg in configs.items():
        (ROOT / name).mkdir(parents=True, exist_ok=True)
        (ROOT / name / "config.json").write_text(json.dumps(cfg))
    waves = (
        [["ar", "dflare7", "dflash7", "dflash5"]]
        if total_gb > 120
        else [["ar", "dflare7"], ["dflash7", "dflash5"]]
    )
    frac = "0.88" if len(waves) == 1 else "0.9"
    base = [
        "--model-path",
        str(ROOT / "target"),
        "--load-format",
        "dummy",
        "--skip-tokenizer-init",
        "--dtype",
        "bfloat16",
        "--mem-fraction-static",
        frac,
        # Concurrent servers: SGLang sizes KV as (free now) - (free at start) * (1 - fraction), so
        # the last to start got almost none at 0.22 (OOM at 1024 new tokens); a high fraction with
        # a token cap gives every server the same pool.
        "--max-total-tokens",
        str(max(sizes) * (new + 256)),
        "--max-running-requests",
        str(max(sizes)),
        "--cuda-graph-max-bs",
        str(max(sizes)),
        "--context-length",
        "4096",
    ]
    algo = {"dflash7": "DFLASH", "dflare7": "DFLARE", "dflash5": "DFLASH"}
    results: dict[str, dict] = {}
    notes: dict[str, list[str]] = {}  # every wave's servers, not only the last wave's
    for w, wave in enumerate(waves):
        specs = []
        for i, name in enumerate(wave):
            phases = Path(f"/tmp/phases/{name}")
            env = {"DFLARE_PHASE_TIMING": str(phases)}
            args = list(base)
            if name != "ar":
                env["SGLANG_SIMULATE_ACC_LEN"] = acc
                args += [
                    *SPEC,
                    "--speculative-algorithm",
                    algo[name],
                    "--speculative-draft-model-path",
                    str(ROOT / name),
                    "--speculative-draft-load-format",
                    "dummy",
                ]
            specs.append((name, 32000 + 10 * w + i, args, env))
        servers, startup = timed(lambda specs=specs: start_all(specs, timeout=540))
        res[f"wave{w}_startup_s"] = round(startup, 1)
        try:
            for name, (srv, ok) in servers.items():
                if not ok:
                    results[name] = {"error": srv.log_tail(40)}
            up = {name: srv.url for name, (srv, ok) in servers.items() if ok}
            notes.update(  # which fast paths each server took (a host-time gap starts here)
                {
                    name: [ln[-200:] for needle in LOG_NEEDLES for ln in srv.log_grep(needle)][:12]
                    for name, (srv, _) in servers.items()
                }
            )
            res["server_notes"] = notes
            results.update(run_interleaved(up, sizes, new, rounds))
            res["runs"] = results
        finally:
            for srv, _ in servers.values():
                srv.stop()

    summary = {}
    ar = results.get("ar", {})
    for name in ("dflash7", "dflare7", "dflash5"):
        rows = results.get(name, {})
        if "error" in rows:
            continue
        summary[name] = {}
        for bs, row in rows.items():
            t_ar = ar.get(bs, {}).get("decode_ms")
            t_draft = (row["draft_ms"] or 0) + (row["context_kv_ms"] or 0)
            t_verify = row["verify_ms"]
            bound = row["tau"] * t_ar / (t_verify + t_draft) if t_ar and t_verify and row["tau"] else None
            step_wall_ms = 1000 * bs * row["tau"] / row["tok_s"] if row["tau"] else None
            summary[name][bs] = {
                "speedup": round(row["tok_s"] / ar[bs]["tok_s"], 3) if bs in ar else None,
                "bound": round(bound, 3) if bound else None,
                "tau": row["tau"],
                "t_draft_ms": round(t_draft, 4),
                "t_verify_ms": t_verify,
                "t_ar_ms": t_ar,
                "step_wall_ms": round(step_wall_ms, 4) if step_wall_ms else None,
                "ar_step_wall_ms": round(1000 * bs / ar[bs]["tok_s"], 4) if bs in ar else None,
            }
    if "dflare7" in summary and "dflash7" in summary:
        summary["dflare_vs_dflash_same_shape"] = {
            bs: {
                "draft_step_ratio": round(
                    summary["dflare7"][bs]["t_draft_ms"] / summary["dflash7"][bs]["t_draft_ms"], 3
                ),
                "speedup_ratio": round(
                    summary["dflare7"][bs]["speedup"] / summary["dflash7"][bs]["speedup"], 3
                ),
            }
            for bs in summary["dflare7"]
            if bs in summary["dflash7"] and summary["dflash7"][bs]["t_draft_ms"]
        }
    res["summary"] = summary
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return 0


if __name__ == "__main__":
    sys.exit(main())
