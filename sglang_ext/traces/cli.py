"""``dflare trace record|synthetic|report``: acceptance traces from a real pair, the frozen synthetic model,
and their side-by-side report.

Only the chosen subcommand's module is imported (``synthetic`` and ``report`` run without torch).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sglang_ext.cli import dispatch

# name -> (module with add_arguments(parser) and main(args), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "record": ("sglang_ext.traces.record", "record a trace from a target/drafter pair (reference engine)"),
    "synthetic": ("sglang_ext.traces.synthetic", "write the frozen synthetic trace"),
    "report": ("sglang_ext.traces.report", "compare traces side by side: JSON + PNG"),
}


def _run(name: str, rest: list[str]) -> int:
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"dflare trace {name}", description=help_)
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(rest)) or 0)


def main(argv: list[str]) -> int:
    return dispatch("dflare trace", COMMANDS, argv, _run, width=10)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
