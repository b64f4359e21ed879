"""A tiny random target + DFlare drafter + byte-level BPE tokenizer with a ChatML template, on disk.

Random weights decode nonsense but exercise every path of the gateway and engine-server exactly as
the demo pair does (same directory layout, same loader), in well under a second per request on CPU.
A fully random drafter almost never matches, so the target is nudged towards one token (" the"): a
small shared offset on embedding dim 0 and the same weight on that token's logit row. The target then
repeats it, and the random drafter, which borrows the target's embeddings and head, agrees at some
draft positions and not others: acceptance histograms with several non-zero bins.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding drafts a block of tokens and the target verifies them in one forward.",
    "def add(a, b):\n    return a + b\n",
    "User: what is two plus two? Assistant: two plus two is four.",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MAX_CONTEXT = 128
BLOCK_SIZE = 4
NUDGE = 0.4
FAVOURED = "Ġthe"


def build_tokenizer(out: Path, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def build_pair(root: Path, favoured: str = FAVOURED) -> tuple[Path, Path]:
    """Write ``root/target`` (HF Qwen3 + tokenizer) and ``root/drafter``; return both paths. The target
    leans towards the token ``favoured`` (its end-of-turn token makes it answer nothing but that)."""
    import torch

    from sglang_ext.dflare.checkpoint import save_drafter
    from sglang_ext.reference.tiny import tiny_drafter, tiny_target

    target_dir, drafter_dir = root / "target", root / "drafter"
    tokenizer = build_tokenizer(target_dir)
    vocab = len(tokenizer) + 1  # the last id is the drafter's mask token, never a real token
    target = tiny_target(
        vocab_size=vocab,
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        seed=0,
        dtype=torch.float32,
        max_position_embeddings=MAX_CONTEXT,
    )
    with torch.no_grad():
        target.model.embed_tokens.weight[:, 0] += NUDGE
        target.lm_head.weight[tokenizer.convert_tokens_to_ids(favoured), 0] += NUDGE
    target.save_pretrained(target_dir)
    (target_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer.eos_token_id}))
    save_drafter(tiny_drafter(target, "dflare", block_size=BLOCK_SIZE), drafter_dir)
    return target_dir, drafter_dir
