"""GPU check of the SGLang DFLARE plugin against SGLang's own decoding (issue 5, deliverable 4).

Run on a GPU node (``tests/gpu/run_on_gpu.sh check``) with the trained demo pair. Starts every
server it needs at once (each with a small memory fraction), then checks:

* the draft class SGLang resolved is ours (worker log line);
* greedy SGLang+DFLARE == SGLang AR token for token, >= 32 prompts, batch 1 and 8, CUDA graphs on and
  off, float32 (divergences reported with the target's top-2 logit margin);
* tau = 1 + correct/verify_ct within 5% of the reference engine's on the same prompts;
* ``k_proj_target`` zeroed (a copy of the checkpoint) drops tau by more than 30%;
* temperature sampling runs and each request's stats are consistent (top_p 1 here; top_p < 1 is
  ``check_top_p.py``: sgl_kernel's top-p renormalisation JIT-compiles FlashInfer kernels for minutes);
* built-in DFLASH runs the DFlash demo drafter (greedy == AR too);
* real responses captured as fixtures (native + OpenAI, streamed + not, DFLARE with usage.speculative,
  built-in DFLASH without our plugin with return_meta_info);
* decode tokens/s of AR, DFLASH and DFLARE on the demo pair at batch 1/8/32.

Writes $OUT/check.json as it goes, $OUT/fixtures.json and $OUT/logs.txt at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import hashlib
import json
import shutil
import sys
import time
import traceback
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_harness import OUT, SPEC, Results, generate, post_raw, start_all, timed

REPO = Path(__file__).resolve().parents[2]
MAX_NEW = 96
N_PROMPTS = 48
SAMPLING_TIMEOUT_S = 60
SAMPLING_WARMUP_S = 90
# Pure temperature sampling: with top_p < 1 SGLang's DFlash-family verify renormalises through sgl_kernel's
# top_p_renorm_prob, which JIT-compiles FlashInfer's sampling module for minutes (check_top_p.py).
SAMPLED = {"temperature": 0.8, "top_p": 1.0}


def load_prompts(target: Path, n: int) -> list[list[int]]:
    """The demo held-out chats (first user turn), through the target's chat template, <= 384 tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target))
    prompts = []
    for line in (REPO / "sglang_ext/demo/corpus/heldout.jsonl").read_text().splitlines():
        msgs = json.loads(line)["messages"][:1]
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except (ValueError, AttributeError):
            text = msgs[0]["content"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if 8 <= len(ids) <= 384:
            prompts.append(ids)
        if len(prompts) == n:
            break
    return prompts


@contextlib.contextmanager
def stage(res: Results, name: str) -> Iterator[None]:
    """Run one check; a failure is recorded in the results and the next check still runs."""
    t0 = time.time()
    try:
        yield
    except Exception:
        res.data.setdefault("errors", {})[name] = traceback.format_exc()[-4000:]
    res.data.setdefault("stage_seconds", {})[name] = round(time.time() - t0, 1)
    res.save()


def float32_kernels_ok() -> str | None:
    """None if SGLang's CUDA RMSNorm kernels take float32 (they back every norm of the served models)."""
    import torch

    try:
        from sgl_kernel import fused_add_rmsnorm, rmsnorm

        x, r = (torch.randn(4, 256, device="cuda") for _ in range(2))
        w = torch.ones(256, device="cuda")
        rmsnorm(x, w, 1e-6)
        fused_add_rmsnorm(x, r, w, 1e-6)
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # an unsupported dtype surfaces as RuntimeError from the extension
        return repr(exc)[:300]


def first_sampled_request(url: str) -> float:
    """Seconds of one short sampled request (the first one pays any kernel compilation)."""
    params = {**SAMPLED, "max_new_tokens": 8}
    _, secs = timed(lambda: generate(url, [[1, 2, 3, 4]], params, 1, timeout=SAMPLING_WARMUP_S))
    return round(secs, 1)


def sampling_verify_available() -> bool | str:
    """SGLang silently verifies greedily when sgl_kernel's sampling ops are missing.

    (docs/sglang_plugin.md, "Known limits")"""
    try:
        from sglang.srt.speculative.dflash_utils import is_dflash_sampling_verify_available

        return bool(is_dflash_sampling_verify_available())
    except Exception as exc:
        return repr(exc)[:300]


def servable_target(target: Path) -> tuple[Path, bool]:
    """SGLang resolves the model class from config.json ``architectures``; add it to a copy if missing."""
    cfg = json.loads((target / "config.json").read_text())
    if cfg.get("architectures"):
        return target, False
    copy = Path("/tmp/demo_target")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(target, copy)
    cfg["architectures"] = ["Qwen3ForCausalLM"]
    (copy / "config.json").write_text(json.dumps(cfg, indent=2))
    return copy, True


def zero_context_k(src: Path, dst: Path) -> Path:
    """Copy of a DFlare checkpoint with every ``k_proj_target`` zeroed (the ablation)."""
    from safetensors.torch import load_file, save_file

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    files = list(dst.glob("*.safetensors"))
    zeroed = 0
    for f in files:
        tensors = load_file(str(f))
        for name in tensors:
            if name.endswith("k_proj_target.weight"):
                tensors[name] = tensors[name] * 0
                zeroed += 1
        save_file(tensors, str(f), metadata={"format": "pt"})
    assert zeroed > 0, "no k_proj_target tensors found"
    return dst


def spec_tau(outs: list[dict]) -> dict:
    steps = sum(o["meta_info"].get("spec_verify_ct", 0) for o in outs)
    correct = sum(o["meta_info"].get("spec_num_correct_drafts", 0) for o in outs)
    return {"tau": 1 + correct / steps if steps else None, "verify_steps": steps, "accepted": correct}


def compare(ref: list[dict], got: list[dict]) -> list[dict]:
    """Per-request first divergence between two greedy runs (empty list = identical)."""
    diffs = []
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        x, y = a["output_ids"], b["output_ids"]
        if x != y:
            j = next((k for k in range(min(len(x), len(y))) if x[k] != y[k]), min(len(x), len(y)))
            diffs.append({"prompt": i, "position": j, "ar": x[j : j + 3], "spec": y[j : j + 3]})
    return diffs


def margins(target: Path, prompts: list[list[int]], ar: list[dict], diffs: list[dict]) -> None:
    """Add the target's top-2 logit margin (float32, HF) at each divergence.

    ``ar`` must be the AR run of the SAME batch size as ``diffs``: bf16 AR output itself changes with the
    batch size, and a margin taken on another run's text measures nothing (the 08:44 run did that).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).cuda().eval()
    for d in diffs:
        ids = prompts[d["prompt"]] + ar[d["prompt"]]["output_ids"][: d["position"]]
        with torch.no_grad():
            logits = model(torch.tensor([ids], device="cuda")).logits[0, -1].float()
        top = torch.topk(logits, 2)
        d["top2_margin"] = float(top.values[0] - top.values[1])
        d["top2_ids"] = top.indices.tolist()


def reference_tau(target: Path, drafter: Path, prompts: list[list[int]], dtype: str) -> dict:
    from sglang_ext.reference import SamplingParams, load_engine

    engine = load_engine(target, drafter, dtype=dtype, device="cuda", max_batch=8)
    results, secs = timed(
        lambda: engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))
    )
    steps = sum(r.stats.verify_steps for r in results)
    accepted = sum(r.stats.accepted_tokens for r in results)
    return {
        "tau": 1 + accepted / steps,
        "verify_steps": steps,
        "accepted": accepted,
        "seconds": round(secs, 1),
        "output_ids": [r.output_ids for r in results],
    }


def sampling_consistency(outs: list[dict], block: int) -> dict:
    from sglang_ext.stats import SpecStats

    bad = []
    for i, o in enumerate(outs):
        m = o["meta_info"]
        try:
            stats = SpecStats.from_sglang_meta_info(m)
            n = m["completion_tokens"]
            steps, acc = stats.verify_steps, stats.accepted_tokens
            ok = stats.block_size == block and steps <= n <= 1 + steps + acc and len(o["output_ids"]) == n
        except (ValueError, KeyError, TypeError) as exc:
            ok, stats = False, repr(exc)
        if not ok:
            bad.append({"request": i, "meta": {k: v for k, v in m.items() if k.startswith("spec")}})
    return {"requests": len(outs), "inconsistent": bad, "tau": spec_tau(outs)["tau"]}


def completion_prompt(target: Path) -> str:
    """The fixtures' ``/v1/completions`` prompt: a user turn through the chat template, as text. The demo
    target only ever saw chats, so a bare code prompt ("def add(a, b):") ends at its first token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target))
    msgs = [{"role": "user", "content": "Write a Python function that adds."}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def capture_fixtures(
    dflare_url: str,
    dflash_url: str,
    model: str,
    prompt_ids: list[int],
    comp_prompt: str,
    sampled: bool = False,
) -> dict:
    """Greedy captures, or (``sampled``) the one that samples, which runs after the sampling check."""
    chat = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a Python function that adds."}],
        "max_tokens": 48,
        "temperature": 0,
    }
    comp = {"model": model, "prompt": comp_prompt, "max_tokens": 48, "temperature": 0}
    native = {"input_ids": prompt_ids, "sampling_params": {"temperature": 0, "max_new_tokens": 48}}
    stream_opts = {"stream": True, "stream_options": {"include_usage": True}}
    calls = {
        "dflare_generate": (dflare_url + "/generate", native),
        "dflare_generate_stream": (dflare_url + "/generate", {**native, "stream": True}),
        "dflare_chat": (dflare_url + "/v1/chat/completions", chat),
        "dflare_chat_stream": (dflare_url + "/v1/chat/completions", {**chat, **stream_opts}),
        "dflare_completions": (dflare_url + "/v1/completions", comp),
        "dflare_completions_stream": (dflare_url + "/v1/completions", {**comp, **stream_opts}),
        "dflash_noplugin_chat_meta": (
            dflash_url + "/v1/chat/completions",
            {**chat, "return_meta_info": True},
        ),
        "dflash_noplugin_generate": (dflash_url + "/generate", native),
        "dflash_noplugin_chat_stream": (dflash_url + "/v1/chat/completions", {**chat, **stream_opts}),
    }
    if sampled:
        calls = {
            "dflare_chat_n2": (dflare_url + "/v1/chat/completions", {**chat, "n": 2, "temperature": 0.7})
        }
    listings = {"dflare_models": dflare_url, "dflash_noplugin_models": dflash_url}
    fixtures = {}
    for name, url in {} if sampled else {n: u + "/v1/models" for n, u in listings.items()}.items():
        with urllib.request.urlopen(url, timeout=30) as r:
            fixtures[name] = {
                "url": "v1/models",
                "method": "GET",
                "status": r.status,
                "body": r.read().decode(),
            }
    for name, (url, body) in calls.items():
        try:
            status, text = post_raw(url, body, timeout=SAMPLING_TIMEOUT_S)
        except Exception as exc:  # recorded, and the remaining captures still run
            status, text = None, repr(exc)[:500]
        fixtures[name] = {
            "url": url.split("127.0.0.1:")[1].split("/", 1)[1],
            "request": body,
            "status": status,
            "body": text,
        }
    return fixtures


def usage_checks(fixtures: dict) -> dict:
    """Our hooks put usage.speculative on DFLARE's OpenAI responses; none without the plugin."""
    out = {}
    for name in ("dflare_chat", "dflare_completions", "dflare_chat_n2"):
        if name not in fixtures or fixtures[name]["status"] != 200:
            out[name] = f"status {fixtures.get(name, {}).get('status')}"
            continue
        body = json.loads(fixtures[name]["body"])
        out[name] = (body.get("usage") or {}).get("speculative")
    for name in ("dflare_chat_stream", "dflare_completions_stream", "dflash_noplugin_chat_stream"):
        chunks = [
            json.loads(ln[6:]) for ln in fixtures[name]["body"].splitlines() if ln.startswith("data: {")
        ]
        final = [c for c in chunks if c.get("usage") and c.get("choices") == []]
        out[name] = final[-1]["usage"].get("speculative", "absent") if final else "no usage chunk"
    return out


def decode_bench(url: str, prompt: list[int], sizes: list[int], new_tokens: int) -> dict:
    out = {}
    sampling = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    generate(url, [prompt], sampling, 1)  # warm
    for bs in sizes:
        outs, secs = timed(lambda bs=bs: generate(url, [prompt] * bs, sampling, bs))
        toks = sum(o["meta_info"]["completion_tokens"] for o in outs)
        out[bs] = {"tok_s": round(toks / secs, 1), **spec_tau(outs)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=Path, required=True)
    ap.add_argument("--dflare", type=Path, required=True)
    ap.add_argument("--dflash", type=Path, required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--skip-reference", action="store_true", help="the reference engine runs on CPU elsewhere"
    )
    ap.add_argument(
        "--only-sampling", action="store_true", help="one DFLARE server, the sampling stage alone"
    )
    ap.add_argument(
        "--only-fixtures", action="store_true", help="DFLARE and plugin-less DFLASH: fixture captures only"
    )
    args = ap.parse_args()
    res = Results(OUT / "check.json")
    res["only_sampling"], res["only_fixtures"] = args.only_sampling, args.only_fixtures
    partial = args.only_sampling or args.only_fixtures
    import torch

    res["device"] = torch.cuda.get_device_name(0)
    weights = {
        name: {
            "path": str(path),
            "sha256": hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()[:16],
        }
        for name, path in (("target", args.target), ("dflare", args.dflare), ("dflash", args.dflash))
    }
    res["models"] = weights
    args.target, patched = servable_target(args.target)
    res["target_config_patched_architectures"] = patched
    prompts = load_prompts(args.target, N_PROMPTS)
    res["prompts"] = {"count": len(prompts), "max_new_tokens": MAX_NEW, "requested_dtype": args.dtype}
    ablated = zero_context_k(args.dflare, Path("/tmp/dflare_zero_k_target"))

    def server_specs(dtype: str) -> list:
        # Six servers share one GPU. SGLang sizes KV as (free now) - (free at start) * (1 - fraction), so
        # a small fraction fails whenever the neighbours allocate in between (run 1 lost DFLASH-no-plugin
        # that way); a large fraction with a token cap gives each server a small, fixed pool instead.
        base = ["--model-path", str(args.target), "--dtype", dtype, "--mem-fraction-static", "0.8"]
        base += ["--max-total-tokens", "65536"]
        base += ["--max-running-requests", "32", "--cuda-graph-max-bs", "32"]
        draft = ["--speculative-draft-model-path"]
        dflare = [*SPEC, "--speculative-algorithm", "DFLARE", *draft]
        dflash = [*SPEC, "--speculative-algorithm", "DFLASH", *draft, str(args.dflash)]
        if args.only_sampling:
            return [("dflare", 31001, [*base, *dflare, str(args.dflare)], {})]
        if args.only_fixtures:
            return [
                ("dflare", 31001, [*base, *dflare, str(args.dflare)], {}),
                ("dflash_noplugin", 31005, [*base, *dflash], {"SGLANG_PLUGINS": "none-of-ours"}),
            ]
        return [
            ("ar", 31000, base, {}),
            ("dflare", 31001, [*base, *dflare, str(args.dflare)], {}),
            ("dflare_eager", 31002, [*base, *dflare, str(args.dflare), "--disable-cuda-graph"], {}),
            ("dflare_zero_k", 31003, [*base, *dflare, str(ablated)], {}),
            ("dflash", 31004, [*base, *dflash], {}),
            ("dflash_noplugin", 31005, [*base, *dflash], {"SGLANG_PLUGINS": "none-of-ours"}),
        ]

    dtype = args.dtype
    if dtype == "float32" and (why := float32_kernels_ok()) is not None:
        res["float32_unsupported"] = why
        dtype = "bfloat16"
    servers, startup = timed(lambda: start_all(server_specs(dtype)))
    first, first_up = servers.get("ar") or next(iter(servers.values()))
    if not first_up and dtype != "bfloat16":  # the norm/attention kernels may refuse float32
        res[f"{dtype}_failed"] = first.log_tail(30)
        for srv, _ in servers.values():
            srv.stop()
        dtype = "bfloat16"
        servers, startup = timed(lambda: start_all(server_specs(dtype)))
    res["dtype"] = dtype
    res["servers"] = {n: {"up": ok, "ready_s": s.ready_s} for n, (s, ok) in servers.items()}
    res["startup_s"] = round(startup, 1)
    try:
        failed = [n for n, (_, ok) in servers.items() if not ok]
        if failed:
            res["server_errors"] = {n: servers[n][0].log_tail(60) for n in failed}
        up = {n: s.url for n, (s, ok) in servers.items() if ok}
        # The first sampled request of the 08:44 run took over 60 s on DFLARE and on built-in DFLASH
        # alike (kernel compilation on first use, as far as the logs tell): pay it on the server the
        # greedy stage does not use, while that stage runs.
        warmer = cf.ThreadPoolExecutor(1)
        warm_sampling = (
            warmer.submit(first_sampled_request, up["dflash_noplugin"])
            if "dflash_noplugin" in up and not args.only_fixtures
            else None
        )

        if "dflare" in up:
            lines = servers["dflare"][0].log_grep("DFLARE worker ready")
            res["draft_class"] = {
                "log": lines[-1] if lines else None,
                "ours": bool(lines) and "sglang_ext.sglang_plugin.model.DFlareDraftModel" in lines[-1],
            }

        runs: dict[str, dict[int, list[dict]]] = {}
        with stage(res, "greedy"):
            greedy = {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}
            t_greedy = time.time()
            names = [n for n in ("ar", "dflare", "dflare_eager", "dflash", "dflare_zero_k") if n in up]
            names = [] if partial else names

            def greedy_runs(name: str) -> dict[int, list[dict]] | str:
                try:
                    return {bs: generate(up[name], prompts, greedy, bs) for bs in (1, 8)}
                except Exception:
                    return traceback.format_exc()[-2000:]

            # servers are separate processes: their workloads run side by side (batch sizes unchanged)
            with cf.ThreadPoolExecutor(max(1, len(names))) as pool:
                outcome = dict(zip(names, pool.map(greedy_runs, names), strict=True))
            runs = {n: r for n, r in outcome.items() if isinstance(r, dict)}
            if len(runs) < len(outcome):
                res["greedy_errors"] = {n: r for n, r in outcome.items() if isinstance(r, str)}
            res["greedy_seconds"] = round(time.time() - t_greedy, 1)
            saved: dict = {n: [o["output_ids"] for o in r[1]] for n, r in runs.items()}
            saved.update({f"{n}_bs8": [o["output_ids"] for o in r[8]] for n, r in runs.items()})
            saved["prompts"] = prompts
            (OUT / "greedy_outputs.json").write_text(json.dumps(saved))
            lossless = {}
            for name in ("dflare", "dflare_eager", "dflash", "dflare_zero_k"):
                if name in runs and "ar" in runs:
                    for bs in (1, 8):
                        diffs = compare(runs["ar"][bs], runs[name][bs])
                        lossless[f"{name}_bs{bs}"] = {
                            "identical": not diffs,
                            "divergences": diffs,
                            **spec_tau(runs[name][bs]),
                        }
            if "ar" in runs:
                lossless["ar_bs1_vs_bs8"] = {"identical": not compare(runs["ar"][1], runs["ar"][8])}
            res["greedy_lossless"] = lossless
            if "ar" in runs:
                try:
                    for bs in (1, 8):
                        diffs = [
                            d
                            for run, v in lossless.items()
                            if run.endswith(f"_bs{bs}")
                            for d in v.get("divergences", [])
                        ]
                        margins(args.target, prompts, runs["ar"][bs], diffs)
                except Exception:
                    res["margin_error"] = traceback.format_exc()[-2000:]
                res["greedy_lossless"] = lossless
            full_run = "dflare" if "dflare" in runs else "dflare_eager"
            if "dflare_zero_k" in runs and full_run in runs:
                full, zero = spec_tau(runs[full_run][1])["tau"], spec_tau(runs["dflare_zero_k"][1])["tau"]
                res["ablation_zero_k_proj_target"] = {
                    "tau": full,
                    "tau_zeroed": zero,
                    "drop": 1 - zero / full,
                    "drop_of_tau_minus_1": 1 - (zero - 1) / (full - 1) if full > 1 else None,
                    "drops_over_30pct": 1 - zero / full > 0.30,
                }
        with stage(res, "reference"):
            if args.skip_reference or partial:
                raise RuntimeError("skipped (--skip-reference): tests/gpu/reference_tau.py runs it on CPU")
            ref = reference_tau(args.target, args.dflare, prompts, dtype)
            ref_ids = ref.pop("output_ids")
            ref["outputs_equal_sglang_ar"] = "ar" in runs and all(
                r == o["output_ids"] for r, o in zip(ref_ids, runs["ar"][1], strict=True)
            )
            res["reference_engine"] = ref
            if "dflare" in runs:
                tau = spec_tau(runs["dflare"][1])["tau"]
                res["tau_vs_reference"] = {
                    "sglang": tau,
                    "reference": ref["tau"],
                    "ratio": tau / ref["tau"],
                    "within_5pct": abs(tau / ref["tau"] - 1) <= 0.05,
                }
        with stage(res, "fixtures"):
            if "dflare" in up and "dflash_noplugin" in up:
                comp_prompt = completion_prompt(args.target)
                fixtures = capture_fixtures(
                    up["dflare"], up["dflash_noplugin"], str(args.target), prompts[0], comp_prompt
                )
                (OUT / "fixtures.json").write_text(json.dumps(fixtures, indent=1))
                res["usage_speculative"] = usage_checks(fixtures)
        with stage(res, "demo_bench"):
            bench = {}
            for name in ("ar", "dflash", "dflare"):
                if name in up and not partial:
                    bench[name] = decode_bench(up[name], prompts[0], [1, 8, 32], 256)
            res["demo_decode_bench"] = bench
        with stage(res, "sampling"):
            # Last, and bounded: run 1 lost its remaining stages to a sampling request that never came
            # back. DFLARE and built-in DFLASH side by side, so a hang is attributed to the plugin or not.
            res["sampling_verify_available"] = sampling_verify_available()
            sampled_on = [] if args.only_fixtures else [n for n in ("dflare", "dflash") if n in up]
            params = {**SAMPLED, "max_new_tokens": MAX_NEW, "ignore_eos": True}

            if warm_sampling is not None:
                res["sampling_warmup_s"] = warm_sampling.result(timeout=SAMPLING_WARMUP_S)

            block = int(json.loads((args.dflare / "config.json").read_text())["block_size"])

            def sample(name: str) -> dict:
                try:
                    warm_s = first_sampled_request(up[name])
                    outs = generate(up[name], prompts[:32], params, 8, timeout=SAMPLING_TIMEOUT_S)
                    return {"first_request_s": warm_s, **sampling_consistency(outs, block)}
                except Exception as exc:
                    return {"error": repr(exc)[:500], "log_tail": servers[name][0].log_tail(40)}

            with cf.ThreadPoolExecutor(max(1, len(sampled_on))) as pool:
                res["temperature_sampling"] = dict(zip(sampled_on, pool.map(sample, sampled_on), strict=True))
        with stage(res, "fixtures_sampled"):
            if "dflare" in up and "dflash_noplugin" in up and (OUT / "fixtures.json").exists():
                fixtures = json.loads((OUT / "fixtures.json").read_text())
                fixtures.update(
                    capture_fixtures(
                        up["dflare"], up["dflash_noplugin"], str(args.target), prompts[0], comp_prompt, True
                    )
                )
                (OUT / "fixtures.json").write_text(json.dumps(fixtures, indent=1))
                res["usage_speculative"] = usage_checks(fixtures)
    finally:
        for srv, _ in servers.values():  # stopping the servers also ends a still-running warm-up
            srv.stop()
        with (OUT / "logs.txt").open("w") as f:
            for name, (srv, _) in servers.items():
                f.write(f"===== {name}: {' '.join(srv.cmd)}\n{srv.log_tail(80)}\n")
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return 0


if __name__ == "__main__":
    sys.exit(main())
