"""Launch-time checks of a DFLARE server: the draft checkpoint must fit the target before any GPU work.

Runs in ``ServerArgs.__post_init__`` (before SGLang fills defaults), so a bad combination fails the
launch with one clear message instead of a shape error deep inside the scheduler, or SGLang's silent
fallback to ``TransformersForCausalLM`` for an unknown architecture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ARCHITECTURE = "QwenDFlareDraftModel"  # AngelSlim's published DFlare drafter class


class DFlareConfigError(ValueError):
    """The draft checkpoint, its taps or the block size do not fit the target."""


def read_config(path: str, revision: str | None = None) -> dict[str, Any]:
    """Raw config.json of a local directory or a Hub id (raw: AutoConfig rejects AngelSpec's model_type)."""
    local = Path(path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from transformers import PretrainedConfig

    raw, _ = PretrainedConfig.get_config_dict(path, revision=revision)
    return raw


def check_draft_fits_target(
    draft: dict[str, Any], target: dict[str, Any], block_size: int | None, need_mask_id: bool
) -> int:
    """Raise :class:`DFlareConfigError` unless ``draft`` is a DFlare checkpoint for ``target``.

    Returns the block size the server will use.
    """
    if "model_arch" in draft:
        raise DFlareConfigError(
            f"the draft checkpoint is in the AngelSpec layout (model_arch={draft['model_arch']!r}); "
            "convert it with `dflare convert <src> <dst>` and serve <dst>"
        )
    archs = list(draft.get("architectures") or [])
    if ARCHITECTURE not in archs:
        hint = (
            " (a DFlash drafter: use --speculative-algorithm DFLASH)"
            if any("DFlash" in a for a in archs)
            else ""
        )
        raise DFlareConfigError(
            f"DFLARE needs a {ARCHITECTURE} draft checkpoint, got architectures={archs}{hint}"
        )
    text = target.get("text_config") or target
    depth = int(text["num_hidden_layers"])
    sub = draft.get("dflash_config") or {}
    taps = sub.get("target_layer_ids")
    if not taps:
        raise DFlareConfigError(
            "the draft config has no dflash_config.target_layer_ids (DFLARE needs its taps)"
        )
    taps = [int(t) for t in taps]
    if taps != sorted(set(taps)):
        raise DFlareConfigError(
            f"dflash_config.target_layer_ids={taps} must be sorted and unique: SGLang captures the target's "
            "layers in ascending order"
        )
    if taps[0] < 0 or taps[-1] > depth - 2:
        raise DFlareConfigError(
            f"dflash_config.target_layer_ids={taps} must lie in [0, {depth - 2}]: the target has {depth} "
            "layers and SGLang cannot capture the last layer's output"
        )
    trained_depth = draft.get("num_target_layers")
    if trained_depth is not None and int(trained_depth) != depth:
        raise DFlareConfigError(
            f"the drafter was trained on a {trained_depth}-layer target, this target has {depth} layers"
        )
    if int(draft["hidden_size"]) != int(text["hidden_size"]):
        raise DFlareConfigError(
            f"draft hidden_size {draft['hidden_size']} differs from the target's {text['hidden_size']}"
        )
    if draft.get("attention_bias"):
        raise DFlareConfigError("DFLARE drafters with attention_bias are not supported")
    trained_block = int(sub.get("block_size", draft.get("block_size", 16)))
    block = int(block_size) if block_size is not None else trained_block
    if not 2 <= block <= trained_block:
        raise DFlareConfigError(
            f"block size {block} (--speculative-num-draft-tokens) must be in [2, {trained_block}], the block "
            "size the drafter was trained with"
        )
    mask_id = sub.get("mask_token_id", draft.get("mask_token_id"))
    vocab = int(text["vocab_size"])
    if mask_id is None:
        if need_mask_id:
            raise DFlareConfigError(
                "--skip-tokenizer-init needs dflash_config.mask_token_id in the draft config"
            )
    elif not 0 <= int(mask_id) < vocab:
        raise DFlareConfigError(f"mask_token_id {mask_id} is outside the target vocabulary (size {vocab})")
    return block


def validate_server_args(server_args: Any) -> None:
    """SGLang's ``validate_server_args`` hook for DFLARE (called before defaults are resolved)."""
    if server_args.speculative_draft_model_path is None:
        raise DFlareConfigError(
            "DFLARE requires --speculative-draft-model-path (a QwenDFlareDraftModel checkpoint)"
        )
    if int(getattr(server_args, "tokenizer_worker_num", 1) or 1) > 1:
        raise DFlareConfigError(
            "DFLARE needs --tokenizer-worker-num 1: SGLang 0.5.17's extra tokenizer workers do not load "
            "plugins"
        )
    draft = read_config(
        server_args.speculative_draft_model_path, server_args.speculative_draft_model_revision
    )
    target = read_config(server_args.model_path, getattr(server_args, "revision", None))
    block = server_args.speculative_num_draft_tokens or server_args.speculative_dflash_block_size
    check_draft_fits_target(draft, target, block, bool(server_args.skip_tokenizer_init))


def reject_unconverted_before_alias_resolution(
    speculative_algorithm: str | None, speculative_draft_model_path: str | None, *args: Any, **kwargs: Any
) -> None:
    """BEFORE hook of SGLang's ``_resolve_speculative_algorithm_alias``.

    SGLang loads the draft config with ``AutoConfig`` there, before any algorithm validation, and an
    AngelSpec checkpoint (``model_type: "dflash"``) then dies with an unhelpful transformers error.
    """
    if (speculative_algorithm or "").upper() != "DFLARE" or not speculative_draft_model_path:
        return
    raw = read_config(speculative_draft_model_path)
    if "model_arch" in raw:
        check_draft_fits_target(raw, {}, None, need_mask_id=False)  # raises the `dflare convert` error


HOOKS = (
    (
        "sglang.srt.arg_groups.speculative_hook._resolve_speculative_algorithm_alias",
        reject_unconverted_before_alias_resolution,
        "BEFORE",
    ),
)
