"""``dflare generate``: one prompt through the reference engine; prints the text and speculation stats."""

from __future__ import annotations

import argparse
import sys
import time

from sglang_ext.reference.engine import Request
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dflare generate", description=__doc__.splitlines()[0])
    p.add_argument(
        "prompt",
        nargs="?",
        default=None,
        help="default: the demo pair's first held-out prompt (its domain: Python code)",
    )
    add_pair_arguments(p)
    p.add_argument("--block-size", type=int, default=None, help="default: the drafter's; 1 = plain decoding")
    add_min_draft_confidence_argument(p)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--no-stream", action="store_true", help="print the text only at the end")
    return p


def default_prompt(args: argparse.Namespace) -> str:
    """The demo pair's first held-out prompt (in the domain it was trained on), else a generic one."""
    if args.target is None and not args.random:
        from sglang_ext.reference.bench import load_prompts

        return load_prompts(None, demo=True)[0]
    return "Explain speculative decoding in one paragraph."


def generate_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        pair = load_pair(args)
    except (PairUnavailableError, OSError, ValueError) as exc:
        print(f"dflare generate: {exc}", file=sys.stderr)
        return 2
    tok = pair.tokenizer
    if tok is None:
        print("dflare generate: the target has no tokenizer; cannot encode a text prompt", file=sys.stderr)
        return 2
    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_tokens=args.max_tokens,
            seed=args.seed,
            stop_token_ids=eos_ids(tok),
            stop=tuple(args.stop),
        )
        engine = build_engine(
            pair.target,
            pair.drafter,
            args.block_size,
            tokenizer=tok,
            max_batch=1,
            min_draft_confidence=args.min_draft_confidence,
            verify_policy=args.verify_policy,
        )
        prompt_ids = encode_prompt(tok, args.prompt or default_prompt(args), chat=not args.raw)
    except ValueError as exc:
        print(f"dflare generate: {exc}", file=sys.stderr)
        return 2
    streamed: list[int] = []
    printed = 0

    def on_tokens(ids: list[int]) -> None:
        nonlocal printed
        streamed.extend(ids)
        text = tok.decode(streamed)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)

    print(f"# {pair.description}, block size {engine.block_size}", file=sys.stderr)
    engine.add_request(Request("cli", prompt_ids, params, None if args.no_stream else on_tokens))
    start = time.perf_counter()
    results = []
    while engine.has_work():
        results += engine.step()
    elapsed = time.perf_counter() - start
    res = results[0]
    text = res.text if res.text is not None else tok.decode(res.output_ids)
    if args.no_stream:
        sys.stdout.write(text)
    elif len(text) < printed:  # a stop string was cut after being streamed
        sys.stdout.write(f"\n[cut at stop string: {text[-40:]!r}]")
    sys.stdout.write("\n")
    n = len(res.output_ids)
    print(f"--- {n} tokens in {elapsed:.2f} s ({n / elapsed:.1f} tok/s), finish_reason={res.finish_reason}")
    if res.stats is None:
        print("speculation: off (block size 1)")
    else:
        s = res.stats
        print(
            f"speculation: block size {s.block_size}, verify steps {s.verify_steps}, acceptance length "
            f"tau {s.acceptance_length:.3f}, acceptance rate {s.acceptance_rate:.3f}, "
            f"accepted {s.accepted_tokens}/{s.draft_tokens} drafts, histogram {s.histogram}"
        )
    return 0
