"""``--warmups dflare`` through SGLang's own warm-up runner (``execute_warmups``), with a stand-in for the
tokenizer manager (it needs a GPU engine behind it) that answers as SGLang's does: an async generator per
request, drained by the caller."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from sglang_ext.sglang_plugin import warmup

pytestmark = pytest.mark.sglang


class StandInTokenizerManager:
    """Records each request and yields one output per prompt when the request is done, as a batched
    ``generate_request`` does; ``fail_at``: the request number that raises instead."""

    def __init__(self, vocab_size: int, fail_at: int | None = None) -> None:
        self.model_config = SimpleNamespace(vocab_size=vocab_size)
        self.requests: list = []
        self.drained = 0
        self.fail_at = fail_at

    async def generate_request(self, obj, request=None):
        self.requests.append(obj)
        if self.fail_at is not None and len(self.requests) > self.fail_at:
            raise RuntimeError("engine gone")
        await asyncio.sleep(0)
        yield [{"text": "", "meta_info": {}} for _ in obj.input_ids]
        self.drained += 1


def run_warmups(manager: StandInTokenizerManager, mode: str = "null") -> None:
    from sglang.srt.entrypoints.warmup import execute_warmups

    asyncio.run(execute_warmups(mode, [warmup.NAME], manager))


def test_the_plugin_registers_the_warmup_with_sglang(plugins_loaded) -> None:
    from sglang.srt.entrypoints.warmup import _warmup_registry

    assert _warmup_registry[warmup.NAME] is warmup.run


def test_warmup_decodes_every_batch_class_greedy_and_sampled(plugins_loaded) -> None:
    manager = StandInTokenizerManager(vocab_size=151_936)
    run_warmups(manager)
    sizes = [len(r.input_ids) for r in manager.requests]
    assert sizes == [1, 1, 3, 3, 16, 16] and manager.drained == len(sizes)  # each one drained to its end
    temperatures = [r.sampling_params["temperature"] for r in manager.requests]
    assert temperatures[::2] == [0.0] * 3 and all(t > 0 for t in temperatures[1::2])
    prompts = [tuple(p) for r in manager.requests for p in r.input_ids]
    assert len(set(prompts)) == len(prompts)  # no prefix-cache hit skips a prefill
    assert len({len(p) for p in prompts}) == len(warmup.PROMPT_LENGTHS)
    for r in manager.requests:
        assert r.sampling_params["max_new_tokens"] == warmup.NEW_TOKENS and r.sampling_params["ignore_eos"]
        assert r.log_metrics is False  # the warm-up stays out of the engine's request metrics
        assert r.bootstrap_room is None


@pytest.mark.parametrize("vocab_size", [64, 1000, 151_936])
def test_warmup_prompts_stay_inside_the_vocab(plugins_loaded, vocab_size: int) -> None:
    manager = StandInTokenizerManager(vocab_size=vocab_size)
    run_warmups(manager)
    ids = [t for r in manager.requests for p in r.input_ids for t in p]
    assert min(ids) >= 0 and max(ids) < vocab_size


def test_a_prefill_server_gets_bootstrap_rooms(plugins_loaded) -> None:
    manager = StandInTokenizerManager(vocab_size=1000)
    run_warmups(manager, mode="prefill")
    for r in manager.requests:
        assert r.bootstrap_room == list(range(len(r.input_ids))) and len(r.bootstrap_host) == len(r.input_ids)


def test_a_failing_warmup_is_logged_and_does_not_stop_the_server(plugins_loaded, caplog) -> None:
    manager = StandInTokenizerManager(vocab_size=1000, fail_at=2)
    with caplog.at_level(logging.ERROR, logger=warmup.__name__):
        run_warmups(manager)  # returns: SGLang goes on to listen
    assert len(manager.requests) == 3 and manager.drained == 2
    assert "warm-up failed" in caplog.text
