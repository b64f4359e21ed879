"""The figures of docs/reliability.md, from one run on this machine.

Three ``dflare engine-server`` processes (a tiny random pair built on the spot, one torch thread
each) behind ``dflare serve``, then: a streaming load run during which one engine is SIGKILLed,
client disconnects mid-stream (abort latency at the engine), and a burst of ten times the gateway's
in-flight bound. Prints the figures and writes them as JSON.

    python -m tests.routing.reliability_run --out docs/reliability.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.routing.harness import (
    build_long_context_pair,
    rss_kib,
    start_engine_servers,
    start_gateway,
    wait_admitted,
    wait_for,
)
from tests.routing.scenarios import abort_latency, kill_during_load, overload

MODEL = "tiny"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def scenarios(urls: list[str], engines: list, work: Path, args: argparse.Namespace) -> dict:
    figures: dict = {}
    gw = start_gateway(urls, work / "gateway.log", health_interval_s=1.0)
    try:
        await wait_for(gw.url)
        await wait_admitted(gw.url, len(urls))
        log(f"abort latency: {args.abort_samples} client disconnects mid-stream")
        latencies = await abort_latency(
            gw.url, engines, samples=args.abort_samples, max_tokens=600, model=MODEL
        )
        figures["abort"] = {
            "samples": len(latencies),
            "median_s": round(statistics.median(latencies), 3),
            "max_s": round(max(latencies), 3),
        }
        log(
            f"load run: {args.requests} streams, {args.concurrency} concurrent, engine e1 killed after "
            f"{args.kill_after_s} s"
        )
        started = time.monotonic()
        kill = await kill_during_load(
            gw.url,
            victim=engines[1],
            requests=args.requests,
            concurrency=args.concurrency,
            max_tokens=100,
            kill_after_s=args.kill_after_s,
            model=MODEL,
        )
        names = {e.url: e.name for e in engines}
        kill["served_by"] = {names.get(k, str(k)): v for k, v in kill["served_by"].items()}
        kill["victim"] = names[kill["victim"]]
        kill["duration_s"] = round(time.monotonic() - started, 1)
        figures["kill"] = kill
    finally:
        gw.stop()
    bound = 8
    overload_gw = start_gateway(urls[:1] + urls[2:], work / "gateway_overload.log", max_in_flight=bound)
    try:
        await wait_for(overload_gw.url)
        await wait_admitted(overload_gw.url, len(urls) - 1)
        log(f"overload: {args.bursts} bursts of {10 * bound} simultaneous streams, max_in_flight={bound}")
        rss = [rss_kib(overload_gw.proc.pid)]
        bursts = []
        for _ in range(args.bursts):
            bursts.append(await overload(overload_gw.url, 10 * bound, max_tokens=60, model=MODEL))
            rss.append(rss_kib(overload_gw.proc.pid))
        totals = {
            key: sum(b[key] for b in bursts)
            for key in (
                "sent",
                "admitted",
                "admitted_ok",
                "admitted_failed",
                "rejected_429",
                "rejected_with_retry_after",
            )
        }
        codes = sorted({c for b in bursts for c in b["rejected_error_codes"]})
        figures["overload"] = {
            "max_in_flight": bound,
            "bursts": args.bursts,
            **totals,
            "rejected_error_codes": codes,
            "gateway_rss_kib_after_each_burst": rss,
        }
    finally:
        overload_gw.stop()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--kill-after-s", type=float, default=1.5)
    parser.add_argument("--abort-samples", type=int, default=10)
    parser.add_argument("--bursts", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dflare-reliability-") as tmp:
        work = Path(tmp)
        log("building the tiny pair and starting three engine-servers")
        target, drafter = build_long_context_pair(work / "pair")
        engines = start_engine_servers(["e0", "e1", "e2"], target, drafter, MODEL, work)
        try:
            figures = asyncio.run(scenarios([e.url for e in engines], engines, work, args))
        finally:
            for engine in engines:
                engine.kill()
    figures["machine"] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    figures["command"] = "python -m tests.routing.reliability_run " + " ".join(argv or sys.argv[1:])
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
