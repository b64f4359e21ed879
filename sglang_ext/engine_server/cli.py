"""``dflare engine-server``: serve a target (+ drafter) as SGLang would, on CPU or any torch device."""

from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path

from sglang_ext.reference.pair import add_min_draft_confidence_argument


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dflare engine-server", description=__doc__)
    p.add_argument("--model-path", type=Path, help="target model directory (default: the demo target)")
    p.add_argument("--draft-model-path", type=Path, help="drafter directory (default: the demo drafter)")
    p.add_argument(
        "--drafter",
        choices=("dflare", "dflash", "none"),
        default="dflare",
        help="which demo drafter when --draft-model-path is not given; none = plain decoding",
    )
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: dflare-demo)")
    p.add_argument("--block-size", type=int, default=None, help="speculative block size (default: drafter's)")
    add_min_draft_confidence_argument(p)
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queued-requests", type=int, default=64, help="waiting requests before 503")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument(
        "--no-plugin-stats",
        action="store_true",
        help="behave like stock SGLang: no usage.speculative, stats only in meta_info",
    )
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from sglang_ext.engine_server.app import create_engine_app
    from sglang_ext.engine_server.loader import load_serving

    target = args.model_path
    drafter = args.draft_model_path
    if target is None or (drafter is None and args.drafter != "none"):
        from sglang_ext import demo

        target = target or Path(demo.target_path())
        if drafter is None and args.drafter != "none":
            drafter = Path(demo.drafter_path(args.drafter))
    if args.drafter == "none" and args.draft_model_path is None:
        drafter = None
    name = args.served_model_name or ("dflare-demo" if args.model_path is None else args.model_path.name)
    load = partial(
        load_serving,
        target,
        drafter,
        model_name=name,
        block_size=args.block_size,
        max_batch=args.max_batch,
        max_waiting=args.max_queued_requests,
        threads=args.threads,
        device=args.device,
        min_draft_confidence=args.min_draft_confidence,
        verify_policy=args.verify_policy,
    )
    app = create_engine_app(load, plugin_stats=not args.no_plugin_stats)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
