"""Record an acceptance trace from a real target/drafter pair through the reference engine.

The engine verifies the WHOLE block at every step (``min_draft_confidence=0``), so each recorded accept
count is what the target accepts of all ``B - 1`` drafts, and a replay can cut any shorter window from it.
The drafter always drafts greedily (its argmax); at temperature > 0 the target accepts a draft iff its own
sample equals it, the engine's exact rejection sampling, and the recorded confidence is still the
drafter's top-1 probability, i.e. of that greedy draft. Steps come from the engine's ``step_observer``
hook, so they are exactly the steps its :class:`~sglang_ext.stats.SpecStats` counts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sglang_ext.reference.engine import Request, Result, SpeculativeEngine, VerifyObservation
from sglang_ext.reference.sampling import SamplingParams
from sglang_ext.traces.format import AcceptanceTrace, TraceStep


def record_trace(
    target: torch.nn.Module,
    drafter: Any,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    *,
    block_size: int | None = None,
    batch: int = 8,
    source: str = "demo",
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[AcceptanceTrace, list[Result]]:
    """Decode ``prompts`` (request ``i`` with ``params[i]``) in a continuous batch of ``batch`` rows and
    return the trace (requests in prompt order) with the engine's results (their ``stats`` count the same
    steps). All requests must share one temperature: a trace has one."""
    temperatures = {p.temperature for p in params}
    if len(temperatures) != 1:
        raise ValueError(f"one temperature per trace, got {sorted(temperatures)}")
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    steps: dict[str, list[TraceStep]] = {}

    def observe(obs: VerifyObservation) -> None:
        rows = obs.confidences.tolist()
        for rid, conf, accepted, verified in zip(
            obs.request_ids, rows, obs.accepted, obs.verified, strict=True
        ):
            if verified != len(conf):
                raise RuntimeError(f"request {rid}: {verified} of {len(conf)} drafts verified, not the block")
            steps[rid].append(TraceStep(accepted, tuple(conf)))

    engine = SpeculativeEngine(
        target, drafter, block_size, max_batch=batch, min_draft_confidence=0.0, step_observer=observe
    )
    if engine.block_size < 2:
        raise ValueError("a trace needs speculation: block size >= 2 and a drafter")
    ids = [f"trace-{i}" for i in range(len(prompts))]
    for rid, prompt, p in zip(ids, prompts, params, strict=True):
        steps[rid] = []
        engine.add_request(Request(rid, list(prompt), p))
    done: dict[str, Result] = {}
    with tqdm(total=len(ids), desc=f"recording T={params[0].temperature:g}", disable=not progress) as bar:
        while engine.has_work():
            for res in engine.step():
                done[res.request_id] = res
                bar.update(1)
    trace = AcceptanceTrace(
        source=source,
        block_size=engine.block_size,
        temperature=params[0].temperature,
        requests=[steps[rid] for rid in ids],
        meta=dict(meta or {}),
    )
    return trace, [done[rid] for rid in ids]


# ---- CLI: dflare trace record ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sglang_ext.reference.pair import add_pair_arguments

    add_pair_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="trace file (.json or .json.gz)")
    parser.add_argument("--prompts", type=Path, default=None, help="held-out JSONL (default: the demo's)")
    parser.add_argument("--first-prompt", type=int, default=0, help="index of the first held-out prompt")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="request i samples with seed + i")
    parser.add_argument("--block-size", type=int, default=None, help="default: the drafter's")
    parser.add_argument("--batch", type=int, default=8, help="continuous-batch rows")
    parser.add_argument(
        "--source",
        default=None,
        help='label (default: "demo" for the bundled pair, "random", else "recorded")',
    )


def _prompt_ids(args: argparse.Namespace, tokenizer: Any) -> tuple[list[list[int]], str]:
    """Held-out prompts ``first .. first + num - 1``: chat-templated as ``dflare eval`` builds them when
    the tokenizer has a template, else the first user message's raw tokens (the random pair's bytes)."""
    from sglang_ext import demo

    path = args.prompts or demo.heldout_prompts_path()
    lo, hi = args.first_prompt, args.first_prompt + args.num_prompts
    if getattr(tokenizer, "chat_template", None):
        from sglang_ext.training.evaluate import load_prompts

        prompts = load_prompts(path, tokenizer, hi)[lo:hi]
    else:
        from sglang_ext.reference.bench import load_prompts as load_texts

        prompts = [list(tokenizer.encode(text)) for text in load_texts(path, demo=False)[lo:hi]]
    if len(prompts) < args.num_prompts:
        raise ValueError(f"{path} has {len(prompts)} prompts from index {lo}, asked for {args.num_prompts}")
    return prompts, str(path)


def _pair_name(args: argparse.Namespace, description: str) -> str:
    """The bundled pair by name and build (not by this machine's install path), any other as loaded."""
    if args.target is not None or args.random:
        return description
    import json

    from sglang_ext import demo

    build = json.loads((demo.demo_dir() / "build_report.json").read_text()).get("preset", "unknown build")
    return f"bundled demo pair ({build}): target + {args.kind} drafter"


def main(args: argparse.Namespace) -> int:
    from sglang_ext.reference.pair import PairUnavailableError, eos_ids, load_pair

    try:
        pair = load_pair(args)
        if pair.drafter is None or pair.tokenizer is None:
            raise ValueError("recording needs a drafter and a target with a tokenizer")
        prompts, prompts_path = _prompt_ids(args, pair.tokenizer)
        eos = eos_ids(pair.tokenizer)
        params = [
            SamplingParams(
                temperature=args.temperature,
                max_tokens=args.max_tokens,
                seed=args.seed + i,
                stop_token_ids=eos,
            )
            for i in range(len(prompts))
        ]
    except (PairUnavailableError, OSError, ValueError) as exc:
        print(f"dflare trace record: {exc}", file=sys.stderr)
        return 2
    meta = {
        "pair": _pair_name(args, pair.description),
        "prompts_file": Path(prompts_path).name,
        "prompt_indices": [args.first_prompt, args.first_prompt + len(prompts) - 1],
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "batch": args.batch,
        "recorder": "reference engine, whole block verified (min_draft_confidence=0)",
    }
    trace, results = record_trace(
        pair.target,
        pair.drafter,
        prompts,
        params,
        block_size=args.block_size,
        batch=args.batch,
        source=args.source or ("random" if args.random else "recorded" if args.target else "demo"),
        meta=meta,
    )
    trace.meta["generated_tokens"] = sum(len(r.output_ids) for r in results)
    trace.save(args.out)
    accepted = sum(s.accepted for steps in trace.requests for s in steps)
    tau = 1 + accepted / max(1, trace.num_steps)
    print(
        f"{args.out}: {len(trace.requests)} requests, {trace.num_steps} verify steps, block "
        f"{trace.block_size}, T={trace.temperature:g}, tau {tau:.3f}"
    )
    return 0
