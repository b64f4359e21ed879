"""Train + eval end to end on a tiny configuration on CPU: the demo build's own code path, small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sglang_ext.dflare.checkpoint import load_drafter
from sglang_ext.training import demo_build, evaluate, train_drafter
from sglang_ext.training.data import TokenizedChats


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.set_num_threads(2)
    work, out = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("out")
    manifest = demo_build.prep(work, vocab_size=1024, limit=300, publish=False)
    assert manifest["train_encoded"] > 200
    demo_build.train_all(work, out, "tiny", "cpu")
    return work, out


def test_tiny_build_writes_a_loadable_pair_and_report(built: tuple[Path, Path]) -> None:
    work, out = built
    report = json.loads((out / "build_report.json").read_text())
    assert report["target"]["steps"] == 6 and report["target"]["heldout_loss"] > 0
    assert report["drafters"]["steps"] == 4
    target_config = json.loads((out / "target" / "config.json").read_text())
    assert target_config["architectures"] == ["Qwen3ForCausalLM"]
    assert set(report["drafters"]["teacher_forced_tau"]) == {"dflare", "dflash"}
    regenerated = TokenizedChats.load(out / "drafters" / "regenerated.safetensors")
    original = TokenizedChats.load(work / "train.safetensors")
    assert len(regenerated) == 6
    for i, key in enumerate(regenerated.keys):  # prompts kept, responses are the target's own
        j = original.keys.index(key)
        assert regenerated.prompt(i) == original.prompt(j)
    for kind in ("dflare", "dflash"):
        cfg = load_drafter(out / "drafters" / kind).config
        assert cfg.kind == kind and cfg.target_num_hidden_layers == 6 and cfg.mask_token_id == 3


def test_eval_reports_acceptance_speed_and_losslessness(built: tuple[Path, Path], tmp_path: Path) -> None:
    work, out = built
    args = evaluate.build_parser().parse_args(
        ["--target", str(out / "target"), "--drafter", f"dflare={out / 'drafters' / 'dflare'}",
         "--prompts", str(work / "corpus" / "train.jsonl"), "--num-prompts", "3", "--speed-prompts", "1",
         "--max-tokens", "8", "--block-size", "4", "--out", str(tmp_path)]
    )  # fmt: skip
    report = evaluate.run(args)
    acc = report["acceptance"]["dflare"]
    assert acc["block_size"] == 4 and len(acc["per_position_acceptance"]) == 3
    assert 1.0 <= acc["tau"] <= 4.0 and sum(acc["histogram"]) == acc["usage"]["verify_steps"] > 0
    speed = report["speed"]
    assert speed["ar_baseline"] in ("ar_block1", "hf_generate")
    assert all(speed["identical_to_ar"].values())  # lossless, even with an untrained pair
    assert json.loads((tmp_path / "eval.json").read_text())["speed"]["speedup"]["dflare"] > 0
    assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_resumed_training_equals_an_uninterrupted_run(built: tuple[Path, Path], tmp_path: Path) -> None:
    work, out = built
    common = ["--target", str(out / "target"), "--data", str(work / "train.safetensors"), "--no-regenerate",
              "--limit", "4", "--batch", "2", "--anchors", "3", "--block-size", "4", "--steps", "4",
              "--checkpoint-every", "0", "--device", "cpu", "--drafter", "d:dflare:2"]  # fmt: skip
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train_drafter.main([*common, "--out", str(whole)])
    assert train_drafter.train(
        train_drafter.build_parser().parse_args([*common, "--out", str(resumed), "--stop-after", "2"])
    ) == {"stopped_at": 2}
    assert not (resumed / "d").exists()
    train_drafter.main([*common, "--out", str(resumed), "--resume"])
    steps_logged = [
        json.loads(line)["step"] for line in (resumed / "train_log.jsonl").read_text().splitlines()
    ]
    assert steps_logged == [0, 2, 3]  # steps 0-1 before the stop, 2-3 after resuming
    a = load_file(str(whole / "d" / "model.safetensors"))
    b = load_file(str(resumed / "d" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_warm_start_continues_from_a_trained_drafter(built: tuple[Path, Path], tmp_path: Path) -> None:
    """--init-from DIR starts drafter NAME from DIR/NAME: at learning rate 0 the output is the input bit
    for bit, while a fresh start at lr 0 is not; a drafter of another shape is refused."""
    work, out = built
    common = ["--target", str(out / "target"), "--data", str(work / "train.safetensors"), "--no-regenerate",
              "--limit", "4", "--batch", "2", "--anchors", "3", "--block-size", "4", "--steps", "2",
              "--checkpoint-every", "0", "--device", "cpu", "--lr", "0"]  # fmt: skip
    init = out / "drafters"
    train_drafter.main(
        [*common, "--drafter", "dflare:dflare:2", "--init-from", str(init), "--out", str(tmp_path / "w")]
    )
    train_drafter.main([*common, "--drafter", "dflare:dflare:2", "--out", str(tmp_path / "cold")])
    given = load_file(str(init / "dflare" / "model.safetensors"))
    warm = load_file(str(tmp_path / "w" / "dflare" / "model.safetensors"))
    cold = load_file(str(tmp_path / "cold" / "dflare" / "model.safetensors"))
    assert given.keys() == warm.keys() and all(torch.equal(given[k], warm[k]) for k in given)
    assert not all(torch.equal(given[k], cold[k]) for k in given)
    with pytest.raises(ValueError, match="does not match"):
        train_drafter.main(
            [*common, "--drafter", "dflare:dflare:3", "--init-from", str(init), "--out", str(tmp_path / "x")]
        )


def test_a_drafter_only_rebuild_keeps_the_given_target(built: tuple[Path, Path], tmp_path: Path) -> None:
    work, out = built
    report = demo_build.train_all(work, tmp_path, "tiny", "cpu", reuse_target=out / "target")
    assert report["target"] == {"reused": str(out / "target")} and report["drafters"]["steps"] == 4
    a = load_file(str(out / "target" / "model.safetensors"))
    b = load_file(str(tmp_path / "target" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_drafter(tmp_path / "drafters" / "dflare").config.target_num_hidden_layers == 6


def test_a_budgeted_run_is_sized_on_its_remaining_time() -> None:
    # at step 80, 20 s into a 100 s budget, at 0.5 s per step: 160 more steps fit
    assert train_drafter.budget_steps(80, 20.0, 0.5, 100.0, cap=10_000) == 240
    assert train_drafter.budget_steps(80, 20.0, 0.5, 100.0, cap=100) == 100  # the epoch cap wins
    assert train_drafter.budget_steps(80, 120.0, 0.5, 100.0, cap=10_000) == 81  # over budget: stop next
