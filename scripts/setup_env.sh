#!/usr/bin/env bash
# Create .venv (Python 3.11) with the pinned CPU stack; idempotent: a complete venv is left as it is.
# TensorFlow goes in first, then Horovod is built from source against it (Gloo, no MPI needed).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.wd_sok_ready"
HASH=$(cat requirements.txt constraints.txt scripts/setup_env.sh | sha256sum | cut -c1-16)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]]; then
  exit 0
fi
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"wd-sok needs Python 3.11, got {sys.version}"'
start=$(date +%s)
echo "[setup] creating $VENV with $PY (TensorFlow + Merlin, then Horovod from source: ~15-25 min the first time)"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q "pip==25.0.1" "setuptools==69.5.1" "wheel==0.43.0"
"${PIP[@]}" install -q -r requirements.txt -c constraints.txt
echo "[setup] building horovod 0.28.1 (TensorFlow + Gloo)"
HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
  HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=gloo MAKEFLAGS="-j$(nproc)" \
  "${PIP[@]}" install -q --no-build-isolation -c constraints.txt "horovod==0.28.1"
"${PIP[@]}" install -q --no-deps -e .
"$VENV/bin/python" -c 'import tensorflow as tf, horovod.tensorflow as hvd, merlin.dataloader, nvtabular; print("[setup] ok: tf", tf.__version__)'
echo "$HASH" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start )) s"
