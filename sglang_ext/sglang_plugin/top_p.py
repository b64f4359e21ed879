"""Top-p renormalisation for SGLang's DFlash-family sampled verify, in PyTorch.

Why: SGLang 0.5.17 builds the target distribution of a sampled DFLASH/DFLARE verify step with sgl_kernel's
``top_p_renorm_prob`` whenever a request has ``top_p < 1`` (``build_dflash_verify_target_probs``). That call
goes to FlashInfer, which without prebuilt sampling kernels compiles them with ninja/nvcc on first use, in
every server process: minutes during which the scheduler serves nothing. On our H200 checks every first
``top_p < 1`` request (OpenAI clients send top_p routinely) hung past its timeout, built-in DFLASH included;
the stack of a child process calling the kernel alone was in FlashInfer's ``run_ninja`` after 40 s
(docs/results/sglang_top_p.json).

The DFLARE worker (``install``, at its construction in the scheduler process) rebinds that one module global
to the same mathematics written with ``torch.sort``: keep the most probable tokens up to and including the
one whose cumulative probability reaches ``top_p``, and renormalise. Greedy requests and ``top_p = 1`` never
reach it. Not a HookRegistry hook: where sgl_kernel is missing the global is None, and the registry's
propagation of a REPLACE rewrites every module global equal to the old value, None included.
"""

from __future__ import annotations

import torch


def top_p_renorm_prob(probs: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """Rows of ``probs`` [N, V] restricted to their top-p nucleus and renormalised (float32).

    A token is kept when the probability mass strictly more probable than it, in sorted order, is below
    ``top_p``: the smallest prefix whose mass reaches ``top_p``, as sgl_kernel/FlashInfer define it.
    """
    probs = probs.float()
    p = torch.as_tensor(top_p, dtype=torch.float32, device=probs.device).reshape(-1, 1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, mass_before < p)
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def install() -> bool:
    """Use ``top_p_renorm_prob`` in SGLang's DFlash verify; False where sampled verify is unavailable."""
    from sglang.srt.speculative import dflash_utils

    if dflash_utils.top_p_renorm_prob is None:  # no sgl_kernel: SGLang refuses sampled verify anyway
        return False
    dflash_utils.top_p_renorm_prob = top_p_renorm_prob
    return True
