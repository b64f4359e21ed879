"""What the gateway costs: added latency and max req/s, side by side with SGLang's Rust gateway.

One run starts the fast fake SGLang backend (`fake_backend.py`) on its own core, then measures with
`wrk` (a non-streamed chat completion, the same body every time):

- `direct`: wrk -> backend, no proxy (the baseline every other row is compared to);
- `smg`: SGLang's Rust gateway (PyPI `smg`), round robin, tokenizer off, warn logging;
- `dflare`: our gateway (`dflare serve --backend ...`), stats and metrics on as in production.

Each proxy runs pinned to one core with wrk on that same core (the backend has the other), so a
proxy's req/s is what one core of it passes. Latency at concurrency 1 gives p50/p99 added over
`direct`; throughput at concurrency 32 gives max req/s. Results go to JSON and a PNG.

    python loadtest/gateway_bench.py --out loadtest/results/gateway_bench
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
CHAT_BODY = {
    "model": "fake-model",
    "messages": [{"role": "user", "content": "Say something short."}],
    "max_tokens": 12,
}
WRK_SCRIPT = """wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@dataclass
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    requests: int = 0
    proxy_cpu_ms_per_request: float | None = None


@dataclass
class TargetResult:
    name: str
    latency_c1: WrkResult
    throughput_c32: WrkResult
    added_p50_ms: float = 0.0
    added_p99_ms: float = 0.0
    rps_vs_smg: float | None = None
    rounds: list = field(default_factory=list)  # [latency run, throughput run] of every round


@dataclass
class BenchReport:
    machine: dict
    settings: dict
    targets: list[TargetResult] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(core: int | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv] if core is not None and shutil.which("taskset") else argv


def wait_ready(url: str, timeout_s: float = 60.0) -> None:
    """Until a chat completion through ``url`` answers 200 (proxies may be up before their backends)."""
    body = json.dumps(CHAT_BODY).encode()
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(
                url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status == 200:
                    return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s: {last}")


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, CPU ticks used: user + system) of every live process."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return table


def process_tree(pid: int, table: dict[int, tuple[int, int]] | None = None) -> list[int]:
    """``pid`` and all its live descendants."""
    table = table if table is not None else _proc_table()
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, (parent, _) in table.items() if parent in frontier]
        tree += frontier
    return tree


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its live descendants."""
    table = _proc_table()
    return sum(table[p][1] for p in process_tree(pid, table) if p in table) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def process(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """A child in *our* session: a new session would get its own scheduler autogroup on Linux, which
    alone doubled the gateway's latency at concurrency 1 next to wrk on a busy machine."""
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        for pid in reversed(process_tree(proc.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            for pid in process_tree(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (rps and p50 and p99):
        raise ValueError(f"unexpected wrk output:\n{output}")
    total = re.search(r"(\d+) requests in", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkResult(
        requests_per_s=float(rps.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
        requests=int(total.group(1)) if total else 0,
    )


def run_wrk(url: str, script: Path, connections: int, duration_s: float, core: int | None) -> WrkResult:
    argv = pinned(
        core,
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration_s))}s",
            "--latency",
            "-s",
            str(script),
            url + "/v1/chat/completions",
        ],
    )
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=duration_s + 60).stdout
    result = parse_wrk(out)
    # A wrong answer fails the run; a few socket errors (wrk counts a connection cut at the end of
    # the run, or one stalled past its 2 s timeout on a busy machine) are kept in the report.
    if result.non_2xx or result.socket_errors > max(1, result.requests // 100):
        raise RuntimeError(f"{url}: {result.non_2xx} non-2xx answers, {result.socket_errors} socket errors")
    return result


def measure(
    url: str, script: Path, duration_s: float, core: int | None, proxy_pid: int | None
) -> tuple[WrkResult, WrkResult]:
    """Latency at concurrency 1, then throughput at 32 with the proxy's CPU time per request."""
    run_wrk(url, script, 8, max(1.0, duration_s / 3), core)  # warm-up: connections, pools, caches
    latency = run_wrk(url, script, 1, duration_s, core)
    cpu_before = tree_cpu_s(proxy_pid) if proxy_pid else 0.0
    throughput = run_wrk(url, script, 32, duration_s, core)
    if proxy_pid and throughput.requests:
        cpu = tree_cpu_s(proxy_pid) - cpu_before
        throughput.proxy_cpu_ms_per_request = round(1000 * cpu / throughput.requests, 4)
    return latency, throughput


def proxy_commands(
    backend: str, port: int, baseline: Path | None = None
) -> dict[str, tuple[list[str], dict[str, str]]]:
    env = dict(os.environ)
    dflare_env = {**env, "DFLARE_LOG_LEVEL": "warning"}
    dflare_argv = [str(BIN / "dflare"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    dflare_argv += ["--backend", backend]
    # ``dflare_base``: the same command importing ``service``/``sglang_ext`` from another tree (e.g.
    # ``git archive`` of an older commit) for paired before/after runs; the console script's own
    # directory comes first on sys.path, then PYTHONPATH, then the editable install
    base_env = {**dflare_env, "PYTHONPATH": str(baseline)} if baseline is not None else dflare_env
    return {
        "smg": (
            [
                str(BIN / "smg"),
                "launch",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--worker-urls",
                backend,
                "--policy",
                "round_robin",
                "--disable-tokenizer-autoload",
                "--log-level",
                "warn",
                "--prometheus-port",
                str(free_port()),
                "--prometheus-host",
                "127.0.0.1",
            ],
            env,
        ),
        "dflare": (dflare_argv, dflare_env),
        "dflare_base": (dflare_argv, base_env),
    }


def machine_info() -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def _median(results: list[WrkResult]) -> WrkResult:
    """Each number the median over rounds (p50, p99 and req/s of a busy machine are noisy apart)."""

    def med(key: str) -> float:
        values = sorted(getattr(r, key) for r in results)
        return values[len(values) // 2]

    cpu = sorted(r.proxy_cpu_ms_per_request for r in results if r.proxy_cpu_ms_per_request is not None)
    return WrkResult(
        requests_per_s=med("requests_per_s"),
        p50_ms=med("p50_ms"),
        p99_ms=med("p99_ms"),
        non_2xx=sum(r.non_2xx for r in results),
        socket_errors=sum(r.socket_errors for r in results),
        requests=sum(r.requests for r in results),
        proxy_cpu_ms_per_request=cpu[len(cpu) // 2] if cpu else None,
    )


def run(
    targets: list[str],
    duration_s: float,
    rounds: int,
    workdir: Path,
    stream: bool = False,
    baseline: Path | None = None,
) -> BenchReport:
    cores = os.cpu_count() or 1
    proxy_core, backend_core = (0, 1) if cores >= 2 else (None, None)
    script = workdir / "chat.lua"
    body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}} if stream else CHAT_BODY
    script.write_text(WRK_SCRIPT.format(body=json.dumps(body)))
    report = BenchReport(
        machine={**machine_info(), "loadavg_1m_start": round(os.getloadavg()[0], 2)},
        settings={
            "duration_s": duration_s,
            "rounds": rounds,
            "body": body,
            "proxy_core": proxy_core,
            "backend_core": backend_core,
            "wrk": "-t1, -c1 for latency, -c32 for throughput, pinned to the proxy's core",
            "aggregate": "per target and number, the median over rounds; counts summed; all rounds kept",
            "baseline": str(baseline) if baseline is not None else None,
        },
    )
    backend_port = free_port()
    backend = f"http://127.0.0.1:{backend_port}"
    fake = [sys.executable, str(HERE / "fake_backend.py"), "--port", str(backend_port)]
    runs: dict[str, list[tuple[WrkResult, WrkResult]]] = {name: [] for name in targets}
    with process(pinned(backend_core, fake), workdir / "backend.log"):
        wait_ready(backend)
        steps = [(r, name) for r in range(rounds) for name in targets]  # rounds interleave the targets
        for _, name in tqdm(steps, desc="gateway bench", unit="run"):
            if name == "direct":
                runs[name].append(measure(backend, script, duration_s, proxy_core, None))
                continue
            port = free_port()
            argv, env = proxy_commands(backend, port, baseline)[name]
            with process(pinned(proxy_core, argv), workdir / f"{name}.log", env) as proxy:
                wait_ready(f"http://127.0.0.1:{port}")
                runs[name].append(
                    measure(f"http://127.0.0.1:{port}", script, duration_s, proxy_core, proxy.pid)
                )
    report.machine["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    for name in targets:
        lat, thr = _median([r[0] for r in runs[name]]), _median([r[1] for r in runs[name]])
        rounds = [[asdict(a), asdict(b)] for a, b in runs[name]]
        report.targets.append(TargetResult(name, lat, thr, rounds=rounds))
    by_name = {t.name: t for t in report.targets}
    base = by_name.get("direct")
    for t in report.targets:
        if base is not None:
            t.added_p50_ms = round(t.latency_c1.p50_ms - base.latency_c1.p50_ms, 3)
            t.added_p99_ms = round(t.latency_c1.p99_ms - base.latency_c1.p99_ms, 3)
        if "smg" in by_name:
            t.rps_vs_smg = round(
                t.throughput_c32.requests_per_s / by_name["smg"].throughput_c32.requests_per_s, 3
            )
    return report


def plot(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    proxies = [t for t in report.targets if t.name != "direct"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    x = range(len(proxies))
    ax1.bar([i - 0.2 for i in x], [t.added_p50_ms for t in proxies], width=0.4, label="p50")
    ax1.bar([i + 0.2 for i in x], [t.added_p99_ms for t in proxies], width=0.4, label="p99")
    ax1.axhline(0, color="black", linewidth=0.8)
    ax1.set_xticks(list(x), [t.name for t in proxies])
    ax1.set_ylabel("ms added over direct (no proxy)")
    ax1.set_title("Added latency, concurrency 1")
    ax1.legend()
    ax2.bar([t.name for t in proxies], [t.throughput_c32.requests_per_s for t in proxies], color="#3b7dd8")
    ax2.set_ylabel("requests/s")
    direct = next((t for t in report.targets if t.name == "direct"), None)
    backend_rate = f" (backend alone: {direct.throughput_c32.requests_per_s:,.0f})" if direct else ""
    ax2.set_title(f"Max req/s at concurrency 32, proxy on one core\n{backend_rate.strip(' ()')}", fontsize=10)
    ax2.set_ylim(0, 1.25 * max((t.throughput_c32.requests_per_s for t in proxies), default=1))
    for i, t in enumerate(proxies):
        cpu = t.throughput_c32.proxy_cpu_ms_per_request
        label = f"{t.throughput_c32.requests_per_s:,.0f}" + (f"\n{cpu:.3f} ms CPU/req" if cpu else "")
        ax2.text(i, t.throughput_c32.requests_per_s, label, ha="center", va="bottom")
    fig.suptitle(f"Gateway overhead vs. SGLang smg: {report.machine['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gateway overhead benchmark (wrk, fake SGLang backend)")
    parser.add_argument(
        "--targets", default="direct,smg,dflare", help="comma list of direct, smg, dflare, dflare_base"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="tree holding service/ and sglang_ext/ of the version dflare_base runs (paired before/after)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk measurement")
    parser.add_argument("--rounds", type=int, default=3, help="repeat every target, report the median run")
    parser.add_argument("--stream", action="store_true", help="streamed chat completions (SSE relayed)")
    parser.add_argument(
        "--out", type=Path, default=HERE / "results" / "gateway_bench", help="writes OUT.json and OUT.png"
    )
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        parser.error("wrk not found: apt-get install wrk")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - {"direct", "smg", "dflare", "dflare_base"}
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if ("dflare_base" in targets) != (args.baseline is not None):
        parser.error("dflare_base and --baseline go together")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        report = run(
            targets, args.duration, args.rounds, Path(tmp), stream=args.stream, baseline=args.baseline
        )
    args.out.with_suffix(".json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    for t in report.targets:
        print(
            f"{t.name:>7}: +{t.added_p50_ms:.3f} ms p50, +{t.added_p99_ms:.3f} ms p99 at c=1; "
            f"{t.throughput_c32.requests_per_s:,.0f} req/s at c=32"
            + (
                f", {t.throughput_c32.proxy_cpu_ms_per_request:.3f} ms CPU/request"
                if t.throughput_c32.proxy_cpu_ms_per_request is not None
                else ""
            )
            + (f" ({t.rps_vs_smg:.2f}x smg)" if t.rps_vs_smg is not None else "")
        )
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
