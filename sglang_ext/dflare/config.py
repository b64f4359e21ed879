"""One configuration for DFlare and DFlash drafters, parsed from the three published checkpoint dialects.

Dialects (see ``docs/core.md``):

* ``angelslim`` – Tencent AngelSlim ``QwenDFlareDraftModel`` / ``QwenDFlashDraftModel``: Qwen3 fields plus
  ``block_size``, ``num_target_layers`` (the TARGET's depth) and ``dflash_config`` {mask_token_id,
  target_layer_ids}. DFlare reuses the ``dflash_config`` key on purpose.
* ``angelspec`` – Tencent AngelSpec: ``model_arch`` ("dflare" | "dflash"), top-level ``target_layer_ids`` and
  ``mask_token_id``, ``num_target_layers`` = number of TAPS, ``target_num_hidden_layers`` = target depth.
* ``zlab`` – z-lab ``DFlashDraftModel``: like AngelSlim's DFlash (the layout SGLang's built-in DFLASH loads).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

DrafterKind = Literal["dflare", "dflash"]
Dialect = Literal["angelslim", "angelspec", "zlab"]

# Qwen3's `<|MASK|>` id: the row the padded 151936-entry vocabulary leaves unused (published checkpoints).
QWEN3_MASK_TOKEN_ID = 151669

# Training-only keys we keep verbatim so that a converted checkpoint stays trainable upstream.
_TRAINING_KEYS = ("num_anchors", "loss_decay_gamma", "attention_backend")


class DrafterConfigError(ValueError):
    """A drafter config that cannot be understood (unknown dialect, inconsistent keys)."""


def build_target_layer_ids(num_target_layers: int, num_taps: int) -> list[int]:
    """Tapped target layers spread evenly over ``[1, L-3]`` (upstream default when a config lists none).

    One tap sits in the middle. ``num_target_layers`` is the target's DEPTH.
    """
    if num_taps < 1:
        raise DrafterConfigError(f"need at least one tap, got {num_taps}")
    if num_taps == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    span = end - start
    return [round(start + i * span / (num_taps - 1)) for i in range(num_taps)]


@dataclass
class DFlareConfig:
    """Shape and behaviour of one drafter; ``kind`` selects DFlare (per-layer fusion) or DFlash (``fc``)."""

    kind: DrafterKind
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int  # D, the draft depth
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    target_layer_ids: list[int]  # taps, 0-based target decoder layers; T = len(...)
    target_num_hidden_layers: int  # depth of the target the drafter was trained on
    block_size: int = 16
    mask_token_id: int = QWEN3_MASK_TOKEN_ID
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None
    training: dict[str, Any] = field(default_factory=dict)  # upstream training keys, kept verbatim

    def __post_init__(self) -> None:
        if self.kind not in ("dflare", "dflash"):
            raise DrafterConfigError(f"unknown drafter kind {self.kind!r}")
        if not self.target_layer_ids:
            raise DrafterConfigError("target_layer_ids is empty")
        if self.num_attention_heads % self.num_key_value_heads:
            raise DrafterConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.block_size < 1:
            raise DrafterConfigError(f"block_size must be >= 1, got {self.block_size}")
        if self.hidden_act != "silu":
            raise DrafterConfigError(f"only the SiLU-gated MLP is supported, got {self.hidden_act!r}")
        if self.rope_scaling and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) not in (
            None,
            "default",
        ):
            raise DrafterConfigError(f"unsupported rope_scaling {self.rope_scaling!r} (only default RoPE)")

    @property
    def num_taps(self) -> int:
        """T: tapped target layers."""
        return len(self.target_layer_ids)

    @property
    def num_draft_layers(self) -> int:
        """D: drafter decoder layers."""
        return self.num_hidden_layers

    # ---- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_served_json(self) -> dict[str, Any]:
        """config.json of the served layout: AngelSlim for DFlare, z-lab ``DFlashDraftModel`` for DFlash."""
        arch = "QwenDFlareDraftModel" if self.kind == "dflare" else "DFlashDraftModel"
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": "qwen3",
            "block_size": self.block_size,
            "dflash_config": {
                "mask_token_id": self.mask_token_id,
                "target_layer_ids": list(self.target_layer_ids),
                "block_size": self.block_size,
            },
            "num_target_layers": self.target_num_hidden_layers,
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        if self.torch_dtype:
            out["torch_dtype"] = self.torch_dtype
        out.update(self.training)
        return out


def detect_dialect(raw: dict[str, Any]) -> tuple[Dialect, DrafterKind]:
    """Which checkpoint dialect wrote ``raw`` and which drafter it describes."""
    archs = list(raw.get("architectures") or [])
    if "model_arch" in raw:
        arch = str(raw["model_arch"]).lower()
        if arch not in ("dflare", "dflash"):
            raise DrafterConfigError(f"AngelSpec model_arch={arch!r} is not supported (dflare, dflash)")
        return "angelspec", arch  # type: ignore[return-value]
    if "QwenDFlareDraftModel" in archs:
        return "angelslim", "dflare"
    if "QwenDFlashDraftModel" in archs:
        return "angelslim", "dflash"
    if "DFlashDraftModel" in archs:
        return "zlab", "dflash"
    raise DrafterConfigError(
        f"not a DFlare/DFlash drafter config: architectures={archs!r} and no model_arch "
        "(expected QwenDFlareDraftModel, QwenDFlashDraftModel, DFlashDraftModel or AngelSpec model_arch)"
    )


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = raw.get("rope_parameters") or {}
    theta = raw.get("rope_theta", params.get("rope_theta", 1_000_000.0))
    scaling = raw.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = dict(params)
    return float(theta), scaling


def parse_config(raw: dict[str, Any]) -> tuple[DFlareConfig, Dialect]:
    """Parse any of the three dialects into :class:`DFlareConfig`; returns the dialect too."""
    dialect, kind = detect_dialect(raw)
    depth_layers = int(raw["num_hidden_layers"])
    if dialect == "angelspec":
        taps = raw.get("target_layer_ids")
        target_depth = raw.get("target_num_hidden_layers")
        if taps is None:
            if target_depth is None:
                raise DrafterConfigError("AngelSpec config has neither target_layer_ids nor its target depth")
            taps = build_target_layer_ids(int(target_depth), int(raw.get("num_target_layers", depth_layers)))
        if "num_target_layers" in raw and int(raw["num_target_layers"]) != len(taps):
            raise DrafterConfigError(
                f"AngelSpec num_target_layers={raw['num_target_layers']} (number of taps) disagrees with "
                f"target_layer_ids={taps}"
            )
        mask_id = raw.get("mask_token_id", QWEN3_MASK_TOKEN_ID)
        block_size = raw.get("block_size", 16)
        hidden = int(raw.get("hidden_size", raw.get("target_hidden_size", 0)))
    else:
        sub = raw.get("dflash_config") or {}
        target_depth = raw.get("num_target_layers")
        taps = sub.get("target_layer_ids")
        if taps is None:
            if target_depth is None:
                raise DrafterConfigError(
                    "config has neither dflash_config.target_layer_ids nor num_target_layers"
                )
            taps = build_target_layer_ids(int(target_depth), depth_layers)
        mask_id = sub.get("mask_token_id", raw.get("mask_token_id", QWEN3_MASK_TOKEN_ID))
        block_size = sub.get("block_size", raw.get("block_size", 16))
        hidden = int(raw["hidden_size"])
    taps = [int(t) for t in taps]
    if target_depth is None:
        target_depth = max(taps) + 3  # smallest depth consistent with the taps (taps <= L-3 upstream)
    heads = int(raw["num_attention_heads"])
    theta, scaling = _rope(raw)
    layer_types = raw.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise DrafterConfigError(f"only full-attention draft layers are supported, got {layer_types}")
    cfg = DFlareConfig(
        kind=kind,
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=depth_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads", heads)),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        vocab_size=int(raw.get("vocab_size", 0)),
        target_layer_ids=taps,
        target_num_hidden_layers=int(target_depth),
        block_size=int(block_size),
        mask_token_id=int(mask_id),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 40960)),
        attention_bias=bool(raw.get("attention_bias", False)),
        hidden_act=str(raw.get("hidden_act", "silu")),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        training={k: raw[k] for k in _TRAINING_KEYS if k in raw},
    )
    return cfg, dialect


def load_config(path: str | Path) -> tuple[DFlareConfig, Dialect]:
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DrafterConfigError(f"no drafter config at {path}") from exc
    return parse_config(raw)
