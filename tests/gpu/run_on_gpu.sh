#!/usr/bin/env bash
# GPU checks and benchmark of the SGLang plugin, on a GPU node, from the repo root
# (docs/sglang_plugin.md, "Running the GPU scripts"):  bash tests/gpu/run_on_gpu.sh MODE [args]
#   check: tests/gpu/check_sglang_dflare.py on the demo pair   -> $OUT/check.json, fixtures.json, logs.txt
#          (DRAFT_VOCAB=N: its DFlare drafter kept to a draft vocabulary of N tokens, counted by dflare draft-vocab)
#   fixtures: only the check's usage.speculative captures       -> $OUT/fixtures.json
#   top_p: tests/gpu/check_top_p.py, top-p sampling on DFLARE and built-in DFLASH -> $OUT/top_p.json
#   block_logits: tests/gpu/check_block_logits.py, SGLang's DFLARE block logits vs the reference drafter
#   bench: tests/gpu/bench_sglang_sim.py (Qwen3-8B shapes, simulated acceptance) -> $OUT/bench_sim.json
#   load: tests/gpu/bench_sglang_load.py (batch 1-256, acceptance traces) -> $OUT/bench_load.json
#   adaptive: tests/gpu/check_adaptive.py, adaptive DFLARE greedy == AR on the demo pair (FA3) -> $OUT/adaptive.json
#   argmax: tests/gpu/check_strided_argmax.py, the adaptive greedy argmax vs SGLang's scatter -> $OUT/strided_argmax.json
# SGLang: the one `python3` imports (`pip install 'sglang==0.5.17'`); if it has none, an SGLang unpacked
# into $SGLANG_SITE (default /tmp/site; .gpu/tools/unpack.sh makes it from an offline wheel bundle).
# The plugin: this checkout, found through its entry point; when `pip install --no-deps .` was not run,
# the entry point is declared in $PLUGIN_SITE (default /tmp/dflare-plugin) without touching the environment.
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
SGLANG_SITE=${SGLANG_SITE:-/tmp/site} PLUGIN_SITE=${PLUGIN_SITE:-/tmp/dflare-plugin}
mkdir -p "$OUT"
if python3 -c 'import sglang' 2>/dev/null; then
  echo "SGLang: the installed one"
elif [ -d "$SGLANG_SITE/sglang" ] || { [ -f .gpu/tools/unpack.sh ] && bash .gpu/tools/unpack.sh; }; then
  echo "SGLang: unpacked in $SGLANG_SITE"
  export PYTHONPATH=$SGLANG_SITE${PYTHONPATH:+:$PYTHONPATH}
else
  echo "SGLang is not importable: pip install 'sglang==0.5.17' first (docs/sglang_plugin.md)" >&2
  exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # this checkout's sglang_ext and tests
has_entry_point() {
  python3 -c "from importlib.metadata import entry_points as e; import sys; \
sys.exit(0 if any(x.name == 'dflare' for x in e(group='sglang.srt.plugins')) else 1)"
}
if ! has_entry_point; then
  # SGLang loads plugins from installed distributions only: declare ours in a directory of its own
  # (the code itself comes from the checkout, first on PYTHONPATH; same entry point as pyproject.toml).
  d=$PLUGIN_SITE/dflare_serve-0.1.0.dist-info
  mkdir -p "$d"
  printf 'Metadata-Version: 2.1\nName: dflare-serve\nVersion: 0.1.0\n' > "$d/METADATA"
  printf '[sglang.srt.plugins]\ndflare = sglang_ext.sglang_plugin:register\n' > "$d/entry_points.txt"
  export PYTHONPATH=$PYTHONPATH:$PLUGIN_SITE
  has_entry_point || { echo "the dflare entry point is still not visible" >&2; exit 1; }
  echo "plugin: entry point declared in $PLUGIN_SITE, code from this checkout"
fi
python3 -c "import sglang, sglang_ext.sglang_plugin as p; from importlib.metadata import entry_points as e; \
print('sglang', sglang.__version__, [x.value for x in e(group='sglang.srt.plugins')])"
mode=${1:-check}; shift || true
case "$mode" in
  check)
    demo=$(python3 -m sglang_ext.cli demo-path target 2>/dev/null || echo sglang_ext/demo/target)
    dflare=${DFLARE:-$(dirname "$demo")/dflare}
    if [ -n "${DRAFT_VOCAB:-}" ]; then  # the drafter kept to the N tokens the held-out answers use most
      rm -rf /tmp/dflare_vocab && cp -r "$dflare" /tmp/dflare_vocab && dflare=/tmp/dflare_vocab
      python3 -m sglang_ext.cli draft-vocab --target "${TARGET:-$demo}" --size "$DRAFT_VOCAB" --drafter "$dflare" \
        --data "$(dirname "$demo")/corpus/heldout.jsonl" 2>&1 | tail -1 | tee "$OUT/draft_vocab.txt"
    fi
    python3 tests/gpu/check_sglang_dflare.py --target "${TARGET:-$demo}" \
      --dflare "$dflare" --dflash "${DFLASH:-$(dirname "$demo")/dflash}" "$@" 2>&1 \
      | tee "$OUT/check_stdout.txt" | tail -60 ;;
  fixtures)
    demo=$(python3 -m sglang_ext.cli demo-path target 2>/dev/null || echo sglang_ext/demo/target)
    python3 tests/gpu/check_sglang_dflare.py --target "${TARGET:-$demo}" --dflare "$(dirname "$demo")/dflare" \
      --dflash "$(dirname "$demo")/dflash" --only-fixtures --dtype bfloat16 2>&1 \
      | tee "$OUT/fixtures_stdout.txt" | tail -30 ;;
  top_p)
    demo=$(python3 -m sglang_ext.cli demo-path target 2>/dev/null || echo sglang_ext/demo/target)
    python3 tests/gpu/check_top_p.py --target "${TARGET:-$demo}" --dflare "$(dirname "$demo")/dflare" \
      --dflash "$(dirname "$demo")/dflash" 2>&1 | tee "$OUT/top_p_stdout.txt" | tail -30 ;;
  block_logits)
    demo=$(python3 -m sglang_ext.cli demo-path target 2>/dev/null || echo sglang_ext/demo/target)
    python3 tests/gpu/check_block_logits.py --target "${TARGET:-$demo}" --dflare "$(dirname "$demo")/dflare" \
      2>&1 | tee "$OUT/block_logits_stdout.txt" | tail -30 ;;
  bench)
    python3 tests/gpu/bench_sglang_sim.py "$@" 2>&1 | tee "$OUT/bench_stdout.txt" | tail -60 ;;
  load)
    python3 tests/gpu/bench_sglang_load.py "$@" 2>&1 | tee "$OUT/load_stdout.txt" | tail -80 ;;
  adaptive)
    python3 tests/gpu/check_adaptive.py "$@" 2>&1 | tee "$OUT/adaptive_stdout.txt" | tail -60 ;;
  argmax)
    python3 tests/gpu/check_strided_argmax.py "$@" 2>&1 | tee "$OUT/argmax_stdout.txt" | tail -20 ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
