"""One local ``dflare engine-server`` for ``dflare serve --workers N`` without backends.

The embedded engine lives inside one process, so N uvicorn workers would load N engines. Instead
``dflare serve`` starts a single engine-server child on a free loopback port with the embedded
settings (same model, drafter, batch, queue), points every worker at it as their backend, and stops
it when the gateway exits.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings

logger = logging.getLogger(__name__)
START_TIMEOUT_S = 600.0


def engine_server_args(settings: Settings, port: int) -> list[str]:
    s = settings
    args = [
        "engine-server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        s.embedded_model,
        "--drafter",
        s.embedded_drafter,
        "--max-batch",
        str(s.embedded_max_batch),
        "--max-queued-requests",
        str(s.embedded_queue_size),
        "--threads",
        str(s.embedded_threads),
        "--log-level",
        s.log_level,
    ]
    if s.embedded_target_dir is not None:
        args += ["--model-path", str(s.embedded_target_dir)]
    if s.embedded_drafter_dir is not None and s.embedded_drafter != "none":
        args += ["--draft-model-path", str(s.embedded_drafter_dir)]
    if s.embedded_block_size is not None:
        args += ["--block-size", str(s.embedded_block_size)]
    if s.embedded_min_draft_confidence is not None:
        args += ["--min-draft-confidence", str(s.embedded_min_draft_confidence)]
    if s.embedded_verify_policy is not None:
        args.append("--verify-policy" if s.embedded_verify_policy else "--no-verify-policy")
    return args


@contextlib.contextmanager
def local_engine_server(settings: Settings) -> Iterator[str]:
    """Start the engine-server, wait for ``/health``, yield its URL; terminate it afterwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    child = subprocess.Popen([sys.executable, "-m", "sglang_ext.cli", *engine_server_args(settings, port)])
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if child.poll() is not None:
                raise RuntimeError(f"the local engine-server exited with {child.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local engine-server did not start within {START_TIMEOUT_S:g} s")
            time.sleep(0.2)
        logger.info("local engine-server ready on %s for %d workers", url, settings.workers)
        yield url
    finally:
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False
