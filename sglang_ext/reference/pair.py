"""Where the CLI's target + drafter come from: checkpoint directories, the bundled demo pair, or a tiny
random pair (``--random``: runs anywhere, acceptance ~ 0, useful to check the plumbing)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sglang_ext.dflare.checkpoint import load_drafter
from sglang_ext.dflare.model import DFlareDrafter
from sglang_ext.reference.loader import load_target, load_tokenizer, resolve_dtype


class PairUnavailableError(RuntimeError):
    """No model was given and the bundled demo pair is not installed."""


@dataclass
class Pair:
    target: torch.nn.Module
    drafter: DFlareDrafter | None
    tokenizer: Any
    description: str


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: lets the random pair take and print text."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], **_: Any) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models (default: the bundled demo pair)")
    g.add_argument("--target", type=Path, help="Hugging Face causal-LM directory")
    g.add_argument("--drafter", type=Path, help="drafter checkpoint directory (any dialect)")
    g.add_argument("--kind", choices=["dflare", "dflash"], default="dflare", help="demo/random drafter kind")
    g.add_argument("--random", action="store_true", help="tiny random Qwen3 target + drafter (no files)")
    g.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16, float64")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")


def add_min_draft_confidence_argument(parser: argparse.ArgumentParser) -> None:
    """``--verify-policy``/``--no-verify-policy`` and ``--min-draft-confidence`` of the reference CLIs
    (generate, bench, engine server): how many of each row's drafts the target verifies. Neither given:
    the verify-width policy on CPU, the whole block elsewhere."""
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--verify-policy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="choose each step's widths (or a plain decode step) with the verify-width policy: the most "
        "expected tokens per ms from a cost profile measured at start and corrected by the engine's own "
        "steps, and an acceptance calibration learnt online (default on CPU); --no-verify-policy: the fixed "
        "threshold 0.02 instead",
    )
    how.add_argument(
        "--min-draft-confidence",
        type=float,
        default=None,
        help="a fixed adaptive draft length instead of the policy: verify drafts while the drafter's belief "
        "that all so far are right stays at or above this (0 = the whole block; 0.02 = the CPU threshold)",
    )


def _demo_dirs(kind: str) -> tuple[Path, Path]:
    try:
        from sglang_ext import demo
    except ImportError as exc:
        raise PairUnavailableError(
            "the bundled demo pair (sglang_ext.demo) is not installed in this build; pass "
            "--target DIR [--drafter DIR], or --random for a tiny random pair"
        ) from exc
    if not hasattr(demo, "target_path") or not hasattr(demo, "drafter_path"):
        raise PairUnavailableError(
            "sglang_ext.demo has no target_path/drafter_path yet; pass --target DIR or --random"
        )
    return Path(demo.target_path()), Path(demo.drafter_path(kind))


def load_pair(args: argparse.Namespace) -> Pair:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, args.device)
    if args.random:
        from sglang_ext.reference.tiny import tiny_drafter, tiny_target

        target = tiny_target(vocab_size=257, hidden_size=64, num_layers=4, dtype=dtype).to(args.device)
        drafter = tiny_drafter(target, kind=args.kind, block_size=8).to(args.device)
        return Pair(target, drafter, ByteTokenizer(), f"random tiny Qwen3 + random {args.kind} drafter")
    target_dir, drafter_dir = args.target, args.drafter
    if target_dir is None:
        if drafter_dir is not None:
            raise PairUnavailableError("--drafter needs --target")
        target_dir, drafter_dir = _demo_dirs(args.kind)
    target = load_target(target_dir, dtype, args.device)
    drafter = load_drafter(drafter_dir, dtype=dtype, device=args.device) if drafter_dir else None
    tokenizer = load_tokenizer(target_dir)
    vocab = drafter.draft_vocab if drafter is not None else None
    subset = f" (drafting over {vocab.size} of {vocab.target_vocab_size} tokens)" if vocab is not None else ""
    return Pair(target, drafter, tokenizer, f"{target_dir} + {drafter_dir or 'no drafter'}{subset}")


def encode_prompt(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """Token ids of a prompt; with ``chat`` the tokenizer's chat template (non-thinking) wraps it."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=True,
            tokenize=True,
            enable_thinking=False,
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer.encode(text))


def eos_ids(tokenizer: Any) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return () if eos is None else (int(eos),)
