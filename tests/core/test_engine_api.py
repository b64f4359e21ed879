"""The engine contract: stops, limits, streaming, aborts, joining mid-run, validation, stats semantics."""

from __future__ import annotations

import pytest

from sglang_ext.reference.engine import Request, SpeculativeEngine
from sglang_ext.reference.sampling import SamplingParams
from sglang_ext.reference.tiny import tiny_drafter

from .helpers import OracleEngine, prompts_for, reference_greedy, target

SEED = 0


class WordTokenizer:
    """Token i <-> word "w{i}": enough for the engine, which only decodes."""

    def decode(self, ids: list[int], **_) -> str:
        return " ".join(f"w{i}" for i in ids)


def oracle(block_size: int = 4, max_batch: int = 4, n: int = 60, tokenizer=None) -> tuple[OracleEngine, dict]:
    model = target(SEED)
    refs = {tuple(p): reference_greedy(SEED, tuple(p), n) for p in prompts_for(SEED, 4)}
    engine = OracleEngine(
        model,
        tiny_drafter(model, block_size=block_size),
        block_size,
        max_batch=max_batch,
        references=refs,
        tokenizer=tokenizer,
    )
    return engine, refs


def first_new_token_at(ref: tuple[int, ...], k: int) -> int:
    """Index >= k of a token whose value did not occur before it (so a stop on it cuts exactly there)."""
    for i in range(k, len(ref)):
        if ref[i] not in ref[:i]:
            return i
    raise AssertionError("reference has no fresh token")


def test_stop_token_cuts_mid_block_and_stats_count_what_the_verifier_accepted() -> None:
    engine, refs = oracle(block_size=16)
    prompt = prompts_for(SEED, 1)[0]
    ref = refs[tuple(prompt)]
    cut = first_new_token_at(ref, 5)
    res = engine.generate([prompt], SamplingParams(max_tokens=50, stop_token_ids=(ref[cut],)))[0]
    assert res.output_ids == list(ref[:cut]) and res.finish_reason == "stop"
    s = res.stats
    assert s.verify_steps == sum(s.histogram) and s.draft_tokens == 15 * s.verify_steps
    assert s.acceptance_length == pytest.approx(1 + s.accepted_tokens / s.verify_steps)
    assert 1 + s.accepted_tokens + s.verify_steps >= cut  # drafts counted before the cut


def test_max_tokens_cut_mid_block() -> None:
    engine, refs = oracle(block_size=16)
    prompt = prompts_for(SEED, 1)[0]
    res = engine.generate([prompt], SamplingParams(max_tokens=7))[0]
    assert res.output_ids == list(refs[tuple(prompt)][:7]) and res.finish_reason == "length"


def test_stream_callback_delivers_exactly_the_output() -> None:
    engine, refs = oracle()
    chunks: dict[str, list[list[int]]] = {}
    prompts = prompts_for(SEED, 3)
    for i, p in enumerate(prompts):
        chunks[str(i)] = []
        engine.add_request(Request(str(i), p, SamplingParams(max_tokens=20), chunks[str(i)].append))
    results = {}
    while engine.has_work():
        results.update({r.request_id: r for r in engine.step()})
    for i, p in enumerate(prompts):
        streamed = [t for c in chunks[str(i)] for t in c]
        assert streamed == results[str(i)].output_ids == list(refs[tuple(p)][:20])
        assert len(chunks[str(i)]) < 20  # several tokens per callback: speculation streams blocks


def test_stop_string_cuts_text_and_ids() -> None:
    engine, refs = oracle(tokenizer=WordTokenizer())
    prompt = prompts_for(SEED, 1)[0]
    ref = refs[tuple(prompt)]
    k = first_new_token_at(ref, 6)
    stop = f"w{ref[k]}"
    res = engine.generate([prompt], SamplingParams(max_tokens=40, stop=(stop,)))[0]
    full = WordTokenizer().decode(list(ref[:40]))
    assert res.finish_reason == "stop"
    assert res.text == full[: full.index(stop)]
    assert res.output_ids == list(ref[: k + 1])  # ends with the token that completed the stop string


def test_abort_running_and_waiting_requests_and_the_rest_stays_lossless() -> None:
    engine, refs = oracle(max_batch=2)
    p = prompts_for(SEED, 4)
    for i in range(4):
        engine.add_request(Request(f"r{i}", p[i], SamplingParams(max_tokens=30)))
    engine.step()
    engine.step()
    engine.abort("r0")  # running in row 0: the last row moves into its place
    engine.abort("r3")  # still waiting
    results = {}
    while engine.has_work():
        results.update({r.request_id: r for r in engine.step()})
    assert results["r0"].finish_reason == "abort" and 0 < len(results["r0"].output_ids) < 30
    assert results["r3"].finish_reason == "abort" and results["r3"].output_ids == []
    for i in (1, 2):
        assert results[f"r{i}"].output_ids == list(refs[tuple(p[i])][:30])


def test_request_joining_mid_run_is_lossless() -> None:
    model = target(SEED)
    engine = SpeculativeEngine(model, tiny_drafter(model, block_size=4), 4, max_batch=3)
    p = prompts_for(SEED, 3)
    engine.add_request(Request("a", p[0], SamplingParams(max_tokens=20)))
    results = {r.request_id: r for _ in range(4) for r in engine.step()}
    engine.add_request(Request("b", p[2], SamplingParams(max_tokens=20)))  # a 17-token prefill joins
    while engine.has_work():
        results.update({r.request_id: r for r in engine.step()})
    assert results["a"].output_ids == list(reference_greedy(SEED, tuple(p[0]), 20))
    assert results["b"].output_ids == list(reference_greedy(SEED, tuple(p[2]), 20))


def test_block_size_one_reports_no_speculation() -> None:
    model = target(SEED)
    res = SpeculativeEngine(model, None, 1).generate([[1, 2, 3]], SamplingParams(max_tokens=3))[0]
    assert res.stats is None and len(res.output_ids) == 3 and res.prompt_tokens == 3


def test_bad_requests_get_clear_errors() -> None:
    model = target(SEED)
    engine = SpeculativeEngine(model, tiny_drafter(model, block_size=4), 4)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(Request("x", [], SamplingParams()))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request(Request("x", [48], SamplingParams()))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request(Request("x", [1], SamplingParams(stop=("w1",))))
    with pytest.raises(ValueError, match="context"):
        engine.add_request(Request("x", [1] * engine.max_context, SamplingParams()))
    engine.add_request(Request("x", [1], SamplingParams()))
    with pytest.raises(ValueError, match="already"):
        engine.add_request(Request("x", [2], SamplingParams()))
    with pytest.raises(ValueError, match="needs a drafter"):
        SpeculativeEngine(model, None, 4)
    for bad in ({"temperature": -1}, {"top_p": 0.0}, {"top_k": -1}, {"max_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
