"""Adaptive verify under tensor parallelism, on CPU with real gloo processes (``tp_plan_ranks.py``).

* the confidences of a vocab-parallel LM head (SGLang's ``ParallelLMHead``, one shard per rank, padding
  rows poisoned) equal the unsharded ``top1_probabilities`` on every rank, for vocabularies that leave
  padding, LoRA-added rows and a shard without any token (and on one rank, where only padding is left out);
* every rank runs rank 0's plan (plain steps, the block to draft and per-request widths) although each
  rank plans from its own confidences and cost table, and no rank plans when rank 0 has no cost table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sglang_ext.dflare.verify_policy import StepCostModel
from sglang_ext.sglang_plugin import adaptive
from sglang_ext.sglang_plugin.adaptive_step import AdaptiveStep
from tests.plugin.tp_plan_ranks import shorter_blocks
from tests.ports import loopback_port

pytestmark = pytest.mark.sglang

REPO = Path(__file__).resolve().parents[2]
TP_SIZES = (4, 2, 1)  # 1: the head is whole but padded, and nothing is broadcast
BLOCK = 8
HIDDEN = 32
HEADS = {"padded": (1000, 1000), "lora_added": (1010, 1000), "empty_shard": (70, 70)}  # vocab, base vocab
# (batch, all greedy) per step: after 16 drafted steps at batch 64 a costly table turns to plain decoding
SCHEDULE = [(64, True)] * 24 + [(8, False), (8, True), (3, True), (64, True), (5, False), (64, True)]


def _cost(cheap_verify: bool, short_draft: bool = False) -> dict:
    """``short_draft``: the whole block's draft is dear and block 4's cheap, so the plan drafts block 4."""
    per_token = 0.001 if cheap_verify else 5.0
    verify = [(b, t, 5.0 + per_token * t) for b in (1, 64) for t in (b, b * BLOCK)]
    draft, decode = [(1, BLOCK, 0.1), (64, BLOCK, 0.5)], [(1, 5.0), (64, 5.0)]
    if short_draft:
        draft = [(1, BLOCK, 0.1), (64, BLOCK, 20.0), (1, 4, 0.05), (64, 4, 0.2)]
    return StepCostModel(verify, draft, decode, block_size=BLOCK).to_dict()


CHEAP, COSTLY, SHORT_DRAFT = _cost(True), _cost(False), _cost(True, short_draft=True)
# each scenario's cost table per rank (rank r takes entry r): rank 0 decides, the others disagree with it
SCENARIOS = {
    "rank0_cheap": [CHEAP, COSTLY, COSTLY, COSTLY],
    "rank0_costly": [COSTLY, CHEAP, CHEAP, CHEAP],
    "rank0_without_table": [None, CHEAP, COSTLY, CHEAP],
    "rank0_short_draft": [SHORT_DRAFT, CHEAP, CHEAP, CHEAP],
}


def _inputs() -> dict:
    gen = torch.Generator().manual_seed(18)
    heads = []
    for vocab, org in HEADS.values():
        weight = torch.randn(vocab, HIDDEN, generator=gen) * (3 / HIDDEN**0.5)
        heads.append({"weight": weight, "org": org, "hidden": torch.randn(13, HIDDEN, generator=gen)})
    confidences = [  # each rank its own, as each rank's drafter output would differ if ranks disagreed
        [torch.rand(bs, BLOCK - 1, generator=gen, dtype=torch.float64) for bs, _ in SCHEDULE]
        for _ in range(max(TP_SIZES))
    ]
    return {
        "heads": heads,
        "draft_hidden": torch.randn(3 * BLOCK, HIDDEN, generator=gen),  # 3 requests' drafted blocks
        "draft_vocab": torch.arange(1, HEADS["padded"][0], 3),  # a third of the head, in every rank's shard
        "block": BLOCK,
        "schedule": SCHEDULE,
        "confidences": confidences,
        "costs": SCENARIOS,
    }


def _alone(cost: dict | None, confidences: list[torch.Tensor]) -> list[tuple[bool, int, list[int]]]:
    """The plans one rank would make by itself from these inputs (no broadcast)."""
    step = AdaptiveStep(
        SimpleNamespace(block_size=BLOCK),
        None if cost is None else StepCostModel.from_dict(cost),
        draft_blocks=shorter_blocks(cost, BLOCK),
    )
    plans = []
    for (bs, greedy), conf in zip(SCHEDULE, confidences, strict=True):
        plain, drafted = step._agreed_start(greedy, bs)
        widths = [0] * bs if plain else step._agreed_widths(conf[:, : drafted - 1], greedy, bs)
        plans.append((plain, drafted, widths))
    return plans


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[dict, dict[int, list[dict]]]:
    tmp = tmp_path_factory.mktemp("tp_adaptive")
    inputs = _inputs()
    torch.save(inputs, tmp / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    ports = ",".join(str(loopback_port()) for _ in TP_SIZES)
    sizes = ",".join(map(str, TP_SIZES))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.plugin.tp_plan_ranks", str(tmp / "inputs.pt"), str(tmp), sizes, ports],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return inputs, {tp: [torch.load(tmp / f"tp{tp}-rank{r}.pt") for r in range(tp)] for tp in TP_SIZES}


@pytest.mark.parametrize("tp", TP_SIZES)
def test_vocab_parallel_confidences_equal_the_whole_heads_on_every_rank(ranks, tp) -> None:
    inputs, results = ranks
    for index, (name, case) in enumerate(zip(HEADS, inputs["heads"], strict=True)):
        expected = adaptive.top1_probabilities(case["hidden"], case["weight"])
        assert float(expected.min()) > 0.05 and float(expected.max()) < 0.99, "probabilities too uniform"
        assert sum(r["padding"][index] for r in results[tp]) > 0, f"{name}: no padding row to leave out"
        for rank, result in enumerate(results[tp]):
            got = result["probabilities"][index]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=f"{name}, rank {rank}/{tp}")
            assert torch.equal(got, results[tp][0]["probabilities"][index])  # every rank the same bits
    if tp == 4:  # 70 tokens padded to 128 over 4 ranks: the last shard holds no token at all
        assert results[tp][3]["padding"][list(HEADS).index("empty_shard")] == 32


@pytest.mark.parametrize("tp", TP_SIZES)
def test_the_draft_graphs_head_gives_the_whole_vocabs_drafts_and_confidences_on_every_rank(ranks, tp) -> None:
    """confident_sampler.py over SGLang's TP group: each rank's shard reduced to (max, log-sum-exp) and
    (argmax id), all-gathered, combined: the ids and top-1 probabilities of the unsharded head."""
    inputs, results = ranks
    case = inputs["heads"][0]
    vocab, org = HEADS["padded"]
    assert vocab == org  # SGLang folds no head with added (LoRA) rows into the draft graph
    drafted = inputs["draft_hidden"].view(3, BLOCK, HIDDEN)[:, 1:, :].reshape(-1, HIDDEN)
    logits = drafted @ case["weight"].T
    expected_ids = logits.argmax(dim=-1)
    expected_top1 = adaptive.top1_probabilities(drafted, case["weight"])
    for rank, result in enumerate(results[tp]):
        ids, top1 = result["sampler"]
        assert torch.equal(ids, expected_ids), f"rank {rank}/{tp}"
        torch.testing.assert_close(top1, expected_top1, rtol=1e-5, atol=1e-6, msg=f"rank {rank}/{tp}")


@pytest.mark.parametrize("tp", TP_SIZES)
def test_the_draft_graphs_head_over_a_draft_vocabulary_drafts_its_argmax_on_every_rank(ranks, tp) -> None:
    """The same head kept to a draft vocabulary (every third token): each rank reads only its shard's rows
    of it, and the gathered answer is the argmax over the subset, as a target id, with its softmax's top-1
    probability; it differs from the whole head's (the subset really limits the drafts)."""
    inputs, results = ranks
    subset = inputs["draft_vocab"]
    drafted = inputs["draft_hidden"].view(3, BLOCK, HIDDEN)[:, 1:, :].reshape(-1, HIDDEN)
    rows = inputs["heads"][0]["weight"][subset]
    expected_ids = subset[(drafted @ rows.T).argmax(dim=-1)]
    expected_top1 = adaptive.top1_probabilities(drafted, rows)
    assert not torch.equal(expected_ids, (drafted @ inputs["heads"][0]["weight"].T).argmax(dim=-1))
    for rank, result in enumerate(results[tp]):
        ids, top1 = result["sampler_draft_vocab"]
        assert torch.equal(ids, expected_ids), f"rank {rank}/{tp}"
        torch.testing.assert_close(top1, expected_top1, rtol=1e-5, atol=1e-6, msg=f"rank {rank}/{tp}")


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_rank_runs_rank_0s_plan(ranks, tp, scenario) -> None:
    inputs, results = ranks
    costs, confidences = SCENARIOS[scenario], inputs["confidences"]
    expected = _alone(costs[0], confidences[0])
    for rank, result in enumerate(results[tp]):
        got = result[scenario]
        assert got["leads"] == (rank == 0)
        assert got["planned"] == (costs[0] is not None)
        assert got["plans"] == expected, f"rank {rank}/{tp} ran another plan than rank 0's"
    if costs[0] is None:  # rank 0 has no table: nobody plans, every rank verifies the whole block
        assert expected == [(False, BLOCK, [BLOCK - 1] * bs) for bs, _ in SCHEDULE]
    else:  # the check can fail: alone, rank 1 would have planned otherwise
        assert _alone(costs[1], confidences[1]) != expected
    if scenario == "rank0_costly":
        assert any(plain for plain, _, _ in expected), "rank 0's plan has no plain step to share"
    if scenario == "rank0_short_draft":
        assert any(drafted == 4 for _, drafted, _ in expected), "rank 0's plan drafts no shorter block"
