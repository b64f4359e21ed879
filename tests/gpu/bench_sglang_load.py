"""GPU load benchmark: AR vs static DFLARE blocks from batch 1 to 256, acceptance replayed from traces.

Qwen3-8B shapes with dummy weights; DFLARE with DFlare's depth and taps (7 layers, 9 taps). Acceptance comes
from acceptance traces (``DFLARE_TRACE_REPLAY``, chosen per request through ``custom_params``): the frozen
synthetic trace (tau 7.3 at block 16) and the demo pair's recorded trace, so a block of b keeps what the
trace accepts within b - 1 drafts. One AR server runs for the whole call; the DFLARE servers (one per block)
run beside it in waves (PARALLEL at a time: 2 on an H200, 1 on an H100), and every round measures AR and
each DFLARE server at every batch size, in a rotating order.

Per row: tok/s, x AR (AR of the same wave and round set), tau, verified tokens per request per step, verify /
draft / context-KV ms (CUDA events), the AR step, the bound tau * t_AR / (t_verify + t_draft + t_kv), and
the running batch SGLang actually reached (the largest batch size its decode or verify forwards ran at
during the measurement, from the same phase records). ``step_wall_ms`` is the scheduler's launch-to-launch
period of steps at exactly the row's batch size (phase_timing.py): the steady-state step, host time
included, without the prefill and without the tail of a closed batch (under trace replay the requests that
accept least run on at smaller batches after the others finished: with the synthetic trace at block 8 the
slowest of 128 requests needs about twice the mean request's steps). ``host_ms`` is that period minus the
timed GPU phases, and ``x_ar_steady`` = tau * AR's period / DFLARE's: the speed-up a server kept at this
batch would see, where ``x_ar`` is that of one closed batch of requests. With STEADY=<seconds> each server is
also kept at each batch size above 1 for that long, every client sending its next request when its last one
answered, the lengths asked for varying by SPREAD (0.5: +-50 %, ``keep_full``; rows say it in
``kept_full_spread``): ``kept_full_tok_s`` is the tok/s generated after the first third (each request's
tokens spread over its lifetime), and ``x_ar_kept_full`` its ratio to AR's: measured, where ``x_ar_steady``
is computed from step periods.

Adaptive DFLARE (``DFLARE_VERIFY=adaptive``: per-request verify widths and plain decode steps chosen by the
verify-width policy from a step-cost table) joins as ``a<block>`` in BLOCKS (e.g. ``BLOCKS=16,8,a16``), with
the table in COST_TABLE (default: the shipped table of this card and block); its rows have ``"mode":
"adaptive"`` and ``verified_per_req`` the mean drafts verified per request per step plus one. ``s<block>``
is adaptive DFLARE whose policy may also draft the shorter blocks of SHORT_DRAFTS (default 8;
``DFLARE_DRAFT_BLOCKS``), ``"mode": "adaptive_draft"``; ``d<block>`` SGLang's DSPARK planner.

Env: BLOCKS (16,8), BS (1,8,32,64,128,256), ROUNDS (3), TRACES (synthetic,demo), TRACE_DIR (the shipped
traces), ATTN (triton), PROFILE (1: torch-profile one step at batch 1, 32, 128 per DFLARE server),
PARALLEL, TAG (file name suffix), WARMUP (1: every server, AR included, starts with ``--warmups dflare``,
the chart's default: with PROFILE=0 the rows show what a warmed-up server's first requests get), PYSPY (a
py-spy binary: each server's scheduler process is sampled during its measurements at the largest batch,
``$OUT/pyspy_<server>_bs<N>_<trace>.txt``, collapsed stacks: where the host time of a step goes, which the
GPU phase timings do not show; PYSPY_SECONDS, default 3, how long from the measurement's start: long enough
for a closed batch's tail). Rows also count the scheduler's garbage-collector time (``gc_ms``), Triton's
compilation and kernel-load time (``triton_jit_ms``, ``triton_load_ms``) and the CUDA caching allocator's
retries after a full device (``alloc_retries``, each one a device-wide wait) and cudaMalloc calls
(``device_allocs``) during the measurement. Writes $OUT/bench_load<TAG>.json as it goes,
the step profiles included, and for each adaptive server $OUT/learnt_costs_<server><TAG>.json (what its
policy learnt and plans with: learnt_costs.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sglang_sim import TAPS9, TARGET, draft, mean_ms, median_row, phase_totals, snapshot_delta
from sglang_harness import (
    OUT,
    Results,
    Server,
    generate,
    keep_full,
    post_raw,
    steady_rate,
    stop_on_sigterm,
    timed,
)

ROOT = Path("/tmp/q8load")
PROMPT = list(range(1000, 1128))  # 128 prompt tokens
REPO = Path(__file__).resolve().parents[2]
DEFAULT_TRACES = REPO / "sglang_ext" / "traces" / "data"


# the environment that decides what a run measured, as its recorded command names it
COMMAND_KNOBS = ("BLOCKS", "BS", "TRACES", "ATTN", "ROUNDS", "STEADY", "SPREAD", "SHORT_DRAFTS", "WARMUP",
                 "PROFILE", "PARALLEL", "COST_TABLE", "DFLARE_SHORT_DRAFT_GRAPHS", "GC_FREEZE",
                 "DRAFT_VOCAB")  # fmt: skip


def new_tokens(bs: int) -> int:
    """Long enough that the prefill of the whole batch and the ramp of its first steps do not dominate (at
    batch 128, 128 new tokens are only ~20 verify steps at tau 6.5 and understate speculation), short enough
    that a wave of the grid fits one 10-minute device command: 512 at batch 128, 256 elsewhere."""
    return 512 if 128 <= bs < 256 else 256


def draft_vocab_size() -> int | None:
    """``DRAFT_VOCAB=N``: every DFLARE server drafts over N of the target's tokens (a draft vocabulary,
    sglang_ext/dflare/draft_vocab.py). With dummy weights and replayed acceptance which tokens does not
    matter, only how many LM-head rows each draft reads; the ids are 0..N-1."""
    size = os.environ.get("DRAFT_VOCAB")
    return int(size) if size else None


def write_draft_vocab(drafter_dir: Path) -> None:
    """The drafter's ``draft_vocab.json`` as ``DRAFT_VOCAB`` asks, or none (a file from an earlier run of
    the same lease removed: /tmp outlives a command)."""
    import torch

    from sglang_ext.dflare.draft_vocab import FILE, DraftVocab

    size = draft_vocab_size()
    if size is None:
        (drafter_dir / FILE).unlink(missing_ok=True)
    else:
        DraftVocab(torch.arange(size), TARGET["vocab_size"]).save(drafter_dir)


def greedy(tokens: int, trace: str | None) -> dict:
    """Sampling params of a measured request: greedy, ``tokens`` new tokens whatever the model says, and
    the acceptance trace it replays (None: AR)."""
    sampling = {"temperature": 0, "max_new_tokens": tokens, "ignore_eos": True}
    return {**sampling, "custom_params": {"dflare_trace": trace}} if trace else sampling


def kv_tokens(sizes: list[int]) -> int:
    """KV slots for the largest batch of the grid (prompt, new tokens and a verify window per request)."""
    return max(bs * (len(PROMPT) + new_tokens(bs) + 48) for bs in sizes)


def running_batch(before: dict, after: dict, requests: int) -> int:
    """The largest batch size a decode or verify forward ran at between two phase snapshots, out of the
    ``requests`` sent. Larger sizes are the previous measurement's records: the timer writes them in
    batches of 64, so some land after the next measurement's first snapshot."""
    sizes = [
        int(key.split("/")[1])
        for key, (n, _) in after.items()
        if key.split("/")[0] in ("decode", "verify") and n > before.get(key, [0, 0.0])[0]
    ]
    return max((s for s in sizes if s <= requests), default=0)


def scheduler_pid(server: Server) -> int | None:
    """The server's scheduler process (SGLang titles it ``sglang::scheduler...``): where a step's host
    work runs."""
    import psutil

    for child in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "scheduler" in " ".join(child.cmdline()) or "scheduler" in child.name():
                return child.pid
        except psutil.Error:
            continue
    return None


def sample_host(server: Server, label: str, seconds: float) -> subprocess.Popen | None:
    """py-spy (PYSPY) on the server's scheduler for ``seconds``, without pausing it; None when off."""
    binary, pid = os.environ.get("PYSPY"), None
    if binary:
        pid = scheduler_pid(server)
    if not binary or pid is None:
        return None
    out = OUT / f"pyspy_{server.name}_{label}.txt"
    cmd = [binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "200"]
    cmd += ["--nonblocking", "--format", "raw", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def measure(server: Server, bs: int, trace: str | None, sample: bool = False) -> dict:
    sampling = greedy(new_tokens(bs), trace)
    phases = Path(f"/tmp/phases/{server.name}")
    before = phase_totals(phases)
    seconds = float(os.environ.get("PYSPY_SECONDS", "3"))
    sampler = sample_host(server, f"bs{bs}_{trace or 'ar'}", seconds) if sample else None
    outs, secs = timed(lambda: generate(server.url, [PROMPT] * bs, sampling, bs))
    if sampler is not None:
        sampler.wait(timeout=60)
    time.sleep(0.6)  # let the scheduler flush its last phase records
    after = phase_totals(phases)
    toks = sum(o["meta_info"]["completion_tokens"] for o in outs)
    steps = sum(o["meta_info"].get("spec_verify_ct", 0) for o in outs)
    correct = sum(o["meta_info"].get("spec_num_correct_drafts", 0) for o in outs)
    row = {"tok_s": round(toks / secs, 1), "running_batch": running_batch(before, after, bs)}
    row["tau"] = round(1 + correct / steps, 3) if steps else 1.0
    verified = [o["meta_info"].get("spec_num_verified_drafts") for o in outs]
    plain = [o["meta_info"].get("spec_num_plain_steps") for o in outs]
    if steps and None not in verified:  # adaptive servers: what the policy chose
        row["verified_per_req"] = round(1 + sum(verified) / steps, 3)
        plain_steps = sum(p or 0 for p in plain)  # steps without a verified draft (not in spec_verify_ct)
        row["plain_step_share"] = round(plain_steps / (steps + plain_steps), 3)
    for phase in ("decode", "verify", "draft", "draft_short", "context_kv", "step_wall"):
        row[f"{phase}_ms"] = mean_ms(before, after, phase, bs)
    for phase in ("verify", "draft", "draft_short", "context_kv"):  # host time of each launching call
        row[f"{phase}_host_ms"] = mean_ms(before, after, f"{phase}_host", bs)
    # the whole measurement, every batch size: the scheduler's GC passes, Triton's compilations and loads
    for name, prefix in (("gc", "gc_gen"), ("triton_jit", "triton_jit/"), ("triton_load", "triton_load/")):
        row[f"{name}_ms"] = round(summed_ms(before, after, prefix), 2)
    for name in ("alloc_retries", "device_allocs"):  # the caching allocator's, the whole measurement
        row[name] = snapshot_delta(before, after, f"allocator_{name}/all")[0]
    drafts = {p: snapshot_delta(before, after, f"{p}/{bs}")[0] for p in ("draft", "draft_short")}
    short = drafts["draft_short"] > 0  # adaptive with shorter drafts: their share and the mean draft of both
    mean = sum((row[f"{p}_ms"] or 0) * n for p, n in drafts.items()) / sum(drafts.values()) if short else None
    row["draft_short_share"] = round(drafts["draft_short"] / sum(drafts.values()), 3) if short else None
    row["draft_mean_ms"] = round(mean, 4) if mean is not None else None  # every round has every key
    return row


def freeze_gc(urls: list[str]) -> None:
    """GC_FREEZE=1: SGLang's ``/freeze_gc`` on every server of the wave (AR included), once warmed up and
    before the timed rounds: what the servers hold by then moves out of the garbage collector's reach, so
    its full passes scan only what the measured requests create (``gc_ms`` per row shows what is left)."""
    for url in urls:
        status, text = post_raw(url + "/freeze_gc", {})
        if status != 200:
            raise RuntimeError(f"{url}/freeze_gc answered {status}: {text[:200]}")


def summed_ms(before: dict, after: dict, prefix: str) -> float:
    """Milliseconds the server's scheduler spent between two phase snapshots in what phase_timing.py records
    under keys starting with ``prefix``, at every batch size: garbage-collector passes
    (``gc_gen<generation>/<batch size>``), Triton's compilations (``triton_jit/``) and kernel loads
    (``triton_load/``)."""
    return sum(snapshot_delta(before, after, key)[1] for key in after if key.startswith(prefix))


def length_spread() -> float:
    """SPREAD: kept-full requests ask for the row's new tokens times a factor in [1 - SPREAD, 1 + SPREAD]
    (``keep_full``: one length for all keeps plain decoding's requests in lockstep, their prefills
    batched, which real traffic does not)."""
    return float(os.environ.get("SPREAD", "0.5"))


def measure_kept_full(server: Server, bs: int, trace: str | None, seconds: float) -> float:
    """tok/s of ``server`` kept at ``bs`` requests in flight for ``seconds`` (STEADY): the tokens generated
    after the first third (the ramp), over the rest of the time."""
    sampling = greedy(new_tokens(bs), trace)
    start, finished = keep_full(server.url, PROMPT, sampling, bs, seconds, spread=length_spread())
    return round(steady_rate(finished, start + seconds / 3, start + seconds), 1)


def server_args(attn: str, sizes: list[int]) -> list[str]:
    max_bs = max(sizes)
    return [
        "--model-path", str(ROOT / "target"), "--load-format", "dummy", "--skip-tokenizer-init",
        "--dtype", "bfloat16", "--mem-fraction-static", "0.9",
        "--attention-backend", attn,
        "--max-total-tokens", str(kv_tokens(sizes)),
        "--max-running-requests", str(max_bs), "--cuda-graph-max-bs", str(max_bs),
        "--context-length", "4096",
        *(["--warmups", "dflare"] if os.environ.get("WARMUP") == "1" else []),
    ]  # fmt: skip


# BLOCKS entries: a16 = adaptive block 16, d16 = DSPARK's, s16 = adaptive that may draft SHORT_DRAFTS (8)
PREFIXES = {"a": "adaptive", "d": "dspark_planner", "s": "adaptive_draft"}
PORT_OFFSETS = {"static": 0, "adaptive": 40, "dspark_planner": 80, "adaptive_draft": 120}


def parse_blocks(text: str) -> list[tuple[str, int]]:
    """``16,8,a16,d16,s16`` -> [("static", 16), ("static", 8), ("adaptive", 16), ("dspark_planner", 16),
    ("adaptive_draft", 16)]."""
    return [(PREFIXES[x[0]], int(x[1:])) if x[0] in PREFIXES else ("static", int(x)) for x in text.split(",")]


def dflare_args(attn: str, block: int) -> list[str]:
    return [
        "--speculative-algorithm", "DFLARE", "--speculative-draft-model-path", str(ROOT / "dflare7"),
        "--speculative-draft-load-format", "dummy", "--speculative-num-draft-tokens", str(block),
        "--speculative-draft-attention-backend", attn,
    ]  # fmt: skip


def profile_pass(server: Server) -> None:
    """Reach 21+ decode steps at each profiled batch size before the timed rounds (see step_profile), so
    the profiled (synchronised) step never lands in a timed round: at tau up to 9 that takes 256 tokens
    (96 gave 12-13 full-batch steps, and the profiled step fell into round 0). It also warms each batch
    size up."""
    for bs in (1, 32, 128):
        generate(server.url, [PROMPT] * bs, greedy(256, "synthetic"), bs)


def profile_dir(tag: str, key: str) -> Path:
    return Path(f"/tmp/step_profile{tag}/{key}")


def server_key(mode: str, block: int) -> str:
    prefix = {m: p for p, m in PREFIXES.items()}.get(mode, "b")
    return f"{prefix}{block}"


def start_dflare(base: list[str], attn: str, mode: str, block: int, trace_dir: Path, tag: str) -> Server:
    key = server_key(mode, block)
    env = {
        "DFLARE_PHASE_TIMING": f"/tmp/phases/dflare_{key}",
        "DFLARE_TRACE_REPLAY": str(trace_dir),
        "DFLARE_VERIFY": "adaptive" if mode == "adaptive_draft" else mode,
    }
    if mode == "adaptive_draft":  # the policy may also draft these shorter blocks, eagerly
        env["DFLARE_DRAFT_BLOCKS"] = os.environ.get("SHORT_DRAFTS", "8")
    if mode != "static" and os.environ.get("COST_TABLE"):
        env["DFLARE_COST_TABLE"] = os.environ["COST_TABLE"]
    if mode != "static":  # what its policy learnt and plans with, rewritten as it runs (learnt_costs.py)
        env["DFLARE_LEARNT_COSTS"] = str(OUT / f"learnt_costs_{key}{tag}.json")
    if os.environ.get("PROFILE", "1") == "1":
        env["DFLARE_STEP_PROFILE"] = str(profile_dir(tag, key))
    port = 31010 + block + PORT_OFFSETS[mode]
    return Server(f"dflare_{key}", port, base + dflare_args(attn, block), env)


def run_wave(
    ar: Server, specs: dict[tuple[str, int], Server], sizes: list[int], rounds: int, traces: list[str],
    rows: list[dict], notes: dict, res: Results,
) -> None:  # fmt: skip
    """AR and this wave's DFLARE servers, every batch size, ``rounds`` times, in a rotating order."""
    up = {}
    for who, spec in specs.items():
        ok = ar.wait(600) and spec.wait(600)
        notes[spec.name] = [
            ln[-240:]
            for needle in ("DFLARE", "Capture cuda graph", "max_running")
            for ln in spec.log_grep(needle)
        ][:16]
        if ok:
            up[who] = spec
        else:
            res[f"error_{spec.name}"] = ar.log_tail(30) + "\n---\n" + spec.log_tail(40)
    res["server_notes"] = notes  # now, not at the wave's end: a wave cut short still says how it verified
    if not up:
        return
    generate(ar.url, [PROMPT] * 2, {"temperature": 0, "max_new_tokens": 32}, 2)
    if os.environ.get("PROFILE", "1") == "1":
        for spec in up.values():
            profile_pass(spec)
    if os.environ.get("GC_FREEZE") == "1":
        freeze_gc([ar.url, *(spec.url for spec in up.values())])
    runs = [("ar", None), *((who, t) for who in up for t in traces)]
    raw: dict[tuple, list[dict]] = {}
    for r in range(rounds):
        for bs in sizes:
            for who, trace in runs[r % len(runs) :] + runs[: r % len(runs)]:
                sample = r == 0 and bs == max(sizes)  # host sampling once per server, at the largest batch
                row = measure(ar if who == "ar" else up[who], bs, trace, sample)
                raw.setdefault((who, trace, bs), []).append(row)
                name = who if who == "ar" else server_key(*who)
                print(f"round {r} {name} {trace} bs={bs}", row, flush=True)
    kept: dict[tuple, float] = {}  # STEADY: tok/s with the batch kept full, once per server and batch
    steady_s = float(os.environ.get("STEADY", "0"))
    for bs in [b for b in sizes if b > 1] if steady_s > 0 else []:
        for who, trace in runs:
            kept[(who, trace, bs)] = measure_kept_full(ar if who == "ar" else up[who], bs, trace, steady_s)
            print(f"kept full {who} {trace} bs={bs}: {kept[(who, trace, bs)]} tok/s", flush=True)
    wave = ",".join(server_key(*who) for who in up)
    for bs in sizes:
        a = median_row(raw[("ar", None, bs)])
        a["kept_full_tok_s"] = kept.get(("ar", None, bs))
        a["kept_full_spread"] = length_spread() if steady_s > 0 else None
        for trace in traces:
            rows.append({"trace": trace, "batch": bs, "mode": "ar", "block": 1, "wave": wave, **a,
                         "verified_per_req": 1, "ar_step_ms": a["decode_ms"]})  # fmt: skip
            for mode, block in up:
                s = median_row(raw[((mode, block), trace, bs)])
                draft_key = "draft_mean_ms" if s.get("draft_mean_ms") is not None else "draft_ms"
                t_spec = sum(s[k] or 0 for k in ("verify_ms", draft_key, "context_kv_ms"))
                bound = s["tau"] * a["decode_ms"] / t_spec if a["decode_ms"] and t_spec else None
                walls = s["step_wall_ms"], a["step_wall_ms"]
                steady = s["tau"] * walls[1] / walls[0] if all(walls) else None
                rows.append({
                    "trace": trace, "batch": bs, "mode": mode, "block": block, "wave": wave, **s,
                    "x_ar": round(s["tok_s"] / a["tok_s"], 3),
                    "verified_per_req": block if mode == "static" else s.get("verified_per_req"),
                    "ar_step_ms": a["decode_ms"], "bound": round(bound, 3) if bound else None,
                    "x_ar_steady": round(steady, 3) if steady else None,
                    "host_ms": round(walls[0] - t_spec, 3) if walls[0] and t_spec else None,
                    "short_drafts": os.environ.get("SHORT_DRAFTS", "8") if mode == "adaptive_draft" else None,
                    "draft_vocab": draft_vocab_size(),
                    "kept_full_tok_s": kept.get(((mode, block), trace, bs)),
                    "kept_full_spread": a["kept_full_spread"],
                    "x_ar_kept_full": (
                        round(kept[((mode, block), trace, bs)] / a["kept_full_tok_s"], 3)
                        if kept.get(((mode, block), trace, bs)) and a["kept_full_tok_s"] else None
                    ),
                })  # fmt: skip


def main() -> int:
    import torch

    stop_on_sigterm()
    blocks = parse_blocks(os.environ.get("BLOCKS", "16,8"))
    sizes = [int(x) for x in os.environ.get("BS", "1,8,32,64,128,256").split(",")]
    rounds = int(os.environ.get("ROUNDS", "3"))
    traces = os.environ.get("TRACES", "synthetic,demo").split(",")
    trace_dir = Path(os.environ.get("TRACE_DIR", str(DEFAULT_TRACES)))
    attn = os.environ.get("ATTN", "triton")
    tag = os.environ.get("TAG", "")
    res = Results(OUT / f"bench_load{tag}.json")
    res["device"] = torch.cuda.get_device_name(0)
    res["setup"] = {
        "model": "Qwen3-8B shapes, dummy weights, bfloat16",
        "drafter": "DFLARE 7 layers, 9 taps",
        "prompt_tokens": len(PROMPT),
        "new_tokens": {str(bs): new_tokens(bs) for bs in sizes},
        "rounds": rounds,
        "warmups": os.environ.get("WARMUP") == "1",
        "kept_full_s": float(os.environ.get("STEADY", "0")),
        "kept_full_length_spread": length_spread(),
        "attention": attn,
        "traces": traces,
        "draft_vocab": draft_vocab_size(),
        "command": " ".join(
            f"{knob}={os.environ[knob]}" for knob in COMMAND_KNOBS if os.environ.get(knob) is not None
        )
        + " bash tests/gpu/run_on_gpu.sh load",
    }
    for name, cfg in {"target": TARGET, "dflare7": draft("QwenDFlareDraftModel", 7, TAPS9)}.items():
        (ROOT / name).mkdir(parents=True, exist_ok=True)
        (ROOT / name / "config.json").write_text(json.dumps(cfg))
    write_draft_vocab(ROOT / "dflare7")
    base = server_args(attn, sizes)
    ar = Server("ar", 31000, base, {"DFLARE_PHASE_TIMING": "/tmp/phases/ar"})
    per_wave = int(os.environ.get("PARALLEL", "2" if res["device"].find("H200") >= 0 else "1"))
    rows: list[dict] = []
    notes: dict[str, list[str]] = {}
    profiles: dict[str, list[dict]] = {}
    try:
        for w in range(0, len(blocks), per_wave):
            wave = blocks[w : w + per_wave]
            specs = {}
            for mode, block in wave:
                time.sleep(3)  # staggered: each server profiles free memory before the next one loads
                specs[(mode, block)] = start_dflare(base, attn, mode, block, trace_dir, tag)
            try:
                run_wave(ar, specs, sizes, rounds, traces, rows, notes, res)
            finally:
                for (mode, block), spec in specs.items():
                    spec.stop()
                    profiles[spec.name] = [
                        json.loads(f.read_text())
                        for f in sorted(profile_dir(tag, server_key(mode, block)).glob("*.json"))
                    ]
            res["rows"], res["server_notes"], res["profiles"] = rows, notes, profiles
    finally:
        ar.stop()
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return 0


if __name__ == "__main__":
    sys.exit(main())
