"""Strict checkpoint loading, bit-exact save -> load, and `dflare convert` of every dialect."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sglang_ext.cli import main as dflare_main
from sglang_ext.dflare.checkpoint import CheckpointError, load_drafter, save_drafter
from sglang_ext.dflare.config import load_config
from sglang_ext.dflare.model import DFlareDrafter
from sglang_ext.reference.tiny import tiny_drafter, tiny_target


def make_drafter(kind: str, dtype: torch.dtype = torch.float32) -> DFlareDrafter:
    drafter = tiny_drafter(tiny_target(vocab_size=40, hidden_size=32, num_layers=6), kind=kind, num_layers=2)
    with torch.no_grad():
        for p in drafter.parameters():
            p.normal_()  # no parameter left at an init value such as ones/zeros
    return drafter.to(dtype)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("kind", "arch"), [("dflare", "QwenDFlareDraftModel"), ("dflash", "DFlashDraftModel")]
)
def test_save_load_round_trip_is_bit_exact(tmp_path: Path, kind: str, arch: str, dtype: torch.dtype) -> None:
    drafter = make_drafter(kind, dtype)
    save_drafter(drafter, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == [arch] and "dflash_config" in raw
    assert raw["num_target_layers"] == 6  # target depth, as AngelSlim / z-lab write it
    assert raw["torch_dtype"] == str(dtype).removeprefix("torch.")
    loaded = load_drafter(tmp_path)
    assert {**loaded.config.to_dict(), "torch_dtype": None} == drafter.config.to_dict()
    assert_same_tensors(dict(drafter.state_dict()), dict(loaded.state_dict()))
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert ("layer_fusion_weights" in names) == (kind == "dflare")
    assert ("fc.weight" in names) == (kind == "dflash")
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)  # borrowed, never stored


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    save_drafter(make_drafter("dflare"), tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("layers.1.self_attn.k_proj_target.weight"))
    name = r"\['layers.1.self_attn.k_proj_target.weight'\]"
    with pytest.raises(CheckpointError, match="missing tensors " + name):
        load_drafter(tmp_path)


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    save_drafter(make_drafter("dflash"), tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"layers.0.self_attn.k_proj_target.weight": torch.zeros(16, 32)}))
    name = r"\['layers.0.self_attn.k_proj_target.weight'\]"
    with pytest.raises(CheckpointError, match="unexpected tensors " + name):
        load_drafter(tmp_path)


def test_misshaped_tensor_is_named_with_both_shapes(tmp_path: Path) -> None:
    save_drafter(make_drafter("dflare"), tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"layer_fusion_weights": torch.zeros(2, 4)}))
    shapes = r"layer_fusion_weights: checkpoint \(2, 4\) vs config \(2, 3\)"
    with pytest.raises(CheckpointError, match=shapes):
        load_drafter(tmp_path)


def write_angelspec(src: DFlareDrafter, path: Path) -> None:
    """Rewrite a drafter the way AngelSpec saves it: its config keys, renamed norms, embedding copy."""
    cfg = src.config
    served = cfg.to_served_json()
    raw = {k: v for k, v in served.items() if k not in ("dflash_config", "num_target_layers")}
    raw.update(
        {
            "architectures": ["DFlashDraftModel"],
            "model_type": "dflash",
            "model_arch": cfg.kind,
            "target_layer_ids": cfg.target_layer_ids,
            "num_target_layers": cfg.num_taps,
            "target_num_hidden_layers": cfg.target_num_hidden_layers,
            "mask_token_id": cfg.mask_token_id,
            "target_hidden_size": cfg.hidden_size,
        }
    )
    renames = {"hidden_norm.": "context_norm.", "norm.": "final_norm.", "fc.": "context_proj."}
    tensors = {}
    for name, t in src.state_dict().items():
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        tensors[name] = t.contiguous()
    tensors["embed_tokens.weight"] = torch.zeros(cfg.vocab_size, cfg.hidden_size)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("kind", ["dflare", "dflash"])
def test_angelspec_dialect_loads_with_one_drop_log_line(tmp_path: Path, kind: str, caplog) -> None:
    src = make_drafter(kind)
    write_angelspec(src, tmp_path / "spec")
    assert load_config(tmp_path / "spec")[1] == "angelspec"
    with caplog.at_level(logging.INFO, logger="sglang_ext.dflare.checkpoint"):
        loaded = load_drafter(tmp_path / "spec")
    drops = [r for r in caplog.records if "dropped known redundant tensors" in r.getMessage()]
    assert len(drops) == 1 and "embed_tokens.weight" in drops[0].getMessage()
    assert_same_tensors(dict(src.state_dict()), dict(loaded.state_dict()))


@pytest.mark.parametrize(
    ("kind", "dialect", "arch"),
    [
        ("dflare", "angelslim", "QwenDFlareDraftModel"),
        ("dflare", "angelspec", "QwenDFlareDraftModel"),
        ("dflash", "zlab", "DFlashDraftModel"),
        ("dflash", "angelspec", "DFlashDraftModel"),
    ],
)
def test_convert_every_dialect(tmp_path: Path, kind: str, dialect: str, arch: str, capsys) -> None:
    src = make_drafter(kind, torch.bfloat16)
    if dialect == "angelspec":
        write_angelspec(src, tmp_path / "src")
    else:
        save_drafter(src, tmp_path / "src")
    assert dflare_main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    assert f"{dialect} dialect" in capsys.readouterr().out
    raw = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert raw["architectures"] == [arch]
    assert raw["dflash_config"]["target_layer_ids"] == src.config.target_layer_ids
    assert_same_tensors(dict(src.state_dict()), load_file(str(tmp_path / "dst" / "model.safetensors")))


def test_convert_reports_errors_without_a_traceback(tmp_path: Path, capsys) -> None:
    save_drafter(make_drafter("dflare"), tmp_path / "src")
    _rewrite(tmp_path / "src", lambda t: t.pop("norm.weight"))
    assert dflare_main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 1
    assert "missing tensors ['norm.weight']" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_angelslim_dflash_dialect_converts_to_zlab(tmp_path: Path) -> None:
    src = make_drafter("dflash")
    save_drafter(src, tmp_path / "src")
    raw = json.loads((tmp_path / "src" / "config.json").read_text())
    raw["architectures"] = ["QwenDFlashDraftModel"]  # AngelSlim's own DFlash class name
    (tmp_path / "src" / "config.json").write_text(json.dumps(raw))
    assert load_config(tmp_path / "src")[1] == "angelslim"
    assert dflare_main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["architectures"] == ["DFlashDraftModel"]
    assert_same_tensors(dict(src.state_dict()), load_file(str(tmp_path / "dst" / "model.safetensors")))


def test_load_engine_from_directories_matches_in_memory_engine(tmp_path: Path) -> None:
    from sglang_ext.reference import SamplingParams, SpeculativeEngine, load_engine

    target = tiny_target(vocab_size=40, hidden_size=32, num_layers=4, dtype=torch.float64, seed=9)
    drafter = tiny_drafter(target, block_size=4)
    target.save_pretrained(tmp_path / "target")
    save_drafter(drafter, tmp_path / "drafter")
    loaded = load_engine(tmp_path / "target", tmp_path / "drafter", dtype="float64", max_batch=2)
    assert loaded.block_size == 4 and loaded.tokenizer is None
    params = SamplingParams(max_tokens=10)
    want = SpeculativeEngine(target, drafter, 4).generate([[1, 2, 3], [4]], params)
    got = loaded.generate([[1, 2, 3], [4]], params)
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
