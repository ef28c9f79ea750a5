#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go: the GPU tests, then the benchmarks, logs under $OUT (or ./out).
#   bash benchmarks/run_gpu_suite.sh [tests|decode|generate|backward|model|forward|pending|all]...   (default: all)
# fla (for the NSA baseline) is taken from ./.whl when present (see docs/benchmarks.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 - <<'PY'
import torch; print("#", torch.cuda.get_device_name(), "torch", torch.__version__)
PY
what=${*:-all}
for w in $what; do
  case $w in
    tests|all) python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" ;;&
    decode|all) python3 benchmarks/bench_decode.py 2>&1 | tee "$OUT/bench_decode.log" ;;&
    generate|all) python3 benchmarks/bench_generate.py 2>&1 | tee "$OUT/bench_generate.log" ;;&
    backward|all) [ -f benchmarks/bench_backward.py ] && python3 benchmarks/bench_backward.py 2>&1 | tee "$OUT/bench_backward.log" ;;&
    model) python3 benchmarks/bench_backward.py --model-step 2>&1 | tee "$OUT/bench_model_step.log" ;;
    pending) # what no GPU has run yet: the Flex baselines of the forward/backward grids, 64k for 64/4 heads
      timeout 240 python3 benchmarks/bench_forward.py --T 8192 65536 131072 --heads 32,8 64,4 --out "$OUT" 2>&1 | tee "$OUT/bench_forward_pending.log"
      timeout 240 python3 benchmarks/bench_backward.py --T 65536 --heads 64,4 32,8 --mem-T --no-atomic --budget 200 --out "$OUT" 2>&1 | tee "$OUT/bench_backward_pending.log" ;;
    forward) python3 benchmarks/bench_forward.py --out "$OUT" 2>&1 | tee "$OUT/bench_forward.log" ;;
  esac
done
