"""Gather load-benchmark runs (``bench_load*.json`` and, for a wave cut short by the time limit, the rounds it
printed) into one ``docs/results/sglang_bench_load.json`` with a top-level ``device`` and ``rows``.

``python tests/gpu/collect_load_results.py OUT.json RUN_DIR [RUN_DIR ...]``: each RUN_DIR holds one call's
``bench_load*.json`` and ``load_stdout.txt`` (and, for a call cut short, the server logs in ``gpu_logs/``).
``--into RESULTS.json RUN_DIR ...`` adds the runs to an existing results file of the same card (or starts
one), each new row saying which run measured it (``run_started``) and whether its servers were warmed up:
``warmed_up`` (the profile pass ran first) and ``server_warmup`` (``--warmups dflare``).
Rows of a cut-short wave are the medians of the rounds it finished (``rounds`` says how many), marked
``"partial": true``. Every DFLARE row says how its server verified (``verify_path``).
"""

from __future__ import annotations

import ast
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sglang_load import PREFIXES, server_key

LINE = re.compile(r"^round (\d+) (\S+) (\S+) bs=(\d+) (\{.*\})$")
KEPT = re.compile(r"^kept full (ar|\(.*\)) (\S+) bs=(\d+): ([\d.]+) tok/s$")


def printed_rounds(stdout: Path) -> dict[str, tuple[list[tuple[str, str, int, dict]], dict]]:
    """Every printed measurement by wave (named by its DFLARE blocks): (who, trace, batch, row) of its
    rounds, and its kept-full tok/s by (who, trace, batch). A wave's rounds count up from 0 and measure each
    (server, batch) once a round, so a round number going back down, or a measurement its round already
    has (with one round), starts the next wave; kept-full lines follow their wave's rounds."""
    waves: list[tuple[list[tuple[str, str, int, dict]], dict]] = []
    last_round, seen = None, set()
    for line in stdout.read_text().splitlines():
        if (kept := KEPT.match(line.strip())) and waves:
            who, trace, bs, tok_s = kept.groups()
            name = "ar" if who == "ar" else server_key(*ast.literal_eval(who))
            waves[-1][1][(name, trace, int(bs))] = float(tok_s)
            continue
        m = LINE.match(line.strip())
        if not m:
            continue
        rnd, who, trace, bs, row = m.groups()
        key = (int(rnd), who, trace, int(bs))
        if last_round is None or int(rnd) < last_round or key in seen:
            waves.append(([], {}))
            seen = set()
        last_round = int(rnd)
        seen.add(key)
        waves[-1][0].append((who, trace, int(bs), ast.literal_eval(row)))
    return {",".join(sorted({w for w, *_ in rounds if w != "ar"})): (rounds, kept) for rounds, kept in waves}


def printed_server(who: str) -> tuple[str, int]:
    """(mode, block) of a DFLARE server as the benchmark prints it: ``b8`` (or ``8``) static, ``a16``
    adaptive, ``d16`` SGLang's DSPARK planner."""
    if who[0] in PREFIXES:
        return PREFIXES[who[0]], int(who[1:])
    return "static", int(who.removeprefix("b"))


def partial_rows(
    wave: list[tuple[str, str, int, dict]], wave_name: str, kept: dict, spread: float | None
) -> list[dict]:
    """Rows of a cut-short wave: medians of its printed rounds, with its printed kept-full tok/s (``kept``,
    by (who, trace, batch)) and the run's length ``spread`` where a row has one."""

    def med(rows: list[dict], key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return round(statistics.median(values), 4) if values else None

    out = []
    for bs in sorted({b for _, _, b, _ in wave}):
        ar = [r for who, _, b, r in wave if who == "ar" and b == bs]
        for who, trace in sorted({(w, t) for w, t, b, _ in wave if w != "ar" and b == bs}):
            spec = [r for w, t, b, r in wave if (w, t, b) == (who, trace, bs)]
            if not ar or not spec:
                continue
            row = {key: med(spec, key) for key in spec[0]}
            mode, block = printed_server(who)
            row.update(trace=trace, batch=bs, mode=mode, block=block, wave=wave_name, partial=True)
            if mode == "static":
                row["verified_per_req"] = block
            row["rounds"] = len(spec)
            row["tok_s_rounds"] = [r["tok_s"] for r in spec]
            row["ar_step_ms"] = med(ar, "decode_ms")
            row["x_ar"] = round(row["tok_s"] / med(ar, "tok_s"), 3)
            walls = row.get("step_wall_ms"), med(ar, "step_wall_ms")  # as bench_sglang_load's x_ar_steady
            steady = row["tau"] * walls[1] / walls[0] if row.get("tau") and all(walls) else None
            row["x_ar_steady"] = round(steady, 3) if steady else None
            ar_kept, spec_kept = kept.get(("ar", "None", bs)), kept.get((who, trace, bs))
            row["kept_full_tok_s"], row["kept_full_spread"] = spec_kept, spread if spec_kept else None
            row["x_ar_kept_full"] = round(spec_kept / ar_kept, 3) if spec_kept and ar_kept else None
            out.append(row)
            ar_row = {"trace": trace, "batch": bs, "mode": "ar", "block": 1, "wave": wave_name}
            ar_row.update(partial=True, rounds=len(ar), tok_s=med(ar, "tok_s"), ar_step_ms=row["ar_step_ms"])
            ar_row["running_batch"] = med(ar, "running_batch")
            ar_row["step_wall_ms"] = walls[1]
            ar_row["kept_full_tok_s"], ar_row["kept_full_spread"] = ar_kept, spread if ar_kept else None
            out.append(ar_row)
    return out


def server_notes(data: dict, run: Path) -> dict[str, list[str]]:
    """What each DFLARE server logged about itself at start: the run's ``server_notes``, or, for a run cut
    short before it saved them, the DFLARE lines of the server logs in ``RUN_DIR/gpu_logs/``."""
    notes = dict(data.get("server_notes") or {})
    for log in sorted((run / "gpu_logs").glob("dflare_*.log")):
        if log.stem not in notes:
            notes[log.stem] = [ln for ln in log.read_text(errors="replace").splitlines() if "DFLARE" in ln]
    return notes


def verify_path(lines: list[str]) -> str:
    """How a DFLARE server verified, in its own words: ``adaptive`` (the verify-width policy with a step-cost
    table), ``adaptive_step`` (the adaptive step's ragged verify without a table: the whole block every
    step) or ``sglang`` (SGLang's DFlash step). The plugin's default on FA3 is adaptive, so a run whose
    script did not set ``DFLARE_VERIFY`` is labelled by what its servers ran, not by what the script
    assumed."""
    said = [m for m in ("adaptive", "dspark_planner") if any(f"verify={m}" in ln for ln in lines)]
    planner = said[0] if said else None
    if planner is None:
        return "sglang"
    return "adaptive_step" if any("no step-cost table" in ln for ln in lines) else planner


def label_verify_paths(rows: list[dict], notes: dict[str, list[str]]) -> None:
    """Every DFLARE row gets its server's ``verify_path``; static rows of a server that ran the policy
    become adaptive rows, their verified tokens per request unknown unless measured (the script had set
    them to the block), and rows of a server that verified the whole block every step are static."""
    for row in rows:
        if row["mode"] == "ar":
            continue
        name = f"dflare_{server_key(row['mode'], row['block'])}"
        row["verify_path"] = verify_path(notes.get(name, []))
        if row["mode"] == "static" and row["verify_path"] == "adaptive":
            row["mode"] = "adaptive"
            if row.get("verified_per_req") == row["block"]:
                row["verified_per_req"] = None
        elif row["verify_path"] == "adaptive_step":  # no cost table: static widths
            row["mode"], row["verified_per_req"] = "static", row["block"]


def collect(runs: list[Path], combined: dict) -> dict:
    """``combined`` (a results file's content) with the rows and runs of each RUN_DIR in ``runs`` added."""
    for run in runs:
        (result,) = run.glob("bench_load*.json")
        data = json.loads(result.read_text())
        combined["device"] = combined.get("device") or data["device"]
        if data["device"] != combined["device"]:
            raise SystemExit(f"{result}: {data['device']}, not {combined['device']}: one card per file")
        attention = data["setup"]["attention"]
        rows = data.get("rows", [])
        done = {(r["mode"], r["block"]) for r in rows if r["mode"] != "ar"}
        stdout = run / "load_stdout.txt"
        if stdout.is_file():
            for name, (wave, kept) in printed_rounds(stdout).items():
                if name and not {printed_server(w) for w in name.split(",")} & done:
                    rows += partial_rows(wave, name, kept, data["setup"].get("kept_full_length_spread"))
        label_verify_paths(rows, server_notes(data, run))
        profiled = "PROFILE=0" not in data["setup"].get("command", "")  # the profile pass warms each size up
        for row in rows:
            row["attention"] = attention
            row.setdefault("rounds", data["setup"]["rounds"])
            row.update(run_started=data.get("started"), warmed_up=profiled)
            row["server_warmup"] = bool(data["setup"].get("warmups"))
        combined.setdefault("rows", []).extend(rows)
        combined.setdefault("runs", []).append(
            {k: data.get(k) for k in ("started", "finished", "setup", "server_notes", "profiles")}
        )
    return combined


def main() -> int:
    args = sys.argv[1:]
    into = args[0] == "--into"
    out, runs = Path(args[1 if into else 0]), [Path(p) for p in args[2 if into else 1 :]]
    empty = {"device": None, "runs": [], "rows": []}
    combined = collect(runs, json.loads(out.read_text()) if into and out.is_file() else empty)
    out.write_text(json.dumps(combined, indent=1))
    print(out, len(combined["rows"]), "rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
