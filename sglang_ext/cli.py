"""The ``dflare`` command: one entry point, each subcommand implemented in the module that owns it.

Subcommands are resolved lazily so that ``dflare serve --backend ...`` never imports torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# name -> ("module:function", one-line help). Each function takes argv (list[str]) and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("service.cli:main", "OpenAI-compatible gateway (embedded demo engine by default)"),
    "engine-server": ("sglang_ext.engine_server.cli:main", "reference engine behind SGLang's HTTP protocol"),
    "generate": ("sglang_ext.reference.cli:generate_main", "one prompt through the reference engine"),
    "bench": ("sglang_ext.reference.bench:main", "benchmarks: `dflare bench engine`"),
    "convert": ("sglang_ext.dflare.convert:main", "rewrite a drafter checkpoint into the served layouts"),
    "build-corpus": ("sglang_ext.training.corpus:main", "build the offline chat corpus"),
    "train-tokenizer": ("sglang_ext.training.tokenizer:main", "train the demo BPE tokenizer"),
    "train-target": ("sglang_ext.training.train_target:main", "train a small Qwen3 target"),
    "train-drafter": ("sglang_ext.training.train_drafter:main", "train a DFlare/DFlash drafter"),
    "draft-vocab": (
        "sglang_ext.training.count_vocab:main",
        "keep a drafter to the tokens its target writes most",
    ),
    "eval": ("sglang_ext.training.evaluate:main", "acceptance and speedup of a target/drafter pair"),
    "trace": ("sglang_ext.traces.cli:main", "acceptance traces: `dflare trace record|synthetic|report`"),
    "demo-path": ("sglang_ext.demo:main", "print the directory of a bundled demo model"),
}


def dispatch(
    prog: str,
    commands: dict[str, tuple[str, str]],
    argv: list[str],
    run: Callable[[str, list[str]], int],
    width: int = 16,
) -> int:
    """One level of subcommands: usage for no arguments (exit 2) or ``-h`` (exit 0), a clear error for an
    unknown name (exit 2), else ``run(name, rest)``. ``commands`` maps name -> (target, one-line help)."""
    lines = [f"usage: {prog} <command> [args]", "", "commands:"]
    usage = "\n".join(lines + [f"  {name:<{width}} {help_}" for name, (_, help_) in commands.items()])
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"{prog}: unknown command {name!r}\n\n{usage}", file=sys.stderr)
        return 2
    return run(name, rest)


def _call(name: str, rest: list[str]) -> int:
    module_name, func_name = SUBCOMMANDS[name][0].split(":")
    return int(getattr(importlib.import_module(module_name), func_name)(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    return dispatch("dflare", SUBCOMMANDS, list(sys.argv[1:] if argv is None else argv), _call)


if __name__ == "__main__":
    raise SystemExit(main())
