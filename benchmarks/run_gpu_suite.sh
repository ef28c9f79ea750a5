#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go: the GPU tests, then the benchmarks, logs under $OUT (or ./out).
#   bash benchmarks/run_gpu_suite.sh [tests|tests-fwd|tests-bwd|decode|decode-tune|generate|backward|model|forward|union|union-sweep|union-bwd|linear|recall|all]...
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
    # the decode GPU tests (kernels, CUDA-graph greedy loop), then the launch-setting sweep and the table with the
    # fastest settings (issue 6)
    decode-tune)
      python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_decode.py tests/test_models.py 2>&1 | tee "$OUT/gpu_tests_decode.log"
      python3 benchmarks/bench_decode.py --no-flex --sweep 131072x1 131072x8 --lengths 32768 131072 --batches 1 8 32 \
        2>&1 | tee "$OUT/bench_decode_tuned.log" ;;
    generate|all) python3 benchmarks/bench_generate.py 2>&1 | tee "$OUT/bench_generate.log" ;;&
    backward|all) [ -f benchmarks/bench_backward.py ] && python3 benchmarks/bench_backward.py 2>&1 | tee "$OUT/bench_backward.log" ;;&
    model) python3 benchmarks/bench_backward.py --model-step 2>&1 | tee "$OUT/bench_model_step.log" ;;
    recall) # the whole associative-recall study of issue 8 in one call (~8 minutes on an H200): stage 1 (~1.5 min),
      # then four stage-2 processes side by side on the one GPU (seeds 0-3 of the main variants, seeds 0-1 of six
      # ablations, 556 steps each), the pooled table (--merge) and the no-training table (--stage convert).
      # stage1.pt (27 MB) and the stage-2 logs stay in /tmp/recall; the tables, plot and logs land in $OUT/recall
      # (RECALL_PRESET / RECALL_STEPS override the preset and the stage-2 steps, e.g. tiny / 6 for a CPU dry run;
      # RECALL_INIT=path/stage1.pt continues that stage-1 model, e.g. the gpu preset's 4k model grown to 16k by
      # gpu-16k's curriculum; RECALL_STAGE1_MIN caps stage 1's minutes (default 3); RECALL_ABLATE=0 runs only the
      # four main variants, seeds 0-3 in four processes)
      P=${RECALL_PRESET:-gpu}; N=${RECALL_STEPS:-556}; M=${RECALL_STAGE1_MIN:-3}
      R="python3 -m experiments.recall --preset $P"; D=/tmp/recall-$P
      mkdir -p "$OUT/recall" $D/main
      [ -n "${RECALL_INIT:-}" ] && cp "$RECALL_INIT" $D/main/stage1.pt
      timeout $(( ${M%.*} * 60 + 80 )) $R --out $D/main --stage 1 --stage1-minutes $M 2>&1 | tee "$OUT/recall/stage1.log"
      # the stage-1 model comes back in 15 MB parts (RECALL_INIT for a later call: cat the parts)
      [ "${RECALL_SAVE_STAGE1:-0}" = 1 ] && split -b 15M $D/main/stage1.pt "$OUT/recall/stage1.pt.part-"
      if [ "${RECALL_ABLATE:-1}" = 0 ]; then parts="main s1 s2 s3"; else parts="main s23 ablA ablB"; fi
      for d in $parts; do [ $d = main ] || { mkdir -p $D/$d; cp $D/main/stage1.pt $D/$d/; }; done
      if [ "${RECALL_ABLATE:-1}" = 0 ]; then
        for s in 0 1 2 3; do d=main; [ $s = 0 ] || d=s$s
          $R --out $D/$d --stage 2 --seeds $s --stage2-steps $N > $D/$d.log 2>&1 & done
      else
        $R --out $D/main --stage 2 --seeds 0 1 --stage2-steps $N > $D/main.log 2>&1 &
        $R --out $D/s23 --stage 2 --seeds 2 3 --stage2-steps $N > $D/s23.log 2>&1 &
        $R --out $D/ablA --stage 2 --seeds 0 1 --stage2-steps $N \
          --variants spla_merge_lr30 spla_rattention spla_elu1 spla_relu2 > $D/ablA.log 2>&1 &
        $R --out $D/ablB --stage 2 --seeds 0 1 --stage2-steps $N \
          --variants spla_block_half spla_block_double spla_topk_half spla_topk_double > $D/ablB.log 2>&1 &
      fi
      wait; tail -n 4 $D/*.log
      $R --merge $(for d in $parts; do ls $D/$d/results.json 2>/dev/null; done) --out "$OUT/recall"
      $R --out $D/main --stage convert 2>&1 | tee "$OUT/recall/convert.log" ;;
    # the global linear attention's state-pass launch settings (issues 3 and 4), ~2 minutes
    linear) python3 benchmarks/bench_linear.py 2>&1 | tee "$OUT/bench_linear.log" ;;
    forward) python3 benchmarks/bench_forward.py --out "$OUT" 2>&1 | tee "$OUT/bench_forward.log" ;;
    # the query-tile union stage (issue 3) at 64k on queries with a real model's locality (--data local): the forward
    # table (union) and the union's launch settings and fallback threshold beside the other sparse paths
    # (union-sweep); about 5 minutes each, one device command each
    union) python3 benchmarks/bench_forward.py --T 65536 --heads 32,8 64,4 --data local --out "$OUT/local" 2>&1 \
        | tee "$OUT/bench_forward_local.log" ;;
    union-sweep) python3 benchmarks/bench_forward.py --sweep-sparse --T 65536 --heads 32,8 64,4 --data local \
        --out "$OUT/local" 2>&1 | tee "$OUT/sweep_sparse_local.log" ;;
    # forward+backward at 64k on the same data, the union path (forward and the backward's query-side pass) beside
    # the token/KV-major default, SDPA, NSA and FlexAttention; about 3 minutes
    union-bwd) python3 benchmarks/bench_backward.py --T 65536 --heads 32,8 64,4 --data local --no-atomic --mem-T \
        --out "$OUT/local" 2>&1 | tee "$OUT/bench_backward_local.log" ;;
  esac
done
