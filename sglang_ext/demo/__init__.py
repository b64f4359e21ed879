"""The demo pair shipped with the package: a small Qwen3 target with DFlare and DFlash drafters.

Trained by ``python -m sglang_ext.training.demo_build`` (see ``docs/demo.md``) and installed as package
data, so ``dflare serve`` / ``dflare generate`` and the tests run offline on real weights. Everything
finds the files through this one loader, which resolves them with :mod:`importlib.resources` (works
from a source checkout, an editable install and an installed wheel alike).

Layout: ``target/`` (HF ``Qwen3ForCausalLM`` + tokenizer), ``dflare/`` and ``dflash/`` (drafters in the
served checkpoint layouts), ``corpus/`` (held-out prompts, training-sample hashes).
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

DEMO_MODEL_NAME = "dflare-demo"
DRAFTER_KINDS = ("dflare", "dflash")


class DemoModelMissingError(FileNotFoundError):
    """The package was built without the demo weights."""


def demo_dir() -> Path:
    """Directory holding the demo pair (a real directory: the package is never imported from a zip)."""
    return Path(str(resources.files(__name__)))


def _model_dir(name: str) -> Path:
    path = demo_dir() / name
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise DemoModelMissingError(f"demo model {name!r} is not installed at {path}")
    return path


def target_path() -> Path:
    """The demo target: a Hugging Face ``Qwen3ForCausalLM`` directory with its tokenizer."""
    return _model_dir("target")


def drafter_path(kind: str = "dflare") -> Path:
    """The demo drafter of ``kind`` ("dflare" or "dflash"), trained with the same data and steps."""
    if kind not in DRAFTER_KINDS:
        raise ValueError(f"unknown drafter kind {kind!r}; expected one of {DRAFTER_KINDS}")
    return _model_dir(kind)


def heldout_prompts_path() -> Path:
    """Held-out chat samples (JSONL, ``messages``): no training sample shares their prompt or response."""
    return demo_dir() / "corpus" / "heldout.jsonl"


def main(argv: list[str]) -> int:
    """`dflare demo-path {target,dflare,dflash}`: print the directory (the engine image uses it)."""
    parser = argparse.ArgumentParser(prog="dflare demo-path", description=main.__doc__)
    parser.add_argument("which", choices=("target", *DRAFTER_KINDS))
    args = parser.parse_args(argv)
    print(target_path() if args.which == "target" else drafter_path(args.which))
    return 0
