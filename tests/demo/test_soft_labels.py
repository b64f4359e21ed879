"""``--soft-labels``: the drafter is scored against the target's own next-token distribution.

On the shipped target (real weights): the label distribution for a token must be the target's output at the
position before it, which the target's greedy text proves (its argmax is the token itself); and with one-hot
distributions the soft loss must equal the hard cross-entropy exactly.
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from sglang_ext import demo
from sglang_ext.training import train_drafter
from sglang_ext.training.train_drafter import Batch, DrafterSpec, block_loss, soft_labels, target_forward

BLOCK = 4


@pytest.fixture(scope="module")
def greedy_batch() -> tuple[torch.nn.Module, Batch, int]:
    """Two held-out-style prompts continued greedily by the demo target: data the target agrees with."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    target = train_drafter.load_target(demo.target_path(), torch.device("cpu"))
    tok = AutoTokenizer.from_pretrained(str(demo.target_path()))
    rows = []
    for body in (
        'def parse_header(line):\n    """Parse a Content-type like header.\n\n    Return its type."""',
        'def clamp(value, low, high):\n    """Limit value to the range [low, high]."""',
    ):
        chat = [{"role": "user", "content": f"Write the body of this Python function.\n\n{body}"}]
        prompt = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
        prompt = prompt["input_ids"] if not torch.is_tensor(prompt) else prompt
        out = target.generate(prompt, max_new_tokens=24, do_sample=False)
        rows.append((out[0], prompt.shape[1]))
    width = min(len(ids) for ids, _ in rows)
    assert all(width >= p + 11 + BLOCK for _, p in rows), "the target answered too briefly for the anchors"
    ids = torch.stack([r[:width] for r, _ in rows])
    anchors = torch.tensor([[p, p + 5, p + 11] for _, p in rows])
    real, valid = torch.ones_like(ids, dtype=torch.bool), torch.ones_like(anchors, dtype=torch.bool)
    batch = Batch(ids, real, anchors, valid)
    _, _, mask_id = train_drafter._special(demo.target_path())
    return target, batch, mask_id


def test_soft_label_of_a_greedy_token_peaks_at_that_token(greedy_batch) -> None:
    target, batch, _ = greedy_batch
    _, logprobs = target_forward(target, batch, [1], logprobs=True)
    label_pos = batch.anchors[:, :, None] + torch.arange(1, BLOCK)
    labels = batch.ids.gather(1, label_pos.flatten(1)).view_as(label_pos)
    soft = soft_labels(logprobs, label_pos)
    assert soft.shape == (*label_pos.shape, target.config.vocab_size)
    torch.testing.assert_close(soft.sum(-1), torch.ones(label_pos.shape))
    assert torch.equal(soft.argmax(-1), labels)  # off by one position and this fails


def test_one_hot_soft_labels_give_the_hard_cross_entropy(greedy_batch) -> None:
    target, batch, mask_id = greedy_batch
    spec = DrafterSpec.parse("d:dflare:2", target.config.num_hidden_layers)
    args = argparse.Namespace(block_size=BLOCK, anchors=3, gamma=7.0)
    drafter = train_drafter.build_drafter(spec, target, args, mask_id)
    taps, _ = target_forward(target, batch, list(spec.taps))
    one_hot = F.one_hot(batch.ids.roll(-1, dims=1), target.config.vocab_size).float()  # p predicts p + 1
    hard, hits, count = block_loss(drafter, batch, taps, BLOCK, 7.0, mask_id)
    soft, soft_hits, _ = block_loss(drafter, batch, taps, BLOCK, 7.0, mask_id, one_hot.clamp(min=1e-30).log())
    torch.testing.assert_close(soft, hard, rtol=1e-5, atol=1e-5)
    assert soft_hits == hits and count == 3 * 2 * (BLOCK - 1)
    assert hard.requires_grad and soft.requires_grad
