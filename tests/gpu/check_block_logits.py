"""GPU check: SGLang's DFLARE block logits == the reference drafter's (``run_on_gpu.sh block_logits``).

One DFLARE server, CUDA graphs off, ``DFLARE_DRAFT_CAPTURE`` set (``sglang_plugin/draft_capture.py``),
answers held-out prompts one at a time with 2 new tokens: its first draft block per prompt sits at
positions ``P..P+B-1`` (P = prompt length) and starts with the first generated token. The reference
drafter (``sglang_ext.dflare``, pure PyTorch, bf16 on the same GPU) drafts the same block from the HF
target's taps of the prompt, through the training forward with the block mask. Both hidden states go
through the target's LM head; per block slot the check reports the cosine of the hidden states, the max
logit difference and top-1 agreement (a disagreement is listed with the reference's top-2 margin).
Writes $OUT/block_logits.json and keeps the capture files beside it, so that ``--offline DIR`` can redo the
comparison from them (on any device) without a server.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_sglang_dflare import load_prompts, servable_target
from sglang_harness import OUT, SPEC, Results, generate, start_all

CAPTURE = Path("/tmp/draft_capture")
N_PROMPTS = 32


def reference_blocks(
    target: Path, dflare: Path, prompts: list[list[int]], firsts: list[int], device: str = "cuda"
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The reference drafter's final hidden states [B, H] for each prompt's first block (bf16), and the
    target's LM head weight."""
    from sglang_ext.dflare import ops
    from sglang_ext.dflare.checkpoint import load_drafter
    from sglang_ext.training.train_drafter import load_target

    dev = torch.device(device)
    model = load_target(target, dev).to(torch.bfloat16)
    drafter = load_drafter(dflare).to(dev, torch.bfloat16).eval()
    drafter.bind_target(model.get_input_embeddings(), model.get_output_embeddings())
    cfg = drafter.config
    blk, taps_ids = cfg.block_size, list(cfg.target_layer_ids)
    out = []
    with torch.inference_mode():
        for prompt, first in zip(prompts, firsts, strict=True):
            ids = torch.tensor([[*prompt, first]], device=dev)
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            taps = torch.stack([hs[t + 1] for t in taps_ids], dim=2)  # [1, S, T, H]
            p = len(prompt)
            anchors = torch.tensor([[p]], device=dev)
            mask = ops.block_training_mask(anchors, p + 1, blk, torch.ones_like(anchors, dtype=torch.bool))
            block = torch.full((1, blk), cfg.mask_token_id, device=dev)
            block[0, 0] = first
            positions = p + torch.arange(blk, device=dev)[None]
            ctx_pos = torch.arange(p + 1, device=dev)[None]
            out.append(drafter(drafter.embed(block), positions, taps, ctx_pos, mask)[0].float().cpu())
    return out, model.get_output_embeddings().weight.detach().float().cpu()


def first_blocks(
    records: list[dict], prompts: list[list[int]], ends: list[int] | None = None
) -> list[torch.Tensor | None]:
    """Each prompt's first draft block: the first record of that prompt's requests starting at position
    len(prompt). Matching on the start alone is wrong (a request's second block can start where a later
    prompt's first one does), so the records are searched in order: with ``ends`` (the record count when
    each prompt's request returned) only within that prompt's own records; without it (an older capture)
    from just after the previous prompt's first block, which is right unless a request's later block
    starts exactly at the next prompt's length."""
    starts = [int(r["positions"].flatten()[0]) for r in records]
    out: list[torch.Tensor | None] = []
    lo = 0
    for i, prompt in enumerate(prompts):
        hi = ends[i] if ends is not None else len(starts)
        hit = next((k for k in range(lo, hi) if starts[k] == len(prompt)), None)
        out.append(None if hit is None else records[hit]["hidden"])
        if ends is not None:
            lo = hi
        elif hit is not None:
            lo = hit + 1
    return out


def captured(directory: Path) -> list[dict]:
    return [r for f in sorted(directory.glob("draft_*.pt")) for r in torch.load(f)]


def greedy_firsts(target: Path, prompts: list[list[int]], device: str) -> list[int]:
    """The target's greedy first token per prompt (bf16), for an offline re-comparison whose GPU run did
    not record the tokens SGLang generated."""
    from sglang_ext.training.train_drafter import load_target

    model = load_target(target, torch.device(device)).to(torch.bfloat16)
    with torch.inference_mode():
        return [
            int(model(input_ids=torch.tensor([p], device=device)).logits[0, -1].argmax()) for p in prompts
        ]


def compare(sg: torch.Tensor, ref: torch.Tensor, head: torch.Tensor) -> dict:
    """Slots 1..B-1 (slot 0 is the known token): cosine, max |logit diff|, top-1 agreement."""
    sg, ref = sg[1:], ref[1:]
    cos = torch.nn.functional.cosine_similarity(sg, ref, dim=-1)
    ls, lr = sg @ head.T, ref @ head.T
    top2 = lr.topk(2, dim=-1)
    agree = ls.argmax(-1) == top2.indices[:, 0]
    return {
        "cos_min": round(float(cos.min()), 5),
        "cos_mean": round(float(cos.mean()), 5),
        "max_abs_logit_diff": round(float((ls - lr).abs().max()), 4),
        "logit_scale": round(float(lr.abs().max()), 3),
        "top1_agree": int(agree.sum()),
        "slots": int(agree.numel()),
        "disagreements_margin": [
            round(float(top2.values[i, 0] - top2.values[i, 1]), 4) for i in torch.nonzero(~agree).flatten()
        ],
    }


def summarize(rows: list[dict]) -> dict:
    found = [r for r in rows if "missing" not in r]
    return {
        "blocks_compared": len(found),
        "cos_min": min(r["cos_min"] for r in found) if found else None,
        "top1_agree": sum(r["top1_agree"] for r in found),
        "slots": sum(r["slots"] for r in found),
        "max_disagreement_margin": max((m for r in found for m in r["disagreements_margin"]), default=0.0),
    }


def capture_server(target: Path, dflare: Path, prompts: list[list[int]], res: Results) -> list[int] | None:
    """Serve DFLARE with the capture on and answer ``prompts`` one at a time; their first tokens."""
    base = ["--model-path", str(target), "--dtype", "bfloat16", "--mem-fraction-static", "0.5"]
    base += ["--max-running-requests", "8", "--disable-cuda-graph"]
    spec = [*SPEC, "--speculative-algorithm", "DFLARE", "--speculative-draft-model-path", str(dflare)]
    servers = start_all([("dflare", 31201, [*base, *spec], {"DFLARE_DRAFT_CAPTURE": str(CAPTURE)})])
    srv, up = servers["dflare"]
    res["up"] = up
    if not up:
        res["log_tail"] = srv.log_tail(60)
        srv.stop()
        return None
    firsts, ends = [], []
    try:
        greedy = {"temperature": 0, "max_new_tokens": 2}
        for p in prompts:  # one at a time: the capture file is complete when a response returns
            firsts.append(generate(srv.url, [p], greedy, 1)[0]["output_ids"][0])
            ends.append(len(captured(CAPTURE)))
    finally:
        srv.stop()
    res["record_ends"] = ends
    return firsts


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=Path, required=True)
    ap.add_argument("--dflare", type=Path, required=True)
    ap.add_argument("--offline", type=Path, help="re-compare the captures in this directory (no server)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    target, _ = servable_target(args.target)
    prompts = load_prompts(target, N_PROMPTS)
    if args.offline:
        res = Results(args.offline / "block_logits_offline.json")
        capture = args.offline
        firsts = greedy_firsts(target, prompts, args.device)
        res["firsts_from"] = f"target greedy (bf16, {args.device})"
    else:
        res = Results(OUT / "block_logits.json")
        capture = CAPTURE
        got = capture_server(target, args.dflare, prompts, res)
        if got is None:
            return 1
        firsts = got
        res["firsts_from"] = "SGLang DFLARE server"
        for f in CAPTURE.glob("draft_*.pt"):  # kept with the results: see --offline
            shutil.copy(f, OUT / f.name)
    res["firsts"] = firsts
    records = captured(capture)
    res["captured_blocks"] = len(records)
    sg_blocks = first_blocks(records, prompts, res.data.get("record_ends"))
    ref_blocks, head = reference_blocks(target, args.dflare, prompts, firsts, args.device)
    rows = [
        compare(s, r, head) if s is not None else {"missing": True}
        for s, r in zip(sg_blocks, ref_blocks, strict=True)
    ]
    res["blocks"] = rows
    res["summary"] = summarize(rows)
    print(json.dumps(res["summary"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
