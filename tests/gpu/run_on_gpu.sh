#!/usr/bin/env bash
# On the GPU machine, from the repo root, after the SGLang bundle parts were copied to /tmp/w
# (see docs/sglang_plugin.md "GPU checks"):  bash tests/gpu/run_on_gpu.sh {check|bench} [args]
#   check: tests/gpu/check_sglang_dflare.py on the demo pair   -> $OUT/check.json, fixtures.json, logs.txt
#   top_p: tests/gpu/check_top_p.py, top-p sampling on DFLARE and built-in DFLASH -> $OUT/top_p.json
#   block_logits: tests/gpu/check_block_logits.py, SGLang's DFLARE block logits vs the reference drafter
#   bench: tests/gpu/bench_sglang_sim.py (Qwen3-8B shapes, simulated acceptance) -> $OUT/bench_sim.json
#   load: tests/gpu/bench_sglang_load.py (batch 1-256, acceptance traces) -> $OUT/bench_load.json
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
[ -d /tmp/site/sglang ] || bash .gpu/tools/unpack.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD
if [ ! -f /tmp/site/.dflare_installed ]; then
  # the entry point (sglang.srt.plugins -> dflare) is only seen from an installed distribution
  if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . 2>&1 | tail -3; then
    # no build backend there: declare the distribution by hand (same entry point as pyproject.toml)
    d=/tmp/site/dflare_serve-0.1.0.dist-info; mkdir -p $d
    printf 'Metadata-Version: 2.1\nName: dflare-serve\nVersion: 0.1.0\n' > $d/METADATA
    printf '[sglang.srt.plugins]\ndflare = sglang_ext.sglang_plugin:register\n' > $d/entry_points.txt
    echo "entry point declared by hand; sglang_ext from the checkout"
  fi
  touch /tmp/site/.dflare_installed
fi
python3 -c "import sglang, sglang_ext.sglang_plugin as p; from importlib.metadata import entry_points as e; \
print('sglang', sglang.__version__, [x.value for x in e(group='sglang.srt.plugins')])"
mode=${1:-check}; shift || true
case "$mode" in
  check)
    demo=$(python3 -m sglang_ext.cli demo-path target 2>/dev/null || echo sglang_ext/demo/target)
    python3 tests/gpu/check_sglang_dflare.py --target "${TARGET:-$demo}" \
      --dflare "${DFLARE:-$(dirname "$demo")/dflare}" --dflash "${DFLASH:-$(dirname "$demo")/dflash}" "$@" 2>&1 \
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
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
