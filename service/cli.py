"""``dflare serve``: run the gateway under uvicorn.

With no flags it serves the embedded demo pair on 127.0.0.1:8000. ``--backend URL`` (repeatable)
serves SGLang / engine-server backends instead. Flags override ``DFLARE_*`` variables, which override
``--config FILE`` (YAML or JSON, the ``Settings`` field names). The flags are handed to the uvicorn
workers as ``DFLARE_*`` variables, so every worker builds the same ``Settings``. With several workers
the metrics run in prometheus-client's multiprocess mode (a fresh ``PROMETHEUS_MULTIPROC_DIR``), and
without backends one local ``dflare engine-server`` child serves them all (one engine, not N).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import logging.config
import os
import shutil
import socket
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from service.settings import CONFIG_FILE_ENV

if TYPE_CHECKING:
    from service.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dflare serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8000)")
    p.add_argument(
        "--backend",
        action="append",
        metavar="URL",
        help="SGLang or engine-server base URL; repeat for several (default: embedded engine)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="uvicorn worker processes (> 1 without --backend: one local engine-server for all)",
    )
    p.add_argument("--config", metavar="FILE", help="settings file (YAML or JSON)")
    p.add_argument("--log-level", help="debug, info, warning, error")
    return p


def logging_config(level: str) -> dict[str, Any]:
    """Access lines are bare JSON on stdout; everything else is timestamped text on stderr."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
            "json": {"format": "%(message)s"},
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"},
            "access": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"},
        },
        "loggers": {
            "dflare.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": level.upper(), "propagate": False},
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
    }


def _export_flags(args: argparse.Namespace) -> None:
    if args.config:
        os.environ[CONFIG_FILE_ENV] = os.path.abspath(args.config)
    for name in ("host", "port", "workers", "log_level"):
        value = getattr(args, name)
        if value is not None:
            os.environ[f"DFLARE_{name.upper()}"] = str(value)
    if args.backend:
        os.environ["DFLARE_BACKENDS"] = json.dumps(args.backend)


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now (``None``: it can). Bound as uvicorn binds it
    (``SO_REUSEADDR``, so connections of an earlier server in TIME_WAIT do not count) and let go."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _export_flags(args)
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        settings = Settings()
    except (ValidationError, OSError, ValueError) as exc:
        print(f"dflare serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    from service.shutdown import exit_zero_after_drain

    busy = port_in_use(settings.host, settings.port)
    if busy is not None:  # before loading anything: an engine takes seconds to load for nothing
        print(f"dflare serve: cannot listen on {settings.host}:{settings.port}: {busy}", file=sys.stderr)
        return 1
    log_config = logging_config(settings.log_level)
    logging.config.dictConfig(log_config)
    exit_zero_after_drain()  # SIGTERM: drain in-flight streams, then exit 0 (not 143); children stopped
    with contextlib.ExitStack() as stack:
        if settings.workers > 1 and settings.uses_embedded_engine:
            # one engine for all workers: a local engine-server child becomes their backend
            from service.local_engine import local_engine_server

            url = stack.enter_context(local_engine_server(settings))
            os.environ["DFLARE_BACKENDS"] = json.dumps([url])
            settings = Settings()
        return _run(settings, log_config)


def _run(settings: Settings, log_config: dict[str, Any]) -> int:
    multiproc_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiproc_dir = tempfile.mkdtemp(prefix="dflare-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    import uvicorn

    from service.http_protocol import CoalescingHttpToolsProtocol

    try:
        uvicorn.run(
            "service.app:app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            http=CoalescingHttpToolsProtocol,  # uvicorn's httptools protocol, one write per response
            log_config=log_config,
            access_log=False,
            timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None,
        )
    finally:
        if multiproc_dir:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
    return 0
