#!/usr/bin/env bash
# The device runs of a session, one command each (the device tool: `run` with carry
# [".whl", ".data", ".nanogpt"]), every part's full output written to $OUT (the tool returns only
# the last 12,000 characters of the console).
#   bash experiments/bench/device_runs.sh issue16   # shakespeare_char beside nanoGPT, loop ratio
#   bash experiments/bench/device_runs.sh kernels   # gla / rwkv6 / delta_rule kernels, fla rows
#   bash experiments/bench/device_runs.sh memory    # 125M memory table, LM step, attention auto
#   bash experiments/bench/device_runs.sh loop      # loop_bench bisection + traces, memory table
# Set up here first (see the device README): .whl/ holds the wheels the image lacks (grain
# 0.2.18, array-record 0.8.6, ml-collections 1.1.0, portpicker, importlib_resources,
# tensorboardX 2.6.5, fla-core 0.6.0), .data/ tinyshakespeare.txt, .nanogpt/ a nanoGPT checkout
# with data/shakespeare_char/input.txt. All three are in .git/info/exclude.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD SEQMIX_DATA_DIR=$PWD/.data
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - T0) )); }
quiet() { grep -v "^I1\|^W1\|^train:"; }
case "${1:-}" in
  issue16)
    timeout 430 python3 -m experiments.bench.shakespeare_vs_nanogpt --nanogpt_dir=$PWD/.nanogpt \
      --workdir=/tmp/svn --out=$OUT 2>&1 | tee $OUT/svn.log | quiet | tail -30
    cp /tmp/svn/*.log $OUT/ 2>/dev/null
    timeout $(left 585) python3 -m experiments.bench.loop_bench --steps=300 \
      --profile_dir=/tmp/prof 2>&1 | tee $OUT/loop_bench.log | quiet | tail -20 ;;
  loop)
    timeout 260 python3 -m experiments.bench.loop_bench --steps=300 --profile_dir=/tmp/prof 2>&1 \
      | tee $OUT/loop_bench.log | quiet | tail -45
    for v in step loop; do
      f=$(find /tmp/prof/$v -name '*perfetto_trace.json.gz' | head -1)
      [ -n "$f" ] && [ $(stat -c %s "$f") -lt 15000000 ] && cp "$f" $OUT/trace_$v.json.gz
    done
    timeout $(left 585) python3 -m experiments.bench.lm_memory --budget_s=40 \
      --lengths=16384,65536,262144,1048576 2>&1 | tee $OUT/lm_memory.log | quiet | tail -20 ;;
  embed)
    timeout 90 python3 -m experiments.bench.embed_grad 2>&1 | tee $OUT/embed_grad.log | quiet | tail -6
    timeout 250 python3 -m experiments.bench.loop_bench --steps=300 --profile_dir=/tmp/prof 2>&1 \
      | tee $OUT/loop_bench.log | quiet | tail -45
    f=$(find /tmp/prof/step -name '*perfetto_trace.json.gz' | head -1)
    [ -n "$f" ] && [ $(stat -c %s "$f") -lt 15000000 ] && cp "$f" $OUT/trace_step.json.gz
    timeout $(left 585) python3 -m experiments.bench.lm_memory --budget_s=50 --mixers=gla,mamba2 \
      --lengths=65536,131072,262144 --granule=16384 2>&1 | tee $OUT/lm_memory.log | quiet | tail -20 ;;
  kernels)
    SEQMIX_BENCH_BUDGET_S=160 timeout 215 python3 -m experiments.bench.kernels_linear_attention \
      --timing_only 2>&1 | tee $OUT/linear_attention.log | quiet | tail -25
    SEQMIX_BENCH_BUDGET_S=95 timeout 135 python3 -m experiments.bench.kernels_delta_rule 2>&1 \
      | tee $OUT/delta_rule.log | quiet | tail -20
    timeout $(left 560) python3 -m experiments.bench.fla_anchor --timeout 90 \
      --rows simple_gla_gamma,delta_rule 2>&1 | tee $OUT/fla.log | tail -8 ;;
  memory)
    timeout 300 python3 -m experiments.bench.lm_memory --budget_s=45 \
      --lengths=16384,65536,262144,1048576 2>&1 | tee $OUT/lm_memory.log | quiet | tail -20
    timeout 150 python3 -m experiments.bench.attention_auto 2>&1 | tee $OUT/attention_auto.log \
      | quiet | tail -10
    timeout $(left 580) python3 -m experiments.bench.lm_step --mixers=retnet,deltanet \
      --impls=chunked,pallas 2>&1 | tee $OUT/lm_step.log | quiet | tail -8 ;;
  *) echo "usage: $0 issue16 | kernels | memory | loop | embed"; exit 2 ;;
esac
echo "total $(( $(date +%s) - T0 )) s"
