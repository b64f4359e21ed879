"""One process of a tensor-parallel SGLang DFlare drafter on CPU (gloo).

``python -m tests.plugin.tp_rank RANK TP_SIZES PORTS TARGET_DIR DRAFT_DIR INPUTS OUT``: for each TP size
(comma-separated, one rendezvous port each) it joins SGLang's gloo process group of that many ranks and
sets up SGLang's model-parallel state, builds ``DFlareDraftModel`` from the draft
checkpoint through its strict loader (so ``k_proj_target`` / ``v_proj_target`` are sharded the way
serving shards them), runs the portable context path on the shared inputs and saves what this rank
holds to ``OUT``: the fused features, the per-layer context K/V, this rank's K/V rows of SGLang's own
``qkv_proj`` (sharded by ``QKVParallelLinear``, the convention ``_kv_head_range`` must follow) and the
K/V of an all-gather across the TP group, which must reassemble the unsharded heads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def _cpu_groups_only() -> None:
    """Model-parallel groups without their GPU communicators (PyNccl, custom all-reduce): SGLang turns
    PyNccl on for every non-NPU/XPU backend, and it needs a CUDA device. Collectives then go through the
    gloo process groups, which is what a CPU run has."""
    from sglang.srt.distributed import parallel_state

    parallel_state.set_custom_all_reduce(False)
    make_group = parallel_state.init_model_parallel_group

    def init_model_parallel_group(*args, **kwargs):
        return make_group(*args, **{**kwargs, "use_pynccl": False})

    parallel_state.init_model_parallel_group = init_model_parallel_group


def join_gloo_tp_group(rank: int, tp_size: int, port: int) -> None:
    """This process as ``rank`` of SGLang's process group and one TP group of ``tp_size``, on gloo."""
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel

    init_distributed_environment(
        world_size=tp_size,
        rank=rank,
        local_rank=rank,
        backend="gloo",
        distributed_init_method=f"tcp://127.0.0.1:{port}",
    )
    _cpu_groups_only()
    initialize_model_parallel(tensor_model_parallel_size=tp_size, backend="gloo")


def _init_tp(rank: int, tp_size: int, port: int, target_dir: str) -> None:
    """SGLang's process group and model-parallel state for one TP group of ``tp_size`` processes."""
    import sglang.srt.layers.rotary_embedding.base as rope_base
    from sglang.srt.runtime_context import get_context
    from sglang.srt.server_args import prepare_server_args

    rope_base._is_cpu = True  # else RoPE init imports CUDA-only ops (as in tests/plugin/conftest.py)
    args = prepare_server_args(
        [
            *("--model-path", target_dir, "--device", "cuda", "--skip-tokenizer-init"),
            *("--dtype", "float32", "--tp-size", str(tp_size)),
        ]
    )
    join_gloo_tp_group(rank, tp_size, port)
    get_context().set_server_args(args)


def _shard_outputs(draft_dir: str, inputs: dict) -> dict:
    """Build the drafter on this rank's shard and run the portable context path on ``inputs``."""
    from sglang.srt.distributed import get_tp_group
    from sglang.srt.utils.hf_transformers_utils import get_config

    from sglang_ext.dflare.checkpoint import read_tensors
    from sglang_ext.sglang_plugin.model import DFlareDraftModel, _kv_head_range

    model = DFlareDraftModel(get_config(draft_dir, trust_remote_code=False))
    model.load_weights(iter(read_tensors(Path(draft_dir)).items()))
    model.eval()
    n = inputs["taps"].shape[0]
    with torch.no_grad():
        feats = model.project_target_hidden(inputs["taps"].reshape(n, -1))
        kv = model.context_kv(feats, inputs["positions"])
        k = torch.stack([layer_k for layer_k, _ in kv])  # [D, N, local kv heads, hd]
        v = torch.stack([layer_v for _, layer_v in kv])
        group = get_tp_group().device_group
        gathered_k = [torch.empty_like(k) for _ in range(model.tp_size)]
        gathered_v = [torch.empty_like(v) for _ in range(model.tp_size)]
        torch.distributed.all_gather(gathered_k, k.contiguous(), group=group)
        torch.distributed.all_gather(gathered_v, v.contiguous(), group=group)
    attn = model.layers[0].self_attn
    q, size = attn.q_size, attn.kv_size
    return {
        "head_range": _kv_head_range(model.total_kv_heads, model.tp_rank, model.tp_size),
        "tp": (model.tp_rank, model.tp_size),
        "features": feats,
        "k": k,
        "v": v,
        "gathered_k": gathered_k,
        "gathered_v": gathered_v,
        # this rank's rows of SGLang's fused qkv_proj, per layer: [D, kv, H] each
        "qkv_k": torch.stack([layer.self_attn.qkv_proj.weight[q : q + size] for layer in model.layers]),
        "qkv_v": torch.stack(
            [layer.self_attn.qkv_proj.weight[q + size : q + 2 * size] for layer in model.layers]
        ),
        "context_kv_weight": model.context_kv_weight.detach().clone(),
    }


def run(
    rank: int, tp_sizes: list[int], ports: list[int], target_dir: str, draft_dir: str, inputs: str, out: str
):
    """Each TP size in turn in the same processes (importing SGLang is the slow part); a process takes
    part where its rank is below the TP size. Results go to ``OUT/tp{size}-rank{rank}.pt``."""
    from sglang.srt.distributed import destroy_distributed_environment, destroy_model_parallel

    data = torch.load(inputs)
    for tp_size, port in zip(tp_sizes, ports, strict=True):
        if rank >= tp_size:
            continue
        _init_tp(rank, tp_size, port, target_dir)
        torch.save(_shard_outputs(draft_dir, data), Path(out) / f"tp{tp_size}-rank{rank}.pt")
        torch.distributed.barrier()
        destroy_model_parallel()
        destroy_distributed_environment()


if __name__ == "__main__":
    sizes, ports = ([int(x) for x in arg.split(",")] for arg in sys.argv[2:4])
    run(int(sys.argv[1]), sizes, ports, *sys.argv[4:8])
