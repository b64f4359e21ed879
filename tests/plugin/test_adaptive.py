"""Adaptive DFLARE verify in SGLang: mode resolution, cost tables, and the step's tensor math (CPU)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from sglang_ext.sglang_plugin import adaptive

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("env", "backend", "expected"),
    [
        ({}, "fa3", "static"),
        ({}, "triton", "static"),
        ({}, None, "static"),
        ({"DFLARE_VERIFY": "static"}, "fa3", "static"),
        ({"DFLARE_VERIFY": "adaptive"}, "trtllm_mha", "adaptive"),
        ({"DFLARE_VERIFY": "adaptive", "SGLANG_RAGGED_VERIFY_MODE": "compact"}, "fa3", "adaptive"),
    ],
)
def test_mode_follows_the_backend_unless_asked(env, backend, expected) -> None:
    assert adaptive.resolve_mode(backend, env) == expected


@pytest.mark.parametrize(
    ("env", "backend", "needle"),
    [
        ({"DFLARE_VERIFY": "adaptive"}, "triton", "ragged-verify CUDA graphs"),
        ({"DFLARE_VERIFY": "fast"}, "fa3", "expected one of"),
        ({"DFLARE_VERIFY": "adaptive", "SGLANG_RAGGED_VERIFY_MODE": "cap-accept"}, "fa3", "compact"),
        ({"DFLARE_VERIFY": "static", "SGLANG_RAGGED_VERIFY_MODE": "compact"}, "fa3", "needs DFLARE_VERIFY"),
    ],
)
def test_impossible_modes_fail_the_launch_with_a_reason(env, backend, needle) -> None:
    with pytest.raises(adaptive.AdaptiveConfigError, match=needle):
        adaptive.resolve_mode(backend, env)


def test_cost_table_lookup_prefers_the_variable_then_the_card(tmp_path: Path) -> None:
    assert adaptive.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert adaptive.find_cost_table("No Such Card", 16, {}) is None
    table = tmp_path / "t.json"
    table.write_text("{}")
    assert adaptive.find_cost_table("No Such Card", 16, {"DFLARE_COST_TABLE": str(table)}) == table
    with pytest.raises(adaptive.AdaptiveConfigError, match="no such file"):
        adaptive.find_cost_table("x", 16, {"DFLARE_COST_TABLE": str(tmp_path / "missing.json")})
    for shipped in adaptive.SHIPPED_TABLES.glob("*.json"):
        card, block = shipped.stem.rsplit("_b", 1)
        assert adaptive.find_cost_table(card, int(block), {}) == shipped


def test_shorter_draft_blocks_are_adaptive_only_and_checked_at_launch() -> None:
    env = {"DFLARE_VERIFY": "adaptive", "DFLARE_DRAFT_BLOCKS": "8, 4"}
    assert adaptive.resolve_mode("fa3", env) == "adaptive"
    assert adaptive.draft_blocks(16, env) == [4, 8] and adaptive.draft_blocks(16, {}) == []
    with pytest.raises(adaptive.AdaptiveConfigError, match="needs DFLARE_VERIFY=adaptive"):
        adaptive.resolve_mode("fa3", {"DFLARE_DRAFT_BLOCKS": "8"})
    with pytest.raises(adaptive.AdaptiveConfigError, match="needs DFLARE_VERIFY=adaptive"):
        adaptive.resolve_mode("fa3", {**env, "DFLARE_VERIFY": "dspark_planner"})
    for bad in ("eight", "1", "8,1"):
        with pytest.raises(adaptive.AdaptiveConfigError, match="DFLARE_DRAFT_BLOCKS"):
            adaptive.resolve_mode("fa3", {**env, "DFLARE_DRAFT_BLOCKS": bad})
    with pytest.raises(adaptive.AdaptiveConfigError, match=r"2\.\.7"):
        adaptive.draft_blocks(8, env)  # not shorter than the configured block


def test_shorter_draft_blocks_take_their_draft_costs_from_the_shipped_tables(caplog) -> None:
    """A shorter block's draft costs: the block-16 table's own (eager drafts an adaptive server measured),
    else the shipped table of that block (its static server's graph drafts); a block with neither is
    dropped."""
    card = "NVIDIA H100 80GB HBM3"
    tables = adaptive.SHIPPED_TABLES
    own = {
        p["batch"]: p["ms"]
        for p in json.loads((tables / "nvidia-h100-80gb-hbm3_b16.json").read_text())["draft"]
        if p["block"] == 8
    }
    b8 = json.loads((tables / "nvidia-h100-80gb-hbm3_b8.json").read_text())
    cost, usable = adaptive.load_cost_table(card, 16, [8])
    assert usable == [8]
    assert any(p["batch"] not in own for p in b8["draft"])  # the sibling table fills batches in
    for point in b8["draft"]:
        assert cost.draft_ms(point["batch"], 8) == pytest.approx(own.get(point["batch"], point["ms"]))
    cost, usable = adaptive.load_cost_table(card, 16, [6, 8])  # no draft was measured at block 6
    assert usable == [8] and "no draft cost for blocks [6]" in caplog.text
    assert adaptive.load_cost_table("No Such Card", 16, [8]) == (None, [])


def test_a_chosen_table_brings_the_draft_costs_of_the_tables_beside_it(tmp_path, monkeypatch) -> None:
    """A table made on one card and served on another: the shorter block's draft cost is the one measured
    beside it on its own card, not the shipped one of the card serving (none for this card)."""
    shipped = adaptive.SHIPPED_TABLES / "nvidia-h100-80gb-hbm3_b16.json"
    b8 = json.loads((adaptive.SHIPPED_TABLES / "nvidia-h100-80gb-hbm3_b8.json").read_text())
    for point in b8["draft"]:
        point["ms"] *= 1.04  # still below block 16 (costs rise with the block)
    whole = json.loads(shipped.read_text())
    whole["draft"] = [p for p in whole["draft"] if p["block"] == 16]  # no shorter draft measured in it
    (tmp_path / "my-card_b16.json").write_text(json.dumps(whole))
    monkeypatch.setenv(adaptive.COST_TABLE_ENV, str(tmp_path / "my-card_b16.json"))
    assert adaptive.load_cost_table("Other Card", 16, [8])[1] == []  # nothing beside it yet
    (tmp_path / "my-card_b8.json").write_text(json.dumps(b8))
    cost, usable = adaptive.load_cost_table("Other Card", 16, [8])
    assert usable == [8]
    for point in b8["draft"]:
        assert cost.draft_ms(point["batch"], 8) == pytest.approx(point["ms"])


def test_a_shorter_draft_is_a_ragged_batch_of_equal_lengths_that_no_draft_graph_fits() -> None:
    """What SGLang's attention backends and the draft graph runner read from a shorter draft's input on a
    backend other than FA3: the eager path (its width is not the captured width) and, per request,
    ``width`` queries over the committed prefix plus the drafted block (the metadata a ragged layout gives;
    FA3 gets a uniform batch instead: tests/plugin/test_short_draft.py)."""
    from types import SimpleNamespace

    from sglang.srt.speculative.ragged_verify import build_ragged_target_verify_geometry

    from sglang_ext.sglang_plugin.adaptive_step import AdaptiveStep

    worker = SimpleNamespace(
        block_size=16, device=torch.device("cpu"), draft_model_runner=SimpleNamespace(attn_backend=object())
    )
    step = AdaptiveStep(worker, None)
    spec = step._short_draft_input(3, 8)
    assert spec.draft_token_num == spec.num_tokens_per_req == 8  # != 16 captured: the runner runs eagerly
    assert step._short_draft_input(3, 8) is spec and step._short_draft_input(4, 8) is not spec
    seq_lens = torch.tensor([5, 40, 17])
    geometry = build_ragged_target_verify_geometry(seq_lens=seq_lens, layout=spec.ragged_verify_layout)
    assert geometry.cache_seqlens_int32.tolist() == [13, 48, 25]
    assert geometry.cu_seqlens_q.tolist() == [0, 8, 16, 24] and geometry.max_seq_len_q == 8


def _greedy_case(seed: int, bs: int = 64, block: int = 8):
    """Drafts that match the target's argmax with probability 0.7 per position (over a 5-token vocab, so
    chance matches beyond a mismatch happen too), and random windows 1..block."""
    g = torch.Generator().manual_seed(seed)
    predict = torch.randint(0, 5, (bs, block), generator=g)
    candidates = torch.randint(0, 5, (bs, block), generator=g)
    agree = torch.rand(bs, block - 1, generator=g) < 0.7
    candidates[:, 1:] = torch.where(agree, predict[:, :-1], candidates[:, 1:])
    lens = torch.randint(1, block + 1, (bs,), generator=g)
    return candidates, predict, lens


@pytest.mark.parametrize("seed", range(5))
def test_windowed_accept_commits_exactly_the_targets_tokens_within_the_window(seed: int) -> None:
    candidates, predict, lens = _greedy_case(seed)
    accepted, bonus = adaptive.windowed_greedy_accept(candidates, predict, lens)
    out = adaptive.out_tokens(candidates, accepted, bonus)
    for i in range(candidates.shape[0]):
        a, window = int(accepted[i]), int(lens[i])
        assert 0 <= a <= window - 1  # never a draft the target did not verify
        # lossless: what is committed is the target's own greedy tokens
        assert out[i, : a + 1].tolist() == predict[i, : a + 1].tolist()
        # maximal: the next draft is rejected or outside the window
        assert a == window - 1 or int(candidates[i, a + 1]) != int(predict[i, a])


def test_full_window_matches_sglangs_full_block_rule_and_window_one_is_a_decode() -> None:
    candidates, predict, _ = _greedy_case(7, bs=32, block=16)
    full = torch.full((32,), 16)
    accepted, bonus = adaptive.windowed_greedy_accept(candidates, predict, full)
    match = (candidates[:, 1:] == predict[:, :-1]).int().cumprod(1).sum(1)
    assert accepted.tolist() == match.tolist()
    assert bonus.tolist() == predict.gather(1, match[:, None]).squeeze(1).tolist()
    accepted, bonus = adaptive.windowed_greedy_accept(candidates, predict, torch.ones(32, dtype=torch.long))
    assert accepted.tolist() == [0] * 32 and bonus.tolist() == predict[:, 0].tolist()


def test_top1_probabilities_are_the_softmax_maximum_in_any_chunking() -> None:
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 16, generator=g), torch.randn(101, 16, generator=g)
    expected = torch.softmax(hidden @ weight.T, dim=-1).max(dim=-1).values
    for chunk in (1, 8, 1024):
        assert torch.allclose(adaptive.top1_probabilities(hidden, weight, chunk=chunk), expected, atol=1e-6)


def test_uniform_width_is_the_rounded_mean_and_never_below_the_minimum() -> None:
    assert adaptive.uniform_width([0, 0, 0]) == 1
    assert adaptive.uniform_width([3, 5, 7]) == 5
    assert adaptive.uniform_width([0, 0], minimum=0) == 0


def test_cost_table_from_load_rows_puts_each_block_at_its_tokens(tmp_path: Path) -> None:
    rows = [
        {"trace": "synthetic", "batch": 8, "mode": "ar", "block": 1, "ar_step_ms": 6.0, "attention": "fa3"},
        {"trace": "synthetic", "batch": 8, "mode": "static", "block": 4, "verify_ms": 6.5,
         "context_kv_ms": 0.5, "draft_ms": 1.0, "attention": "fa3"},
        {"trace": "demo_greedy", "batch": 8, "mode": "static", "block": 16, "verify_ms": 9.0,
         "context_kv_ms": 1.0, "draft_ms": 2.0, "attention": "fa3"},
        {"trace": "synthetic", "batch": 8, "mode": "static", "block": 16, "verify_ms": 11.0,
         "context_kv_ms": 1.0, "draft_ms": 3.0, "attention": "fa3"},
        {"trace": "synthetic", "batch": 8, "mode": "static", "block": 16, "verify_ms": 99.0,
         "draft_ms": 99.0, "attention": "triton"},
        {"trace": "synthetic", "batch": 8, "mode": "adaptive_draft", "block": 16, "verify_ms": 8.0,
         "draft_ms": 2.5, "draft_short_ms": 1.5, "short_drafts": "8", "attention": "fa3"},
        {"trace": "synthetic", "batch": 8, "mode": "adaptive_draft", "block": 16, "verify_ms": 8.0,
         "draft_ms": 2.5, "draft_short_ms": 1.2, "short_drafts": "4,8", "attention": "fa3"},
    ]  # fmt: skip
    src = tmp_path / "load.json"
    src.write_text(json.dumps({"device": "NVIDIA Test Card", "rows": rows}))
    out = tmp_path / "table.json"
    script = ROOT / "tests/gpu/make_cost_table.py"
    cmd = [sys.executable, str(script), str(src), "--block", "16", "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    table = json.loads(out.read_text())
    assert table["device"] == "NVIDIA Test Card" and table["block_size"] == 16
    verify = {(p["batch"], p["tokens"]): p["ms"] for p in table["verify"]}
    assert verify == {(8, 8): 6.0, (8, 32): 7.0, (8, 128): 11.0}  # both traces averaged, triton left out
    # block 8 from the eager drafts of the adaptive server that drafted only block 8 beside the whole block
    assert table["draft"] == [{"batch": 8, "block": 8, "ms": 1.5}, {"batch": 8, "block": 16, "ms": 2.5}]
    assert table["decode"] == [{"batch": 8, "ms": 6.0}]


def _step(block: int = 8, cheap_verify: bool = True) -> Any:
    """An AdaptiveStep on a stand-in worker (only the block size is read outside ``run``) with a cost table
    where verifying is nearly free (``cheap_verify``) or costs far more than decoding."""
    from types import SimpleNamespace

    from sglang_ext.dflare.verify_policy import StepCostModel
    from sglang_ext.sglang_plugin.adaptive_step import AdaptiveStep

    per_token = 0.001 if cheap_verify else 5.0
    verify = [(b, t, 5.0 + per_token * t) for b in (1, 64) for t in (b, b * block)]
    cost = StepCostModel(verify, [(1, block, 0.1), (64, block, 0.5)], [(1, 5.0), (64, 5.0)], block_size=block)
    return AdaptiveStep(SimpleNamespace(block_size=block), cost)


def test_greedy_widths_follow_each_requests_confidence_and_sampling_batches_verify_alike() -> None:
    step = _step()
    confident = torch.tensor([[0.99] * 7, [0.02] * 7] * 4, dtype=torch.float64)
    widths = step._widths(step.greedy_policy, confident, greedy=True, bs=8)
    assert widths[0] > widths[1]  # more width to the confident request
    uniform = step._widths(step.sampling_policy, confident, greedy=False, bs=8)
    assert len(set(uniform)) == 1 and uniform[0] >= 1


def test_costly_verify_turns_greedy_batches_to_plain_decoding() -> None:
    step = _step(cheap_verify=False)
    doubtful = torch.full((64, 7), 0.3, dtype=torch.float64)
    policy = step.greedy_policy
    plans = [policy.plan(doubtful) for _ in range(20) if not policy.plan_for_batch(64).plain_decode]
    assert plans and plans[-1].plain_decode  # after the cold-start probe, drafts verify nothing ...
    assert policy.plan_for_batch(64).plain_decode  # ... and then the drafter stops running


def _context_kv_written(hidden, slots, positions, commit_lens, pool_slots: int) -> tuple[torch.Tensor, ...]:
    """The drafter context K/V a verify leaves in SGLang's KV pool (its prefix-valid write, CPU path) when
    the rows ``hidden`` at ``slots`` [bs, W] are projected and committed up to ``commit_lens``: a stand-in
    projection of hidden row and position, so a row written from the wrong request, column or position
    shows."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    pool = MHATokenToKVPool(pool_slots, 1, torch.float32, 2, 4, 1, "cpu", False, enable_alt_stream=False)
    features = hidden + positions.reshape(-1, 1).to(hidden.dtype)
    k, v = features[:, :8].reshape(-1, 2, 4), features[:, 8:].reshape(-1, 2, 4)
    pool.set_kv_buffer_prefix_valid(SimpleNamespace(layer_id=0), slots, commit_lens, k, v)
    return pool.k_buffer[0].clone(), pool.v_buffer[0].clone()


@pytest.mark.parametrize("seed", range(4))
def test_context_kv_of_the_longest_window_writes_what_the_whole_block_wrote(seed: int) -> None:
    """Projecting only the columns up to the longest verify window leaves the same drafter context K/V as
    projecting the whole block (each request commits at most its window), with fewer rows; a window
    shorter than a commit would lose committed rows, which this comparison sees."""
    gen = torch.Generator().manual_seed(seed)
    bs, block = 5, 8
    widths = torch.randint(0, 4, (bs,), generator=gen)  # a block-4 draft (or plain rows) in a block-8 server
    commit = (torch.rand(bs, generator=gen) * (widths + 1)).floor().to(torch.int32) + 1  # 1..width + 1
    window = int(widths.max()) + 1
    hidden = torch.randn(bs * block, 16, generator=gen)
    slots = torch.randperm(bs * block, generator=gen).view(bs, block) + 3
    positions = torch.arange(block).repeat(bs, 1) + 100 * torch.arange(bs)[:, None]
    whole = _context_kv_written(hidden, slots, positions, commit, 64)
    rows, narrow_slots, narrow_positions = adaptive.committable_columns(hidden, slots, positions, window)
    assert rows.shape == (bs * window, 16) and narrow_slots.is_contiguous()
    narrow = _context_kv_written(rows, narrow_slots, narrow_positions, commit, 64)
    assert all(torch.equal(a, b) for a, b in zip(whole, narrow, strict=True))
    if int(commit.max()) > 1:  # too short a window: a committed row is missing
        short = adaptive.committable_columns(hidden, slots, positions, int(commit.max()) - 1)
        assert not torch.equal(whole[0], _context_kv_written(*short, commit, 64)[0])


def test_the_plugins_policy_reads_learnt_step_costs_back_every_16_steps() -> None:
    """Every step teaches the cost model, but the costs the plan reads are rebuilt once in 16 steps (the plan
    runs while the GPU waits for it): 15 slower steps leave the plan's verify cost as it was, the 16th
    moves it."""
    from sglang_ext.sglang_plugin.adaptive_step import LEARN_EVERY

    step = _step()
    cost = step.greedy_policy.cost
    before = cost.verify_ms(64, 64 * 8)
    for i in range(1, LEARN_EVERY + 1):
        step.greedy_policy.observe_step(64, 64 * 8, 3 * (0.5 + before), draft_block=8)
        moved = cost.verify_ms(64, 64 * 8) > 1.2 * before
        assert moved == (i == LEARN_EVERY), i


def test_the_calibration_learns_one_step_late_from_what_was_accepted() -> None:
    step = _step()
    conf = torch.full((4, 7), 0.9, dtype=torch.float64)
    before = step.calibration.observations
    step._pending = (conf, [7, 7, 7, 7], torch.tensor([0, 0, 0, 0], dtype=torch.int32))
    step._learn_lagged()
    assert step.calibration.observations == before + 4  # one rejection seen per request
    assert step._pending is None
    assert float(step.calibration.predict(torch.tensor([0.9]))[0]) < 0.9  # the drafter was overconfident


def test_sglangs_window_builder_gets_each_requests_window_in_order() -> None:
    """The verify ids SGLang's compact ragged verify runs are each request's first verify_len block tokens."""
    from sglang.kernels.ops.speculative.dspark.dspark_verify_window import compact_verify_ids
    from sglang.srt.speculative.ragged_verify import RaggedVerifyLayout

    block_tokens = torch.arange(100, 100 + 4 * 6).view(4, 6)  # 4 requests, block 6
    lens = [1, 6, 3, 2]
    cpu = torch.device("cpu")
    layout = RaggedVerifyLayout.from_verify_lens(verify_lens_cpu=lens, device=cpu, grid=[16, 24])
    anchors, drafts = adaptive.window_inputs(block_tokens)
    ids = compact_verify_ids(draft_block_ids=anchors, draft_tokens=drafts, layout=layout, device="cpu")
    expected = [t for row, n in zip(block_tokens.tolist(), lens, strict=True) for t in row[:n]]
    assert ids.tolist() == expected + [0] * (16 - len(expected))  # padded to the graph tier with zeros


@pytest.mark.parametrize("seed", range(4))
def test_greedy_argmax_of_the_compact_rows_is_the_argmax_of_the_scattered_logits(seed: int) -> None:
    """The greedy step's target tokens from the compact verify logits equal those of the logits scattered to
    the strided layout first (SGLang's way), padding rows and windows of every width included."""
    from sglang.kernels.ops.speculative.dspark.dspark_verify_window import ScatterCompactToStrided
    from sglang.srt.speculative.ragged_verify import RaggedVerifyLayout

    gen = torch.Generator().manual_seed(seed)
    block, bs, vocab = 8, 6, 50
    lens = torch.randint(1, block + 1, (bs,), generator=gen).tolist()
    layout = RaggedVerifyLayout.from_verify_lens(verify_lens_cpu=lens, device=torch.device("cpu"), grid=[64])
    compact = torch.randn(layout.graph_num_tokens, vocab, generator=gen)
    scattered = ScatterCompactToStrided.execute(
        compact=compact, layout=layout, fill_value=0.0, verify_num_draft_tokens=block
    )[: bs * block]
    expected = torch.argmax(scattered, dim=-1).view(bs, block)
    got = adaptive.strided_argmax(compact, layout, block)
    assert got.shape == (bs, block) and torch.equal(got, expected)
    for row, n in enumerate(lens):  # and each window holds its own compact rows' argmax
        start = sum(lens[:row])
        assert got[row, :n].tolist() == compact[start : start + n].argmax(dim=-1).tolist()


def test_only_logit_adjustments_make_a_greedy_step_scatter_the_whole_logits() -> None:
    plain = SimpleNamespace(
        has_custom_logit_processor=False, penalizer_orchestrator=SimpleNamespace(is_required=False),
        acc_linear_penalties=None, grammar_mask=None, logit_bias=None,
    )  # fmt: skip
    assert not adaptive.needs_logit_adjustments(None)
    assert not adaptive.needs_logit_adjustments(plain)
    for change in (
        {"has_custom_logit_processor": True},
        {"penalizer_orchestrator": SimpleNamespace(is_required=True)},
        {"acc_linear_penalties": torch.zeros(1, 4)},
        {"grammar_mask": torch.zeros(1, 4)},
        {"logit_bias": torch.zeros(1, 4)},
    ):
        assert adaptive.needs_logit_adjustments(SimpleNamespace(**{**vars(plain), **change})), change


def test_host_upload_gives_the_values_on_the_cpu_too() -> None:
    from sglang_ext.sglang_plugin import host_upload

    out = host_upload.to_device([3, 1, 2], "cpu", torch.int32)
    assert out.dtype == torch.int32 and out.tolist() == [3, 1, 2]


def test_load_benchmarks_running_batch_ignores_the_previous_measurements_late_records(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "gpu"))
    from bench_sglang_load import running_batch

    before = {"verify/128": [40, 900.0], "verify/1": [10, 70.0], "decode/1": [3, 20.0]}
    after = {"verify/128": [64, 1400.0], "verify/1": [90, 600.0], "decode/1": [3, 20.0]}
    assert running_batch(before, after, 1) == 1  # verify/128 grew: the batch-128 run's records, late
    assert running_batch(before, after, 128) == 128
    assert running_batch(before, before, 8) == 0


def test_load_benchmark_gives_the_drafter_the_draft_vocabulary_asked_for(monkeypatch, tmp_path) -> None:
    """DRAFT_VOCAB=N: the dummy drafter gets a vocabulary of N tokens that the plugin's loader reads; unset,
    a file an earlier run of the same lease left is removed (the drafter drafts over every token again)."""
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "gpu"))
    import bench_sglang_load as bench

    from sglang_ext.dflare.draft_vocab import DraftVocab

    monkeypatch.setenv("DRAFT_VOCAB", "32768")
    bench.write_draft_vocab(tmp_path)
    vocab = DraftVocab.load(tmp_path)
    assert vocab is not None and vocab.size == 32768 and vocab.target_vocab_size == bench.TARGET["vocab_size"]
    monkeypatch.delenv("DRAFT_VOCAB")
    bench.write_draft_vocab(tmp_path)
    assert DraftVocab.load(tmp_path) is None


def test_load_benchmark_sums_what_the_scheduler_spent_in_gc_and_triton_at_every_batch_size(
    monkeypatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "gpu"))
    from bench_sglang_load import summed_ms

    before = {"gc_gen2/128": [1, 9.0], "triton_jit/128": [2, 40.0], "verify/128": [10, 300.0]}
    after = {
        "gc_gen2/128": [2, 21.0],
        "gc_gen0/57": [3, 1.5],
        "triton_jit/128": [2, 40.0],  # nothing new at 128
        "triton_jit/57": [1, 31.0],  # a batch size first met in the tail
        "triton_load/57": [1, 4.0],
        "verify/128": [20, 600.0],
    }
    assert summed_ms(before, after, "gc_gen") == pytest.approx(13.5)
    assert summed_ms(before, after, "triton_jit/") == pytest.approx(31.0)
    assert summed_ms(before, after, "triton_load/") == pytest.approx(4.0)


def test_load_benchmark_starts_each_planner_with_its_own_environment(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "gpu"))
    import bench_sglang_load as bench

    started = []
    monkeypatch.setattr(bench, "Server", lambda name, port, args, env: started.append((name, port, env)))
    monkeypatch.setenv("SHORT_DRAFTS", "4,8")
    blocks = bench.parse_blocks("8,a16,d16,s16")
    assert blocks == [("static", 8), ("adaptive", 16), ("dspark_planner", 16), ("adaptive_draft", 16)]
    for mode, block in blocks:
        bench.start_dflare([], "fa3", mode, block, ROOT, "")
    envs = {name: env for name, _, env in started}
    assert (
        envs["dflare_s16"]["DFLARE_VERIFY"] == "adaptive"
        and envs["dflare_s16"]["DFLARE_DRAFT_BLOCKS"] == "4,8"
    )
    assert (
        envs["dflare_a16"]["DFLARE_VERIFY"] == "adaptive" and "DFLARE_DRAFT_BLOCKS" not in envs["dflare_a16"]
    )
    assert (
        envs["dflare_d16"]["DFLARE_VERIFY"] == "dspark_planner"
        and envs["dflare_b8"]["DFLARE_VERIFY"] == "static"
    )
    assert len({port for _, port, _ in started}) == len(blocks)  # side by side on distinct ports


def test_load_benchmark_splits_shorter_drafts_from_whole_block_drafts(monkeypatch) -> None:
    """An adaptive server that drafted block 8 eagerly in some steps: the row keeps both draft costs, the
    share of short drafts and their mean (what its step really paid for drafting)."""
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "gpu"))
    import bench_sglang_load as bench

    snapshots = iter(
        [
            {"draft/4": [10, 100.0], "verify/4": [10, 300.0], "gc_gen2/8": [1, 30.0]},
            {
                "draft/4": [13, 130.0], "draft_short/4": [1, 6.0], "verify/4": [14, 420.0],
                "draft_short_host/4": [1, 0.5], "gc_gen2/8": [2, 70.0], "gc_gen0/3": [4, 2.0],
            },
        ]
    )  # fmt: skip
    monkeypatch.setattr(bench, "phase_totals", lambda _: next(snapshots))
    monkeypatch.setattr(bench.time, "sleep", lambda _: None)
    meta = {"completion_tokens": 10, "spec_verify_ct": 4, "spec_num_correct_drafts": 8}
    monkeypatch.setattr(bench, "timed", lambda fn: ([{"meta_info": meta}] * 4, 2.0))
    row = bench.measure(SimpleNamespace(name="dflare_s16"), 4, "synthetic")
    assert row["draft_ms"] == 10.0 and row["draft_short_ms"] == 6.0 and row["verify_ms"] == 30.0
    assert row["draft_short_share"] == 0.25 and row["draft_mean_ms"] == 9.0
    assert row["draft_short_host_ms"] == 0.5 and row["verify_host_ms"] is None
    assert row["gc_ms"] == 42.0  # every GC pass meanwhile, at whatever batch size the tail ran
    whole = iter([{"draft/4": [10, 100.0]}, {"draft/4": [12, 120.0]}])
    monkeypatch.setattr(bench, "phase_totals", lambda _: next(whole))
    row = bench.measure(SimpleNamespace(name="dflare_a16"), 4, "synthetic")
    assert row["draft_short_share"] is None and row["draft_mean_ms"] is None  # every round has every key


def test_load_benchmark_samples_the_servers_scheduler_not_its_launcher(monkeypatch) -> None:
    """The host sampler (PYSPY) must attach to the scheduler child, where a step's host work runs."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "gpu"))
    from bench_sglang_load import sample_host, scheduler_pid

    child = "import time; time.sleep(30)"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}, 'x'])",
        ]
    )
    try:
        import psutil

        server = SimpleNamespace(proc=launcher, name="fake")
        deadline = time.time() + 10
        while not psutil.Process(launcher.pid).children() and time.time() < deadline:
            time.sleep(0.05)
        assert scheduler_pid(server) is None  # no child is a scheduler
        (worker,) = psutil.Process(launcher.pid).children()
        monkeypatch.setattr(
            psutil.Process, "name", lambda self: "sglang::scheduler" if self.pid == worker.pid else "python"
        )
        assert scheduler_pid(server) == worker.pid
        monkeypatch.delenv("PYSPY", raising=False)
        assert sample_host(server, "bs1_ar", 1.0) is None  # off unless asked for
    finally:
        launcher.kill()


def test_adaptive_runs_tensor_parallel_and_refuses_pipeline_or_data_parallel_engines() -> None:
    from types import SimpleNamespace

    adaptive.check_parallelism(SimpleNamespace(tp_size=1, pp_size=1, dp_size=1))  # one GPU
    adaptive.check_parallelism(SimpleNamespace(tp_size=8, pp_size=1, dp_size=1))  # one TP group: rank 0 plans
    for flag in ("pp_size", "dp_size"):
        args = SimpleNamespace(tp_size=2, pp_size=1, dp_size=1)
        setattr(args, flag, 2)
        with pytest.raises(adaptive.AdaptiveConfigError, match=f"--{flag.replace('_', '-')} 2"):
            adaptive.check_parallelism(args)


def test_a_server_kept_full_is_measured_at_its_steady_rate(monkeypatch) -> None:
    """keep_full (STEADY in the load benchmark) against a stand-in /generate that takes 20 ms a request
    of 10 tokens: never more than the asked concurrency in flight, each client sending again at once, and
    the window's rate that of the full server (4 clients x 10 tokens / 20 ms = 2,000 tok/s)."""
    import threading

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "gpu"))
    from sglang_harness import keep_full, steady_rate

    in_flight, most, lock = [0], [0], threading.Lock()

    def send(url: str, body: dict, timeout: float) -> tuple[int, dict]:
        assert url.endswith("/generate") and body["sampling_params"]["max_new_tokens"] == 10
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.02)
        with lock:
            in_flight[0] -= 1
        return 200, {"meta_info": {"completion_tokens": 10}}

    start, requests = keep_full("http://stand-in", [1, 2], {"max_new_tokens": 10}, 4, 0.6, send=send)
    assert most[0] == 4 and len(requests) >= 4 * 20
    assert all(start <= sent < answered for sent, answered, _ in requests)
    rate = steady_rate(requests, start + 0.2, start + 0.6)
    assert 1500 < rate < 2100, rate  # sleep overshoots a little: never faster than the full server


def test_kept_full_lengths_vary_by_the_spread_and_repeat_for_every_server(monkeypatch) -> None:
    """SPREAD: each request asks for 100 tokens times a factor in [0.5, 1.5], client i drawing from its own
    seeded stream, so a second server is asked for the same lengths; spread 0 asks for 100 every time."""
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "gpu"))
    from sglang_harness import keep_full

    def run(spread: float) -> list[int]:
        asked: list[tuple[int, int]] = []

        def send(url: str, body: dict, timeout: float) -> tuple[int, dict]:
            n = body["sampling_params"]["max_new_tokens"]
            asked.append((body["input_ids"][0], n))
            time.sleep(0.002)
            return 200, {"meta_info": {"completion_tokens": n}}

        keep_full("http://stand-in", [7], {"max_new_tokens": 100}, 3, 0.15, send=send, spread=spread)
        return [n for _, n in asked]

    varied = run(0.5)
    assert all(50 <= n <= 150 for n in varied) and len(set(varied)) > 10
    assert max(varied) - min(varied) > 60  # the whole range is drawn, not a sliver of it
    fixed = run(0.0)
    assert fixed and set(fixed) == {100}
    first = max(1, round(100 * random.Random(0).uniform(0.5, 1.5)))
    assert first in varied  # client 0's first request: its seeded stream, so every server gets it


def test_a_steady_window_counts_the_tokens_made_inside_it_when_requests_finish_in_waves(monkeypatch) -> None:
    """Four clients in lockstep, 10 tokens per 0.25 s request (160 tok/s), a 0.4 s window that holds two
    waves of answers (at 0.25 and 0.5 s) but 1.6 request lifetimes: 160 tok/s, not 200."""
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "gpu"))
    from sglang_harness import steady_rate

    waves = [(t, t + 0.25, 10) for t in (0.0, 0.25, 0.5) for _client in range(4)]
    assert steady_rate(waves, 0.2, 0.6) == pytest.approx(160.0)
    assert steady_rate(waves, 0.0, 0.75) == pytest.approx(160.0)  # the whole run, however cut


def test_load_benchmark_freezes_the_garbage_collector_of_every_server_it_is_asked_to(monkeypatch) -> None:
    """GC_FREEZE=1: a POST to SGLang's /freeze_gc on each server, over real HTTP on loopback; a server that
    refuses fails the run instead of measuring something else than the command says."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "gpu"))
    import bench_sglang_load as bench

    seen: list[tuple[int, str]] = []

    def server(status: int) -> ThreadingHTTPServer:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                seen.append((self.server.server_address[1], self.path))
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"Garbage collection frozen.\n" if status == 200 else b"no")

            def log_message(self, *args) -> None:
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return httpd

    ok, ok2, refusing = server(200), server(200), server(404)
    try:
        urls = [f"http://127.0.0.1:{s.server_address[1]}" for s in (ok, ok2, refusing)]
        bench.freeze_gc(urls[:2])
        assert seen == [(ok.server_address[1], "/freeze_gc"), (ok2.server_address[1], "/freeze_gc")]
        with pytest.raises(RuntimeError, match="404"):
            bench.freeze_gc(urls[2:])
    finally:
        for s in (ok, ok2, refusing):
            s.shutdown()
