"""Tensor-parallel sharding of DFlare's context path, on CPU with gloo, against the unsharded math.

DFlare adds per-layer ``k_proj_target`` / ``v_proj_target`` whose KV heads must be split across TP
ranks exactly like SGLang splits the block K/V of ``qkv_proj`` (``QKVParallelLinear``): sharded when
there are at least as many KV heads as ranks, replicated otherwise. The demo shapes have 2 KV heads, so
TP 2 shards them and TP 4 replicates each head on two ranks. Every rank is a real process with SGLang's
process group and model-parallel state on gloo (``tests/plugin/tp_rank.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.plugin.conftest import TARGET
from tests.plugin.test_context_path import _reference
from tests.ports import loopback_port

pytestmark = pytest.mark.sglang

REPO = Path(__file__).resolve().parents[2]
HEAD_DIM = TARGET["head_dim"]


@pytest.mark.parametrize(
    ("total_kv_heads", "tp_size"),
    [(8, 1), (8, 2), (8, 4), (8, 8), (4, 4), (2, 2), (2, 4), (2, 8), (1, 2), (1, 8)],
)
def test_kv_head_range_follows_sglang_qkv_parallel_linear(sglang_runtime, total_kv_heads, tp_size):
    """For every rank, the heads ``_kv_head_range`` names are the heads SGLang's own ``QKVParallelLinear``
    loads into that rank's K and V rows (each head's checkpoint rows carry its index as their value)."""
    from sglang.srt.layers.linear import QKVParallelLinear

    from sglang_ext.sglang_plugin.model import _kv_head_range

    hidden, head_dim = 4, 2
    marked = torch.arange(total_kv_heads, dtype=torch.float32).repeat_interleave(head_dim)
    checkpoint = marked[:, None].expand(-1, hidden).contiguous()  # row r = head r // head_dim
    owners: dict[int, list[int]] = {}
    for rank in range(tp_size):
        layer = QKVParallelLinear(
            hidden,
            head_dim,
            total_num_heads=max(total_kv_heads, tp_size),
            total_num_kv_heads=total_kv_heads,
            bias=False,
            params_dtype=torch.float32,
            tp_rank=rank,
            tp_size=tp_size,
        )
        for shard in ("k", "v"):
            layer.weight_loader(layer.weight, checkpoint, shard)
        q = layer.num_heads * head_dim
        kv = layer.num_kv_heads * head_dim
        loaded_k = layer.weight[q : q + kv, 0].view(-1, head_dim)[:, 0].long().tolist()
        loaded_v = layer.weight[q + kv : q + 2 * kv, 0].view(-1, head_dim)[:, 0].long().tolist()
        first, count = _kv_head_range(total_kv_heads, rank, tp_size)
        assert list(range(first, first + count)) == loaded_k == loaded_v, f"rank {rank}/{tp_size}"
        for head in loaded_k:
            owners.setdefault(head, []).append(rank)
    assert sorted(owners) == list(range(total_kv_heads))  # every head lives somewhere
    assert {len(r) for r in owners.values()} == {max(1, tp_size // total_kv_heads)}


TP_SIZES = (4, 2)  # TP 2 reuses the first two of the four processes


def _run_ranks(target: Path, draft: Path, inputs: Path, out: Path) -> dict[int, list[dict]]:
    """max(TP_SIZES) processes, each TP size in turn: {tp size: per-rank results in rank order}."""
    ports = ",".join(str(loopback_port()) for _ in TP_SIZES)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    sizes = ",".join(map(str, TP_SIZES))
    paths = (target, draft, inputs, out)
    logs = [out / f"process{rank}.log" for rank in range(max(TP_SIZES))]
    sinks = [log.open("w") for log in logs]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.plugin.tp_rank", str(rank), sizes, ports, *map(str, paths)],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        for rank, sink in enumerate(sinks)
    ]
    # One failed process leaves its peers waiting in a collective: stop them all at the first failure.
    deadline = time.monotonic() + 280
    try:
        while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
            if any(proc.poll() not in (None, 0) for proc in procs):
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for sink in sinks:
            sink.close()
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, (
            f"process {rank} exited {proc.returncode}:\n{logs[rank].read_text()[-4000:]}"
        )
    return {tp: [torch.load(out / f"tp{tp}-rank{r}.pt") for r in range(tp)] for tp in TP_SIZES}


@pytest.fixture(scope="module")
def sharded(model_dirs, tmp_path_factory):
    """The reference drafter, the shared inputs and every rank's outputs for TP 4 and TP 2."""
    tmp = tmp_path_factory.mktemp("tp")
    ref, draft = _reference(tmp, torch.float32)
    n, t, h = 7, ref.config.num_taps, ref.config.hidden_size
    taps = torch.randn(n, t, h, generator=torch.Generator().manual_seed(3)) * 3
    positions = torch.tensor([0, 1, 2, 40, 41, 300, 301])
    torch.save({"taps": taps, "positions": positions}, tmp / "inputs.pt")
    return ref, taps, positions, _run_ranks(model_dirs["target"], draft, tmp / "inputs.pt", tmp)


def _heads_of(rows: torch.Tensor, full: torch.Tensor) -> list[int]:
    """Which heads of the unsharded [kv_heads*hd, H] weight ``rows`` [n*hd, H] are (exact match)."""
    heads = full.view(-1, HEAD_DIM, full.shape[-1])
    found = []
    for block in rows.view(-1, HEAD_DIM, rows.shape[-1]):
        (match,) = [h for h in range(heads.shape[0]) if torch.equal(heads[h], block)]
        found.append(match)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("tp", TP_SIZES)
def test_sharded_context_kv_matches_unsharded_reference(sharded, tp):
    ref, taps, positions, results = sharded
    ranks = results[tp]
    with torch.no_grad():
        ref_feats = ref.context_features(taps)
        ref_k, ref_v = ref.context_kv(taps, positions)  # [D, N, kv heads, hd]
    total_kv = ref_k.shape[2]
    covered: set[int] = set()
    for rank, got in enumerate(ranks):
        assert got["tp"] == (rank, tp)
        # The fusion over target layers is replicated: every rank computes the whole features.
        torch.testing.assert_close(got["features"], ref_feats, atol=2e-5, rtol=0)
        for layer, ref_layer in enumerate(ref.layers):
            attn = ref_layer.self_attn
            # The heads SGLang's QKVParallelLinear gave this rank (found by value, not by our helper) ...
            heads = _heads_of(got["qkv_k"][layer], attn.k_proj.weight)
            assert heads == _heads_of(got["qkv_v"][layer], attn.v_proj.weight)
            first, count = got["head_range"]
            assert heads == list(range(first, first + count)), f"rank {rank}: _kv_head_range {first, count}"
            # ... are the heads of k_proj_target / v_proj_target this rank holds ...
            kv = len(heads) * HEAD_DIM
            stacked = got["context_kv_weight"][layer]
            assert _heads_of(stacked[:kv], attn.k_proj_target.weight) == heads
            assert _heads_of(stacked[kv:], attn.v_proj_target.weight) == heads
            # ... and its context K (after k_norm and RoPE) and V are those heads of the unsharded math.
            torch.testing.assert_close(got["k"][layer], ref_k[layer][:, heads], atol=2e-5, rtol=0)
            torch.testing.assert_close(got["v"][layer], ref_v[layer][:, heads], atol=2e-5, rtol=0)
        covered.update(heads)
        # The all-gather over the TP group hands each rank every peer's heads in rank order.
        for peer, (k, v) in enumerate(zip(got["gathered_k"], got["gathered_v"], strict=True)):
            torch.testing.assert_close(k, ranks[peer]["k"], atol=0, rtol=0)
            torch.testing.assert_close(v, ranks[peer]["v"], atol=0, rtol=0)
    assert covered == set(range(total_kv))
    # Reassembled from the ranks (one copy of each replicated head), the heads are the unsharded K/V.
    by_head = {}
    for got in ranks:
        first, count = got["head_range"]
        for i in range(count):
            by_head.setdefault(first + i, (got["k"][:, :, i], got["v"][:, :, i]))
    full_k = torch.stack([by_head[i][0] for i in range(total_kv)], dim=2)
    full_v = torch.stack([by_head[i][1] for i in range(total_kv)], dim=2)
    torch.testing.assert_close(full_k, ref_k, atol=2e-5, rtol=0)
    torch.testing.assert_close(full_v, ref_v, atol=2e-5, rtol=0)
    if tp > total_kv:  # replicated heads: the ranks sharing a head computed the same K
        replicas = tp // total_kv
        for rank in range(0, tp, replicas):
            for twin in range(rank + 1, rank + replicas):
                torch.testing.assert_close(ranks[twin]["k"], ranks[rank]["k"], atol=0, rtol=0)
