"""`dflare train-tokenizer`: the demo pair's byte-level BPE tokenizer, trained on the corpus.

A chat model needs more than merges: the ChatML special tokens the template writes, an end-of-text
token for padding, and a reserved ``<|MASK|>`` whose embedding the drafter uses for the block slots it
has to fill (DFlash/DFlare feed ``[last token, MASK x (B-1)]``). The chat template is stored in
``tokenizer_config.json`` so `transformers` and SGLang render prompts identically.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sglang_ext.training.corpus import load_chats

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
MASK = "<|MASK|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, MASK)  # ids 0..3 in this order

# ChatML without a default system prompt or thinking blocks (the demo target is a non-thinking model).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _texts(corpus: Path) -> Iterator[str]:
    for record in load_chats(corpus):
        for message in record["messages"]:
            yield message["content"]


def train_bpe(corpus: Path, vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation, so every byte string is encodable)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(_texts(corpus), trainer=trainer)
    return tok


def save_hf_tokenizer(tok: Tokenizer, out: Path, model_max_length: int) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (with the chat template) for transformers."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        mask_token=MASK,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    # In tokenizer_config.json (not a separate chat_template.jinja) so older readers find it too.
    hf.save_pretrained(str(out), save_jinja_files=False)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dflare train-tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="train.jsonl from build-corpus")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--model-max-length", type=int, default=2048)
    args = parser.parse_args(argv)
    if args.vocab_size < 1024:
        parser.error("--vocab-size must be >= 1024")
    tok = train_bpe(args.corpus, args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    save_hf_tokenizer(tok, args.out, args.model_max_length)
    summary = {"vocab_size": tok.get_vocab_size(), "special": {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}}
    print(json.dumps(summary))
    return 0
