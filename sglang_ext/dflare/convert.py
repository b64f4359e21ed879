"""``dflare convert SRC DST``: rewrite any drafter dialect into the layout SGLang serves.

DFlare -> AngelSlim ``QwenDFlareDraftModel``; DFlash -> z-lab ``DFlashDraftModel``. Tensors are validated
strictly (same rules as loading) and copied bit for bit unless ``--dtype`` asks for a cast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sglang_ext.dflare.checkpoint import CheckpointError, dtype_from_name, load_checkpoint, save_tensors
from sglang_ext.dflare.config import DrafterConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dflare convert", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="checkpoint directory (AngelSlim, AngelSpec or z-lab dialect)")
    parser.add_argument("dst", help="output directory (created)")
    parser.add_argument("--dtype", default=None, help="cast tensors (bfloat16, float16, float32, float64)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg, dialect, tensors = load_checkpoint(args.src)
        if args.dtype:
            dtype = dtype_from_name(args.dtype)
            tensors = {n: t.to(dtype) for n, t in tensors.items()}
        out = save_tensors(cfg, tensors, args.dst)
    except (CheckpointError, DrafterConfigError, ValueError, OSError) as exc:
        print(f"dflare convert: {exc}", file=sys.stderr)
        return 1
    layout = "AngelSlim QwenDFlareDraftModel" if cfg.kind == "dflare" else "z-lab DFlashDraftModel"
    print(
        f"converted {cfg.kind} drafter ({dialect} dialect, D={cfg.num_hidden_layers}, T={cfg.num_taps}, "
        f"{len(tensors)} tensors) -> {out} ({layout} layout)"
    )
    return 0
