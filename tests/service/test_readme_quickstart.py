"""The README's quick start, run from the README's own text: its serve command and its curl example.

The test reads the first two fenced ``bash`` blocks of the "Quick start" section: the install-and-serve
line (its last ``&&`` step is the serve command) and the curl example. It starts that serve command on a
free loopback port (``dflare`` becomes ``python -m sglang_ext.cli``, the same entry point, so the tree
under test runs), runs the curl example through bash with the port swapped, and checks that the answer
is a chat completion whose usage carries ``speculative``. Editing either block into something that does
not work fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import Settings
from tests.ports import loopback_port
from tests.service.conftest import Proc, start

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
FENCED_BASH = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
CURL_URL = re.compile(r"http://127\.0\.0\.1:(\d+)(/\S*)")


def quick_start_blocks() -> tuple[str, str]:
    """(the block with the serve command, the block with the curl example) of the Quick start section."""
    text = README.read_text()
    match = re.search(r"^## Quick start.*?(?=^## )", text, re.S | re.M)
    assert match, "README.md has no '## Quick start' section"
    blocks = FENCED_BASH.findall(match.group(0))
    serve = [b for b in blocks if "dflare serve" in b]
    curl = [b for b in blocks if b.lstrip().startswith("curl ")]
    assert serve and curl, "the Quick start section needs a bash block with `dflare serve` and one with curl"
    return serve[0], curl[0]


def serve_steps(block: str) -> list[list[str]]:
    """The ``&&`` steps of the line that starts the server, each split as the shell would."""
    line = next(line for line in block.splitlines() if "dflare serve" in line)
    return [shlex.split(step, comments=True) for step in line.split("&&")]


def engine_extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def test_install_line_makes_a_venv_installs_an_existing_extra_then_serves():
    steps = serve_steps(quick_start_blocks()[0])
    assert steps[0][:3] == ["python3", "-m", "venv"], steps[0]
    venv = steps[0][3]
    assert steps[1] == [".", f"{venv}/bin/activate"], "the venv is activated before pip runs"
    pip = steps[2]
    assert pip[:3] == ["pip", "install", "-e"], pip
    requested = set(re.fullmatch(r"\.\[(.*)\]", pip[3]).group(1).split(","))
    assert requested <= engine_extras(), f"extras {requested - engine_extras()} are not in pyproject.toml"
    assert "engine" in requested, "the embedded demo engine needs the engine extra"
    assert steps[-1][:2] == ["dflare", "serve"], steps[-1]


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, int]]:
    """The README's serve command on a free port; yields it with the port the README's curl targets."""
    serve = serve_steps(quick_start_blocks()[0])[-1]
    args = serve[1:]
    if "--port" in args:
        readme_port = int(args[args.index("--port") + 1])
        args = [a for i, a in enumerate(args) if a != "--port" and (i == 0 or args[i - 1] != "--port")]
    else:
        readme_port = Settings.model_fields["port"].default
    port = loopback_port()
    # A user's shell has no DFLARE_* settings: run the command with the defaults the README promises.
    clean = {key: value for key, value in os.environ.items() if not key.startswith("DFLARE_")}
    log = tmp_path_factory.mktemp("logs") / "readme_serve.log"
    with pytest.MonkeyPatch.context() as mp:
        for key in set(os.environ) - set(clean):
            mp.delenv(key)
        proc = start([*args, "--port", str(port)], log, port, ready_path="/ready")
    yield proc, readme_port
    proc.stop()


@pytest.mark.slow
def test_readme_curl_example_gets_speculative_usage_from_the_readme_server(readme_server):
    proc, readme_port = readme_server
    curl = quick_start_blocks()[1]
    urls = CURL_URL.findall(curl)
    assert urls, "the curl example names no http://127.0.0.1:PORT URL"
    assert {int(p) for p, _ in urls} == {readme_port}, "the curl example targets another port than the server"
    command = CURL_URL.sub(lambda m: f"{proc.url}{m.group(2)}", curl)
    bash = ["bash", "-euo", "pipefail", "-c", command]
    done = subprocess.run(bash, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"curl failed ({done.returncode}): {done.stderr}\n{proc.output()}"
    answer = json.loads(done.stdout)
    assert answer.get("object") == "chat.completion", answer
    assert answer["choices"][0]["message"]["content"].strip(), answer
    speculative = answer["usage"]["speculative"]
    assert speculative is not None, "the demo pair speculates: usage.speculative must not be null"
    assert speculative["verify_steps"] >= 1
    assert 1 <= speculative["acceptance_length"] <= speculative["block_size"]
    # Every usage field the README's sample answer shows is a field of the real answer.
    shown = set(re.findall(r'"(\w+)":', "\n".join(ln for ln in curl.splitlines() if ln.startswith("#"))))
    real = set(answer) | set(answer["usage"]) | set(speculative) | set(answer["choices"][0]["message"])
    assert shown <= real, f"the README shows fields the answer does not have: {shown - real}"


def test_blocks_are_found_in_a_copy_that_breaks_them(tmp_path, monkeypatch):
    """The parser fails loudly when the quick start loses its serve command."""
    broken = tmp_path / "README.md"
    broken.write_text(README.read_text().replace("dflare serve", "dflare serv"))
    monkeypatch.setattr(sys.modules[__name__], "README", broken)
    with pytest.raises(AssertionError, match="dflare serve"):
        quick_start_blocks()
