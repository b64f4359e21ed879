"""Regeneration's temperature mix and its OOM fallback (the two things the second demo build relied on)."""

from __future__ import annotations

import random
from collections import Counter
from itertools import islice

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from sglang_ext.training import regenerate
from sglang_ext.training.regenerate import (
    RECIPE_TEMPERATURES,
    Decoding,
    generate_halving_on_oom,
    temperature_schedule,
)


def test_every_run_of_ten_batches_follows_the_recipe_mix_exactly() -> None:
    schedule = temperature_schedule(RECIPE_TEMPERATURES, random.Random(3))
    expected = Counter({t: w for t, w in RECIPE_TEMPERATURES})
    cycles = [Counter(islice(schedule, 10)) for _ in range(5)]
    assert all(c == expected for c in cycles)
    # ...in a seeded order that is not the same every cycle
    again = temperature_schedule(RECIPE_TEMPERATURES, random.Random(3))
    firsts = [list(islice(again, 10)) for _ in range(5)]
    assert len({tuple(f) for f in firsts}) > 1


GREEDY = Decoding(temperature=0.0, max_new_tokens=6, eos_id=1, pad_id=0, keep_unfinished=True)


@pytest.fixture(scope="module")
def tiny_model() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
    )  # fmt: skip
    return Qwen3ForCausalLM(cfg).eval()


def test_a_batch_that_runs_out_of_memory_is_generated_as_halves_with_the_same_result(
    tiny_model: Qwen3ForCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    whole = generate_halving_on_oom(tiny_model, prompts, GREEDY)

    real, sizes = regenerate.generate_batch, []

    def runs_out_above_one_row(model, batch, decoding):  # a GPU OOM cannot happen on CPU: injected
        sizes.append(len(batch))
        if len(batch) > 1:
            raise torch.OutOfMemoryError("injected")
        return real(model, batch, decoding)

    monkeypatch.setattr(regenerate, "generate_batch", runs_out_above_one_row)
    halved = generate_halving_on_oom(tiny_model, prompts, GREEDY)
    assert sizes == [4, 2, 1, 1, 2, 1, 1]
    assert halved == whole  # greedy rows do not depend on their batch-mates


def test_a_single_row_that_runs_out_of_memory_is_an_error(
    tiny_model: Qwen3ForCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    def always_oom(*args):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(regenerate, "generate_batch", always_oom)
    with pytest.raises(torch.OutOfMemoryError):
        generate_halving_on_oom(tiny_model, [[5, 6]], GREEDY)
