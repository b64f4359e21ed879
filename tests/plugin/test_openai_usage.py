"""``usage.speculative`` on SGLang's OpenAI endpoints: every hook is applied by SGLang's own plugin
loader, and SGLang's real response builders and stream generators (hooked) carry our stats.

Only the tokenizer manager is a stand-in (it needs the scheduler and a GPU): it replays the outputs
SGLang's tokenizer manager yields, ``meta_info`` included, through our ``generate_request`` hook.
"""

from __future__ import annotations

import inspect
import json
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.sglang

# meta_info of a finished DFLARE request as SGLang 0.5.17 reports it (block 4: 0..3 drafts accepted)
SPEC_META = {
    "spec_verify_ct": 5,
    "spec_num_correct_drafts": 11,
    "spec_num_proposed_drafts": 15,
    "spec_accept_rate": 0.7333,
    "spec_accept_length": 3.2,
    "spec_correct_drafts_histogram": [1, 0, 1, 3],
}


def _output(index: int, text: str, finished: bool, meta: dict) -> dict:
    info = {
        "id": f"req-{index}",
        "prompt_tokens": 7,
        "completion_tokens": len(text),
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "weight_version": "default",
        "finish_reason": {"type": "length", "length": len(text)} if finished else None,
    }
    if finished:
        info.update(meta)
    return {"index": index, "text": text, "output_ids": list(range(len(text))), "meta_info": info}


class ReplayTokenizerManager:
    """Stand-in for SGLang's TokenizerManager: yields canned outputs, through our AROUND hook."""

    def __init__(self, server_args, outputs: list, stream: bool) -> None:
        self.server_args = server_args
        self.tokenizer = None
        self.model_config = SimpleNamespace(
            get_default_sampling_params=dict,
            hf_config=SimpleNamespace(model_type="qwen3", architectures=["Qwen3ForCausalLM"]),
        )
        self.outputs, self.stream = outputs, stream

    async def _replay(self, obj, request=None):
        if self.stream:
            for out in self.outputs:
                yield out
        else:
            yield self.outputs if len(self.outputs) > 1 else self.outputs[0]

    def generate_request(self, obj, request=None):
        from sglang_ext.sglang_plugin.openai_usage import around_generate_request

        return around_generate_request(ReplayTokenizerManager._replay, self, obj, request)

    def create_abort_task(self, obj):
        return None


def test_every_hook_is_applied_by_sglangs_loader(plugins_loaded):
    import importlib

    from sglang_ext.sglang_plugin import openai_usage, request_counters, validation

    for target, hook, _kind in (*validation.HOOKS, *openai_usage.HOOKS, *request_counters.HOOKS):
        module_name, _, rest = target.rpartition(".")
        try:
            owner = importlib.import_module(module_name)
        except ModuleNotFoundError:  # Class.method
            module_name, _, cls = module_name.rpartition(".")
            owner = getattr(importlib.import_module(module_name), cls)
        wrapper = getattr(owner, rest)
        assert hasattr(wrapper, "__wrapped__"), f"{target} is not wrapped"
        assert inspect.getclosurevars(wrapper).nonlocals.get("hook") is hook, f"{target}: not our hook"


def _servers(sglang_runtime, outputs, stream):
    from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat
    from sglang.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion

    tm = ReplayTokenizerManager(sglang_runtime, outputs, stream)
    templates = SimpleNamespace(
        force_reasoning=False, chat_template_name=None, jinja_template_content_format=None
    )
    return OpenAIServingChat(tm, templates), OpenAIServingCompletion(tm, templates)


def _expected(*metas):
    from sglang_ext.stats import SpecStats, total

    return total(SpecStats.from_sglang_meta_info(m) for m in metas).to_usage()


def _requests():
    from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
    from sglang.srt.managers.io_struct import GenerateReqInput

    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    comp = CompletionRequest(model="m", prompt="hi", max_tokens=8)
    return chat, comp, GenerateReqInput(input_ids=[1, 2, 3])


async def test_non_streamed_chat_and_completion_carry_usage_speculative(sglang_runtime):
    chat_req, comp_req, adapted = _requests()
    outputs = [_output(0, "hello", True, SPEC_META)]
    chat, comp = _servers(sglang_runtime, outputs, stream=False)
    for server, request in ((chat, chat_req), (comp, comp_req)):
        response = await server._handle_non_streaming_request(adapted, request, None)
        body = json.loads(response.body)
        assert body["usage"]["completion_tokens"] == 5
        assert body["usage"]["speculative"] == _expected(SPEC_META)
        assert body["choices"][0].get("text", body["choices"][0].get("message", {}).get("content")) == "hello"


async def test_two_choices_are_summed(sglang_runtime):
    chat_req, _, adapted = _requests()
    chat_req.n = 2
    other = dict(
        SPEC_META,
        spec_verify_ct=2,
        spec_num_correct_drafts=1,
        spec_num_proposed_drafts=6,
        spec_correct_drafts_histogram=[1, 1, 0, 0],
    )
    outputs = [_output(0, "ab", True, SPEC_META), _output(1, "cd", True, other)]
    chat, _ = _servers(sglang_runtime, outputs, stream=False)
    body = json.loads((await chat._handle_non_streaming_request(adapted, chat_req, None)).body)
    assert body["usage"]["speculative"] == _expected(SPEC_META, other)
    assert body["usage"]["speculative"]["verify_steps"] == 7


async def test_no_speculation_reports_null(sglang_runtime):
    chat_req, _, adapted = _requests()
    chat, _ = _servers(sglang_runtime, [_output(0, "hello", True, {})], stream=False)
    body = json.loads((await chat._handle_non_streaming_request(adapted, chat_req, None)).body)
    assert body["usage"]["speculative"] is None and body["usage"]["completion_tokens"] == 5


async def _stream(server, method, adapted, request) -> list[dict]:
    chunks = [c async for c in getattr(server, method)(adapted, request, None)]
    assert chunks[-1] == "data: [DONE]\n\n"
    return [json.loads(c[len("data: ") :]) for c in chunks[:-1]]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_streamed_final_usage_chunk_carries_usage_speculative(sglang_runtime, endpoint):
    from sglang.srt.entrypoints.openai.protocol import StreamOptions

    chat_req, comp_req, adapted = _requests()
    outputs = [
        _output(0, "he", False, {}),
        _output(0, "hell", False, {}),
        _output(0, "hello", True, SPEC_META),
    ]
    chat, comp = _servers(sglang_runtime, outputs, stream=True)
    server, method, request = (
        (chat, "_generate_chat_stream", chat_req)
        if endpoint == "chat"
        else (comp, "_generate_completion_stream", comp_req)
    )
    request.stream, request.stream_options = True, StreamOptions(include_usage=True)
    chunks = await _stream(server, method, adapted, request)
    final = [c for c in chunks if c.get("usage") and c["choices"] == []]
    assert len(final) == 1 and final[0]["usage"]["speculative"] == _expected(SPEC_META)
    assert all("speculative" not in (c.get("usage") or {}) for c in chunks if c["choices"])
    from sglang_ext.sglang_plugin.openai_usage import _STREAM_META

    assert id(adapted) not in _STREAM_META  # the stream cleaned up after itself


async def test_stream_without_include_usage_is_untouched(sglang_runtime):
    chat_req, _, adapted = _requests()
    chat_req.stream = True
    chat, _ = _servers(sglang_runtime, [_output(0, "hello", True, SPEC_META)], stream=True)
    chunks = await _stream(chat, "_generate_chat_stream", adapted, chat_req)
    assert not any(c.get("usage") for c in chunks)
