"""Where a CPU speculative step's time goes (the profile in docs/benchmarks.md, "Reference engine on CPU").

A script, not a test (timings belong in benchmarks). Each mode prints medians and writes JSON:

  phases     per-phase medians of the reference engine, block size 1 and speculative interleaved prompt by
             prompt: step, drafter (context append, block forward), target forward by verified rows
  standin    the verify forward after the real drafter vs in a stand-in engine that skips the drafter
             (constant 3-draft blocks, same verify width); ``--touch-mb`` makes the stand-in read a buffer
             where the drafter would run
  isolated   the target forward alone at 1-8 rows over a 150-token context
  rows       each weight product in the running engines (as ``phases`` runs them), by weight shape and rows:
             what the verify's and the drafter's extra rows cost where the weights stream from cache
  bandwidth  read bandwidth of ``x.sum()`` over 1-256 MB
  products   per-call time of a [rows, 256] x [256, 1024] product: float32, bfloat16, fp16 and int8 weights

    python tests/perf/cpu_step_profile.py phases --out docs/results/cpu_step_phases.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sglang_ext import demo
from sglang_ext.dflare.linear import StackedLinear
from sglang_ext.reference.bench import load_prompts
from sglang_ext.reference.engine import CPU_MIN_DRAFT_CONFIDENCE, SpeculativeEngine
from sglang_ext.reference.loader import load_engine
from sglang_ext.reference.pair import encode_prompt, eos_ids
from sglang_ext.reference.sampling import SamplingParams


def _ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1e3, 3)


def _timed(obj: Any, name: str, sink: list[float]) -> None:
    """Replace ``obj.name`` by a wrapper that appends each call's seconds to ``sink``."""
    inner = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        sink.append(time.perf_counter() - start)
        return out

    setattr(obj, name, wrapper)


def _forward_by_rows(engine: SpeculativeEngine, times: dict[str, list[float]], label: str) -> None:
    """Time the target forward, keyed by the rows it ran (verify widths; ``pre`` for prefills)."""
    inner = engine.runner.forward

    def wrapper(cache: Any, ids: torch.Tensor, starts: list[int]) -> Any:
        start = time.perf_counter()
        out = inner(cache, ids, starts)
        rows = ids.shape[1]
        times[f"{label}.forward.q{rows if rows <= 16 else 'pre'}"].append(time.perf_counter() - start)
        return out

    engine.runner.forward = wrapper


def _engines(args: argparse.Namespace) -> tuple[SpeculativeEngine, SpeculativeEngine, list[list[int]], Any]:
    target = demo.target_path()
    drafter = args.drafter or demo.drafter_path("dflare")
    # the fixed threshold its documented profiles used (the policy would mix in plain decode steps)
    spec = load_engine(
        target,
        drafter,
        block_size=args.block_size,
        max_batch=1,
        min_draft_confidence=CPU_MIN_DRAFT_CONFIDENCE,
    )
    plain = load_engine(target, None, block_size=1, max_batch=1)
    texts = load_prompts(None, demo=True)[: args.num_prompts]
    prompts = [encode_prompt(spec.tokenizer, t, chat=True) for t in texts]
    params = SamplingParams(max_tokens=args.max_tokens, stop_token_ids=eos_ids(spec.tokenizer))
    return spec, plain, prompts, params


def _alternate(
    engines: list[SpeculativeEngine],
    prompts: list[list[int]],
    params,
    rounds: int,
    before: Callable[[SpeculativeEngine], None] | None = None,
) -> None:
    """Decode every prompt with every engine, prompt by prompt, in ABBA order (``before(engine)`` first)."""
    for _ in range(rounds):
        for i, prompt in enumerate(prompts):
            for engine in engines if i % 2 == 0 else engines[::-1]:
                if before is not None:
                    before(engine)
                engine.generate([prompt], params)


def phases(args: argparse.Namespace) -> dict[str, Any]:
    spec, plain, prompts, params = _engines(args)
    _alternate([plain, spec], prompts[:2], params, 1)  # warm-up, untimed
    times: dict[str, list[float]] = defaultdict(list)
    for label, engine in (("ar", plain), ("spec", spec)):
        _timed(engine, "step", times[f"{label}.step"])
        _forward_by_rows(engine, times, label)
    _timed(spec, "_propose", times["spec.drafter"])
    _timed(spec.drafter, "append_context", times["spec.drafter.append_context"])
    _timed(spec.drafter, "draft_hidden", times["spec.drafter.block_forward"])
    _alternate([plain, spec], prompts, params, args.rounds)
    return {k: {"calls": len(v), "median_ms": _ms(v)} for k, v in sorted(times.items())}


def rows(args: argparse.Namespace) -> dict[str, Any]:
    spec, plain, prompts, params = _engines(args)
    _alternate([plain, spec], prompts[:2], params, 1)  # warm-up, untimed
    times: dict[str, list[float]] = defaultdict(list)
    label = ["ar"]
    inner = StackedLinear.__call__

    def timed(self: StackedLinear, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = inner(self, x)
        rows = x.numel() // x.shape[-1]
        if rows <= 16:  # decode and verify products; prefills are not what a step costs
            shape = f"{self.linears[0].in_features}x{sum(lin.out_features for lin in self.linears)}"
            times[f"{label[0]}.{shape}.rows{rows}"].append(time.perf_counter() - start)
        return out

    def set_label(engine: SpeculativeEngine) -> None:
        label[0] = "ar" if engine is plain else "spec"

    StackedLinear.__call__ = timed  # type: ignore[method-assign]
    try:
        _alternate([plain, spec], prompts, params, args.rounds, set_label)
    finally:
        StackedLinear.__call__ = inner  # type: ignore[method-assign]
    return {
        k: {"calls": len(v), "median_us": round(statistics.median(v) * 1e6, 1)}
        for k, v in sorted(times.items())
    }


def standin(args: argparse.Namespace) -> dict[str, Any]:
    spec, _, prompts, params = _engines(args)
    stand, _, _, _ = _engines(args)
    buffer = torch.randn(args.touch_mb * 2**20 // 4) if args.touch_mb else None

    def no_drafter(rows: int) -> tuple[torch.Tensor, list[int]]:
        for slot in stand._slots[:rows]:
            slot.ctx = []  # the drafter's context is never needed
        if buffer is not None:
            buffer.sum()
        return torch.full((rows, 3), 5, dtype=torch.long), [3] * rows

    stand._propose = no_drafter  # type: ignore[method-assign]
    times: dict[str, list[float]] = defaultdict(list)
    _forward_by_rows(spec, times, "real")
    _forward_by_rows(stand, times, "standin")
    _alternate([spec, stand], prompts, params, args.rounds)
    real, fake = times["real.forward.q4"], times["standin.forward.q4"]
    return {
        "touch_mb": args.touch_mb,
        "real_q4_ms": _ms(real),
        "standin_q4_ms": _ms(fake),
        "gap_ms": round(_ms(real) - _ms(fake), 3),
        "calls": [len(real), len(fake)],
    }


def isolated(args: argparse.Namespace) -> dict[str, Any]:
    spec, _, _, _ = _engines(args)
    runner, context = spec.runner, 150
    cache = runner.new_cache(1)
    widths = (1, 2, 4, 5, 8)
    blocks = {q: torch.randint(5, 4000, (1, q)) for q in widths}
    times: dict[int, list[float]] = {q: [] for q in widths}
    with torch.inference_mode():
        runner.forward(cache, torch.randint(5, 4000, (1, context)), [0])
        cache.lengths[0] = context
        for _ in range(400):
            for q in widths:  # interleaved, so drift hits every width alike
                start = time.perf_counter()
                runner.forward(cache, blocks[q], [context])
                times[q].append(time.perf_counter() - start)
    return {f"q{q}_ms": _ms(t[20:]) for q, t in times.items()}


def _per_call(fn: Callable[[], Any], calls: int) -> float:
    for _ in range(100):
        fn()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return round(statistics.median(samples) * 1e6, 1)


def bandwidth(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for mb in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        x = torch.randn(mb * 2**20 // 4)
        seconds = _per_call(x.sum, max(3, 2000 // mb)) / 1e6
        out[f"{mb}MB_GBps"] = round(mb / 1024 / seconds, 1)
    return out


def products(args: argparse.Namespace) -> dict[str, Any]:
    weight = torch.randn(1024, 256)  # [out, in]
    w_t = weight.t().contiguous()
    w_bf16 = w_t.to(torch.bfloat16)
    fp16 = torch.ops.quantized.linear_prepack_fp16(weight, None)
    scales = weight.abs().amax(1) / 127
    q = torch.quantize_per_channel(weight, scales, torch.zeros(1024, dtype=torch.long), 0, torch.qint8)
    int8 = torch.ops.quantized.linear_prepack(q, None)
    out = {}
    for rows in (1, 4, 8):
        x = torch.randn(rows, 256)
        xb = x.to(torch.bfloat16)
        out[f"rows{rows}_us"] = {
            "float32": _per_call(lambda x=x: x @ w_t, 3000),
            "bfloat16": _per_call(lambda xb=xb: xb @ w_bf16, 3000),
            "fp16_weights": _per_call(lambda x=x: torch.ops.quantized.linear_dynamic_fp16(x, fp16), 3000),
            "int8_weights": _per_call(lambda x=x: torch.ops.quantized.linear_dynamic(x, int8, True), 3000),
        }
    return out


MODES = {
    "phases": phases,
    "standin": standin,
    "isolated": isolated,
    "rows": rows,
    "bandwidth": bandwidth,
    "products": products,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--drafter", type=Path, default=None, help="drafter directory (default: the demo DFlare)")
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--touch-mb", type=int, default=0, help="standin: MB the stand-in reads per step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {"mode": args.mode, "threads": args.threads, "result": MODES[args.mode](args)}
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
