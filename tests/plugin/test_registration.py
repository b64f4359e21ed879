"""The entry point is found by SGLang's own loader and registers DFLARE, the draft class and the hooks;
``--speculative-algorithm DFLARE`` parses into DFlash-style server args; bad drafters fail the launch."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from tests.plugin.conftest import TARGET, draft_config, write_config

pytestmark = pytest.mark.sglang


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("dflare") == "sglang_ext.sglang_plugin:register"


def test_load_plugins_registers_algorithm(plugins_loaded, model_dirs):
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from sglang_ext.sglang_plugin.algorithm import DFlareAlgo, register_algorithm

    algo = SpeculativeAlgorithm.from_string("dflare")
    assert isinstance(algo, DFlareAlgo)
    assert algo.is_dflash_family() and algo.is_dflash() and algo.supports_overlap
    assert algo.supports_target_verify_for_draft() and not algo.need_topk()
    assert algo.carries_draft_hidden_states() is False
    assert register_algorithm() is False  # a second registration is a no-op, not an error


def test_create_future_map_matches_enum(plugins_loaded):
    """The method SGLang's overlap scheduler calls (missing from CustomSpecAlgo in 0.5.17)."""
    import torch
    from sglang.srt.managers.overlap_utils import FutureMap
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    algo = SpeculativeAlgorithm.from_string("DFLARE")
    pool = ReqToTokenPool(size=4, max_context_len=32, device="cpu", enable_memory_saver=False)
    fmap = algo.create_future_map(torch.device("cpu"), pool, needs_cpu_seq_lens=False)
    assert isinstance(fmap, FutureMap) and fmap.spec_algo is algo and fmap.req_pool_size == pool.size + 1


def test_draft_architecture_resolves_to_our_class(plugins_loaded):
    from sglang.srt.models.registry import ModelRegistry

    from sglang_ext.sglang_plugin.model import DFlareDraftModel

    cls, arch = ModelRegistry.resolve_model_cls(["QwenDFlareDraftModel"])
    assert cls is DFlareDraftModel and arch == "QwenDFlareDraftModel"


def test_draft_forward_signature_is_the_parents(plugins_loaded):
    """SGLang's CUDA-graph runner decides from ``inspect.signature(model.forward)`` whether to pass the
    draft ``input_embeds``: our override must name every parameter DFlash's forward does (a ``*args,
    **kwargs`` override failed every DFLARE server at graph capture on the H200, 13:57 UTC)."""
    import inspect

    from sglang.srt.models.dflash import DFlashDraftModel

    from sglang_ext.sglang_plugin.model import DFlareDraftModel

    ours = inspect.signature(DFlareDraftModel.forward).parameters
    parents = inspect.signature(DFlashDraftModel.forward).parameters
    assert list(ours) == list(parents) and "input_embeds" in ours
    assert [p.default for p in ours.values()] == [p.default for p in parents.values()]


def test_worker_factory_returns_dflare_worker(plugins_loaded, model_dirs):
    from sglang.srt.speculative.dflash_worker_v2 import DFlashWorkerV2
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from sglang_ext.sglang_plugin.worker import DFlareWorkerV2

    args = _parse(model_dirs["target"], model_dirs["draft"])
    worker_cls = SpeculativeAlgorithm.from_string("DFLARE").create_worker(args)
    assert worker_cls is DFlareWorkerV2 and issubclass(worker_cls, DFlashWorkerV2)


def _parse(target, draft, *extra):
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(
        [
            "--model-path", str(target), "--device", "cuda", "--skip-tokenizer-init",
            "--speculative-algorithm", "dflare", "--speculative-draft-model-path", str(draft),
            "--attention-backend", "triton", *extra,
        ]
    )  # fmt: skip


def test_dflare_server_args_parse(plugins_loaded, model_dirs):
    args = _parse(model_dirs["target"], model_dirs["draft"])
    assert args.speculative_algorithm == "DFLARE"
    assert args.speculative_num_draft_tokens == 4  # inferred from dflash_config.block_size
    assert args.speculative_num_steps == 1 and args.speculative_eagle_topk == 1
    assert args.max_running_requests == 48
    assert args.speculative_draft_attention_backend == "triton"


def _sub(**changes) -> dict:
    """Draft overrides with ``dflash_config`` entries changed (None removes one)."""
    sub = {"block_size": 4, "mask_token_id": 511, "target_layer_ids": [1, 2]}
    sub.update(changes)
    return {"dflash_config": {k: v for k, v in sub.items() if v is not None}}


@pytest.mark.parametrize(
    ("draft", "extra", "message"),
    [
        (
            {"architectures": ["DFlashDraftModel"], "model_type": "dflash", "model_arch": "dflare"},
            (),
            "dflare convert",
        ),
        ({"architectures": ["DFlashDraftModel"]}, (), "use --speculative-algorithm DFLASH"),
        (_sub(target_layer_ids=[2, 1]), (), "sorted"),
        (_sub(target_layer_ids=[1, 5]), (), "[0, 4]"),
        (_sub(mask_token_id=999), (), "vocabulary"),
        (_sub(mask_token_id=None), (), "mask_token_id"),
        ({}, ("--speculative-num-draft-tokens", "8"), "[2, 4]"),
        ({"num_target_layers": 36}, (), "36-layer target"),
        ({"hidden_size": 128}, (), "hidden_size"),
    ],
    ids=[
        "angelspec",
        "dflash-drafter",
        "unsorted-taps",
        "last-layer-tap",
        "mask-id",
        "no-mask-id",
        "block-too-big",
        "other-target",
        "hidden-size",
    ],
)
def test_bad_drafter_fails_the_launch(plugins_loaded, model_dirs, tmp_path, draft, extra, message):
    from sglang_ext.sglang_plugin.validation import DFlareConfigError

    bad = write_config(tmp_path / "draft", draft_config(**draft))
    with pytest.raises(DFlareConfigError) as err:
        _parse(model_dirs["target"], bad, *extra)
    assert message in str(err.value)


def test_target_depth_matters(plugins_loaded, tmp_path):
    """Tap 4 is fine for a 6-layer target but not for a 5-layer one (no capture after the last layer)."""
    from sglang_ext.sglang_plugin.validation import DFlareConfigError, check_draft_fits_target

    draft = draft_config(num_target_layers=None)
    assert check_draft_fits_target(draft, TARGET, None, need_mask_id=True) == 4
    with pytest.raises(DFlareConfigError, match=r"\[0, 3\]"):
        check_draft_fits_target(draft, dict(TARGET, num_hidden_layers=5), None, need_mask_id=True)
