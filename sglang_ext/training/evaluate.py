"""`dflare eval`: acceptance and speed of target/drafter pairs on held-out prompts -> JSON + PNG.

Acceptance (tau, per-position acceptance, histogram) comes from the reference engine's own
:class:`~sglang_ext.stats.SpecStats`, decoding the held-out prompts in a continuous batch. tau is reported
twice: pooled (``1 + accepted / verify steps`` over all requests, the SpecStats definition) and as the
mean of per-prompt tau (the DFlash/DFlare papers' definition).

Speed is measured at batch size 1 on a few prompts, each prompt decoded by every method in turn so that
machine noise hits all of them alike: the speculative engine per drafter, the same engine at block size
1, and ``transformers`` ``generate`` with its KV cache. The AR baseline is the faster of the last two;
speedup = speculative tokens/s / AR tokens/s. Greedy runs also check losslessness: every method must
produce the same tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sglang_ext.stats import SpecStats, total


def load_prompts(path: Path, tokenizer: Any, limit: int) -> list[list[int]]:
    """Chat-template token ids of the first ``limit`` held-out samples (their last message dropped)."""
    from sglang_ext.training.corpus import load_chats
    from sglang_ext.training.data import render_prompt

    records = load_chats(path)[:limit]
    return [render_prompt(tokenizer, r["messages"][:-1]) for r in records]


def acceptance(
    target: torch.nn.Module,
    drafter: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    params: Any,
    block_size: int | None,
    batch: int,
) -> tuple[dict[str, Any], list[list[int]]]:
    """Decode ``prompts`` speculatively; acceptance numbers and the outputs."""
    from sglang_ext.reference.engine import SpeculativeEngine

    engine = SpeculativeEngine(target, drafter, block_size, tokenizer, max_batch=batch)
    results = []
    for lo in tqdm(range(0, len(prompts), batch), desc="acceptance", mininterval=2.0):
        results += engine.generate(prompts[lo : lo + batch], params)
    stats = [r.stats for r in results if r.stats is not None and r.stats.verify_steps]
    pooled = total(stats) or SpecStats(engine.block_size)
    steps = max(1, pooled.verify_steps)
    vocab = getattr(drafter, "draft_vocab", None)
    summary = {
        "block_size": engine.block_size,
        "draft_vocab_size": vocab.size if vocab is not None else None,  # None: drafts over every token
        "prompts": len(prompts),
        "generated_tokens": sum(len(r.output_ids) for r in results),
        "tau": pooled.acceptance_length,
        "tau_mean_per_prompt": sum(s.acceptance_length for s in stats) / max(1, len(stats)),
        "acceptance_rate": pooled.acceptance_rate,
        "per_position_acceptance": [n / steps for n in pooled.accepted_per_position],
        "histogram": pooled.histogram,
        "usage": pooled.to_usage(),
    }
    return summary, [r.output_ids for r in results]


def _hf_generate(
    target: torch.nn.Module, prompt: Sequence[int], max_tokens: int, eos: tuple[int, ...]
) -> list[int]:
    ids = torch.tensor([list(prompt)])
    out = target.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=list(eos) or None,
        pad_token_id=eos[0] if eos else 0,
        use_cache=True,
    )
    new = out[0, ids.shape[1] :].tolist()
    cut = [i for i, t in enumerate(new) if t in eos]
    return new[: cut[0]] if cut else new  # the engine, like SGLang, leaves the stop token out


def speed(
    target: torch.nn.Module,
    drafters: dict[str, Any],
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    params: Any,
    block_size: int | None,
) -> dict[str, Any]:
    """Tokens/s at batch 1 of every drafter, block size 1 and HF generate, interleaved per prompt."""
    from sglang_ext.reference.engine import SpeculativeEngine

    engines = {
        name: SpeculativeEngine(target, d, block_size, tokenizer, max_batch=1) for name, d in drafters.items()
    }
    engines["ar_block1"] = SpeculativeEngine(target, None, 1, tokenizer, max_batch=1)
    methods = [*engines, "hf_generate"]
    seconds = dict.fromkeys(methods, 0.0)
    tokens = dict.fromkeys(methods, 0)
    outputs: dict[str, list[list[int]]] = {m: [] for m in methods}
    engines[methods[0]].generate([prompts[0]], params)  # warm-up (allocator, kernels)
    for prompt in tqdm(prompts, desc="speed", mininterval=2.0):
        for method in methods:
            start = time.perf_counter()
            if method == "hf_generate":
                out = _hf_generate(target, prompt, params.max_tokens, tuple(params.stop_token_ids))
            else:
                out = engines[method].generate([prompt], params)[0].output_ids
            seconds[method] += time.perf_counter() - start
            tokens[method] += len(out)
            outputs[method].append(out)
    tok_s = {m: tokens[m] / seconds[m] if seconds[m] else 0.0 for m in methods}
    ar_name = max(("ar_block1", "hf_generate"), key=lambda m: tok_s[m])
    result: dict[str, Any] = {
        "prompts": len(prompts),
        "threads": torch.get_num_threads(),
        "tokens_per_s": tok_s,
        "tokens": tokens,
        "seconds": seconds,
        "ar_baseline": ar_name,
        "speedup": {name: tok_s[name] / tok_s[ar_name] for name in drafters},
    }
    if params.temperature == 0:
        ref = outputs["ar_block1"]
        result["identical_to_ar"] = {m: outputs[m] == ref for m in methods}
    return result


def plot(report: dict[str, Any], path: Path) -> None:
    """Per-position acceptance, accepted-drafts histogram and tokens/s, one colour per drafter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_speed = "speed" in report
    fig, axes = plt.subplots(1, 3 if has_speed else 2, figsize=(15 if has_speed else 10, 4))
    for name, acc in report["acceptance"].items():
        pos = acc["per_position_acceptance"]
        axes[0].plot(range(1, len(pos) + 1), pos, marker="o", label=f"{name} (tau {acc['tau']:.2f})")
        hist = acc["histogram"]
        n = max(1, sum(hist))
        axes[1].plot(range(len(hist)), [h / n for h in hist], marker="s", label=name)
    axes[0].set(
        xlabel="draft position", ylabel="accepted fraction of verify steps", title="per-position acceptance"
    )
    axes[1].set(xlabel="accepted drafts per verify step", ylabel="fraction of steps", title="histogram")
    for ax in axes[:2]:
        ax.legend()
        ax.grid(alpha=0.3)
    if has_speed:
        tok_s = report["speed"]["tokens_per_s"]
        axes[2].bar(list(tok_s), list(tok_s.values()), color="tab:blue")
        axes[2].set(ylabel="tokens/s (batch 1)", title="speed vs autoregressive")
        axes[2].tick_params(axis="x", rotation=20)
    fig.suptitle(report.get("title", "dflare eval"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dflare eval", description=__doc__.split("\n")[0])
    p.add_argument("--target", type=Path, default=None, help="HF target directory (default: the demo target)")
    p.add_argument(
        "--drafter", action="append", default=[], metavar="NAME=DIR", help="drafter to evaluate (repeatable)"
    )
    p.add_argument(
        "--kind", action="append", default=[], choices=("dflare", "dflash"), help="demo drafter(s)"
    )
    p.add_argument("--prompts", type=Path, default=None, help="held-out JSONL (default: the demo's)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--speed-prompts", type=int, default=4, help="0 = skip the speed comparison")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=None, help="default: the drafter's")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="continuous-batch rows for the acceptance run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--out", type=Path, required=True, help="directory for eval.json and eval.png")
    return p


def _drafter_dirs(args: argparse.Namespace) -> dict[str, Path]:
    from sglang_ext import demo

    dirs = {kind: demo.drafter_path(kind) for kind in args.kind}
    for item in args.drafter:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        dirs[name] = Path(path)
    return dirs or {"dflare": demo.drafter_path("dflare")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sglang_ext import demo
    from sglang_ext.dflare.checkpoint import load_drafter
    from sglang_ext.reference.loader import load_target, load_tokenizer
    from sglang_ext.reference.sampling import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    target_dir = args.target or demo.target_path()
    target = load_target(target_dir, torch.float32)
    tokenizer = load_tokenizer(target_dir)
    drafters = {n: load_drafter(d, dtype=torch.float32) for n, d in _drafter_dirs(args).items()}
    prompts = load_prompts(args.prompts or demo.heldout_prompts_path(), tokenizer, args.num_prompts)
    params = SamplingParams(
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
        stop_token_ids=(tokenizer.eos_token_id,),
    )
    report: dict[str, Any] = {
        "title": f"{target_dir.name}: {', '.join(drafters)} at T={args.temperature}",
        "target": str(target_dir),
        "drafters": {n: str(d) for n, d in _drafter_dirs(args).items()},
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "acceptance": {},
    }
    outputs = {}
    for name, drafter in drafters.items():
        report["acceptance"][name], outputs[name] = acceptance(
            target, drafter, tokenizer, prompts, params, args.block_size, args.batch
        )
    if args.temperature == 0 and len(outputs) > 1:
        first = next(iter(outputs.values()))
        report["drafters_agree"] = all(o == first for o in outputs.values())
    if args.speed_prompts:
        report["speed"] = speed(
            target, drafters, tokenizer, prompts[: args.speed_prompts], params, args.block_size
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "eval.png")
    return report


def main(argv: list[str]) -> int:
    report = run(build_parser().parse_args(argv))
    for name, acc in report["acceptance"].items():
        print(
            f"{name}: tau {acc['tau']:.3f} (mean per prompt {acc['tau_mean_per_prompt']:.3f}), "
            f"block {acc['block_size']}"
        )
    if "speed" in report:
        sp = report["speed"]
        rates = ", ".join(f"{m} {v:.1f}" for m, v in sp["tokens_per_s"].items())
        print(f"tokens/s: {rates}; AR baseline = {sp['ar_baseline']}")
        for name, ratio in sp["speedup"].items():
            print(f"{name}: {ratio:.2f}x vs AR")
        if sp.get("identical_to_ar") and not all(sp["identical_to_ar"].values()):
            print(f"NOT LOSSLESS: {sp['identical_to_ar']}", file=sys.stderr)
            return 1
    return 0
