#!/usr/bin/env bash
# Create .venv (Python 3.11) with the pinned CPU stack, in two levels; idempotent: a complete level is left as is.
#   scripts/setup_env.sh          one process: TensorFlow + Merlin + the test tools (`make demo`, `make setup`)
#   scripts/setup_env.sh --dist   the above, then Horovod built from source against it, with Gloo (`make test`,
#                                 `make setup-dist`): what `horovodrun -np N` and the multi-process tests need
# Each level has its own stamp holding the hash of requirements.txt + constraints.txt + this script.
set -euo pipefail
cd "$(dirname "$0")/.."
# Seconds measured in a fresh clone with an empty pip cache on 2 idle cores (2026-12-03); on 2 cores shared with
# other work (load average 6-13) the same took 304 s and 1261 s. The README's first section states the same
# numbers (tests/test_first_run.py).
BASE_S=78     # one-process level
DIST_S=186    # the Horovod build on top of it
DIST=0
case "${1:-}" in
  --dist) DIST=1 ;;
  "") ;;
  *) echo "usage: $0 [--dist]" >&2; exit 2 ;;
esac
VENV=${VENV:-.venv}
STAMP="$VENV/.wd_sok_ready"            # one-process level complete
DIST_STAMP="$VENV/.wd_sok_dist_ready"  # Horovod level complete
HASH=$(cat requirements.txt constraints.txt scripts/setup_env.sh | sha256sum | cut -c1-16)
current() { [[ -f "$1" && "$(cat "$1")" == "$HASH" ]]; }
if current "$STAMP" && { [[ $DIST == 0 ]] || current "$DIST_STAMP"; }; then
  exit 0
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
start=$(date +%s)
if ! current "$STAMP"; then
  rm -f "$DIST_STAMP"  # the stack under Horovod may change: its level is redone after this one
  PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
  "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"wd-sok needs Python 3.11, got {sys.version}"'
  echo "[setup] creating $VENV with $PY: TensorFlow + Merlin + test tools, no Horovod" \
       "(${BASE_S} s measured on 2 idle cores, up to 4x longer on a busy machine)"
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  "${PIP[@]}" install -q "pip==25.0.1" "setuptools==69.5.1" "wheel==0.43.0"
  # --no-compile: Python compiles the modules a run imports when it first imports them, instead of pip compiling
  # all 17k files of the stack here (about a minute of one core)
  "${PIP[@]}" install -q --no-compile -r requirements.txt -c constraints.txt
  "${PIP[@]}" install -q --no-deps -e .
  "$VENV/bin/python" -c 'import tensorflow as tf, merlin.dataloader, nvtabular; print("[setup] ok: tf", tf.__version__)'
  echo "$HASH" > "$STAMP"
  echo "[setup] one-process level done in $(( $(date +%s) - start )) s (make demo can start)"
fi
if [[ $DIST == 1 ]] && ! current "$DIST_STAMP"; then
  t=$(date +%s)
  echo "[setup] building horovod 0.28.1 from source (TensorFlow + Gloo; ${DIST_S} s measured on 2 idle cores," \
       "up to 7x longer on a busy machine)"
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
    HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=gloo MAKEFLAGS="-j$(nproc)" \
    "${PIP[@]}" install -q --no-build-isolation -c constraints.txt "horovod==0.28.1"
  "$VENV/bin/python" -c 'import horovod, horovod.tensorflow; print("[setup] ok: horovod", horovod.__version__)'
  [[ -x "$VENV/bin/horovodrun" ]] || { echo "[setup] horovodrun missing from $VENV/bin" >&2; exit 1; }
  echo "$HASH" > "$DIST_STAMP"
  echo "[setup] horovod level done in $(( $(date +%s) - t )) s"
fi
echo "[setup] done in $(( $(date +%s) - start )) s"
