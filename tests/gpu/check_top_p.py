"""GPU check of top-p sampling through SGLang's DFlash-family verify (``run_on_gpu.sh top_p``).

Sampled requests with ``top_p < 1`` were seen hanging on DFLARE and on built-in DFLASH alike, and
sgl_kernel's ``top_p_renorm_prob`` alone not returning within 60 s. This run shows, on the
shipped pair: (1) where that call spends its time (the child dumps its Python stack at 40 s: FlashInfer
compiling its sampling module with ninja);
(2) DFLARE, whose worker installs the PyTorch renormalisation (``sglang_ext/sglang_plugin/top_p.py``),
answers top-p requests with consistent per-request stats; (3) built-in DFLASH without our plugin, same
requests, for comparison. Writes $OUT/top_p.json as it goes.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_sglang_dflare import load_prompts, sampling_consistency, servable_target
from sglang_harness import OUT, SPEC, Results, generate, start_all, timed

PROBE = """
import faulthandler, sys, time
faulthandler.dump_traceback_later(40, exit=True)
t = time.perf_counter()
import torch
from sgl_kernel import top_p_renorm_prob
print("import_s", round(time.perf_counter() - t, 2), flush=True)
probs = torch.softmax(torch.randn(16, int(sys.argv[1]), device="cuda") * 3, dim=-1)
torch.cuda.synchronize()
t = time.perf_counter()
out = top_p_renorm_prob(probs, torch.full((16,), 0.95, device="cuda"))
print("launched_s", round(time.perf_counter() - t, 3), flush=True)
torch.cuda.synchronize()
print("done_s", round(time.perf_counter() - t, 3), float(out.sum(-1).mean()), flush=True)
"""
TOP_P = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 96, "ignore_eos": True}


def probe(vocab: int) -> dict:
    """The kernel alone, in a child that dumps its stack and exits after 40 s."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, str(vocab)], capture_output=True, text=True, timeout=60
        )
        return {"vocab": vocab, "rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr[-1500:]}
    except subprocess.TimeoutExpired as exc:
        return {"vocab": vocab, "rc": None, "stdout": str(exc.stdout), "stderr": str(exc.stderr)[-1500:]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=Path, required=True)
    ap.add_argument("--dflare", type=Path, required=True)
    ap.add_argument("--dflash", type=Path, required=True)
    args = ap.parse_args()
    res = Results(OUT / "top_p.json")
    res["params"] = TOP_P
    target, _ = servable_target(args.target)
    prompts = load_prompts(target, 16)
    base = ["--model-path", str(target), "--dtype", "bfloat16", "--mem-fraction-static", "0.8"]
    base += ["--max-total-tokens", "65536", "--max-running-requests", "32", "--cuda-graph-max-bs", "32"]
    draft = [*SPEC, "--speculative-draft-model-path"]
    specs = [
        ("dflare", 31101, [*base, *draft, str(args.dflare), "--speculative-algorithm", "DFLARE"], {}),
        ("dflash_noplugin", 31102, [*base, *draft, str(args.dflash), "--speculative-algorithm", "DFLASH"],
         {"SGLANG_PLUGINS": "none-of-ours"}),
    ]  # fmt: skip
    with cf.ThreadPoolExecutor(1) as pool:
        probes = pool.submit(lambda: [probe(4096), probe(151936)])  # while the servers start
        servers, startup = timed(lambda: start_all(specs))
        res["probe"] = probes.result()
    res["startup_s"] = round(startup, 1)
    block = int(json.loads((args.dflare / "config.json").read_text())["block_size"])

    def sample(name: str) -> dict:
        srv, up = servers[name]
        if not up:
            return {"up": False, "log_tail": srv.log_tail(40)}
        try:
            outs, secs = timed(lambda: generate(srv.url, prompts, TOP_P, 8, timeout=60))
            return {"seconds": round(secs, 1), **sampling_consistency(outs, block)}
        except Exception as exc:
            return {"error": repr(exc)[:300], "log_tail": srv.log_tail(15)}

    try:
        with cf.ThreadPoolExecutor(2) as pool:
            res["top_p_sampling"] = dict(zip(servers, pool.map(sample, servers), strict=True))
        res["worker_log"] = [
            line for line in servers["dflare"][0].log_tail(400).splitlines() if "DFLARE worker ready" in line
        ]
    finally:
        for srv, _ in servers.values():
            srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
