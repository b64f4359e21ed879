"""A shorter eager draft on FA3 runs as a uniform batch of its own width (short_draft.py): the attention
metadata SGLang's FA3 backend builds for it equals what the ragged layout of equal lengths gave, the
backend's configured width comes back after the forward, and the spec input carries no ragged layout.

The backend is SGLang's own ``FlashAttentionBackend`` with only the attributes its metadata set-up reads
(its constructor needs a model runner on a GPU); ``sgl_kernel``, a CUDA kernel library its module imports
one function of, is a stand-in module for the test's duration."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from sglang_ext.sglang_plugin import short_draft

CPU = torch.device("cpu")


@pytest.fixture
def fa3(monkeypatch):
    monkeypatch.setitem(sys.modules, "sgl_kernel", types.SimpleNamespace(merge_state_v2=None))
    from sglang.srt.layers.attention.flashattention_backend import FlashAttentionBackend

    def make(block: int, context: int = 300, requests: int = 4) -> FlashAttentionBackend:
        backend = object.__new__(FlashAttentionBackend)
        backend.topk, backend.speculative_num_draft_tokens, backend.page_size = 1, block, 1
        backend.max_context_len, backend.device = context, CPU
        backend.req_to_token_pool = SimpleNamespace(
            req_to_token=torch.arange(requests * context, dtype=torch.int32).view(requests, context)
        )
        backend.use_sliding_window_kv_pool = backend._unified_dense = backend.has_local_attention = False
        backend.attention_chunk_size = None
        return backend

    return make


def _draft_batch(width: int, seq_lens: list[int], spec) -> SimpleNamespace:
    """A draft forward batch as AdaptiveStep._draft builds it: committed lengths on the device, committed +
    width on the host."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    seq = torch.tensor(seq_lens)
    return SimpleNamespace(
        forward_mode=ForwardMode.TARGET_VERIFY, seq_lens=seq, seq_lens_cpu=seq + width, batch_size=len(seq),
        req_pool_indices=torch.tensor([2, 0, 3][: len(seq)]), spec_info=spec, out_cache_loc=None,
        encoder_lens=None,
    )  # fmt: skip


@pytest.mark.parametrize("width", [2, 4, 8])
def test_a_uniform_short_draft_gets_the_metadata_of_the_ragged_layout(fa3, width: int) -> None:
    from sglang.srt.speculative.draft_worker_common import make_draft_block_spec_info
    from sglang.srt.speculative.ragged_verify import RaggedVerifyLayout

    block, seq_lens = 16, [10, 50, 33]
    ragged_spec = make_draft_block_spec_info(draft_token_num=width, device=CPU)
    ragged_spec.ragged_verify_layout = RaggedVerifyLayout.from_verify_lens(
        verify_lens_cpu=[width] * len(seq_lens), device=CPU, grid=[width * len(seq_lens)]
    )
    ragged = fa3(block)
    ragged.init_forward_metadata(_draft_batch(width, seq_lens, ragged_spec))
    uniform = fa3(block)
    assert short_draft.sized_on_host(uniform)
    with short_draft.uniform_width(uniform, width):
        uniform.init_forward_metadata(
            _draft_batch(width, seq_lens, make_draft_block_spec_info(draft_token_num=width, device=CPU))
        )
    assert uniform.speculative_num_draft_tokens == block  # the configured width is back
    want, got = ragged.forward_metadata, uniform.forward_metadata
    assert (
        got.cache_seqlens_int32.tolist() == [n + width for n in seq_lens] == want.cache_seqlens_int32.tolist()
    )
    assert got.cu_seqlens_q.tolist() == want.cu_seqlens_q.tolist() == list(range(0, 3 * width + 1, width))
    assert got.cu_seqlens_k.tolist() == want.cu_seqlens_k.tolist()
    assert got.max_seq_len_q == want.max_seq_len_q == width
    # the host's bound is wider than the longest sequence (never below it): only the page table's width
    assert got.max_seq_len_k >= want.max_seq_len_k == max(seq_lens) + width
    assert torch.equal(got.page_table[:, : want.max_seq_len_k], want.page_table)


def test_the_configured_width_comes_back_when_the_forward_fails(fa3) -> None:
    backend = fa3(16)
    with pytest.raises(RuntimeError), short_draft.uniform_width(backend, 8):
        assert backend.speculative_num_draft_tokens == 8
        raise RuntimeError("draft forward failed")
    assert backend.speculative_num_draft_tokens == 16


def test_only_fa3_drafts_short_blocks_uniformly_and_its_spec_input_has_no_layout(fa3) -> None:
    from sglang_ext.sglang_plugin.adaptive_step import AdaptiveStep

    assert not short_draft.sized_on_host(object())
    runner = SimpleNamespace(attn_backend=fa3(16))
    step = AdaptiveStep(SimpleNamespace(block_size=16, device=CPU, draft_model_runner=runner), None)
    spec = step._short_draft_input(3, 8)
    assert spec.num_tokens_per_req == 8 and getattr(spec, "ragged_verify_layout", None) is None


class _StandInGraphRunner:
    """Stands in for SGLang's ``DecodeCudaGraphRunner``, whose construction captures CUDA graphs (a GPU):
    records what it was built with and what the draft runner's capture hooks were meanwhile."""

    built: ClassVar[list[tuple[int, object, list]]] = []
    fail_width: ClassVar[int | None] = None

    def __init__(self, model_runner, *, attn_backend, speculative_num_draft_tokens) -> None:
        if speculative_num_draft_tokens == self.fail_width:
            raise RuntimeError("CUDA out of memory")
        self.built.append((speculative_num_draft_tokens, attn_backend, list(model_runner.capture_tail_hooks)))
        self.capture_bs = [1, 2, 4, 8]


@pytest.fixture
def stand_in_graphs(monkeypatch):
    from sglang.srt.model_executor.runner import decode_cuda_graph_runner

    _StandInGraphRunner.built, _StandInGraphRunner.fail_width = [], None
    monkeypatch.setattr(decode_cuda_graph_runner, "DecodeCudaGraphRunner", _StandInGraphRunner)
    return _StandInGraphRunner


def _draft_runner(fa3, block: int = 16) -> SimpleNamespace:
    whole_block_hook, whole_block_graphs = object(), object()
    return SimpleNamespace(
        attn_backend=fa3(block),
        decode_cuda_graph_runner=whole_block_graphs,
        capture_tail_hooks=[whole_block_hook],
        _get_attention_backend=lambda: fa3(block),  # a new backend each call, configured at the block
    )


def test_each_shorter_width_is_captured_with_a_backend_of_its_own_and_without_the_block_head(
    fa3, stand_in_graphs
) -> None:
    runner = _draft_runner(fa3)
    hooks = runner.capture_tail_hooks
    graphs = short_draft.capture_graphs(runner, [4, 8, 8])
    assert sorted(graphs) == [4, 8]
    assert [width for width, *_ in stand_in_graphs.built] == [8, 4]  # larger first
    for width, backend, hooks_during in stand_in_graphs.built:
        assert hooks_during == []  # the block's fused greedy head reads a whole block per request
        assert backend.speculative_num_draft_tokens == width and graphs[width].backend is backend
        assert backend is not runner.attn_backend
    assert runner.capture_tail_hooks is hooks and runner.attn_backend.speculative_num_draft_tokens == 16


def test_a_width_whose_capture_fails_stays_eager_and_the_others_keep_their_graphs(
    fa3, stand_in_graphs, caplog
) -> None:
    stand_in_graphs.fail_width = 8
    runner = _draft_runner(fa3)
    graphs = short_draft.capture_graphs(runner, [4, 8])
    assert sorted(graphs) == [4]
    assert "draft block 8 failed" in caplog.text
    assert len(runner.capture_tail_hooks) == 1


def test_replaying_hands_the_runner_a_widths_graphs_and_backend_for_one_forward(fa3) -> None:
    runner = _draft_runner(fa3)
    own = runner.decode_cuda_graph_runner, runner.attn_backend
    graphs = short_draft.WidthGraphs(4, fa3(4), object())
    with short_draft.replaying(runner, graphs):
        assert runner.decode_cuda_graph_runner is graphs.runner and runner.attn_backend is graphs.backend
    assert (runner.decode_cuda_graph_runner, runner.attn_backend) == own
    with pytest.raises(RuntimeError), short_draft.replaying(runner, graphs):
        raise RuntimeError("draft forward failed")
    assert (runner.decode_cuda_graph_runner, runner.attn_backend) == own


def test_the_adaptive_step_captures_shorter_drafts_only_on_fa3_with_graphs_on(
    fa3, stand_in_graphs, monkeypatch
) -> None:
    from sglang_ext.sglang_plugin.adaptive_step import AdaptiveStep

    def step(runner) -> AdaptiveStep:
        return AdaptiveStep(SimpleNamespace(block_size=16, device=CPU, draft_model_runner=runner), None)

    monkeypatch.delenv(short_draft.GRAPHS_ENV, raising=False)
    fa3_step = step(_draft_runner(fa3))
    fa3_step.capture_short_draft_graphs([8])
    assert list(fa3_step._short_graphs) == [8]
    other = _draft_runner(fa3)
    other.attn_backend = object()  # triton and the rest: shorter drafts keep the ragged eager path
    triton_step = step(other)
    triton_step.capture_short_draft_graphs([8])
    no_graphs = step(SimpleNamespace(**{**vars(_draft_runner(fa3)), "decode_cuda_graph_runner": None}))
    no_graphs.capture_short_draft_graphs([8])  # --disable-cuda-graph
    monkeypatch.setenv(short_draft.GRAPHS_ENV, "0")
    off = step(_draft_runner(fa3))
    off.capture_short_draft_graphs([8])
    assert triton_step._short_graphs == no_graphs._short_graphs == off._short_graphs == {}
    assert len(stand_in_graphs.built) == 1
    assert short_draft.graphs_wanted({}) and not short_draft.graphs_wanted({short_draft.GRAPHS_ENV: "0"})
