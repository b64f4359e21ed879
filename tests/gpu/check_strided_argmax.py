"""GPU check and timing of the adaptive step's greedy argmax (``adaptive.strided_argmax``) against SGLang's
way (the compact verify logits scattered to the strided [bs * block] rows, then the argmax), through
SGLang's Triton scatter kernel on the card: identical tokens at every batch size, and the time of each.

Qwen3's vocabulary (151,936), float32 logits as the verify returns them, block 16, per-request windows
drawn at random (seeded), the compact rows padded to the next multiple of 16 as a captured graph tier pads
them. Medians of 20 timed repetitions after 3 warm-ups, CUDA events.

Usage: ``python3 tests/gpu/check_strided_argmax.py [--out PATH]`` (default $OUT/strided_argmax.json); exits
1 when any token differs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sglang_ext.sglang_plugin import adaptive

VOCAB, BLOCK = 151_936, 16


def timed(fn, reps: int = 20) -> float:
    """Median ms of ``fn`` over ``reps`` runs (CUDA events), after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def one_batch(bs: int, gen: torch.Generator) -> dict:
    from sglang.kernels.ops.speculative.dspark.dspark_verify_window import ScatterCompactToStrided
    from sglang.srt.speculative.ragged_verify import RaggedVerifyLayout

    lens = torch.randint(1, BLOCK + 1, (bs,), generator=gen).tolist()
    tier = -(-sum(lens) // 16) * 16
    cuda = torch.device("cuda")
    layout = RaggedVerifyLayout.from_verify_lens(verify_lens_cpu=lens, device=cuda, grid=[tier])
    compact = torch.randn(layout.graph_num_tokens, VOCAB, device=cuda)

    def sglang_way() -> torch.Tensor:
        strided = ScatterCompactToStrided.execute(
            compact=compact, layout=layout, fill_value=0.0, verify_num_draft_tokens=BLOCK
        )[: bs * BLOCK]
        return torch.argmax(strided, dim=-1).view(bs, BLOCK)

    def ours() -> torch.Tensor:
        return adaptive.strided_argmax(compact, layout, BLOCK)

    same = bool(torch.equal(sglang_way(), ours()))
    scatter_ms, ours_ms = timed(sglang_way), timed(ours)
    return {
        "batch": bs,
        "verified_tokens": sum(lens),
        "identical": same,
        "scatter_then_argmax_ms": round(scatter_ms, 4),
        "argmax_then_scatter_ms": round(ours_ms, 4),
        "saved_ms": round(scatter_ms - ours_ms, 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(os.environ.get("OUT", "/tmp/out")) / "strided_argmax.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    rows = [one_batch(bs, gen) for bs in (1, 8, 32, 64, 128, 256)]
    for row in rows:
        print(row, flush=True)
    result = {"device": torch.cuda.get_device_name(0), "vocab": VOCAB, "block": BLOCK, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
