"""``dflare bench engine``: the same prompts decoded speculatively and with block size 1, side by side.

All engines share one target model object and run in the same process, alternating prompt by prompt at
batch 1 (else round by round), so the tokens/s ratio compares like with like on the same machine at the
same moment. Prints a table, writes JSON (and optionally a PNG bar chart).

On a shared machine one round's ratio can swing several-fold between runs, so the ratio of each round is
printed and stored with their spread, the median is reported, and a single round says that its noise is
unmeasured. The JSON goes where ``--out`` says, else into ``runs/`` (ignored by git), never the current
directory itself.

``--vs-threshold`` runs three engines instead of two: AR, the verify-width policy (``--verify-policy``)
and the fixed ``--min-draft-confidence`` threshold (default 0.02), and reports the policy's tokens/s over
the threshold's. With ``--draft-blocks 8`` (with ``--vs-threshold``) a fourth engine runs the policy
allowed to draft those shorter blocks too (``policy_draft``), reported over the policy that drafts the
whole block.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from sglang_ext.reference.engine import CPU_MIN_DRAFT_CONFIDENCE, Request, Result, SpeculativeEngine
from sglang_ext.reference.loader import build_engine
from sglang_ext.reference.pair import (
    PairUnavailableError,
    add_min_draft_confidence_argument,
    add_pair_arguments,
    encode_prompt,
    eos_ids,
    load_pair,
)
from sglang_ext.reference.sampling import SamplingParams
from sglang_ext.stats import total

DEFAULT_PROMPTS = [
    "Explain how a hash map works.",
    "Write a short poem about the sea.",
    "What is the capital of France? Answer in one sentence.",
    "List three tips for writing clean Python code.",
    "Describe the water cycle to a ten-year-old.",
    "Summarise the plot of a heist movie in three sentences.",
    "How do I reverse a list in Python?",
    "Give me a recipe for pancakes.",
]


DEFAULT_ROUNDS = 3
T = TypeVar("T")
RESULTS_DIR = Path("runs")


def default_out() -> Path:
    """Where a report goes without ``--out``: the results folder, one file per run."""
    return RESULTS_DIR / time.strftime("bench_engine-%Y%m%d-%H%M%S.json", time.gmtime())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dflare bench engine", description=__doc__.splitlines()[0])
    add_pair_arguments(p)
    p.add_argument(
        "--prompts",
        type=Path,
        help="text file (one prompt per line) or JSONL (`messages` or "
        "`prompt`); default: the demo pair's held-out prompts, or 8 built-in ones",
    )
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--block-size", type=int, default=None, help="speculative block size (default: drafter's)")
    add_min_draft_confidence_argument(p)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1, help="concurrent requests (continuous batching rows)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help="alternating rounds per mode: the median is reported with each round's ratio and their spread "
        "(1 round: the noise is not measured)",
    )
    p.add_argument(
        "--vs-threshold",
        action="store_true",
        help="compare the verify-width policy with the fixed --min-draft-confidence "
        f"(default {CPU_MIN_DRAFT_CONFIDENCE}) in the same run, beside AR",
    )
    p.add_argument(
        "--draft-blocks",
        type=lambda text: [int(b) for b in text.split(",")],
        default=[],
        help="with --vs-threshold: also run the policy allowed to draft these shorter blocks (e.g. 8)",
    )
    p.add_argument("--raw", action="store_true", help="do not wrap prompts in the chat template")
    p.add_argument("--ignore-eos", action="store_true", help="always decode max_tokens tokens")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON report (default: runs/bench_engine-<UTC time>.json)"
    )
    p.add_argument("--plot", type=Path, default=None, help="also write a PNG bar chart")
    return p


def run_mode(
    engine: SpeculativeEngine,
    prompts: list[list[int]],
    params: SamplingParams,
    label: str,
    progress: bool = True,
) -> tuple[tuple[float, float], list[Result]]:
    """Decode every prompt through ``engine``; returns ((wall s, process CPU s), results in prompt order).

    CPU seconds are reported next to wall seconds because on a shared machine other processes stretch
    wall time; with one torch thread CPU time is close to what an idle machine would take.
    """
    done: dict[str, Result] = {}
    ids = [f"{label}-{i}" for i in range(len(prompts))]
    start, cpu_start = time.perf_counter(), time.process_time()
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(Request(rid, prompt, params))
    with tqdm(
        total=len(prompts), desc=label, unit="req", leave=False, file=sys.stderr, disable=not progress
    ) as bar:
        while engine.has_work():
            for res in engine.step():
                done[res.request_id] = res
                bar.update(1)
    return (time.perf_counter() - start, time.process_time() - cpu_start), [done[i] for i in ids]


def run_order(engines: list[T], turn: int) -> list[T]:
    """The engines' order for one turn (a prompt, or a round): rotated by one each turn, so every engine
    runs in every place equally often and, with three or more, none runs twice in a row. With two this is
    ABBA. Reversing three (ABC CBA) let the outer two run twice in a row, warm from themselves, and never
    the middle one, which measured several % slower than in last place (the verify-width policy against
    the threshold on the demo pair, docs/benchmarks.md)."""
    shift = turn % len(engines)
    return engines[shift:] + engines[:shift]


def alternation(engines: int) -> str:
    """How ``run_order`` alternates ``engines`` engines, for the report."""
    if engines == 2:
        return "per prompt (ABBA)"
    names = "ABCDEFGH"[:engines]
    return "per prompt (rotated: " + " ".join(names[i:] + names[:i] for i in range(engines)) + ")"


def load_prompts(path: Path | None, demo: bool) -> list[str]:
    """Prompt texts: a file, else the demo pair's held-out set (in its domain), else built-in ones."""
    if path is None and demo:
        from sglang_ext import demo as demo_pkg

        held_out = getattr(demo_pkg, "heldout_prompts_path", None)
        if held_out is not None and held_out().is_file():
            path = held_out()
    if path is None:
        return list(DEFAULT_PROMPTS)
    if path.suffix != ".jsonl":
        return [line for line in path.read_text().splitlines() if line.strip()]
    texts = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            users = [m["content"] for m in row.get("messages", []) if m.get("role") == "user"]
            texts.append(users[0] if users else row["prompt"])
    return texts


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
    }


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "engine":
        print("usage: dflare bench engine [options]   (see `dflare bench engine --help`)", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv[1:])
    if args.rounds < 1:
        print("dflare bench: --rounds must be at least 1", file=sys.stderr)
        return 2
    if args.draft_blocks and not args.vs_threshold:
        print("dflare bench: --draft-blocks compares policies: use it with --vs-threshold", file=sys.stderr)
        return 2
    try:
        pair = load_pair(args)
    except (PairUnavailableError, OSError, ValueError) as exc:
        print(f"dflare bench: {exc}", file=sys.stderr)
        return 2
    if pair.drafter is None:
        print("dflare bench: a drafter is needed to compare against block size 1", file=sys.stderr)
        return 2
    texts = load_prompts(args.prompts, demo=args.target is None and not args.random)[: args.num_prompts]
    prompts = [encode_prompt(pair.tokenizer, t, chat=not args.raw) for t in texts]
    params = SamplingParams(
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=0,
        stop_token_ids=() if args.ignore_eos else eos_ids(pair.tokenizer),
    )
    engines = [("ar", SpeculativeEngine(pair.target, None, 1, max_batch=args.batch))]
    profile_s, threshold = 0.0, args.min_draft_confidence
    if args.vs_threshold:
        start = time.perf_counter()
        policy = build_engine(
            pair.target, pair.drafter, args.block_size, max_batch=args.batch, verify_policy=True
        )
        profile_s = time.perf_counter() - start  # engine start-up including the cost profile
        threshold = CPU_MIN_DRAFT_CONFIDENCE if threshold is None else threshold
        fixed = build_engine(
            pair.target, pair.drafter, args.block_size, max_batch=args.batch, min_draft_confidence=threshold
        )
        engines += [("policy", policy), ("threshold", fixed)]
        if args.draft_blocks:
            shorter = build_engine(
                pair.target,
                pair.drafter,
                args.block_size,
                max_batch=args.batch,
                verify_policy=True,
                draft_blocks=args.draft_blocks,
            )
            engines.append(("policy_draft", shorter))
    else:
        spec = build_engine(
            pair.target,
            pair.drafter,
            args.block_size,
            max_batch=args.batch,
            min_draft_confidence=args.min_draft_confidence,
            verify_policy=args.verify_policy,
        )
        engines.append(("speculative", spec))
    for label, engine in engines:  # first-call allocations out of the timing
        run_mode(engine, prompts[:1], params, f"warmup {label}")
    times: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in engines}
    outputs: dict[str, list[Result]] = {}
    verified: dict[str, int] = {}
    plain_steps: dict[str, int] = {}
    # batch 1: the modes alternate prompt by prompt (see run_order), since a shared machine's speed drifts
    # within seconds; with batching each mode decodes all prompts at once (rows join as others finish)
    chunks = [prompts[i : i + 1] for i in range(len(prompts))] if args.batch == 1 else [prompts]
    per_prompt = len(chunks) > 1
    for r in range(args.rounds):
        before = {label: (e.verified_drafts, e.plain_decode_steps) for label, e in engines}
        spent = {label: [0.0, 0.0] for label, _ in engines}
        results: dict[str, list[Result]] = {label: [] for label, _ in engines}
        bar = tqdm(
            chunks, desc=f"round {r + 1}/{args.rounds}", leave=False, file=sys.stderr, disable=not per_prompt
        )
        for c, chunk in enumerate(bar):
            for label, engine in run_order(engines, c + r):
                desc = f"{label} round {r + 1}/{args.rounds}"
                (wall, cpu), done = run_mode(engine, chunk, params, desc, progress=not per_prompt)
                spent[label][0] += wall
                spent[label][1] += cpu
                results[label] += done
        for label, engine in engines:  # of the last round, as the outputs
            verified[label] = engine.verified_drafts - before[label][0]
            plain_steps[label] = engine.plain_decode_steps - before[label][1]
            times[label].append((spent[label][0], spent[label][1]))
            outputs[label] = results[label]
    block_size = engines[1][1].block_size
    report = summarise(args, pair.description, block_size, times, outputs)
    report["alternation"] = alternation(len(engines)) if per_prompt else "per round"
    report["min_draft_confidence"] = args.min_draft_confidence
    for label, engine in engines[1:]:
        row = report["modes"][label]
        row["plain_decode_steps"] = plain_steps[label]
        if row["speculative"] and row["speculative"]["verify_steps"]:  # drafts checked per verify step
            row["verified_drafts_per_step"] = round(verified[label] / row["speculative"]["verify_steps"], 3)
        if engine.verify_policy is not None:
            row["verify_policy"] = {
                "cost_model": engine.verify_policy.cost.to_dict(),
                "calibration_error": round(engine.verify_policy.calibration.calibration_error(), 4),
                "confidence_error": round(engine.verify_policy.calibration.confidence_error(), 4),
            }
    if "speculative" in report["modes"]:
        report["verified_drafts_per_step"] = report["modes"]["speculative"].get("verified_drafts_per_step", 0)
    if args.vs_threshold:
        report["min_draft_confidence"] = threshold
        report["policy_start_s"] = round(profile_s, 3)
    report["drafter_kind"] = pair.drafter.config.kind
    print_table(report)
    out = args.out if args.out is not None else default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def summarise(
    args: argparse.Namespace,
    description: str,
    block_size: int,
    times: dict[str, list[tuple[float, float]]],
    outputs: dict[str, list[Result]],
) -> dict[str, Any]:
    """Per mode: tokens, median seconds (wall and CPU), rates, stats; speedups over AR; for
    ``--vs-threshold`` the policy's rate over the threshold's."""
    modes: dict[str, Any] = {}
    for label, results in outputs.items():
        tokens = sum(len(r.output_ids) for r in results)
        seconds = statistics.median(t[0] for t in times[label])
        cpu = statistics.median(t[1] for t in times[label])
        stats = total(r.stats for r in results if r.stats is not None)
        modes[label] = {
            "block_size": block_size if label != "ar" else 1,
            "output_tokens": tokens,
            "seconds": round(seconds, 4),
            "seconds_per_round": [round(t[0], 4) for t in times[label]],
            "tokens_per_s": round(tokens / seconds, 2),
            "cpu_seconds": round(cpu, 4),
            "tokens_per_cpu_s": round(tokens / cpu, 2),
            "speculative": stats.to_usage() if stats else None,
        }
    for label, row in modes.items():
        if label != "ar":
            row["speedup"] = round(row["tokens_per_s"] / modes["ar"]["tokens_per_s"], 3)
            row["speedup_cpu"] = round(row["tokens_per_cpu_s"] / modes["ar"]["tokens_per_cpu_s"], 3)
            row["tau"] = row["speculative"]["acceptance_length"] if row["speculative"] else 1.0
            row["identical_outputs"] = sum(
                a.output_ids == b.output_ids for a, b in zip(outputs["ar"], outputs[label], strict=True)
            )
    report: dict[str, Any] = {
        "pair": description,
        "prompts": len(outputs["ar"]),
        "max_tokens": args.max_tokens,
        "batch": args.batch,
        "temperature": args.temperature,
        "rounds": args.rounds,
        "machine": machine(),
        "modes": modes,
    }
    if "speculative" in modes:
        spec = modes["speculative"]
        # each round's ratio, from the same outputs (greedy and seeded: every round decodes the same tokens)
        per_round = [
            round((spec["output_tokens"] / s) / (modes["ar"]["output_tokens"] / a), 3)
            for (a, _), (s, _) in zip(times["ar"], times["speculative"], strict=True)
        ]
        report.update(
            speedup=spec["speedup"],
            speedup_per_round=per_round,
            speedup_spread=round(max(per_round) - min(per_round), 3) if len(per_round) > 1 else None,
            speedup_cpu=spec["speedup_cpu"],
            tau=spec["tau"],
            identical_outputs=spec["identical_outputs"],
        )
    if "policy" in modes:
        policy, fixed = modes["policy"], modes["threshold"]
        per_round = [
            round((fixed_s[0] / policy_s[0]), 3)
            for policy_s, fixed_s in zip(times["policy"], times["threshold"], strict=True)
        ]
        report["policy_vs_threshold"] = {
            "tokens_per_s": round(policy["tokens_per_s"] / fixed["tokens_per_s"], 3),
            "tokens_per_cpu_s": round(policy["tokens_per_cpu_s"] / fixed["tokens_per_cpu_s"], 3),
            "per_round": per_round,  # threshold seconds / policy seconds, same tokens when greedy
        }
    if "policy_draft" in modes:
        shorter = modes["policy_draft"]
        report["draft_blocks"] = args.draft_blocks
        report["policy_draft_vs_policy"] = {
            "tokens_per_s": round(shorter["tokens_per_s"] / policy["tokens_per_s"], 3),
            "per_round": [
                round(p[0] / d[0], 3) for p, d in zip(times["policy"], times["policy_draft"], strict=True)
            ],
        }
    return report


def print_table(report: dict[str, Any]) -> None:
    m = report["modes"]
    print(
        f"pair: {report['pair']}; {report['prompts']} prompts, max_tokens {report['max_tokens']}, "
        f"batch {report['batch']}, temperature {report['temperature']}, "
        f"{report['machine']['torch_threads']} torch threads"
    )
    print(
        f"{'mode':<12} {'block':>5} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'tok/cpu-s':>9} {'tau':>6} "
        f"{'x AR':>6} {'drafts/step':>11} {'plain steps':>11}"
    )
    for label, row in m.items():
        tau = row["speculative"]["acceptance_length"] if row["speculative"] else 1.0
        print(
            f"{label:<12} {row['block_size']:>5} {row['output_tokens']:>7} {row['seconds']:>8.2f} "
            f"{row['tokens_per_s']:>8.1f} {row['tokens_per_cpu_s']:>9.1f} {tau:>6.2f} "
            f"{row.get('speedup', 1.0):>6.2f} {row.get('verified_drafts_per_step', 0):>11.2f} "
            f"{row.get('plain_decode_steps', 0):>11}"
        )
    if "speedup" in report:
        print(
            f"speedup (tok/s speculative / AR): {report['speedup']:.2f}x wall, "
            f"{report['speedup_cpu']:.2f}x CPU; tau {report['tau']:.2f}; "
            f"verified drafts/step {report.get('verified_drafts_per_step', 0):.2f}; "
            f"identical outputs {report['identical_outputs']}/{report['prompts']}"
        )
    if "policy_vs_threshold" in report:
        cmp = report["policy_vs_threshold"]
        print(
            f"policy / threshold {report['min_draft_confidence']}: {cmp['tokens_per_s']:.3f}x wall, "
            f"{cmp['tokens_per_cpu_s']:.3f}x CPU (per round {cmp['per_round']}); "
            f"identical outputs {m['policy']['identical_outputs']}/{report['prompts']} policy, "
            f"{m['threshold']['identical_outputs']}/{report['prompts']} threshold"
        )
    if "policy_draft_vs_policy" in report:
        cmp = report["policy_draft_vs_policy"]
        print(
            f"policy drafting blocks {report['draft_blocks']} too / policy: {cmp['tokens_per_s']:.3f}x "
            f"(per round {cmp['per_round']}); identical outputs "
            f"{m['policy_draft']['identical_outputs']}/{report['prompts']}"
        )
    if "speedup_per_round" in report:
        per_round = report["speedup_per_round"]
        if len(per_round) > 1:
            spread = ", ".join(f"{r:.2f}x" for r in per_round)
            spread_x = report["speedup_spread"]
            print(f"noise: ratio per round {spread} (spread {spread_x:.2f}x); median reported")
        else:
            print(
                "noise: not measured with one round (on a shared machine one round's ratio can differ "
                f"several-fold between runs); use --rounds {DEFAULT_ROUNDS} or more"
            )


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["modes"]
    kind = {"dflare": "DFlare", "dflash": "DFlash"}.get(report.get("drafter_kind", ""), "speculative")
    names = {
        "ar": "AR (block 1)",
        "speculative": f"{kind} (block {report['modes'].get('speculative', {}).get('block_size')})",
        "policy": f"{kind}, verify-width policy",
        "threshold": f"{kind}, threshold {report.get('min_draft_confidence')}",
        "policy_draft": f"{kind}, policy + blocks {report.get('draft_blocks')}",
    }
    labels = [names[label] for label in m]
    values = [row["tokens_per_s"] for row in m.values()]
    colors = {"ar": "#888888", "speculative": "#e4572e", "policy": "#e4572e", "threshold": "#4c72b0"}
    colors["policy_draft"] = "#55a868"
    fig, ax = plt.subplots(figsize=(5 + 1.2 * (len(m) - 2), 3.5))
    ax.bar(labels, values, color=[colors[label] for label in m])
    ax.set_ylabel("output tokens / s")
    if "policy_vs_threshold" in report:
        cmp = report["policy_vs_threshold"]["tokens_per_s"]
        vs = f"{m['policy']['speedup']:.2f} vs {m['threshold']['speedup']:.2f}"
        title = f"policy / threshold {cmp:.3f}x; x AR {vs}"
        if "policy_draft_vs_policy" in report:
            shorter = report["policy_draft_vs_policy"]["tokens_per_s"]
            title += f"; + blocks {report['draft_blocks']} / policy {shorter:.3f}x"
    else:
        title = f"{report['speedup']:.2f}x, tau {report['tau']:.2f}"
    ax.set_title(f"{title} (batch {report['batch']})", fontsize=9)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
