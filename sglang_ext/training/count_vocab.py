"""`dflare draft-vocab`: count the tokens a target writes in a chat corpus and keep the most frequent as
the drafter's draft vocabulary (``draft_vocab.json`` in its checkpoint directory; see
``sglang_ext.dflare.draft_vocab`` for what it buys and costs).

What is counted is what the target produces: the assistant turns of ``{"messages": [...]}`` records (the
chat corpus format of ``dflare build-corpus`` and of OpenAI fine-tuning files), or the ``text`` /
``completion`` field of other records. Traffic like the one served gives the best subset. The coverage
printed is the share of counted tokens the subset holds, and the share a subset counted without every tenth
text holds of those texts: what to expect on text the count never saw.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sglang_ext.dflare.draft_vocab import DraftVocab, DraftVocabError, count_tokens

DEFAULT_SIZE = 32768  # near the 32,000 draft tokens of EAGLE-3 drafters for 128k-152k-token targets


def outputs(record: dict[str, Any]) -> list[str]:
    """The texts of a corpus record that the target would write."""
    messages = record.get("messages")
    if isinstance(messages, list):
        return [
            m["content"]
            for m in messages
            if m.get("role") == "assistant" and isinstance(m.get("content"), str)
        ]
    return [record[k] for k in ("completion", "text") if isinstance(record.get(k), str)]


def read_texts(paths: Iterable[Path]) -> Iterator[str]:
    for path in paths:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield from outputs(json.loads(line))
                except (json.JSONDecodeError, AttributeError, KeyError) as exc:
                    raise DraftVocabError(f"{path}:{number}: not a corpus record ({exc})") from exc


def end_ids(target_dir: Path) -> set[int]:
    """End-of-sequence ids of a target (config.json and generation_config.json): always draftable."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = target_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return {int(i) for i in ids}


HELD_OUT_EVERY = 10  # every tenth text checks a vocabulary counted without it


def build(target_dir: Path, data: list[Path], size: int) -> tuple[DraftVocab, float | None]:
    """The ``size`` tokens the target writes most often in ``data``, its end ids among them; and the coverage
    that a vocabulary counted without every tenth text had on those texts: what to expect on text the count
    never saw, which the vocabulary's own coverage (of the text it was counted from) overstates. None with
    fewer than ten texts."""
    from sglang_ext.reference.loader import load_tokenizer

    tokenizer = load_tokenizer(target_dir)
    if tokenizer is None:
        raise DraftVocabError(f"{target_dir} has no tokenizer: counting needs one")
    vocab_size = int(json.loads((target_dir / "config.json").read_text())["vocab_size"])
    kept, held = torch.zeros(vocab_size, dtype=torch.int64), torch.zeros(vocab_size, dtype=torch.int64)
    for i, text in enumerate(tqdm(read_texts(data), desc="counting", unit=" texts", mininterval=2.0)):
        tokens = [tokenizer(text, add_special_tokens=False)["input_ids"]]
        count_tokens(tokens, vocab_size, into=held if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else kept)
    counts = kept + held
    if int(counts.sum()) == 0:
        raise DraftVocabError(f"no target output found in {[str(p) for p in data]}")
    size, ends = min(size, vocab_size), end_ids(target_dir)
    held_out = None
    if int(held.sum()) > 0 and int(kept.sum()) > 0:
        without = DraftVocab.from_counts(kept, size, ends)
        held_out = float(held[without.ids].sum()) / float(held.sum())
    return DraftVocab.from_counts(counts, size, ends), held_out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dflare draft-vocab", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=Path, default=None, help="HF target directory (default: the demo target)")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="JSONL corpus files to count")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"tokens to keep (default {DEFAULT_SIZE})")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--drafter", type=Path, help="drafter checkpoint directory to write draft_vocab.json into"
    )
    where.add_argument("--out", type=Path, help="a file instead (e.g. for a ConfigMap: DFLARE_DRAFT_VOCAB)")
    args = p.parse_args(argv)
    if args.target is None:
        from sglang_ext import demo

        args.target = demo.target_path()
    if args.drafter is not None and not (args.drafter / "config.json").is_file():
        print(
            f"dflare draft-vocab: {args.drafter} is not a drafter checkpoint (no config.json)",
            file=sys.stderr,
        )
        return 2
    try:
        vocab, held_out = build(args.target, args.data, args.size)
    except (DraftVocabError, OSError) as exc:
        print(f"dflare draft-vocab: {exc}", file=sys.stderr)
        return 2
    path = vocab.save(args.drafter) if args.drafter is not None else vocab.write(args.out)
    unseen = "" if held_out is None else f"; counted without every tenth text, {held_out:.2%} of those texts"
    print(
        f"{path}: {vocab.size} of {vocab.target_vocab_size} tokens, covering {vocab.coverage:.2%} of the "
        f"counted output{unseen}"
    )
    return 0
