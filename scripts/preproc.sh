#!/usr/bin/env bash
# Preprocess the Outbrain Click Prediction CSVs into parquet parts + feature_spec.yaml.
# Usage: scripts/preproc.sh INPUT_DIR OUTPUT_DIR [--seed N] [--min-parts N] [--rows-per-part N]
#                           [--chunk-rows N] [--device auto|cpu|gpu] [--overwrite] [--quiet]
#                           [--raw-ids [--uuid] [--raw-capacity N|FEATURE=N,...]]
# INPUT_DIR holds clicks_train.csv and events.csv (required) and promoted_content.csv, documents_meta.csv,
# documents_topics.csv, documents_entities.csv, documents_categories.csv (optional; a missing one gives one
# warning and fill values). Uses the repository's .venv/bin/python when present, else python3.
set -euo pipefail
if [[ $# -lt 2 || "$1" == -* ]]; then
  echo "usage: $0 INPUT_DIR OUTPUT_DIR [extra args for python -m wd_sok.outbrain]" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m wd_sok.outbrain "$@"
