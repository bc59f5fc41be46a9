#!/usr/bin/env bash
# GPU check of the SOK embedding backend, for a machine with TensorFlow + merlin-sok 2.x + Horovod
# (e.g. the NGC Merlin TensorFlow container, or this repo's Dockerfile image). It cannot run on CPU-only hosts.
#
# Usage: scripts/gpu_check.sh [NGPUS] [--keep]
#   NGPUS   how many GPUs to use for the multi-GPU steps (default: all that nvidia-smi lists)
#   --keep  keep the work folder (datasets, logs) instead of deleting it
#
# Steps (each prints PASS/FAIL; the last line is the verdict, exit code 0 only if all passed):
#   1. SOK parity on 1 GPU: tests/dist/parity.py --backend sok compares SOK against the replicated oracle
#      through the real train step: forward and whole tables + optimizer slots after 1 and 10 steps, sum and
#      mean combiners, one-hot and multi-hot, wide dim-1 tables (atol 1e-4: GPU atomics reorder sums).
#   2. the same on NGPUS GPUs with horovodrun (uneven shards: no cardinality divides by 2 or 3), if NGPUS > 1.
#   3. a short `main.py --benchmark` with --embedding_backend sok on the Outbrain-shaped synthetic data
#      (data/outbrain_feature_spec.yaml, 5x1024 MLP) on 1 GPU and on NGPUS GPUs; prints train throughput.
# Environment: PYTHON (default: .venv/bin/python if present, else python3), HOROVODRUN (default: horovodrun),
#   BENCH_BATCH (global batch, default 131072), BENCH_STEPS (timed steps, default 100), STEP_TIMEOUT (s, 900).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
HVD="${HOROVODRUN:-horovodrun}"
BENCH_BATCH="${BENCH_BATCH:-131072}"
BENCH_STEPS="${BENCH_STEPS:-100}"
STEP_TIMEOUT="${STEP_TIMEOUT:-900}"
KEEP=0
NGPUS=""
for arg in "$@"; do
  case "$arg" in
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) NGPUS="$arg" ;;
  esac
done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

fail() { echo "GPU CHECK FAIL: $*"; exit 1; }

# ---- prerequisites
command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: this check needs NVIDIA GPUs"
AVAILABLE="$(nvidia-smi -L | grep -c '^GPU')"
[[ "$AVAILABLE" -ge 1 ]] || fail "no GPU listed by nvidia-smi"
NGPUS="${NGPUS:-$AVAILABLE}"
[[ "$NGPUS" -le "$AVAILABLE" ]] || fail "asked for $NGPUS GPUs, $AVAILABLE available"
"$PY" -c "import sparse_operation_kit" >/dev/null 2>&1 || fail "python cannot import sparse_operation_kit (pip install merlin-sok)"
"$PY" -c "import horovod.tensorflow" >/dev/null 2>&1 || fail "python cannot import horovod.tensorflow"
if [[ "$NGPUS" -gt 1 ]]; then command -v "$HVD" >/dev/null || fail "$HVD not found (needed for $NGPUS GPUs)"; fi
echo "gpu_check: $NGPUS of $AVAILABLE GPU(s), python $PY"

WORK="$(mktemp -d -t wd_sok_gpu_check.XXXXXX)"
if [[ "$KEEP" -eq 0 ]]; then trap 'rm -rf "$WORK"' EXIT; else echo "gpu_check: work folder $WORK"; fi
STATUS=0
RESULTS=()

gpus_list() { seq -s, 0 $(( $1 - 1 )); }

launch() {  # launch NP LOGFILE ARGS... : run python ARGS on NP GPUs (horovodrun when NP > 1)
  local np="$1" log="$2"; shift 2
  if [[ "$np" -gt 1 ]]; then
    CUDA_VISIBLE_DEVICES="$(gpus_list "$np")" timeout "$STEP_TIMEOUT" \
      "$HVD" -np "$np" -H "localhost:$np" "$PY" "$@" >"$log" 2>&1
  else
    CUDA_VISIBLE_DEVICES=0 timeout "$STEP_TIMEOUT" "$PY" "$@" >"$log" 2>&1
  fi
}

record() {  # record NAME RC LOGFILE DETAIL
  if [[ "$2" -eq 0 ]]; then
    RESULTS+=("PASS  $1  $4")
  else
    RESULTS+=("FAIL  $1  (exit $2; log tail below)")
    STATUS=1
    echo "---- $1 failed, last lines of $3:"; tail -n 30 "$3"
  fi
}

# ---- 1-2: parity against the replicated oracle
"$PY" -c "from pathlib import Path; from tests.dist.common import make_dataset; make_dataset(Path('$WORK/tiny'))" \
  || fail "could not write the parity dataset"
PARITY_RANKS=(1)
[[ "$NGPUS" -gt 1 ]] && PARITY_RANKS+=("$NGPUS")
for np in "${PARITY_RANKS[@]}"; do
  log="$WORK/parity_$np.log"
  launch "$np" "$log" tests/dist/parity.py --data "$WORK/tiny" --out "$WORK/parity_$np.json" \
    --backend sok --atol 1e-4
  rc=$?
  record "sok parity, $np GPU(s)" "$rc" "$log" "$(grep -ho 'PARITY [A-Z]* ([^)]*)' "$log" | head -n 1)"
done

# ---- 3: short benchmark with the sok backend (Outbrain-shaped synthetic data)
BENCH="$WORK/outbrain_synthetic"
if "$PY" -m wd_sok.tools.generate --feature_spec_in data/outbrain_feature_spec.yaml --output "$BENCH" \
     --train_rows $(( BENCH_BATCH * 4 )) --test_rows 65536 --train_files 8 --test_files 8 \
     >"$WORK/generate.log" 2>&1; then
  BENCH_RANKS=(1)
  [[ "$NGPUS" -gt 1 ]] && BENCH_RANKS+=("$NGPUS")
  for np in "${BENCH_RANKS[@]}"; do
    log="$WORK/bench_$np.log"
    launch "$np" "$log" main.py --dataset_path "$BENCH" --embedding_backend sok --benchmark \
      --benchmark_warmup_steps 20 --benchmark_steps "$BENCH_STEPS" --global_batch_size "$BENCH_BATCH" \
      --eval_batch_size "$BENCH_BATCH" --model_dir "$WORK/bench_ckpt_$np" --results_dir "$WORK/bench_results_$np"
    rc=$?
    rate="$(grep -ho 'train_throughput [0-9,]* samples/s' "$log" | tail -n 1)"
    [[ "$rc" -eq 0 && -z "$rate" ]] && rc=3  # finished without reporting a throughput
    record "sok benchmark, $np GPU(s), global batch $BENCH_BATCH" "$rc" "$log" "${rate:-}"
  done
else
  record "generate benchmark data" 1 "$WORK/generate.log" ""
fi

echo "==== wd-sok GPU check"
for line in "${RESULTS[@]}"; do echo "$line"; done
if [[ "$STATUS" -eq 0 ]]; then echo "GPU CHECK PASS"; else echo "GPU CHECK FAIL"; fi
exit "$STATUS"
