"""Config dialects: the published Qwen3 DFlare/DFlash configs parse into the right shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sglang_ext.dflare.checkpoint import expected_shapes
from sglang_ext.dflare.config import DrafterConfigError, build_target_layer_ids, load_config, parse_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
DFLARE_TAPS = [1, 5, 9, 13, 17, 21, 25, 29, 33]


@pytest.mark.parametrize(
    ("name", "dialect", "kind", "hidden", "depth", "taps"),
    [
        ("angelslim_qwen3_4b_dflare", "angelslim", "dflare", 2560, 7, DFLARE_TAPS),
        ("angelslim_qwen3_8b_dflare", "angelslim", "dflare", 4096, 7, DFLARE_TAPS),
        ("angelspec_qwen3_8b_dflare", "angelspec", "dflare", 4096, 7, DFLARE_TAPS),
        ("zlab_qwen3_8b_dflash_b16", "zlab", "dflash", 4096, 5, [1, 9, 17, 25, 33]),
    ],
)
def test_published_configs_parse(name, dialect, kind, hidden, depth, taps) -> None:
    cfg, found = load_config(FIXTURES / f"{name}.json")
    assert (found, cfg.kind) == (dialect, kind)
    assert cfg.hidden_size == hidden and cfg.num_hidden_layers == depth
    assert cfg.target_layer_ids == taps and cfg.num_taps == len(taps)
    assert cfg.target_num_hidden_layers == 36
    assert (cfg.block_size, cfg.mask_token_id) == (16, 151669)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 8, 128)
    shapes = expected_shapes(cfg)
    if kind == "dflare":
        assert shapes["layer_fusion_weights"] == (depth, len(taps))
        assert shapes["layers.0.self_attn.k_proj_target.weight"] == (1024, hidden)
        assert "fc.weight" not in shapes
    else:
        assert shapes["fc.weight"] == (hidden, len(taps) * hidden)


def test_qwen3_4b_dflare_tensor_list_matches_published_checkpoint() -> None:
    """AngelSlim/Qwen3-4b-dflare: 94 tensors, 1,486,442,110 bytes of bf16 tensor data."""
    cfg, _ = load_config(FIXTURES / "angelslim_qwen3_4b_dflare.json")
    shapes = expected_shapes(cfg)
    assert len(shapes) == 94
    assert 2 * sum(math.prod(s) for s in shapes.values()) == 1_486_442_110


def test_served_json_round_trips_through_the_parser() -> None:
    for path in FIXTURES.glob("*.json"):
        cfg, _ = load_config(path)
        again, dialect = parse_config(json.loads(json.dumps(cfg.to_served_json())))
        assert dialect == ("angelslim" if cfg.kind == "dflare" else "zlab")
        assert again.to_dict() == cfg.to_dict()


def test_build_target_layer_ids_matches_upstream_examples() -> None:
    assert build_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert build_target_layer_ids(36, 7) == [1, 6, 12, 17, 22, 28, 33]
    assert build_target_layer_ids(36, 9) == DFLARE_TAPS
    assert build_target_layer_ids(36, 1) == [18]


def test_missing_taps_fall_back_to_the_upstream_rule() -> None:
    raw = json.loads((FIXTURES / "angelslim_qwen3_4b_dflare.json").read_text())
    del raw["dflash_config"]["target_layer_ids"]
    cfg, _ = parse_config(raw)
    assert cfg.target_layer_ids == [1, 6, 12, 17, 22, 28, 33]


def test_bad_configs_get_clear_errors() -> None:
    raw = json.loads((FIXTURES / "angelspec_qwen3_8b_dflare.json").read_text())
    with pytest.raises(DrafterConfigError, match="number of taps"):
        parse_config({**raw, "num_target_layers": 36})
    with pytest.raises(DrafterConfigError, match="not a DFlare/DFlash drafter config"):
        parse_config({"architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": 2})
    with pytest.raises(DrafterConfigError, match="model_arch"):
        parse_config({**raw, "model_arch": "dfly"})
    with pytest.raises(DrafterConfigError, match="rope_scaling"):
        parse_config({**raw, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
