"""Strict loading and saving of drafter checkpoints in every published dialect.

Loading maps a dialect's tensor names onto ours (which equal the AngelSlim / z-lab names), drops a short
documented list of known redundant tensors with one log line, and fails on anything else that does not
fit: a missing, unexpected or mis-shaped tensor is a :class:`CheckpointError` naming it. Saving always
writes the *served* layouts: DFlare as AngelSlim ``QwenDFlareDraftModel``, DFlash as z-lab
``DFlashDraftModel`` (``model.safetensors`` + ``config.json``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sglang_ext.dflare import ops
from sglang_ext.dflare.config import DFlareConfig, Dialect, DrafterKind, load_config
from sglang_ext.dflare.draft_vocab import DraftVocab
from sglang_ext.dflare.model import DFlareDrafter

log = logging.getLogger(__name__)

# Tensor-name aliases per dialect (prefix -> our prefix). AngelSpec renamed the norms and DFlash's `fc`.
RENAMES: dict[Dialect, dict[str, str]] = {
    "angelspec": {"context_norm.": "hidden_norm.", "final_norm.": "norm.", "context_proj.": "fc."},
    "angelslim": {},
    "zlab": {},
}

# Known redundant tensors, dropped with one log line: AngelSpec stores a frozen copy of the target's
# embeddings; its DFlare checkpoints may carry the DFlash `context_proj` that DFlare does not use.
DROPPED: dict[tuple[Dialect, DrafterKind], tuple[str, ...]] = {
    ("angelspec", "dflare"): ("embed_tokens.weight", "fc.weight"),
    ("angelspec", "dflash"): ("embed_tokens.weight",),
}

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config (names the offending tensors)."""


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: ``model.safetensors`` or a sharded index."""
    path = Path(path)
    single = path / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_file(str(path / shard)))
        return tensors
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if len(found) == 1:
        return load_file(str(path / found[0]))
    raise CheckpointError(f"{path}: no model.safetensors (or index) found; files: {found}")


def normalize_names(
    tensors: dict[str, torch.Tensor], dialect: Dialect, kind: DrafterKind
) -> dict[str, torch.Tensor]:
    """Map dialect names to ours and drop the documented redundant tensors (logged once)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.startswith("model."):  # some exporters wrap the drafter in `model.`
            name = name[len("model.") :]
        for old, new in RENAMES[dialect].items():
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        if name in out:
            raise CheckpointError(f"tensor {name!r} appears twice after renaming {dialect} names")
        out[name] = tensor
    dropped = [n for n in DROPPED.get((dialect, kind), ()) if n in out]
    if dropped:
        log.info("%s %s checkpoint: dropped known redundant tensors %s", dialect, kind, dropped)
        for n in dropped:
            del out[n]
    return out


def expected_shapes(cfg: DFlareConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``cfg`` must hold, with its shape (built on the meta device)."""
    with torch.device("meta"):
        model = DFlareDrafter(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_tensors(tensors: dict[str, torch.Tensor], cfg: DFlareConfig) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected or mis-shaped tensor."""
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = [
        f"{n}: checkpoint {tuple(tensors[n].shape)} vs config {expected[n]}"
        for n in sorted(set(expected) & set(tensors))
        if tuple(tensors[n].shape) != expected[n]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if misshaped:
        problems.append("mis-shaped tensors [" + "; ".join(misshaped) + "]")
    if problems:
        summary = ", ".join(problems)
        raise CheckpointError(f"{cfg.kind} drafter checkpoint does not match its config: {summary}")


def load_checkpoint(path: str | Path) -> tuple[DFlareConfig, Dialect, dict[str, torch.Tensor]]:
    """Config, dialect and validated, renamed tensors of a checkpoint directory (no model built)."""
    cfg, dialect = load_config(path)
    tensors = normalize_names(read_tensors(path), dialect, cfg.kind)
    check_tensors(tensors, cfg)
    return cfg, dialect, tensors


def load_drafter(
    path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> DFlareDrafter:
    """Build a :class:`DFlareDrafter` from any dialect; ``dtype`` defaults to the checkpoint's."""
    cfg, _, tensors = load_checkpoint(path)
    if dtype is None:
        dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    with torch.device("meta"):
        model = DFlareDrafter(cfg)
    model.load_state_dict({n: t.to(device=device, dtype=dtype) for n, t in tensors.items()}, assign=True)
    # the non-persistent RoPE buffer is not in the checkpoint: rebuild it off the meta device
    model.inv_freq = ops.rope_inv_freq(cfg.head_dim, cfg.rope_theta, torch.device(device))
    model.draft_vocab = DraftVocab.load(path)
    return model.eval()


def save_tensors(cfg: DFlareConfig, tensors: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the served layout for ``cfg.kind``."""
    check_tensors(tensors, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtypes = {t.dtype for t in tensors.values()}
    served = cfg.to_served_json()
    if len(dtypes) == 1:
        served["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.")
    payload = {n: t.detach().contiguous().cpu() for n, t in sorted(tensors.items())}
    save_file(payload, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(served, indent=2) + "\n")
    return out


def save_drafter(model: DFlareDrafter, out_dir: str | Path) -> Path:
    """Save a drafter in its served layout (borrowed target modules are not part of it)."""
    return save_tensors(model.config, dict(model.state_dict()), out_dir)


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError as exc:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(_DTYPES)}") from exc
