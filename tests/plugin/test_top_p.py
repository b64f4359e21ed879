"""The top-p fix: once installed, SGLang's own DFlash verify builds its target distribution with our PyTorch
renormalisation, and that renormalisation is the nucleus of each row."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang_ext.sglang_plugin.top_p import install, top_p_renorm_prob

pytestmark = pytest.mark.sglang


def nucleus(row: list[float], p: float) -> list[float]:
    """One row by hand: walk tokens from most to least probable until the mass reaches p."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += row[i]
        if mass >= p:
            break
    total = sum(row[i] for i in kept)
    return [row[i] / total if i in kept else 0.0 for i in range(len(row))]


def test_rows_are_their_nucleus_renormalised() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 50, generator=gen, dtype=torch.float64) * 2.5, dim=-1)
    top_p = torch.rand(64, generator=gen, dtype=torch.float64).clamp(0.05, 1.0)
    top_p[0], top_p[1] = 1.0, 1e-6  # everything kept; only the argmax kept
    got = top_p_renorm_prob(probs, top_p)
    rows = [nucleus(r.tolist(), float(p)) for r, p in zip(probs, top_p, strict=True)]
    want = torch.tensor(rows, dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1] > 0, torch.nn.functional.one_hot(probs[1].argmax(), 50).bool())
    torch.testing.assert_close(got[0].double(), probs[0], atol=1e-6, rtol=1e-6)


def test_sglang_dflash_verify_uses_it_once_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    from sglang.srt.speculative import dflash_utils

    assert dflash_utils.top_p_renorm_prob is None and install() is False  # CPU: no sgl_kernel, untouched

    def hung_kernel(*_args: object) -> torch.Tensor:
        raise AssertionError("sgl_kernel's top_p_renorm_prob was called")

    monkeypatch.setattr(dflash_utils, "top_p_renorm_prob", hung_kernel)  # what a GPU build binds
    assert install() is True
    bs, draft = 2, 4
    logits = torch.randn(bs * draft, 32, generator=torch.Generator().manual_seed(1))
    info = SimpleNamespace(
        temperatures=torch.tensor([[0.7], [1.0]]),
        top_ps=torch.tensor([0.5, 0.9]),
        top_ks=torch.tensor([1 << 30, 1 << 30]),
        need_top_k_sampling=False,
        need_top_p_sampling=True,
    )
    probs = dflash_utils.build_dflash_verify_target_probs(
        next_token_logits=logits, sampling_info=info, draft_token_num=draft, bs=bs
    )
    scaled = torch.softmax(logits / torch.tensor([0.7] * draft + [1.0] * draft)[:, None], dim=-1)
    want = top_p_renorm_prob(scaled, torch.tensor([0.5] * draft + [0.9] * draft))
    torch.testing.assert_close(probs.view(bs * draft, -1), want)
    assert (probs.view(bs * draft, -1)[:draft] > 0).sum(-1).lt(32).all()  # the nucleus is a real cut
