"""Load test of an OpenAI-compatible chat server (a local `dflare serve` by default).

    locust -f loadtest/locustfile.py --config loadtest/locust.conf --host http://127.0.0.1:8000

Headless with CSV + HTML reports under loadtest/results/, thresholds that set the exit code
(`--max-error-ratio`, `--max-p95-ttft-ms`), load shapes (`--shape steady|ramp|spike`).
`python loadtest/summary_png.py loadtest/results` turns the run into a PNG.
"""

from __future__ import annotations

from chat_users import ChatUser
from load_shapes import DEFAULT_RUN_TIME_S, STAGES, users_at
from locust import LoadTestShape, events
from prompt_sets import PROMPT_SETS
from run_checks import apply_verdict

__all__ = ["ChatUser", "StagesShape"]


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("DFlare chat load")
    group.add_argument(
        "--model",
        default="",
        env_var="DFLARE_LOAD_MODEL",
        help="model to ask for; empty = the first one /v1/models lists",
    )
    group.add_argument(
        "--prompt-sets",
        default=",".join(PROMPT_SETS),
        env_var="DFLARE_LOAD_PROMPT_SETS",
        help=f"comma-separated bundled prompt sets ({', '.join(PROMPT_SETS)})",
    )
    group.add_argument("--max-tokens", type=int, default=64, env_var="DFLARE_LOAD_MAX_TOKENS")
    group.add_argument("--temperature", type=float, default=0.0, env_var="DFLARE_LOAD_TEMPERATURE")
    group.add_argument(
        "--shape",
        choices=sorted(STAGES),
        default="steady",
        env_var="DFLARE_LOAD_SHAPE",
        help="how the user count moves towards -u over the run time",
    )
    group.add_argument(
        "--max-error-ratio",
        type=float,
        default=0.01,
        env_var="DFLARE_LOAD_MAX_ERROR_RATIO",
        help="fail the run above this share of failed HTTP requests",
    )
    group.add_argument(
        "--max-p95-ttft-ms",
        type=float,
        default=5000.0,
        env_var="DFLARE_LOAD_MAX_P95_TTFT_MS",
        help="fail the run above this p95 time to first token",
    )
    group.add_argument(
        "--min-requests",
        type=int,
        default=1,
        env_var="DFLARE_LOAD_MIN_REQUESTS",
        help="fail the run with fewer chat requests than this",
    )
    group.add_argument(
        "--request-log",
        default="",
        env_var="DFLARE_LOAD_REQUEST_LOG",
        help="JSON lines, one per request, for summary_png.py",
    )
    group.add_argument(
        "--summary-json",
        default="",
        env_var="DFLARE_LOAD_SUMMARY_JSON",
        help="write the threshold verdict here",
    )


@events.quitting.add_listener
def _judge_run(environment, **_kwargs) -> None:
    apply_verdict(environment)


class StagesShape(LoadTestShape):
    """Drives the user count from STAGES; `-u`, `-r` and `-t` keep their usual meaning."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options
        run_time = float(options.run_time or DEFAULT_RUN_TIME_S)
        users = users_at(options.shape, self.get_run_time(), run_time, int(options.num_users or 1))
        if users is None:
            return None
        return users, float(options.spawn_rate or users)
