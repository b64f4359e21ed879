"""The draft graph's greedy head with confidences (confident_sampler.py) against SGLang's own head
(``_DflashDraftSampler``, which it replaces in adaptive mode) and the confidences computed apart, on CPU.
Under tensor parallelism: tests/plugin/test_tp_adaptive.py."""

from __future__ import annotations

import pytest
import torch

from sglang_ext.sglang_plugin import adaptive
from sglang_ext.sglang_plugin.confident_sampler import ConfidentDraftSampler

pytestmark = pytest.mark.sglang

BLOCK, HIDDEN, VOCAB, TOKENS = 8, 32, 120, 100  # rows TOKENS.. of the head are padding, not tokens


def _sglang_head(dtype: torch.dtype, vocab_start: int = 0):
    from sglang.srt.speculative.dflash_worker_v2 import _DflashDraftSampler

    gen = torch.Generator().manual_seed(7)
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.6).to(dtype)
    weight[TOKENS:] = 50.0  # padding rows that would win every argmax if they were counted
    head = _DflashDraftSampler(
        weight=weight, block_size=BLOCK, num_org=TOKENS, org_vocab_start=vocab_start, max_bs=4
    )
    hidden = torch.randn(3 * BLOCK, HIDDEN, generator=gen).to(dtype)
    return head, hidden


@pytest.mark.parametrize("vocab_start", [0, 1000])
def test_the_drafts_are_sglangs_and_the_confidences_the_whole_softmaxs(vocab_start: int) -> None:
    sglang_head, hidden = _sglang_head(torch.float32, vocab_start)
    ours = ConfidentDraftSampler.replacing(sglang_head)
    assert ours.out.numel() == sglang_head.out.numel() == 4 * (BLOCK - 1)
    sglang_head(hidden)
    ours(hidden)
    n = 3 * (BLOCK - 1)
    assert torch.equal(ours.out[:n], sglang_head.out[:n])
    drafted = hidden.view(3, BLOCK, HIDDEN)[:, 1:, :].reshape(-1, HIDDEN)
    expected = adaptive.top1_probabilities(drafted, sglang_head.weight[:TOKENS])
    assert float(expected.min()) < 0.5 < float(expected.max())  # not all sure, not all hopeless
    torch.testing.assert_close(ours.top1[:n], expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_logits_give_sglangs_drafts_and_close_confidences() -> None:
    sglang_head, hidden = _sglang_head(torch.bfloat16)
    ours = ConfidentDraftSampler.replacing(sglang_head)
    sglang_head(hidden)
    ours(hidden)
    n = 3 * (BLOCK - 1)
    assert torch.equal(ours.out[:n], sglang_head.out[:n])
    drafted = hidden.view(3, BLOCK, HIDDEN)[:, 1:, :].reshape(-1, HIDDEN)
    expected = adaptive.top1_probabilities(drafted.float(), sglang_head.weight[:TOKENS].float())
    torch.testing.assert_close(ours.top1[:n], expected, rtol=0.02, atol=0.01)  # bf16 logits: 3 digits


def test_the_adaptive_step_reads_the_graphs_confidences_instead_of_a_second_lm_head_pass() -> None:
    from types import SimpleNamespace

    from sglang_ext.sglang_plugin.adaptive_step import AdaptiveStep

    step = AdaptiveStep(SimpleNamespace(block_size=BLOCK), None)  # no target worker: no LM head to run
    fused = torch.rand(3, BLOCK - 1)
    hidden = torch.randn(3, BLOCK - 1, HIDDEN)
    got = step._confidences([None] * 3, hidden, 3, None, BLOCK - 1, fused)
    assert got.dtype == torch.float64 and torch.equal(got, fused.double())
    with pytest.raises(AttributeError, match="target_worker"):  # without them: the LM-head pass
        step._confidences([None] * 3, hidden, 3, None, BLOCK - 1)


def test_an_eager_draft_of_fewer_rows_gets_its_ids_and_confidences_in_the_same_buffers() -> None:
    """What an eager draft of a shorter block calls (``draft``): any number of drafted rows up to the
    buffers' size, the same answers as a whole head."""
    sglang_head, hidden = _sglang_head(torch.float32)
    ours = ConfidentDraftSampler.replacing(sglang_head)
    rows = hidden[:10]
    ids, top1 = ours.draft(rows)
    assert ids.data_ptr() == ours.out.data_ptr() and top1.data_ptr() == ours.top1.data_ptr()
    logits = rows @ sglang_head.weight[:TOKENS].T
    assert torch.equal(ids, logits.argmax(dim=-1))
    torch.testing.assert_close(top1, adaptive.top1_probabilities(rows, sglang_head.weight[:TOKENS]))


def test_the_worker_drafts_over_its_checkpoints_draft_vocabulary(tmp_path, monkeypatch) -> None:
    """DFlareWorkerV2 with ``draft_vocab.json`` beside the drafter: its graph head reads only the subset's
    rows, and its eager head (batches the graphs do not hold, in slices the buffers hold) drafts the same
    subset argmax; ``DFLARE_DRAFT_VOCAB`` names a file that wins over it (a missing one is an error); a
    vocabulary made for another target stops the server; without one, SGLang's head."""
    from types import SimpleNamespace

    from sglang.srt.speculative.dflash_worker_v2 import DFlashWorkerV2

    from sglang_ext.dflare.draft_vocab import DraftVocab
    from sglang_ext.sglang_plugin.worker import DFlareWorkerV2

    sglang_head, _ = _sglang_head(torch.float32)
    monkeypatch.setattr(DFlashWorkerV2, "_maybe_build_draft_sampler", lambda self: sglang_head)
    worker = object.__new__(DFlareWorkerV2)  # what a GPU start would build around the head
    worker.server_args = SimpleNamespace(speculative_draft_model_path=str(tmp_path))
    worker.model_runner = SimpleNamespace(model_config=SimpleNamespace(vocab_size=TOKENS))
    assert worker._maybe_build_draft_sampler() is sglang_head  # static block, no vocabulary file
    subset = torch.arange(3, TOKENS, 4)
    DraftVocab(subset, TOKENS).save(tmp_path)
    head = worker._maybe_build_draft_sampler()
    assert isinstance(head, ConfidentDraftSampler) and head.weight.shape[0] == subset.numel()
    worker._draft_sampler = head
    rows = torch.randn(3 * head.out.numel() + 5, HIDDEN, generator=torch.Generator().manual_seed(3))
    got = worker._greedy_sample_from_vocab_parallel_head(hidden_states=rows, lm_head=None)
    assert torch.equal(got, subset[(rows @ sglang_head.weight[subset].T).argmax(dim=-1)])
    assert not torch.equal(got, (rows @ sglang_head.weight[:TOKENS].T).argmax(dim=-1))
    named = DraftVocab(torch.tensor([0, 5, 99]), TOKENS).write(tmp_path / "configmap.json")
    monkeypatch.setenv("DFLARE_DRAFT_VOCAB", str(named))  # the chart's engine.speculative.draftVocab
    assert worker._maybe_build_draft_sampler().id_map.tolist() == [0, 5, 99]
    monkeypatch.setenv("DFLARE_DRAFT_VOCAB", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="no draft vocabulary file"):
        worker._maybe_build_draft_sampler()
    monkeypatch.delenv("DFLARE_DRAFT_VOCAB")
    worker.model_runner.model_config.vocab_size = TOKENS + 1
    with pytest.raises(ValueError, match="made for a 100-token target"):
        worker._maybe_build_draft_sampler()
