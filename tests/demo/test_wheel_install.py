"""The built wheel carries the demo pair: installed non-editable into a fresh venv, it generates offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

GENERATE = """
import sglang_ext.demo as demo
from sglang_ext.reference.loader import load_engine
from sglang_ext.reference.sampling import SamplingParams
from sglang_ext.training.data import render_prompt
import sys, torch
torch.set_num_threads(1)
assert str(demo.target_path()).startswith(sys.prefix), demo.target_path()
engine = load_engine(demo.target_path(), demo.drafter_path("dflare"))
tok = engine.tokenizer
question = "Write the body of this Python function.\\n\\ndef add(a, b):"
prompt = render_prompt(tok, [{"role": "user", "content": question}])
res = engine.generate([prompt], SamplingParams(max_tokens=12, stop_token_ids=(tok.eos_token_id,)))[0]
print(demo.DEMO_MODEL_NAME, len(res.output_ids), res.stats.verify_steps, repr(tok.decode(res.output_ids)))
"""


@pytest.mark.slow
def test_wheel_installs_and_generates_in_a_fresh_venv(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("sglang_ext", "service"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(src),
        ],
        check=True,
    )
    wheel = next(dist.glob("dflare_serve-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # torch/transformers come from the test venv: a plain path line appends it after the fresh site dir,
    # and its own .pth files (the editable install of this checkout) are not processed.
    Path(site, "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(python), "-c", GENERATE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    name, n_tokens, steps, _text = out.stdout.strip().splitlines()[-1].split(" ", 3)
    assert name == "dflare-demo" and int(n_tokens) > 0 and int(steps) > 0
