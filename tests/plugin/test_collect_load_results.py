"""collect_load_results.py: a GPU call cut short by its time limit still yields the rows it printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

ROW = "{'tok_s': %s, 'running_batch': %d, 'tau': %s, 'decode_ms': %s, 'step_wall_ms': %s}"
STDOUT = "\n".join(
    [
        "round 0 ar None bs=128 " + ROW % (12800.0, 128, 1.0, 9.2, 9.25),
        "round 0 b4 synthetic bs=128 " + ROW % (12840.0, 128, 3.2, None, 19.5),
        "kept full ar None bs=128: 9195.4 tok/s",
        "kept full ('static', 4) synthetic bs=128: 12226.4 tok/s",
        # the second wave, one round again: its rounds restart at 0 without the number going down
        "round 0 ar None bs=128 " + ROW % (11000.0, 128, 1.0, 9.3, 9.35),
        "round 0 s8 synthetic bs=128 " + ROW % (9700.0, 128, 4.7, None, 33.0),
        "kept full ar None bs=128: 8907.7 tok/s",
        "kept full ('adaptive_draft', 8) synthetic bs=128: 12928.8 tok/s",
        "round 0 ar None bs=256 " + ROW % (17500.0, 256, 1.0, 11.0, 11.05),
        "round 0 s8 synthetic bs=256 " + ROW % (14100.0, 256, 3.3, None, None),
    ]
)


def test_a_cut_short_wave_of_one_round_is_recovered_with_its_kept_full_rates(tmp_path, monkeypatch) -> None:
    """Two one-round waves printed; the saved JSON holds only the first (the call stopped inside the
    second). The second wave's rows come back from the printout, partial, each with the kept-full tok/s
    printed for it (none at batch 256, which the call did not reach) and the run's length spread."""
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "gpu"))
    import collect_load_results

    run = tmp_path / "run"
    run.mkdir()
    (run / "load_stdout.txt").write_text(STDOUT + "\n")
    first = [
        {"trace": "synthetic", "batch": 128, "mode": "ar", "block": 1, "tok_s": 12800.0},
        {"trace": "synthetic", "batch": 128, "mode": "static", "block": 4, "tok_s": 12840.0},
    ]
    setup = {"attention": "fa3", "rounds": 1, "kept_full_length_spread": 0.5}
    saved = {"device": "NVIDIA H100 80GB HBM3", "setup": setup, "rows": first, "server_notes": {}}
    (run / "bench_load.json").write_text(json.dumps(saved))
    waves = collect_load_results.printed_rounds(run / "load_stdout.txt")
    assert sorted(waves) == ["b4", "s8"]
    assert waves["s8"][1] == {("ar", "None", 128): 8907.7, ("s8", "synthetic", 128): 12928.8}
    out = tmp_path / "out.json"
    monkeypatch.setattr("sys.argv", ["collect", str(out), str(run)])
    assert collect_load_results.main() == 0
    rows = json.loads(out.read_text())["rows"]
    second = {(r["mode"], r["batch"]): r for r in rows if r.get("partial")}
    assert set(second) == {("adaptive_draft", 128), ("ar", 128), ("adaptive_draft", 256), ("ar", 256)}
    assert second[("adaptive_draft", 128)]["kept_full_tok_s"] == 12928.8
    assert second[("adaptive_draft", 128)]["x_ar_kept_full"] == round(12928.8 / 8907.7, 3)
    assert second[("adaptive_draft", 128)]["kept_full_spread"] == 0.5
    assert second[("ar", 128)]["kept_full_tok_s"] == 8907.7
    assert second[("adaptive_draft", 256)]["kept_full_tok_s"] is None
    assert second[("adaptive_draft", 256)]["x_ar"] == round(14100.0 / 17500.0, 3)
    # the steady-step ratio, tau x AR's step period over the server's, as the benchmark's own rows have it
    assert second[("adaptive_draft", 128)]["x_ar_steady"] == round(4.7 * 9.35 / 33.0, 3)
    assert second[("ar", 128)]["step_wall_ms"] == 9.35
    assert second[("adaptive_draft", 256)]["x_ar_steady"] is None  # no period printed for it
    assert len(rows) == 6  # the first wave's two saved rows are not duplicated from the printout


def test_runs_are_added_into_a_results_file_of_the_same_card_only(tmp_path, monkeypatch) -> None:
    """``--into`` keeps the file's rows and runs, adds the new run's rows with the run that measured them and
    whether its servers were warmed up, and refuses a run of another card (one card per file)."""
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "gpu"))
    import collect_load_results

    results = tmp_path / "results.json"
    old = {"trace": "synthetic", "batch": 1, "mode": "ar", "block": 1, "tok_s": 150.0}
    card = "NVIDIA H100 80GB HBM3"
    results.write_text(json.dumps({"device": card, "runs": [{"started": "a"}], "rows": [old]}))
    run = tmp_path / "run"
    run.mkdir()
    row = {"trace": "synthetic", "batch": 128, "mode": "static", "block": 4, "tok_s": 12840.0}
    setup = {"attention": "fa3", "rounds": 2, "warmups": True, "command": "PROFILE=0 BLOCKS=4 bash ..."}
    saved = {"device": card, "started": "2026-12-07T19:00:00Z", "setup": setup}
    (run / "bench_load.json").write_text(json.dumps({**saved, "rows": [row], "server_notes": {}}))
    monkeypatch.setattr("sys.argv", ["collect", "--into", str(results), str(run)])
    assert collect_load_results.main() == 0
    merged = json.loads(results.read_text())
    assert merged["rows"][0] == old and len(merged["rows"]) == 2
    new = merged["rows"][1]
    assert new["run_started"] == "2026-12-07T19:00:00Z"
    assert (new["warmed_up"], new["server_warmup"]) == (False, True)
    assert (new["rounds"], new["attention"], new["verify_path"]) == (2, "fa3", "sglang")
    assert [r["started"] for r in merged["runs"]] == ["a", "2026-12-07T19:00:00Z"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "bench_load.json").write_text(json.dumps({**saved, "device": "NVIDIA H200", "rows": []}))
    monkeypatch.setattr("sys.argv", ["collect", "--into", str(results), str(other)])
    with pytest.raises(SystemExit, match="one card per file"):
        collect_load_results.main()
