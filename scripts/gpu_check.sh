#!/usr/bin/env bash
# GPU check of the SOK embedding backend, for a machine with TensorFlow + merlin-sok 2.x + Horovod (this repo's
# Docker image: `docker run --gpus all --entrypoint bash wd-sok:gpu scripts/gpu_check.sh`). Not for CPU hosts.
#
# Usage: scripts/gpu_check.sh [NGPUS] [--keep]
#   NGPUS   how many GPUs to use (default: all that nvidia-smi lists)
#   --keep  keep the work folder (datasets, checkpoints, logs) instead of deleting it
#
# Checks (the tiny data is tests/dist/common.py's: 6 train / 3 uneven test files, no shard split even):
#   1. parity: tests/dist/parity.py --backend sok vs the replicated oracle through the real train step
#      (forward, whole tables + slots, dense weights after 1 and 10 steps; atol 1e-4), on 1 and NGPUS GPUs.
#   2. evaluate with uneven test shards: tests/dist/eval_padding.py with sok on min(NGPUS, 3) GPUs (every step
#      feeds exactly the local eval batch, equal step counts, benchmark_eval finishes, metrics equal a 1-process
#      run that pads nothing; atol 1e-4).
#   3. checkpoints across devices: train on CPU (sharded backend, --cpu, 2 processes), evaluate that checkpoint
#      with sok on min(NGPUS, 3) GPUs; and the reverse (train with sok, evaluate on CPU). Metrics must equal
#      the training run's final evaluation (atol 1e-4).
#   4. dynamic tables (sok.DynamicVariable, tests/dist/dynamic_ckpt.py --rules sok --sok real: capacity 256,
#      LRU, min_count 1): train + save on D = min(NGPUS, 2) GPUs (with an evaluation lookup of never-trained
#      ids), restore on 3 - D GPUs (another count when NGPUS >= 2) and on CPU (sharded, 2 processes); every rank
#      checks its keys, values and slots against the files, and the export serves the saved rows and zeros for
#      the never-trained ids.
#   5. throughput: main.py --benchmark with sok at global batch BENCH_BATCH (default 131072, the reference's)
#      on each GPU count in GPU_COUNTS (default: every n in 1..NGPUS that divides BENCH_BATCH), on
#      Outbrain-shaped synthetic data (data/outbrain_feature_spec.yaml, 5x1024 MLP).
# The last lines are one markdown table (environment, one row per check) to paste into a bug report, then the
# verdict; exit code 0 only if every check passed.
# Environment: PYTHON (default python3, or .venv/bin/python if present), HOROVODRUN (default horovodrun),
#   BENCH_BATCH, BENCH_STEPS (timed steps, default 100), GPU_COUNTS ("1 2 4 8"), STEP_TIMEOUT (s, default 900),
#   GPU_CHECK_BACKEND (default sok; "sharded" with a stub nvidia-smi on PATH dry-runs the script on CPU).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
HVD="${HOROVODRUN:-horovodrun}"
BACKEND="${GPU_CHECK_BACKEND:-sok}"
BENCH_BATCH="${BENCH_BATCH:-131072}"
BENCH_STEPS="${BENCH_STEPS:-100}"
STEP_TIMEOUT="${STEP_TIMEOUT:-900}"
KEEP=0
NGPUS=""
for arg in "$@"; do
  case "$arg" in
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
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
"$PY" -c "import horovod.tensorflow" >/dev/null 2>&1 || fail "python cannot import horovod.tensorflow"
command -v "$HVD" >/dev/null || fail "$HVD not found"
SOK_OK="$("$PY" -c "from wd_sok.embedding.sok import supported_sok; print(supported_sok() or '')" 2>/dev/null \
  | tail -n 1)"
[[ -n "$SOK_OK" || "$BACKEND" != sok ]] || fail "no supported SOK: $("$PY" -c "import sparse_operation_kit as s; from wd_sok.embedding.sok import check_sok; check_sok(s)" 2>&1 | tail -n 1)"
SMALL=$(( NGPUS < 3 ? NGPUS : 3 ))  # the tiny data has 3 test files: at most 3 ranks
echo "gpu_check: $NGPUS of $AVAILABLE GPU(s), python $PY, SOK ${SOK_OK:-none}, backend $BACKEND"

WORK="$(mktemp -d -t wd_sok_gpu_check.XXXXXX)"
if [[ "$KEEP" -eq 0 ]]; then trap 'rm -rf "$WORK"' EXIT; else echo "gpu_check: work folder $WORK"; fi
STATUS=0
ROWS=()

gpus_list() { seq -s, 0 $(( $1 - 1 )); }

launch() {  # launch NP LOGFILE ARGS... : python ARGS on NP GPUs (horovodrun when NP > 1)
  local np="$1" log="$2"; shift 2
  if [[ "$np" -gt 1 ]]; then
    CUDA_VISIBLE_DEVICES="$(gpus_list "$np")" timeout "$STEP_TIMEOUT" \
      "$HVD" -np "$np" -H "localhost:$np" "$PY" "$@" >"$log" 2>&1
  else
    CUDA_VISIBLE_DEVICES=0 timeout "$STEP_TIMEOUT" "$PY" "$@" >"$log" 2>&1
  fi
}

launch_cpu() {  # launch_cpu NP LOGFILE ARGS... : the same on CPU processes (no GPU visible)
  local np="$1" log="$2"; shift 2
  CUDA_VISIBLE_DEVICES="" timeout "$STEP_TIMEOUT" "$HVD" -np "$np" -H "localhost:$np" "$PY" "$@" >"$log" 2>&1
}

record() {  # record CHECK GPUS RC LOGFILE DETAIL
  local check="$1" gpus="$2" rc="$3" log="$4" detail="$5"
  if [[ "$rc" -eq 0 ]]; then
    ROWS+=("| $check | $gpus | PASS | ${detail//|//} |")
  else
    ROWS+=("| $check | $gpus | FAIL | exit $rc: $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-160 | tr '|' '/') |")
    STATUS=1
    echo "---- $check ($gpus GPU(s)) failed, last lines of $log:"; tail -n 30 "$log"
  fi
}

same_metrics() {  # same_metrics RESULTS_A RESULTS_B : compare the final metrics of two runs (atol 1e-4)
  "$PY" - "$1" "$2" <<'PY'
import sys
from pathlib import Path

from tests.dist.common import final_metrics

a, b = (final_metrics(Path(p)) for p in sys.argv[1:3])
keys = ("loss_val", "auc_roc", "streaming_map_val")
diff = {k: abs(a[k] - b[k]) for k in keys}
print(", ".join(f"{k} {b[k]:.6f} (diff {diff[k]:.1e})" for k in keys))
sys.exit(0 if max(diff.values()) <= 1e-4 else 1)
PY
}

"$PY" -c "from pathlib import Path; from tests.dist.common import make_dataset; make_dataset(Path('$WORK/tiny'))" \
  || fail "could not write the tiny dataset"
TINY=(--dataset_path "$WORK/tiny" --num_epochs 1 --global_batch_size 48 --eval_batch_size 48
      --deep_hidden_units 16 16 --deep_dropout 0 --deep_learning_rate 0.01 --deep_warmup_epochs 0
      --linear_learning_rate 0.1 --log_every 1000)

# ---- 1. parity against the replicated oracle
PARITY_RANKS=(1)
[[ "$NGPUS" -gt 1 ]] && PARITY_RANKS+=("$NGPUS")
for np in "${PARITY_RANKS[@]}"; do
  log="$WORK/parity_$np.log"
  launch "$np" "$log" tests/dist/parity.py --data "$WORK/tiny" --out "$WORK/parity_$np.json" \
    --backend "$BACKEND" --atol 1e-4
  rc=$?
  record "$BACKEND parity vs replicated (train step, tables, slots)" "$np" "$rc" "$log" \
    "$(grep -ho 'PARITY [A-Z]*' "$log" | head -n 1)"
done

# ---- 2. evaluation with uneven test shards (padding + masking)
log="$WORK/eval_ref.log"
launch 1 "$log" tests/dist/eval_padding.py --data "$WORK/tiny" --out "$WORK/eval_ref" --backend replicated \
  --eval_batch_size 6
rc=$?
if [[ "$rc" -eq 0 ]]; then
  log="$WORK/eval_sok.log"
  launch "$SMALL" "$log" tests/dist/eval_padding.py --data "$WORK/tiny" --out "$WORK/eval_sok" --backend "$BACKEND" \
    --eval_batch_size 48 --bench_steps 20 --reference "$WORK/eval_ref" --atol 1e-4
  rc=$?
fi
record "evaluate + benchmark_eval, uneven test shards" "$SMALL" "$rc" "$log" \
  "$(grep -ho 'EVAL PADDING [A-Z]*' "$log" | head -n 1)"

# ---- 3. checkpoints: CPU (sharded) -> SOK, and SOK -> CPU (sharded)
log="$WORK/ckpt_cpu_train.log"
launch_cpu 2 "$log" main.py "${TINY[@]}" --embedding_backend sharded --cpu --model_dir "$WORK/ck_cpu" \
  --results_dir "$WORK/res_cpu_train"
rc=$?
if [[ "$rc" -eq 0 ]]; then
  log="$WORK/ckpt_cpu_to_sok.log"
  launch "$SMALL" "$log" main.py "${TINY[@]}" --embedding_backend "$BACKEND" --model_dir "$WORK/ck_cpu" \
    --results_dir "$WORK/res_cpu_to_sok" --evaluate --use_checkpoint \
    && same_metrics "$WORK/res_cpu_train" "$WORK/res_cpu_to_sok" >>"$log" 2>&1
  rc=$?
fi
record "restore CPU sharded (2 procs) checkpoint into $BACKEND" "$SMALL" "$rc" "$log" "$(tail -n 1 "$log")"

log="$WORK/ckpt_sok_train.log"
launch "$SMALL" "$log" main.py "${TINY[@]}" --embedding_backend "$BACKEND" --model_dir "$WORK/ck_sok" \
  --results_dir "$WORK/res_sok_train"
rc=$?
if [[ "$rc" -eq 0 ]]; then
  log="$WORK/ckpt_sok_to_cpu.log"
  launch_cpu 2 "$log" main.py "${TINY[@]}" --embedding_backend sharded --cpu --model_dir "$WORK/ck_sok" \
    --results_dir "$WORK/res_sok_to_cpu" --evaluate --use_checkpoint \
    && same_metrics "$WORK/res_sok_train" "$WORK/res_sok_to_cpu" >>"$log" 2>&1
  rc=$?
fi
record "restore $BACKEND checkpoint on CPU sharded (2 procs)" "$SMALL" "$rc" "$log" "$(tail -n 1 "$log")"

# ---- 4. dynamic tables: SOK on D GPUs -> SOK on another count, and -> CPU sharded; export
DYN=$(( NGPUS < 2 ? NGPUS : 2 ))
DYN_OTHER=$(( NGPUS < 2 ? 1 : 3 - DYN ))
DYN_ARGS=(tests/dist/dynamic_ckpt.py --rules sok --sok real)
log="$WORK/dynamic_save.log"
launch "$DYN" "$log" "${DYN_ARGS[@]}" --mode save --backend "$BACKEND" --model_dir "$WORK/ck_dyn" \
  --out "$WORK/dynamic_save.json"
rc=$?
record "dynamic tables: train + save ($BACKEND)" "$DYN" "$rc" "$log" "keys, values, slots saved"
if [[ "$rc" -eq 0 ]]; then
  log="$WORK/dynamic_restore_gpu.log"
  launch "$DYN_OTHER" "$log" "${DYN_ARGS[@]}" --mode restore --backend "$BACKEND" --model_dir "$WORK/ck_dyn" \
    --out "$WORK/dynamic_restore_gpu.json"
  record "dynamic tables: restore on $DYN_OTHER GPU(s) + export" "$DYN_OTHER" "$?" "$log" \
    "every key, value and slot as saved; export serves them, zeros for never-trained ids"
  log="$WORK/dynamic_restore_cpu.log"
  launch_cpu 2 "$log" "${DYN_ARGS[@]}" --mode restore --backend sharded --model_dir "$WORK/ck_dyn" \
    --out "$WORK/dynamic_restore_cpu.json"
  record "dynamic tables: restore on CPU sharded (2 procs) + export" "0" "$?" "$log" \
    "every key, value and slot as saved; export serves them, zeros for never-trained ids"
fi

# ---- 5. throughput at the reference's global batch
if [[ -z "${GPU_COUNTS:-}" ]]; then
  GPU_COUNTS=""
  for (( n = 1; n <= NGPUS; n++ )); do
    (( BENCH_BATCH % n == 0 )) && GPU_COUNTS+="$n "
  done
fi
FILES=$(( NGPUS > 8 ? NGPUS : 8 ))
BENCH="$WORK/outbrain_synthetic"
if "$PY" -m wd_sok.tools.generate --feature_spec_in data/outbrain_feature_spec.yaml --output "$BENCH" \
     --train_rows $(( BENCH_BATCH * 4 )) --test_rows 65536 --train_files "$FILES" --test_files "$FILES" \
     >"$WORK/generate.log" 2>&1; then
  base=""
  for np in $GPU_COUNTS; do
    log="$WORK/bench_$np.log"
    launch "$np" "$log" main.py --dataset_path "$BENCH" --embedding_backend "$BACKEND" --benchmark \
      --benchmark_warmup_steps 20 --benchmark_steps "$BENCH_STEPS" --global_batch_size "$BENCH_BATCH" \
      --eval_batch_size "$BENCH_BATCH" --model_dir "$WORK/bench_ckpt_$np" --results_dir "$WORK/bench_results_$np"
    rc=$?
    rate="$(grep -ho 'train_throughput [0-9,]* samples/s' "$log" | tail -n 1 | tr -dc '0-9')"
    [[ "$rc" -eq 0 && -z "$rate" ]] && rc=3  # finished without reporting a throughput
    detail=""
    if [[ -n "$rate" ]]; then
      [[ -z "$base" ]] && base=$(( rate / np ))
      detail="$(printf "%'d samples/s, %'d per GPU (%s of the first count's per-GPU rate)" "$rate" \
        $(( rate / np )) "$(awk -v r="$rate" -v n="$np" -v b="$base" 'BEGIN { printf "%.2f", r / n / b }')")"
    fi
    record "train throughput, global batch $BENCH_BATCH, $BENCH_STEPS steps" "$np" "$rc" "$log" "$detail"
  done
else
  record "generate benchmark data" "-" 1 "$WORK/generate.log" ""
fi

# ---- the table
VERSIONS="$("$PY" - 2>/dev/null <<'PY' | tail -n 1
import platform

import horovod
import tensorflow as tf

try:
    import sparse_operation_kit as sok

    sok_version = sok.__version__
except Exception:  # noqa: BLE001 - a dry run without SOK
    sok_version = "not importable"
info = tf.sysconfig.get_build_info()
print(f"python {platform.python_version()}, tensorflow {tf.__version__}, sok {sok_version}, "
      f"horovod {horovod.__version__}, cuda {info.get('cuda_version', '?')}, cudnn {info.get('cudnn_version', '?')}")
PY
)"
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')"
GPU_NAMES="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | sort | uniq -c \
  | sed 's/^ *//' | paste -sd ';' -)"
echo
echo "==== wd-sok GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'))"
echo "| check | GPUs | result | detail |"
echo "| --- | --- | --- | --- |"
echo "| environment | $NGPUS of $AVAILABLE | - | ${GPU_NAMES//|//}; ${VERSIONS:-versions unknown}; wd-sok $COMMIT |"
for row in "${ROWS[@]}"; do echo "$row"; done
if [[ "$STATUS" -eq 0 ]]; then echo "GPU CHECK PASS"; else echo "GPU CHECK FAIL"; fi
exit "$STATUS"
