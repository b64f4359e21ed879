"""Per-request ``spec_num_verified_drafts`` / ``spec_num_plain_steps``: the worker's records reach
``meta_info`` through SGLang 0.5.17's own code, every hook applied by SGLang's plugin loader.

The chain runs on CPU with real SGLang objects: ``Req``s, ``GenerationBatchResult``s, the (hooked)
``SchedulerBatchResultProcessor._resolve_spec_v2_tokens``, the output streamer's accumulator and its
``BatchTokenIDOutput``, the IPC encoding (pickle, SGLang's default, and msgpack), the detokenizer's
``BatchStrOutput`` and the tokenizer manager's ``_handle_batch_output`` (hooked). Stand-ins only where a
GPU or a process is needed: the processor's pools and workers, the detokenizer's tokenizer, the
tokenizer manager's sockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
from array import array
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.sglang

BLOCK = 4  # B: 0..3 drafts per step


@pytest.fixture(autouse=True)
def _no_steps_in_flight():
    from sglang_ext.sglang_plugin import request_counters

    request_counters._pending.clear()
    request_counters._reported.clear()
    yield
    request_counters._pending.clear()


# ---- record_step and the pairing of records with processed results ----------------------------------


def _fake_req(rid: str, spec_verify_ct: int = 0):
    return SimpleNamespace(
        rid=rid, spec_verify_ct=spec_verify_ct, spec_correct_drafts_histogram=[], customized_info=None
    )


def test_record_step_refuses_what_cannot_be_a_step():
    from sglang_ext.sglang_plugin.request_counters import _pending, record_step

    a, b = _fake_req("a"), _fake_req("b")
    for verified, plain in (([3], False), (torch.tensor([3, 1, 0]), False), ([2, -1], False), ([0, 1], True)):
        with pytest.raises(ValueError):
            record_step([a, b], verified, plain)
    record_step([], [], plain=True)  # an empty (idle) batch records nothing
    assert not _pending
    record_step([a, b], torch.tensor([3, 0]), plain=False)  # a host tensor is read at once
    assert _pending[0].values() == [3, 0]


def test_each_result_takes_its_own_step():
    """Overlap: step 2 is recorded before step 1's result is processed; a result takes the oldest step of
    exactly its requests, keeps newer ones, and drops older ones that never got a result."""
    from sglang_ext.sglang_plugin import request_counters as rc

    a, b, c = _fake_req("a"), _fake_req("b"), _fake_req("c")
    rc.record_step([a, b, c], [3, 3, 3], plain=False)  # step 1
    rc.record_step([a, b, c], [2, 2, 2], plain=False)  # step 2, same requests
    rc.record_step([a, b], [1, 1], plain=False)  # step 3, c left the batch
    assert rc._take_step([a, b, c]).values() == [3, 3, 3]
    assert rc._take_step([b, a]) is None  # no step of these requests in this order: nothing dropped
    assert len(rc._pending) == 2
    assert rc._take_step([a, b]).values() == [1, 1]  # step 2's result never came: dropped
    assert not rc._pending
    for _ in range(rc._MAX_IN_FLIGHT + 3):
        rc.record_step([a], [1], plain=False)
    assert len(rc._pending) == rc._MAX_IN_FLIGHT


def test_settle_counts_only_what_sglang_counted(caplog):
    from sglang_ext.sglang_plugin import request_counters as rc

    # as SGLang left them after the step: a and b counted (ct 1, one more histogram entry), c finished
    a, b, c = _fake_req("a", 1), _fake_req("b", 1), _fake_req("c", 5)
    a.spec_correct_drafts_histogram, b.spec_correct_drafts_histogram = [0, 0, 1], [1]
    rc.record_step([a, b, c], [3, 0, 3], plain=False)
    rc.settle(rc._take_step([a, b, c]), [a, b, c], [0, 0, 5], correct=[2, 0, 0], block_size=BLOCK)
    assert rc.counters_of(a) == rc.RequestCounters(verified_drafts=3, plain_steps=0)
    assert (b.spec_verify_ct, b.spec_correct_drafts_histogram) == (0, [0])  # width 0: a plain step
    assert rc.counters_of(b) == rc.RequestCounters(verified_drafts=0, plain_steps=1)
    assert c.customized_info is None and c.spec_verify_ct == 5
    # a worker that says it verified fewer drafts than the target accepted is logged and not believed
    a.spec_verify_ct += 1
    a.spec_correct_drafts_histogram[2] += 1
    rc.record_step([a], [1], plain=False)
    rc.settle(rc._take_step([a]), [a], [1], correct=[2], block_size=BLOCK)
    assert rc.counters_of(a).verified_drafts == 3 + 2
    assert "request a verified 1 drafts but accepted 2 (block 4); counted as 2" in caplog.text


# ---- the scheduler side -------------------------------------------------------------------------


def _req(rid: str, max_new_tokens: int):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    params.normalize(None)
    return Req(rid, "", array("q", [1, 2, 3]), params, vocab_size=512)


def _processor():
    """SGLang's real result processor; only what ``_resolve_spec_v2_tokens`` touches is filled in."""
    from sglang.srt.managers.scheduler_components.batch_result_processor import (
        SchedulerBatchResultProcessor,
    )

    fields = {f.name: None for f in dataclasses.fields(SchedulerBatchResultProcessor)}
    fields.update(
        enable_overlap=True,
        server_args=SimpleNamespace(speculative_num_draft_tokens=BLOCK),
        model_worker=SimpleNamespace(on_verify_complete_cpu=lambda *a, **k: None),
    )
    return SchedulerBatchResultProcessor(**fields)


def _result(accepted: list[int]):
    """A verify step's CPU result: request i committed ``accepted[i]`` drafts + the bonus token."""
    from sglang.srt.managers.utils import GenerationBatchResult

    ids = torch.arange(len(accepted) * BLOCK, dtype=torch.int64) + 10
    return GenerationBatchResult(
        next_token_ids=ids,
        accept_lens=torch.tensor([a + 1 for a in accepted], dtype=torch.int32),
        speculative_num_draft_tokens=BLOCK,
    )


def _process(processor, batch, accepted: list[int]) -> None:
    """What ``process_batch_result_decode`` does with a spec-v2 result, up to the finish check."""
    tokens = processor._resolve_spec_v2_tokens(_result(accepted), batch)
    for req, run in zip(batch.reqs, tokens, strict=True):
        if req.finished() or req.is_retracted:
            continue
        req.output_ids.extend(run)
        req.update_finish_state(len(run))


def _stream(reqs):
    """SGLang's output streamer accumulator -> the ``BatchTokenIDOutput`` it sends to the detokenizer."""
    from sglang.srt.managers.scheduler_components.output_streamer import _GenerationStreamAccumulator
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    acc = _GenerationStreamAccumulator(
        return_logprob=False,
        return_hidden_states=False,
        return_routed_experts=False,
        return_indexer_topk=False,
        return_sampling_mask=False,
        spec_algorithm=SpeculativeAlgorithm.from_string("DFLARE"),
        disaggregation_mode=None,
        default_stream_interval=1,
        default_force_stream_interval=1,
        get_cached_tokens_details=lambda req: None,
    )
    for req in reqs:
        if not (req.finished() and req.finished_output):
            acc.accept(req=req)
    return acc.to_payload(dp_rank=0, is_idle_batch=False)


def _wire(payload, msgpack: bool):
    """Scheduler -> detokenizer -> tokenizer manager as SGLang's sockets encode it."""
    from sglang.srt.managers import io_struct

    if msgpack:
        return io_struct.msgpack_decode(io_struct.msgpack_encode(payload))
    return pickle.loads(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))


def _detokenize(payload):
    """SGLang's detokenizer turning the ``BatchTokenIDOutput`` into the ``BatchStrOutput`` it forwards."""
    from sglang.srt.managers.detokenizer_manager import DetokenizerManager

    detokenizer = SimpleNamespace(
        _decode_batch_token_id_output=lambda out: ["" for _ in out.rids],
        _b64_encode_per_request=DetokenizerManager._b64_encode_per_request,
    )
    return DetokenizerManager.handle_batch_token_id_out(detokenizer, payload)


# ---- the tokenizer manager (HTTP server process) ----------------------------------------------------


def _tokenizer_manager(rids: list[str]):
    """SGLang's TokenizerManager without its sockets and tokenizer: request states for ``rids``."""
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.managers.tokenizer_manager import ReqState, TokenizerManager
    from sglang.srt.observability.req_time_stats import APIServerReqTimeStats

    tm = object.__new__(TokenizerManager)
    tm.server_args = SimpleNamespace(
        speculative_algorithm="DFLARE",
        speculative_num_draft_tokens=BLOCK,
        batch_notify_size=16,
        weight_version="default",
    )
    tm.enable_metrics = False
    tm.enable_lora = False
    tm.incremental_streaming_output = False
    tm.dump_requests_folder = tm.crash_dump_folder = None
    tm.child_rid_to_logical_rid, tm.logical_rid_to_child_rids = {}, {}
    tm._config_updates = []
    tm.rid_to_state = {
        rid: ReqState(
            out_list=[],
            finished=False,
            event=asyncio.Event(),
            obj=GenerateReqInput(input_ids=[1, 2, 3]),
            time_stats=APIServerReqTimeStats(),
        )
        for rid in rids
    }
    return tm


def _deliver(tm, payload, msgpack: bool) -> None:
    asyncio.run(tm._handle_batch_output(_detokenize(_wire(payload, msgpack))))


# ---- the whole chain ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msgpack", "incremental"),
    [(False, False), (True, False), (False, True)],
    ids=["pickle-ipc", "msgpack-ipc", "incremental-streaming"],
)
def test_recorded_steps_reach_meta_info_through_sglang(plugins_loaded, monkeypatch, msgpack, incremental):
    """Four requests over four overlapped steps (each step launched before the previous one's result is
    processed): ragged widths, a width-0 request, a whole-batch plain step, requests that finish while a
    later step is already in flight (SGLang does not count that step; neither may we)."""
    from sglang.srt.managers import io_struct

    from sglang_ext.sglang_plugin.openai_usage import speculative_usage
    from sglang_ext.sglang_plugin.request_counters import KEY, RequestCounters, record_step
    from sglang_ext.stats import SpecStats

    monkeypatch.setattr(io_struct, "_USE_PICKLE_IPC", not msgpack)
    a, b, c, d = _req("a", 10), _req("b", 7), _req("c", 4), _req("d", 2)
    processor, tm = _processor(), _tokenizer_manager(["a", "b", "c", "d"])
    tm.rid_to_state["a"].obj.stream = True  # its intermediate outputs reach the client too
    tm.incremental_streaming_output = incremental  # SGLang slices per-token meta_info lists then
    states = dict(tm.rid_to_state)

    def step(batch_reqs, accepted):
        batch = SimpleNamespace(reqs=batch_reqs, has_grammar=False)
        _process(processor, batch, accepted)
        _deliver(tm, _stream(batch_reqs), msgpack)

    s1 = [a, b, c, d]
    record_step(s1, [3, 2, 3, 0], plain=False)
    record_step(s1, torch.tensor([3, 0, 3, 0]), plain=False)  # step 2 launched before step 1's result
    step(s1, [2, 1, 3, 0])  # c: 4 tokens, finished
    s3 = [a, b, d]
    record_step(s3, [0, 0, 0], plain=True)  # the whole batch decodes plainly
    step(s1, [3, 0, 1, 0])  # c finished: its step 2 is not counted; d: 2 tokens, finished
    record_step([a, b], [1, 3], plain=False)
    step(s3, [0, 0, 0])  # d finished: not counted
    step([a, b], [1, 2])  # a: 3+4+1+2 = 10 tokens, b: 2+1+1+3 = 7: both finished

    # the scheduler's own counts, also of the steps processed after a request's final output
    for req, (steps, verified, plain) in zip(
        (a, b, c, d), ((3, 7, 1), (2, 5, 2), (1, 3, 0), (0, 0, 2)), strict=True
    ):
        assert (req.spec_verify_ct, req.customized_info[KEY]) == (steps, RequestCounters(verified, plain))

    metas = {rid: state.out_list[-1]["meta_info"] for rid, state in states.items()}
    assert all(state.finished for state in states.values())
    expected = {  # rid: (verify steps, accepted, histogram, verified drafts, plain steps)
        "a": (3, 6, [0, 1, 1, 1], 7, 1),
        "b": (2, 3, [0, 1, 1], 5, 2),
        "c": (1, 3, [0, 0, 0, 1], 3, 0),
        "d": (0, 0, [0, 0, 0, 0], 0, 2),
    }
    for rid, (steps, accepted, hist, verified, plain) in expected.items():
        meta = metas[rid]
        got = (
            meta["spec_verify_ct"],
            meta["spec_num_correct_drafts"],
            meta["spec_correct_drafts_histogram"],
            meta["spec_num_verified_drafts"],
            meta["spec_num_plain_steps"],
        )
        assert got == (steps, accepted, hist, verified, plain), rid
        assert meta["spec_num_proposed_drafts"] == steps * (BLOCK - 1), rid  # SGLang's whole blocks
        stats = SpecStats.from_sglang_meta_info(meta)
        assert (stats.block_size, stats.draft_tokens, stats.plain_steps) == (BLOCK, verified, plain), rid
        assert meta["spec_accept_rate"] == (accepted / verified if verified else 0.0), rid
    # a's intermediate outputs carried neither our key nor the fields (SGLang adds them at the finish)
    assert len(states["a"].out_list) == 4
    for out in states["a"].out_list:
        assert KEY not in out["meta_info"]
    assert [("spec_num_plain_steps" in out["meta_info"]) for out in states["a"].out_list] == [0, 0, 0, 1]

    usage = speculative_usage(metas.values())
    assert usage["draft_tokens"] == 7 + 5 + 3 + 0
    assert usage["plain_decode_steps"] == 1 + 2 + 0 + 2
    assert usage["verify_steps"] == 3 + 2 + 1
    assert usage["acceptance_rate"] == round(12 / 15, 4)
    assert speculative_usage([metas["d"]])["plain_decode_steps"] == 2  # only plain steps: still stats


def test_without_records_meta_info_is_sglangs_own(plugins_loaded):
    """A scheduler whose worker records nothing (built-in DFLASH, EAGLE) keeps SGLang's counts."""
    a = _req("a", 4)
    processor, tm = _processor(), _tokenizer_manager(["a"])
    state = tm.rid_to_state["a"]
    batch = SimpleNamespace(reqs=[a], has_grammar=False)
    for accepted in ([0], [2]):
        _process(processor, batch, [accepted[0]])
        _deliver(tm, _stream([a]), msgpack=False)
    meta = state.out_list[-1]["meta_info"]
    assert (meta["spec_verify_ct"], meta["spec_correct_drafts_histogram"]) == (2, [1, 0, 1])
    assert "spec_num_verified_drafts" not in meta and "spec_num_plain_steps" not in meta
    assert a.customized_info is None
