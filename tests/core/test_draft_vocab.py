"""Draft vocabularies: how they are chosen, stored and read back, and that drafting over one keeps decoding
exact (greedy and sampled) while drafting only the tokens it holds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sglang_ext import demo
from sglang_ext.dflare.checkpoint import load_drafter
from sglang_ext.dflare.draft_vocab import FILE, DraftVocab, DraftVocabError, count_tokens
from sglang_ext.reference.engine import SpeculativeEngine
from sglang_ext.reference.loader import load_target, load_tokenizer
from sglang_ext.reference.sampling import SamplingParams
from sglang_ext.reference.tiny import tiny_drafter
from sglang_ext.training.corpus import load_chats
from sglang_ext.training.data import render_prompt

from .distribution import VOCAB, chi_square_pvalue, expected_joint, sample_counts, small_target


def test_from_counts_keeps_the_most_counted_ids_sorted_with_ties_to_the_lower_id() -> None:
    counts = torch.tensor([5, 0, 9, 5, 1, 5, 0, 2])
    vocab = DraftVocab.from_counts(counts, 3)
    assert vocab.ids.tolist() == [0, 2, 3]  # 9, then the first two of the three 5s
    assert vocab.coverage == pytest.approx(19 / 27)
    forced = DraftVocab.from_counts(counts, 3, always=[6])  # an end id nobody counted still gets in
    assert forced.ids.tolist() == [0, 2, 6]
    assert DraftVocab.from_counts(counts, 8).coverage == 1.0
    for size in (0, 9):
        with pytest.raises(DraftVocabError, match="size"):
            DraftVocab.from_counts(counts, size)
    with pytest.raises(DraftVocabError, match="forced"):
        DraftVocab.from_counts(counts, 1, always=[1, 6])


def test_bad_ids_are_refused() -> None:
    for ids in ([3, 1], [1, 1], [0, 8], [-1, 2], []):
        with pytest.raises(DraftVocabError):
            DraftVocab(torch.tensor(ids, dtype=torch.int64), 8)


def test_save_load_round_trip_and_a_file_of_another_kind(tmp_path: Path) -> None:
    assert DraftVocab.load(tmp_path) is None  # no file: the whole vocabulary
    vocab = DraftVocab.from_counts(torch.tensor([3, 0, 2, 7]), 2)
    vocab.save(tmp_path)
    back = DraftVocab.load(tmp_path)
    assert back is not None and back.ids.tolist() == [0, 3] and back.target_vocab_size == 4
    assert back.coverage == vocab.coverage
    with pytest.raises(DraftVocabError, match="no draft vocabulary file"):  # named by configuration
        DraftVocab.read(tmp_path / "elsewhere.json")
    (tmp_path / FILE).write_text(json.dumps({"format": "other", "ids": [1]}))
    with pytest.raises(DraftVocabError, match="format"):
        DraftVocab.load(tmp_path)
    (tmp_path / FILE).write_text("{not json")
    with pytest.raises(DraftVocabError, match="not a draft vocabulary"):
        DraftVocab.load(tmp_path)


def test_head_rows_and_tensor_parallel_shards() -> None:
    vocab = DraftVocab(torch.tensor([1, 4, 5, 9]), 10)
    weight = torch.arange(40.0).view(10, 4)
    assert torch.equal(vocab.head(weight), weight[[1, 4, 5, 9]])
    with pytest.raises(DraftVocabError, match="rows"):
        vocab.head(weight[:9])
    rows, ids = vocab.shard(4, 4)  # ranks own contiguous shards: [4, 8) holds 4 and 5
    assert rows.tolist() == [0, 1] and ids.tolist() == [4, 5]
    rows, ids = vocab.shard(6, 2)  # a shard with none of the subset keeps its first token
    assert rows.tolist() == [0] and ids.tolist() == [6]


def test_count_tokens() -> None:
    assert count_tokens([[1, 1, 3], [], [0]], 5).tolist() == [1, 2, 0, 1, 0]
    running = torch.tensor([0, 0, 0, 0, 7])
    assert count_tokens([[4, 0]], 5, into=running) is running and running.tolist() == [1, 0, 0, 0, 8]
    with pytest.raises(DraftVocabError, match="outside"):
        count_tokens([[5]], 5)


class RecordingEngine(SpeculativeEngine):
    """The engine, keeping every block of drafts it proposed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drafted: list[torch.Tensor] = []

    def _propose(self, rows: int) -> tuple[torch.Tensor, list[int]]:
        drafts, lengths = super()._propose(rows)
        self.drafted.append(drafts.clone())
        return drafts, lengths


def test_sampling_with_a_draft_vocabulary_follows_the_target_distribution() -> None:
    """Half the tokens out of the drafter's reach: the samples still follow the target's distribution, the
    drafts that remain are accepted, and none lies outside the subset."""
    model = small_target()
    drafter = tiny_drafter(model, block_size=4, seed=3)
    drafter.draft_vocab = DraftVocab(torch.tensor([0, 2, 3, 5]), VOCAB)
    engine = RecordingEngine(model, drafter, 4, max_batch=64)
    params = SamplingParams(temperature=0.8, top_k=5)
    counts, results = sample_counts(engine, params)
    assert chi_square_pvalue(counts, expected_joint(params)) > 1e-3
    assert sum(r.stats.accepted_tokens for r in results) > 50
    assert set(torch.cat([d.flatten() for d in engine.drafted]).tolist()) <= {0, 2, 3, 5}
    assert chi_square_pvalue(counts, expected_joint(SamplingParams(temperature=1.6))) < 1e-6


def test_a_draft_vocabulary_made_for_another_target_is_refused() -> None:
    model = small_target()
    drafter = tiny_drafter(model, block_size=4, seed=3)
    drafter.draft_vocab = DraftVocab(torch.tensor([0, 2]), VOCAB + 1)
    with pytest.raises(ValueError, match="draft vocabulary made for a 9-token target"):
        SpeculativeEngine(model, drafter, 4)


@pytest.fixture(scope="module")
def demo_run():
    """The demo pair on four held-out prompts, and a decode of them (greedy) with a given draft vocab."""
    torch.set_num_threads(2)
    target = load_target(demo.target_path(), torch.float32)
    tok = load_tokenizer(demo.target_path())
    records = load_chats(demo.heldout_prompts_path())[:4]
    prompts = [render_prompt(tok, r["messages"][:-1]) for r in records]
    params = SamplingParams(max_tokens=48, stop_token_ids=(tok.eos_token_id,))

    def run(vocab: DraftVocab | None) -> tuple[list[list[int]], float, RecordingEngine]:
        drafter = load_drafter(demo.drafter_path("dflare"), dtype=torch.float32)
        drafter.draft_vocab = vocab
        engine = RecordingEngine(target, drafter, tokenizer=tok, max_batch=len(prompts))
        results = engine.generate(prompts, params)
        steps = sum(r.stats.verify_steps for r in results)
        return [r.output_ids for r in results], sum(len(r.output_ids) for r in results) / steps, engine

    return run, records, tok


def test_demo_pair_greedy_output_unchanged_and_acceptance_kept_by_a_frequent_subset(demo_run) -> None:
    """The 2,048 tokens most frequent in the answers: the same output as drafting over all 4,096, most of
    the acceptance kept, every draft inside the subset. 2,048 tokens the target never wrote: no draft is
    accepted (drafts really map to the subset's own target ids)."""
    run, records, tok = demo_run
    answers = [tok(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"] for r in records]
    counts = count_tokens(answers, 4096)
    full_out, full_tau, _ = run(None)
    frequent = DraftVocab.from_counts(counts, 2048)
    out, tau, engine = run(frequent)
    assert out == full_out
    assert tau >= 0.85 * full_tau, (tau, full_tau)
    drafted = set(torch.cat([d.flatten() for d in engine.drafted]).tolist())
    assert drafted <= set(frequent.ids.tolist())
    written = {t for row in full_out for t in row}
    unwritten = DraftVocab(torch.tensor([t for t in range(4096) if t not in written][:2048]), 4096)
    out, tau, _ = run(unwritten)
    assert out == full_out
    assert tau == 1.0  # no draft can match: every step commits only the target's own token


def test_draft_vocab_command_writes_what_the_loader_reads(tmp_path: Path) -> None:
    drafter_dir = tmp_path / "dflare"
    shutil.copytree(demo.drafter_path("dflare"), drafter_dir)
    corpus = tmp_path / "chats.jsonl"
    corpus.write_text(
        "\n".join(json.dumps(r) for r in load_chats(demo.heldout_prompts_path())[:50])
        + "\n"
        + json.dumps({"text": "def f(x):\n    return x"})
        + "\n"
    )
    cli = [sys.executable, "-m", "sglang_ext.cli", "draft-vocab", "--data", str(corpus), "--size", "700"]
    done = subprocess.run([*cli, "--drafter", str(drafter_dir)], capture_output=True, text=True, check=True)
    assert "700 of 4096 tokens" in done.stdout
    unseen = float(done.stdout.split("counted without every tenth text, ")[1].split("%")[0])
    assert 50.0 < unseen < 100.0  # what to expect on text the count never saw
    vocab = load_drafter(drafter_dir).draft_vocab
    assert vocab is not None and vocab.size == 700 and 0.5 < vocab.coverage < 1.0
    assert 2 in vocab.ids.tolist()  # the demo target's end id, drafted even if never counted
    done = subprocess.run(
        [*cli, "--out", str(tmp_path / "v.json")], capture_output=True, text=True, check=True
    )
    assert DraftVocab.read(tmp_path / "v.json").ids.tolist() == vocab.ids.tolist()  # a file, e.g. a ConfigMap
    both = [*cli, "--drafter", str(drafter_dir), "--out", str(tmp_path / "v.json")]
    assert subprocess.run(both, capture_output=True).returncode == 2
    bad = subprocess.run([*cli, "--drafter", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a drafter checkpoint" in bad.stderr
    corpus.write_text("[1, 2]\n")
    bad = subprocess.run([*cli, "--drafter", str(drafter_dir)], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a corpus record" in bad.stderr
