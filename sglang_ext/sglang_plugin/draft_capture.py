"""Opt-in capture of DFLARE block outputs for the GPU check: ``DFLARE_DRAFT_CAPTURE=<dir>``.

Why: the issue's GPU check compares SGLang's block logits with the reference drafter's, and SGLang keeps
them inside the worker (a greedy head folded into the draft step). With the variable set, every eager draft
forward (CUDA-graph capture and replay are skipped: run the server with ``--disable-cuda-graph``) appends
its positions and final hidden states, on the CPU, to ``<dir>/draft_<pid>.pt``, up to ``LIMIT`` blocks;
the check applies the target's LM head itself. Unset, it costs one module-level check per draft forward.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ENV = "DFLARE_DRAFT_CAPTURE"
LIMIT = 256
_dir = os.environ.get(ENV)
_records: list[dict[str, torch.Tensor]] = []


def enabled() -> bool:
    return bool(_dir)


def record(positions: torch.Tensor, hidden: torch.Tensor) -> None:
    """Keep one draft forward's positions [N] and hidden states [N, H]; rewrite the capture file."""
    if not _dir or len(_records) >= LIMIT:
        return
    if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    _records.append({"positions": positions.detach().cpu(), "hidden": hidden.detach().float().cpu()})
    out = Path(_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"draft_{os.getpid()}.tmp"
    torch.save(_records, tmp)
    tmp.replace(out / f"draft_{os.getpid()}.pt")
