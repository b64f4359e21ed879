"""The committed held-out prompts are disjoint from training, and the corpus build is deterministic."""

from __future__ import annotations

import gzip
import json
import sys
import sysconfig
from pathlib import Path

import pytest

from sglang_ext.demo import heldout_prompts_path
from sglang_ext.training.corpus import build_corpus, is_heldout, load_chats, text_hash

CORPUS = heldout_prompts_path().parent


def _train_hashes() -> tuple[set[str], set[str]]:
    lines = gzip.decompress((CORPUS / "train_hashes.txt.gz").read_bytes()).decode().split()
    return set(lines[0::2]), set(lines[1::2])


def test_heldout_shares_no_prompt_or_response_with_training() -> None:
    prompts, responses = _train_hashes()
    manifest = json.loads((CORPUS / "manifest.json").read_text())
    heldout = load_chats(heldout_prompts_path())
    assert len(prompts) == manifest["train_samples"] > 40_000
    assert len(heldout) == manifest["heldout_samples"] > 300
    for record in heldout:
        prompt, response = (m["content"] for m in record["messages"])
        assert record["id"] == text_hash(prompt)
        assert is_heldout(record["id"])
        assert text_hash(prompt) not in prompts
        assert text_hash(response) not in responses
    assert not any(is_heldout(h) for h in prompts)  # the split rule put every training prompt in train


@pytest.mark.skipif(
    ".".join(map(str, sys.version_info[:3])) != json.loads((CORPUS / "manifest.json").read_text())["python"],
    reason="the corpus is a function of the stdlib of the Python version that built it",
)
def test_rebuilding_the_corpus_gives_the_committed_samples() -> None:
    train, heldout = build_corpus(Path(sysconfig.get_paths()["stdlib"]), limit=3000)
    prompts, responses = _train_hashes()
    committed_heldout = {r["id"] for r in load_chats(heldout_prompts_path())}
    assert len(train) > 2500
    assert {s.prompt_hash for s in train} <= prompts
    assert {s.response_hash for s in train} <= responses
    assert {s.prompt_hash for s in heldout} <= committed_heldout
