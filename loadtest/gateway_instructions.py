"""CPU instructions a proxy executes per request: a measure of gateway cost that load does not move.

On a shared machine two runs of the same gateway differ by ±20% in req/s, so a change worth 3% can
only be seen in a count that does not depend on what else runs. Each target runs under valgrind's
callgrind with instrumentation off (start-up at near native speed), is warmed up with wrk, then
instrumentation is switched on and the counters zeroed, ``--requests`` chat completions are sent
over 4 kept-alive connections, and the counters are dumped: user-space instructions divided by the
requests. Repeat runs agree within about 0.2%. Kernel time (socket calls) is not included.

    apt-get install valgrind wrk
    python loadtest/gateway_instructions.py --targets smg,dflare_base,dflare --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gateway_bench import (  # noqa: E402  (run as a script from any directory)
    CHAT_BODY,
    WRK_SCRIPT,
    free_port,
    process,
    proxy_commands,
    wait_ready,
)

CONNECTIONS = 4


def send_requests(url: str, total: int, stream: bool) -> None:
    """``total`` chat completions over ``CONNECTIONS`` kept-alive connections; each must answer 200."""
    body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}} if stream else CHAT_BODY
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    errors: list[str] = []

    def worker(n: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        for _ in range(n):
            conn.request(
                "POST", "/v1/chat/completions", body=data, headers={"content-type": "application/json"}
            )
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors.append(f"status {resp.status}")
        conn.close()

    threads = [threading.Thread(target=worker, args=(total // CONNECTIONS,)) for _ in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{url}: {len(errors)} failed requests ({errors[0]})")


def instructions(
    name: str, backend: str, requests: int, stream: bool, baseline: Path | None, workdir: Path
) -> int:
    port = free_port()
    argv, env = proxy_commands(backend, port, baseline)[name]
    out = workdir / f"callgrind.{name}"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p"]
    if argv[0].endswith("dflare"):
        argv = [sys.executable, *argv]  # the console script runs as a Python file under valgrind
    env = {**env, "PYTHONMALLOC": "malloc"}  # valgrind sees every allocation, not pymalloc's arenas
    script = workdir / "chat.lua"
    body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}} if stream else CHAT_BODY
    script.write_text(WRK_SCRIPT.format(body=json.dumps(body)))
    url = f"http://127.0.0.1:{port}"
    with process([*valgrind, *argv], workdir / f"{name}.log", env) as proc:
        wait_ready(url, timeout_s=600)
        subprocess.run(
            ["wrk", "-t1", "-c4", "-d3s", "-s", str(script), url + "/v1/chat/completions"],
            check=True,
            capture_output=True,
        )
        for command in ("-i", "on"), ("-z",):
            subprocess.run(["callgrind_control", *command, str(proc.pid)], check=True, capture_output=True)
        send_requests(url, requests, stream)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        dump = next(workdir.glob(f"callgrind.{name}.{proc.pid}.1"))
    total = re.search(r"^(?:summary|totals):\s+(\d+)", dump.read_text(), re.M)
    if total is None:
        raise RuntimeError(f"no totals in {dump}")
    return int(total.group(1)) // requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="user-space instructions per request (callgrind)")
    parser.add_argument("--targets", default="smg,dflare", help="comma list of smg, dflare, dflare_base")
    parser.add_argument("--baseline", type=Path, help="tree of service/ and sglang_ext/ for dflare_base")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--stream", action="store_true", help="streamed chat completions")
    parser.add_argument("--out", type=Path, help="write the counts as JSON here")
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found: apt-get install valgrind wrk")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if ("dflare_base" in targets) != (args.baseline is not None):
        parser.error("dflare_base and --baseline go together")
    results: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="gateway-instr-") as tmp:
        workdir = Path(tmp)
        backend_port = free_port()
        backend = f"http://127.0.0.1:{backend_port}"
        fake = [sys.executable, str(HERE / "fake_backend.py"), "--port", str(backend_port)]
        with process(fake, workdir / "backend.log"):
            wait_ready(backend)
            for name in targets:
                results[name] = instructions(
                    name, backend, args.requests, args.stream, args.baseline, workdir
                )
                print(f"{name:>12}: {results[name]:,} instructions per request")
    if args.out:
        report = {"requests": args.requests, "stream": args.stream, "instructions_per_request": results}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
