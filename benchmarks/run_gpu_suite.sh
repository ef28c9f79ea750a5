#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go: the GPU tests, then the benchmarks, logs under $OUT (or ./out).
#   bash benchmarks/run_gpu_suite.sh [tests|tests-fwd|tests-bwd|decode|generate|backward|model|forward|recall|all]...
#   (default: all)
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
    # the whole GPU suite takes about 9 minutes on one H100 (the backward file alone 222 s): near the 10-minute
    # limit of one device command, so it also runs as two halves
    tests-fwd) python3 -m pytest -q -m gpu -p no:cacheprovider tests --ignore tests/test_parallel_bwd.py 2>&1 | tee "$OUT/gpu_tests_fwd.log" ;;
    tests-bwd) python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_parallel_bwd.py --durations=5 2>&1 | tee "$OUT/gpu_tests_bwd.log" ;;
    decode|all) python3 benchmarks/bench_decode.py 2>&1 | tee "$OUT/bench_decode.log" ;;&
    generate|all) python3 benchmarks/bench_generate.py 2>&1 | tee "$OUT/bench_generate.log" ;;&
    backward|all) [ -f benchmarks/bench_backward.py ] && python3 benchmarks/bench_backward.py 2>&1 | tee "$OUT/bench_backward.log" ;;&
    model) python3 benchmarks/bench_backward.py --model-step 2>&1 | tee "$OUT/bench_model_step.log" ;;
    recall) # the associative-recall study of issue 8 in one call: stage 1 (~1 minute on an H200) + 2 seeds x 4
      # variants of stage 2 (~2 minutes); more seeds and the ablations: experiments/README.md
      timeout 570 python3 -m experiments.recall --preset gpu --out "$OUT/recall" --stage1-minutes 5 2>&1 | tee "$OUT/recall.log" ;;
    forward) python3 benchmarks/bench_forward.py --out "$OUT" 2>&1 | tee "$OUT/bench_forward.log" ;;
  esac
done
