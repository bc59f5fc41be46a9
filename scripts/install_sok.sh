#!/usr/bin/env bash
# Replace the Merlin TensorFlow 23.08 container's legacy SOK 1.2 with merlin-sok 2.x, built against the
# container's own TensorFlow, CUDA, NCCL, MPI and Horovod. Run by the Dockerfile (no GPU needed to build).
#
# Why: merlin-tensorflow:23.08 ships SOK 1.2.0, whose top level has no sok.init / sok.Variable /
# sok.lookup_sparse / sok.filter_variables (that API sits under sparse_operation_kit.experiment there); the
# top-level 2.x API ships from HugeCTR 23.12 (SOK 2.0.0); merlin-sok 2.1.0 is HugeCTR 24.06. No later Merlin
# TensorFlow release is pinned by the Merlin repository's support matrix, so the image builds SOK itself.
#
# Which source: HugeCTR tag v25.03.00 (the Dockerfile passes it). Its SOK still says 2.1.0, like the PyPI
# merlin-sok 2.1.0 (HugeCTR 24.06), but its lookup_sparse has use_low_frequency_filter, which wd-sok's dynamic
# tables need to look up without inserting (README, "What SOK features are used"); PyPI's sdist lacks it. The
# tag is built as SOK's own setup.py expects: from sparse_operation_kit/ inside a HugeCTR checkout with the
# json and HierarchicalKV submodules (setup.py copies ../HugeCTR, ../gpu_cache and those two into place).
#
# Both SOK versions name their kernels libsparse_operation_kit.so and SOK 2.x looks for it on every sys.path
# entry, so the legacy package must be gone completely, or 2.x could load 1.2's library.
# Usage: scripts/install_sok.sh [VERSION] [HUGECTR_TAG]   (default 2.1.0 from PyPI; with a tag, from that tag)
set -euo pipefail
VERSION="${1:-2.1.0}"
TAG="${2:-}"
PY="${PYTHON:-python}"

# 1. remove every legacy copy (an egg from `setup.py install`, a dist-info, or a bare package folder)
for _ in 1 2 3; do
  "$PY" -m pip uninstall -y merlin-sok sparse_operation_kit >/dev/null 2>&1 || true
done
while legacy="$("$PY" -c 'import importlib.util as u; s = u.find_spec("sparse_operation_kit"); print(s.submodule_search_locations[0] if s else "")')" && [[ -n "$legacy" ]]; do
  echo "[install_sok] removing leftover $legacy"
  rm -rf "$legacy"
done

# 2. build merlin-sok against the container's TensorFlow (no build isolation, no dependency changes)
export SOK_COMPILE_UNIT_TEST=OFF  # the Merlin image sets ON for its own CI
"$PY" -m pip install --no-cache-dir "scikit-build==0.17.6" "ninja==1.11.1.1"
if [[ -n "$TAG" ]]; then
  src="$(mktemp -d)/HugeCTR"
  git clone --quiet --depth 1 --branch "$TAG" https://github.com/NVIDIA-Merlin/HugeCTR.git "$src"
  git -C "$src" submodule update --quiet --init --depth 1 third_party/json third_party/HierarchicalKV
  (cd "$src/sparse_operation_kit" && "$PY" -m pip install --no-cache-dir --no-build-isolation --no-deps .)
  rm -rf "$(dirname "$src")"
else
  "$PY" -m pip install --no-cache-dir --no-build-isolation --no-deps "merlin-sok==$VERSION"
fi

# 3. check what was installed without importing it (importing loads CUDA, absent while building)
"$PY" - "$VERSION" <<'PY'
import importlib.metadata, importlib.util, pathlib, re, sys

want = sys.argv[1]
spec = importlib.util.find_spec("sparse_operation_kit")
assert spec is not None, "sparse_operation_kit is not importable after installing merlin-sok"
pkg = pathlib.Path(spec.submodule_search_locations[0])
text = (pkg / "_version.py").read_text()  # SOK 2.x keeps it here (1.x: core/_version.py)
found = ".".join(re.search(rf"_{part} = (\d+)", text).group(1) for part in ("Major", "Minor", "Patch"))
assert found == want == importlib.metadata.version("merlin-sok"), (found, want)
libs = sorted(p.name for p in pkg.rglob("*.so"))
assert "libsparse_operation_kit.so" in libs, f"no SOK kernels under {pkg}: {libs}"
print(f"[install_sok] merlin-sok {found} at {pkg} ({', '.join(libs)})")
PY
