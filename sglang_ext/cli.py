"""The ``dflare`` command: one entry point, each subcommand implemented in the module that owns it.

Subcommands are resolved lazily so that ``dflare serve --backend ...`` never imports torch.
"""

from __future__ import annotations

import importlib
import sys

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
    "eval": ("sglang_ext.training.evaluate:main", "acceptance and speedup of a target/drafter pair"),
    "trace": ("sglang_ext.traces.cli:main", "acceptance traces: `dflare trace record|synthetic|report`"),
    "demo-path": ("sglang_ext.demo:main", "print the directory of a bundled demo model"),
}


def _usage() -> str:
    lines = ["usage: dflare <command> [args]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"dflare: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = SUBCOMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
