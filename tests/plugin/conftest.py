"""CPU harness for the SGLang plugin: SGLang 0.5.17 imported without a GPU.

How SGLang is installed for it, and why this works: docs/sglang_plugin.md, "Testing without a GPU".

``sglang_runtime`` brings up what SGLang's layers need to be built on CPU: a one-rank gloo process group,
model parallel state and published ``ServerArgs``. RadixAttention, the scheduler and the KV pools are
GPU-only and are exercised by ``tests/gpu/`` instead.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

sglang = pytest.importorskip("sglang", reason="SGLang 0.5.17 comes from .ci/install (CPU, --no-deps)")

TARGET = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "hidden_act": "silu",
    "attention_bias": False,
}
TAPS = [0, 1, 2, 4]


def draft_config(**overrides) -> dict:
    """A tiny AngelSlim-layout DFlare drafter config for :data:`TARGET` (2 layers, 4 taps, block 4)."""
    cfg = dict(
        TARGET,
        architectures=["QwenDFlareDraftModel"],
        num_hidden_layers=2,
        num_target_layers=TARGET["num_hidden_layers"],
        block_size=4,
        dflash_config={"block_size": 4, "mask_token_id": 511, "target_layer_ids": TAPS},
    )
    cfg.update(overrides)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sglang_models")
    return {
        "target": write_config(root / "target", TARGET),
        "draft": write_config(root / "draft", draft_config()),
    }


@pytest.fixture(scope="session")
def plugins_loaded():
    """SGLang's own plugin loader, run once: discovers our entry point and applies our hooks."""
    from sglang.srt.plugins import load_plugins

    load_plugins()


@pytest.fixture(scope="session")
def sglang_runtime(model_dirs, plugins_loaded):
    """Process group + model-parallel state + ServerArgs, so SGLang layers can be built on CPU."""
    import sglang.srt.layers.rotary_embedding.base as rope_base
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    from sglang.srt.runtime_context import get_context
    from sglang.srt.server_args import prepare_server_args

    rope_base._is_cpu = True  # else RoPE init imports vllm's CUDA ops (docs/sglang_plugin.md)
    args = prepare_server_args(
        [
            "--model-path",
            str(model_dirs["target"]),
            "--device",
            "cuda",
            "--skip-tokenizer-init",
            "--dtype",
            "float32",
        ]
    )
    init_distributed_environment(
        world_size=1,
        rank=0,
        local_rank=0,
        backend="gloo",
        distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
    )
    initialize_model_parallel(1)
    get_context().set_server_args(args)
    return args
