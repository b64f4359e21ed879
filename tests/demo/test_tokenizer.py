"""The shipped tokenizer: BPE of >= 1024 tokens, chat special tokens, a reserved mask token, and the chat
template stored in tokenizer_config.json and applied by transformers."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from sglang_ext.demo import drafter_path, target_path
from sglang_ext.training.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS


def test_tokenizer_files_and_special_tokens() -> None:
    raw = json.loads((target_path() / "tokenizer.json").read_text())
    config = json.loads((target_path() / "tokenizer_config.json").read_text())
    assert raw["model"]["type"] == "BPE"
    assert config["chat_template"] == CHAT_TEMPLATE
    tok = AutoTokenizer.from_pretrained(str(target_path()))
    assert len(tok) >= 1024
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == [0, 1, 2, 3]
    assert tok.eos_token == "<|im_end|>" and tok.mask_token == "<|MASK|>"
    mask_id = json.loads((drafter_path("dflare") / "config.json").read_text())["dflash_config"][
        "mask_token_id"
    ]
    assert mask_id == tok.mask_token_id


def test_transformers_applies_the_chat_template() -> None:
    tok = AutoTokenizer.from_pretrained(str(target_path()))
    messages = [{"role": "user", "content": "def f(x):\n    return x"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\ndef f(x):\n    return x<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == text
