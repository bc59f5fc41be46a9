"""Contract test of the SOK backend: same parity checks as the sharded one (tests/dist/parity.py).

Runs wherever ``sparse_operation_kit`` (merlin-sok 2.x) is importable and TensorFlow sees a GPU: on 1 GPU, and
on every visible GPU through horovodrun when there are more. Skipped otherwise (a CPU-only machine cannot run
SOK's CUDA kernels); scripts/gpu_check.sh runs the same script on GPU machines (NGC Merlin TF container).
On GPU, atomics reorder floating-point sums, so the tolerance is 1e-4 rather than the sharded backend's 1e-5.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.dist import common


def _gpus() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


SOK_MISSING = importlib.util.find_spec("sparse_operation_kit") is None
pytestmark = pytest.mark.skipif(
    SOK_MISSING or _gpus() == 0,
    reason="SOK backend needs merlin-sok (sparse_operation_kit) and a GPU; this machine has "
           + ("no sparse_operation_kit" if SOK_MISSING else "no GPU")
           + ": run scripts/gpu_check.sh on a GPU machine instead")


@pytest.mark.parametrize("ranks", [1, 2])
def test_sok_matches_replicated(tmp_path: Path, ranks: int) -> None:
    if ranks > _gpus():
        pytest.skip(f"{ranks} ranks need {ranks} GPUs, {_gpus()} visible")
    if ranks > 1 and not common.horovodrun():
        pytest.fail("horovodrun not found: multi-GPU SOK parity needs Horovod")
    data = common.make_dataset(tmp_path / "data")
    out = tmp_path / "parity.json"
    env_gpus = {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(ranks))}
    result = common.launch(ranks, ["tests/dist/parity.py", "--data", str(data), "--out", str(out),
                                   "--backend", "sok", "--atol", "1e-4"], timeout=600, extra_env=env_gpus)
    common.check(result)
    report = json.loads(out.read_text())
    assert report["failures"] == [] and report["combiners"]["sum"]["backend"] == "sok"
