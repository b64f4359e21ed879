"""What a draft vocabulary costs in acceptance: the demo pair's tau with the drafter kept to the N tokens the
target writes most, for several N, greedy and at temperature 1, side by side in one run (no GPU).

The vocabularies are counted as ``dflare draft-vocab`` counts them, from the assistant turns of the demo's
training corpus (rebuilt from this Python's standard library, as ``dflare build-corpus`` does); tau is
measured on the held-out prompts, which that count never saw. Each row also gives the vocabulary's coverage
of the held-out answers: the share of the target's tokens it could draft at all.

    python tests/perf/draft_vocab_acceptance.py --out docs/results/draft_vocab_acceptance.json \\
        --plot docs/results/draft_vocab_acceptance.png
"""

from __future__ import annotations

import argparse
import json
import platform
import sysconfig
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sglang_ext import demo
from sglang_ext.dflare.checkpoint import load_drafter
from sglang_ext.dflare.draft_vocab import DraftVocab, count_tokens
from sglang_ext.reference.loader import load_target, load_tokenizer
from sglang_ext.reference.sampling import SamplingParams
from sglang_ext.training.corpus import build_corpus, load_chats
from sglang_ext.training.count_vocab import end_ids
from sglang_ext.training.evaluate import acceptance, load_prompts

SIZES = (4096, 3072, 2048, 1536, 1024, 512)


def measure(sizes: list[int], prompts: int, max_tokens: int, batch: int) -> dict[str, Any]:
    target_dir = demo.target_path()
    tokenizer = load_tokenizer(target_dir)
    vocab_size = int(json.loads((target_dir / "config.json").read_text())["vocab_size"])
    train, _ = build_corpus(Path(sysconfig.get_paths()["stdlib"]))
    encode = tokenizer.backend_tokenizer.encode_batch  # the fast tokenizer: the whole corpus in seconds
    counts = count_tokens(
        (e.ids for e in encode([s.response for s in train], add_special_tokens=False)), vocab_size
    )
    heldout = load_chats(demo.heldout_prompts_path())[:prompts]
    answers = [r["messages"][-1]["content"] for r in heldout]
    heldout_counts = count_tokens((e.ids for e in encode(answers, add_special_tokens=False)), vocab_size)
    target = load_target(target_dir, torch.float32)
    drafter = load_drafter(demo.drafter_path("dflare"), dtype=torch.float32)
    prompt_ids = load_prompts(demo.heldout_prompts_path(), tokenizer, prompts)
    rows = []
    for size in tqdm(sizes, desc="draft vocabularies"):
        vocab = DraftVocab.from_counts(counts, size, end_ids(target_dir))
        drafter.draft_vocab = None if size == vocab_size else vocab
        row: dict[str, Any] = {
            "size": size,
            "coverage_train": round(vocab.coverage or 0.0, 4),
            "coverage_heldout": round(
                float(heldout_counts[vocab.ids].sum()) / float(heldout_counts.sum()), 4
            ),
        }
        for name, temperature in (("greedy", 0.0), ("t1", 1.0)):
            params = SamplingParams(
                temperature=temperature,
                max_tokens=max_tokens,
                seed=0,
                stop_token_ids=(tokenizer.eos_token_id,),
            )
            summary, _ = acceptance(target, drafter, tokenizer, prompt_ids, params, None, batch)
            row[f"tau_{name}"] = round(summary["tau"], 4)
            row[f"per_position_{name}"] = [round(x, 4) for x in summary["per_position_acceptance"]]
        rows.append(row)
    for row in rows:
        for name in ("greedy", "t1"):
            row[f"tau_{name}_vs_full"] = round(row[f"tau_{name}"] / rows[0][f"tau_{name}"], 4)
    return {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "pair": "demo (dflare drafter, block 16)",
        "target_vocab_size": vocab_size,
        "prompts": prompts,
        "max_tokens": max_tokens,
        "batch": batch,
        "rows": rows,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    sizes = [r["size"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, label in (("greedy", "greedy"), ("t1", "temperature 1")):
        full = rows[0][f"tau_{name}"]
        ax.plot(
            sizes, [r[f"tau_{name}_vs_full"] for r in rows], marker="o", label=f"{label} (tau {full:.2f})"
        )
    ax.set_xlabel(f"draft vocabulary (tokens of {report['target_vocab_size']})")
    ax.set_ylabel("tau / tau over the whole vocabulary")
    ax.invert_xaxis()
    cov = ax.twinx()
    cov.plot(
        sizes, [100 * r["coverage_heldout"] for r in rows], color="grey", ls="--", label="held-out coverage"
    )
    cov.set_ylabel("coverage of held-out answers (%)")
    lines = ax.get_legend_handles_labels()
    more = cov.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower left")
    ax.set_title(f"Demo pair: acceptance by draft vocabulary ({report['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="largest first: the first is the baseline"
    )
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args()
    report = measure([int(s) for s in args.sizes.split(",")], args.prompts, args.max_tokens, args.batch)
    report["command"] = "python tests/perf/draft_vocab_acceptance.py " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if v is not None and k not in ("out", "plot")
    )
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    for r in report["rows"]:
        print(
            f"{r['size']:>6} tokens: coverage {r['coverage_heldout']:.1%}, tau {r['tau_greedy']} greedy "
            f"({r['tau_greedy_vs_full']}x), {r['tau_t1']} at T=1 ({r['tau_t1_vs_full']}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
