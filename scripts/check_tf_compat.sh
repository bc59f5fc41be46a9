#!/usr/bin/env bash
# Run the single-process test suite against the GPU image's TensorFlow version, in a side venv.
#
# The Docker image (Dockerfile: nvcr.io/nvidia/merlin/merlin-tensorflow:23.08) runs TensorFlow 2.12.0 with Keras
# 2.12 and numpy 1.22, not the CPU setup's pinned TensorFlow 2.15.1: code that uses an API newer than the image's
# TensorFlow would pass `make test` here and fail in the container. This script builds a venv with the image's
# versions (tensorflow-cpu, numpy < 1.24 as TF 2.12 requires) and the project's other pinned dependencies,
# WITHOUT Horovod, and runs every test that needs no horovodrun.
#
# Usage: scripts/check_tf_compat.sh [-- PYTEST_ARGS...]
# Environment: TF_VERSION (default 2.12.0), NUMPY_VERSION (default 1.23.5: the newest with Python 3.11 wheels
#   that TF 2.12 accepts), PYTHON (default python3.11), VENV (default .gl/tf-compat-$TF_VERSION, gitignored).
# Output: pytest's summary; exit code = pytest's. The venv is kept for reruns (delete it to rebuild).
set -euo pipefail
cd "$(dirname "$0")/.."
TF_VERSION=${TF_VERSION:-2.12.0}
NUMPY_VERSION=${NUMPY_VERSION:-1.23.5}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.gl/tf-compat-$TF_VERSION}
if [[ "${1:-}" == "--" ]]; then shift; fi

if [[ ! -f "$VENV/.ready" ]]; then
  echo "[tf-compat] building $VENV: tensorflow-cpu==$TF_VERSION numpy==$NUMPY_VERSION + requirements.txt (no Horovod)"
  "$PY" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  "${PIP[@]}" install "pip==25.0.1" "setuptools==69.5.1" "wheel==0.43.0"
  reqs="$VENV/requirements.txt"
  # the project's pins except TensorFlow / numpy (replaced) and ruff (not a test dependency)
  grep -vE '^(tensorflow-cpu|numpy|ruff)==' requirements.txt > "$reqs"
  "${PIP[@]}" install "tensorflow-cpu==$TF_VERSION" "numpy==$NUMPY_VERSION" -r "$reqs"
  "${PIP[@]}" install --no-deps -e .
  touch "$VENV/.ready"
fi
"$VENV/bin/python" -c 'import tensorflow as tf, numpy, keras; print("[tf-compat] tensorflow", tf.__version__,
"keras", keras.__version__, "numpy", numpy.__version__)'

# Tests that launch horovodrun cannot run without Horovod: the multi-process file and the multi-rank cases.
# tests/test_export.py's two-rank test skips itself when no horovodrun is found; tests/test_sok_backend.py's
# GPU test skips itself without SOK and a GPU (its CPU tests run).
exec "$VENV/bin/python" -m pytest tests -q -ra -p no:cacheprovider \
  --ignore tests/test_distributed.py \
  --deselect tests/test_bad_input.py::test_fewer_files_than_ranks \
  --deselect tests/test_eval_padding.py::test_sharded_uneven_shards_equal_batches \
  "$@"
