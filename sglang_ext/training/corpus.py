"""`dflare build-corpus`: a deterministic, offline chat corpus made from the Python standard library.

Why the standard library: every machine that runs Python has it, so the demo pair can be retrained
anywhere without downloading data. Each function becomes one chat pair:

    user:      "Write the body of this Python function." + where it lives (module, class) + its
               signature and docstring (if it has one)
    assistant: the function's body (docstring removed)

The corpus is a pure function of the stdlib sources: files are read in sorted order, samples are
deduplicated by prompt, and the held-out split is chosen by hashing the prompt, so two builds on the
same Python version give byte-identical output. Different Python versions ship different stdlibs,
hence the demo corpus is built on the CPU machine (Python 3.11) and carried to the GPU machine.

Outputs (in ``--out``): ``train.jsonl`` and ``heldout.jsonl`` (one ``{"id", "messages"}`` per line),
``train_hashes.txt`` (``sha256(prompt)[:16] sha256(response)[:16]`` per training sample) and
``manifest.json`` (counts, Python version, digest of both files).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

INSTRUCTION = "Write the body of this Python function."
# Directories of the stdlib that hold third-party, vendored or demo code.
SKIPPED_DIRS = frozenset({"site-packages", "__pycache__", "lib2to3", "turtledemo"})
HELDOUT_MODULUS = 100  # about 1 % of the prompts are held out


@dataclass(frozen=True)
class Sample:
    """One chat pair; ``source`` says where it came from (relative path and line)."""

    prompt: str
    response: str
    source: str

    @property
    def prompt_hash(self) -> str:
        return text_hash(self.prompt)

    @property
    def response_hash(self) -> str:
        return text_hash(self.response)

    def to_record(self) -> dict[str, object]:
        return {
            "id": self.prompt_hash,
            "source": self.source,
            "messages": [
                {"role": "user", "content": self.prompt},
                {"role": "assistant", "content": self.response},
            ],
        }


def text_hash(text: str) -> str:
    """The 16-hex-digit content hash used for splitting and for the committed training hashes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def is_heldout(prompt_hash: str) -> bool:
    return int(prompt_hash, 16) % HELDOUT_MODULUS == 0


def stdlib_files(root: Path) -> list[Path]:
    """Sources under ``root`` (the test suite included) in a stable order, vendored trees excluded."""
    files = [p for p in root.rglob("*.py") if not SKIPPED_DIRS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _function_sample(
    lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef
) -> tuple[str, str] | None:
    """Split one function into (signature + docstring, body), both dedented; None if unsuitable."""
    body = node.body
    n_doc = 1 if ast.get_docstring(node, clean=False) is not None else 0
    code = body[n_doc:]
    if not code or (len(code) == 1 and isinstance(code[0], ast.Pass | ast.Raise | ast.Expr)):
        return None  # abstract stubs and `...` teach nothing
    indent = node.col_offset
    head_end = body[0].end_lineno if n_doc else code[0].lineno - 1
    head = lines[node.lineno - 1 : head_end]
    tail = lines[head_end : node.end_lineno]
    if not head or not tail:
        return None
    if any(line[:indent].strip() for line in head + tail):
        return None  # odd layout (e.g. a one-line def); not worth special-casing
    prompt_code = "\n".join(line[indent:] for line in head).rstrip()
    response = textwrap.dedent("\n".join(line[indent:] for line in tail)).strip("\n")
    response = textwrap.indent(response, "    ")
    return prompt_code, response


def _acceptable(prompt_code: str, response: str, max_prompt_chars: int, max_response_lines: int) -> bool:
    if not prompt_code.isascii() or not response.isascii() or "\t" in prompt_code + response:
        return False
    n_lines = response.count("\n") + 1
    return (
        len(prompt_code) <= max_prompt_chars and 1 <= n_lines <= max_response_lines and len(response) <= 1600
    )


def iter_samples(root: Path, max_prompt_chars: int = 1000, max_response_lines: int = 30) -> Iterator[Sample]:
    """Every suitable function of the stdlib under ``root``, in file order, not yet deduplicated."""
    for path in stdlib_files(root):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        rel = path.relative_to(root).as_posix()
        for node, owner in _functions(tree):
            split = _function_sample(lines, node)
            if split is None or not _acceptable(*split, max_prompt_chars, max_response_lines):
                continue
            prompt_code, response = split
            where = f"Module `{rel}`" + (f", class `{owner}`" if owner else "")
            yield Sample(f"{INSTRUCTION}\n{where}.\n\n{prompt_code}", response, f"{rel}:{node.lineno}")


def _functions(tree: ast.Module) -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str | None]]:
    """Every function in source order with the name of the class that directly holds it, if any."""
    stack: list[tuple[ast.AST, str | None]] = [(tree, None)]
    found: list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str | None]] = []
    while stack:
        parent, owner = stack.pop()
        for child in ast.iter_child_nodes(parent):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((child, owner))
                stack.append((child, None))
            elif isinstance(child, ast.ClassDef):
                stack.append((child, child.name))
            else:
                stack.append((child, owner))
    yield from sorted(found, key=lambda item: (item[0].lineno, item[0].col_offset))


def build_corpus(root: Path, limit: int | None = None) -> tuple[list[Sample], list[Sample]]:
    """Deduplicated (train, heldout). A held-out sample whose response also occurs in training is dropped,
    so the two splits share neither prompts nor responses."""
    seen: set[str] = set()
    train: list[Sample] = []
    heldout: list[Sample] = []
    for sample in iter_samples(root):
        key = sample.prompt_hash
        if key in seen:
            continue
        seen.add(key)
        (heldout if is_heldout(key) else train).append(sample)
        if limit is not None and len(train) + len(heldout) >= limit:
            break
    train_responses = {s.response_hash for s in train}
    heldout = [s for s in heldout if s.response_hash not in train_responses]
    return train, heldout


def _write_jsonl(path: Path, samples: list[Sample]) -> str:
    text = "".join(json.dumps(s.to_record(), sort_keys=True) + "\n" for s in samples)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_corpus(out: Path, train: list[Sample], heldout: list[Sample]) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "python": ".".join(map(str, sys.version_info[:3])),
        "train_samples": len(train),
        "heldout_samples": len(heldout),
        "train_chars": sum(len(s.prompt) + len(s.response) for s in train),
        "train_sha256": _write_jsonl(out / "train.jsonl", train),
        "heldout_sha256": _write_jsonl(out / "heldout.jsonl", heldout),
    }
    hashes = "".join(f"{s.prompt_hash} {s.response_hash}\n" for s in train)
    (out / "train_hashes.txt").write_text(hashes, encoding="utf-8")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def load_chats(path: Path) -> list[dict[str, object]]:
    """Records of a corpus JSONL file (``{"id", "messages", ...}`` per line)."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dflare build-corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]), help="stdlib root to read"
    )
    parser.add_argument("--limit", type=int, default=None, help="stop after this many unique prompts")
    args = parser.parse_args(argv)
    train, heldout = build_corpus(args.stdlib, args.limit)
    manifest = write_corpus(args.out, train, heldout)
    print(json.dumps(manifest, indent=2))
    return 0
