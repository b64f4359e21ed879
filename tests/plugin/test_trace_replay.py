"""Trace replay (benchmarks on dummy weights): per-request traces, window semantics, SGLang's call shape."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sglang_ext.sglang_plugin import trace_replay
from sglang_ext.traces.format import AcceptanceTrace, TraceStep

ROOT = Path(__file__).resolve().parents[2]


def _trace(source: str, accepted: list[list[int]], block: int = 8) -> AcceptanceTrace:
    steps = [[TraceStep(a, tuple([0.5] * (block - 1))) for a in req] for req in accepted]
    return AcceptanceTrace(source=source, block_size=block, temperature=0.0, requests=steps)


def _req(rid: str, **params) -> SimpleNamespace:
    return SimpleNamespace(rid=rid, sampling_params=SimpleNamespace(custom_params=params or None))


@pytest.fixture
def replay(tmp_path: Path) -> trace_replay.TraceReplay:
    _trace("synthetic", [[7, 6, 5], [1, 0]]).save(tmp_path / "synthetic.json.gz")
    _trace("demo", [[3, 2]]).save(tmp_path / "demo.json")
    return trace_replay.TraceReplay(trace_replay.load_traces(tmp_path))


def test_each_request_follows_its_own_trace_request_and_wraps(replay) -> None:
    a, b, c = _req("a"), _req("b"), _req("c", dflare_trace="demo")
    assert replay.default == "synthetic"
    assert replay.accepted_lengths([a, b, c], [7, 7, 7]) == [7, 1, 3]  # a, b dealt requests 0 and 1
    assert replay.accepted_lengths([a, b, c], [7, 7, 7]) == [6, 0, 2]
    assert replay.accepted_lengths([c, a, b], [7, 7, 7]) == [3, 5, 1]  # c and b wrap; order free


def test_a_short_window_keeps_what_the_trace_accepts_there_not_a_clamped_length(replay) -> None:
    a = _req("a", dflare_trace_request=0)
    assert replay.accepted_lengths([a], [3]) == [3]  # trace accepted 7 of the block: 3 of a 3-window
    b = _req("b", dflare_trace_request=1)
    assert replay.accepted_lengths([b], [3]) == [1]  # trace accepted 1: a shorter window cannot add
    assert replay.accepted_lengths([b], [0]) == [0]


def test_unknown_trace_and_empty_directory_are_refused(replay, tmp_path: Path) -> None:
    with pytest.raises(trace_replay.TraceReplayError, match="unknown trace 'nope'"):
        replay.accepted_lengths([_req("x", dflare_trace="nope")], [7])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(trace_replay.TraceReplayError, match=r"no \*\.json"):
        trace_replay.load_traces(empty)


def test_written_outputs_commit_the_accepted_drafts_and_the_targets_token(replay) -> None:
    candidates = torch.tensor([[9, 11, 12, 13, 14, 15, 16, 17], [9, 21, 22, 23, 24, 25, 26, 27]])
    target_predict = torch.arange(100, 116).view(2, 8)
    accept_len = torch.zeros(2, dtype=torch.int32)
    commit_lens = torch.zeros(2, dtype=torch.int32)
    bonus = torch.zeros(2, dtype=torch.int64)
    out_tokens = torch.full((2, 8), -1, dtype=torch.int64)
    trace_replay.write_replayed_acceptance(
        [2, 0],
        candidates=candidates,
        target_predict=target_predict,
        accept_len=accept_len,
        commit_lens=commit_lens,
        bonus=bonus,
        out_tokens=out_tokens,
    )
    assert accept_len.tolist() == [2, 0] and commit_lens.tolist() == [3, 1]
    assert bonus.tolist() == [102, 108]  # the target's own token at the first unaccepted position
    assert out_tokens[0, :3].tolist() == [11, 12, 102] and out_tokens[1, :1].tolist() == [108]


def test_worker_hook_takes_sglangs_simulated_acceptance_call(replay) -> None:
    """The worker replaces ``apply_dflash_simulated_acceptance``: it must accept SGLang's keywords."""
    from sglang.srt.speculative import dflash_worker_v2

    from sglang_ext.sglang_plugin.worker import DFlareWorkerV2

    called_with = set(inspect.signature(dflash_worker_v2.apply_dflash_simulated_acceptance).parameters)
    needed = {"candidates", "target_predict", "accept_len", "commit_lens", "bonus", "out_tokens"}
    assert needed <= called_with
    bs, block = 2, 8
    outputs = {
        "target_predict": torch.zeros(bs, block, dtype=torch.int64),
        "accept_len": torch.zeros(bs, dtype=torch.int32),
        "commit_lens": torch.zeros(bs, dtype=torch.int32),
        "bonus": torch.zeros(bs, dtype=torch.int64),
        "out_tokens": torch.zeros(bs, block, dtype=torch.int64),
        "simulate_acc_len": 1.0,
        "simulate_acc_method": "match-expected",
        "simulate_acc_token_mode": "fixed",
    }
    worker = SimpleNamespace(_trace_replay=replay, _replay_reqs=[_req("a"), _req("b")])
    DFlareWorkerV2._replay_acceptance(worker, candidates=torch.ones(bs, block, dtype=torch.int64), **outputs)
    assert outputs["commit_lens"].tolist() == [8, 2]
    worker._replay_reqs = worker._replay_reqs[:1]
    candidates = torch.ones(bs, block, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="1 requests for 2 verify rows"):
        DFlareWorkerV2._replay_acceptance(worker, candidates=candidates, **outputs)


def test_replay_only_on_request_and_only_on_dummy_weights(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(trace_replay.ENV, raising=False)
    assert trace_replay.from_environment(SimpleNamespace(load_format="dummy")) is None
    _trace("synthetic", [[1]]).save(tmp_path / "synthetic.json")
    monkeypatch.setenv(trace_replay.ENV, str(tmp_path))
    with pytest.raises(trace_replay.TraceReplayError, match="dummy weights"):
        trace_replay.from_environment(SimpleNamespace(load_format="auto"))
    assert trace_replay.from_environment(SimpleNamespace(load_format="dummy")) is not None


def test_the_chart_cannot_switch_replay_on() -> None:
    chart_text = "\n".join(p.read_text() for p in (ROOT / "helm").rglob("*") if p.is_file())
    assert trace_replay.ENV not in chart_text


def test_peek_shows_the_step_the_next_verify_replays_without_advancing(replay) -> None:
    a, b = _req("a"), _req("b")
    first = replay.peek_steps([a, b])
    assert first == replay.peek_steps([a, b])  # peeking twice moves nothing
    assert [s.accepted for s in first] == [7, 1]
    assert replay.accepted_lengths([a, b], [7, 7]) == [7, 1]  # the peeked steps are the replayed ones
    assert [s.accepted for s in replay.peek_steps([a, b])] == [6, 0]


def test_replicas_given_the_same_batches_and_widths_replay_the_same_whoever_peeked(tmp_path: Path) -> None:
    """Every tensor-parallel rank keeps its own replay (adaptive_step.py): they agree as long as they see
    the same batches and widths, whether or not a rank peeked before verifying, with requests joining
    mid-run (the order cursors are dealt in) and whole-block steps in between."""
    _trace("synthetic", [[7, 6, 5], [1, 0], [4, 4, 2, 0]]).save(tmp_path / "synthetic.json")
    peeking, plain = (trace_replay.TraceReplay(trace_replay.load_traces(tmp_path)) for _ in range(2))
    a, b, c, d = (_req(rid) for rid in "abcd")
    steps = [
        ([a], [3]),
        ([c, d, a], [7, 2, 2]),
        ([d, a, c], [0, 7, 7]),
        ([b, d], [5, 1]),
        ([a, b, c, d], [7] * 4),
    ]
    for reqs, widths in steps:
        peeking.peek_steps(reqs)  # new requests' cursors are dealt here on this replica
        assert peeking.accepted_lengths(reqs, widths) == plain.accepted_lengths(reqs, widths), widths
