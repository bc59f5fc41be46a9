"""The SOK backend: version gate and backend choice (everywhere, with fake modules), GPU parity (GPU only).

CPU part: ``sparse_operation_kit`` is replaced by fake modules in ``sys.modules`` shaped like the real ones
(read from NVIDIA-Merlin/HugeCTR, see wd_sok/embedding/sok.py): legacy SOK 1.2 (merlin-tensorflow:23.08) has
``__version__ = "1.2.0"`` and its 2.x-style API only under ``.experiment``; SOK 2.x has it at top level.

GPU part: the contract test runs wherever ``sparse_operation_kit`` (merlin-sok 2.x) is importable and TensorFlow
sees a GPU: on 1 GPU, and on every visible GPU through horovodrun when there are more. Skipped otherwise (a
CPU-only machine cannot run SOK's CUDA kernels); scripts/gpu_check.sh runs the same script on GPU machines.
On GPU, atomics reorder floating-point sums, so the tolerance is 1e-4 rather than the sharded backend's 1e-5.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from tests.dist import common
from wd_sok.embedding import resolve_backend
from wd_sok.embedding import sok as sok_backend
from wd_sok.embedding.base import Placement, RowMap, initial_rows
from wd_sok.feature_spec import TableConfig

API = ("init", "Variable", "lookup_sparse", "filter_variables")


def fake_sok(version: str, top_level: tuple[str, ...] = API) -> ModuleType:
    """A module shaped like ``sparse_operation_kit`` of the given version with ``top_level`` functions."""
    mod = ModuleType("sparse_operation_kit")
    mod.__version__ = version
    mod.calls = []
    for name in top_level:
        setattr(mod, name, lambda *a, _n=name, **k: mod.calls.append((_n, a, k)))
    if "init" in top_level:  # the real signature (pkg/__init__.py:75 at v23.12.00 and v24.06.00)
        def init(comm_tool: str = "horovod", use_legacy_optimizer: bool = True) -> None:
            mod.calls.append(("init", (), {"comm_tool": comm_tool, "use_legacy_optimizer": use_legacy_optimizer}))
        mod.init = init
    return mod


def legacy_sok() -> ModuleType:
    """SOK 1.2 as in merlin-tensorflow:23.08: Init / DistributedEmbedding at top level, 2.x API in .experiment."""
    mod = fake_sok("1.2.0", ("Init", "DistributedEmbedding", "Saver"))
    mod.experiment = fake_sok("1.2.0")  # has init, Variable, lookup_sparse, filter_variables
    return mod


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - a setter
    def put(module: ModuleType | None) -> None:
        monkeypatch.setitem(sys.modules, "sparse_operation_kit", module)  # None: `import` raises ImportError
    monkeypatch.setattr(sok_backend, "_SOK_READY", False)
    return put


@pytest.mark.parametrize("version,expected", [("2.1.0", "2.1.0"), ("2.0.0", "2.0.0"), ("1.2.0", "1.2.0"),
                                              ("2.1.0rc1", "2.1.0rc1"), ("2.1", "2.1"),
                                              ("2.1.0+cuda12", "2.1.0+cuda12"), ("unknown", None), ("", None)])
def test_parse_version(version: str, expected: str | None) -> None:
    parsed = sok_backend.parse_version(version)
    assert (None if parsed is None else str(parsed)) == expected


@pytest.mark.parametrize("version,ok", [("2.0.0rc1", False), ("2.0.0.dev3", False), ("1.10.0", False),
                                        ("2.0", True), ("2.1.0+cuda12", True), ("10.0", True)])
def test_version_gate_orders_pre_releases_and_local_tags_as_pep_440(installed, version: str,  # noqa: ANN001
                                                                     ok: bool) -> None:
    """Issue 22: versions compare with packaging.version. The old tuple of leading digits read a 2.0 release
    candidate as 2.0.0 and let it through."""
    if ok:
        assert sok_backend.check_sok(fake_sok(version)) == version
    else:
        with pytest.raises(ValueError, match=f"found sparse_operation_kit {re.escape(version)}"):
            sok_backend.check_sok(fake_sok(version))


def test_auto_never_picks_legacy_sok(installed) -> None:  # noqa: ANN001
    installed(legacy_sok())
    assert resolve_backend("auto", 2, gpu=True) == "sharded"
    assert resolve_backend("auto", 1, gpu=True) == "replicated"


@pytest.mark.parametrize("version", ["2.0.0", "2.1.0", "2.1.1"])
def test_auto_picks_sok_2x_only_with_gpus(installed, version: str) -> None:  # noqa: ANN001
    installed(fake_sok(version))
    assert resolve_backend("auto", 2, gpu=True) == "sok"
    assert resolve_backend("auto", 1, gpu=True) == "sok"
    assert resolve_backend("auto", 2, gpu=False) == "sharded"
    assert resolve_backend("auto", 1, gpu=False) == "replicated"


def test_auto_skips_sok_without_its_api_or_that_fails_to_import(installed) -> None:  # noqa: ANN001
    installed(fake_sok("2.1.0", ("init", "Variable", "filter_variables")))  # no lookup_sparse
    assert resolve_backend("auto", 2, gpu=True) == "sharded"
    installed(None)
    assert resolve_backend("auto", 2, gpu=True) == "sharded"
    assert resolve_backend("sok", 2, gpu=False) == "sok"  # explicit names pass through (checked when built)


class Ranks:
    """A runtime of ``size`` ranks whose min_int is the minimum of this rank's value and the others'."""

    def __init__(self, size: int, others: list[int]) -> None:
        self.size, self.others, self.calls = size, others, []

    def min_int(self, value: int, name: str) -> int:
        self.calls.append(name)
        return min([value, *self.others])


def test_auto_is_agreed_by_every_rank(installed) -> None:  # noqa: ANN001
    """sok only if every rank can run it: a rank without SOK (or GPU) makes every rank take sharded."""
    installed(fake_sok("2.1.0"))
    assert resolve_backend("auto", 2, gpu=True, runtime=Ranks(2, [1])) == "sok"
    assert resolve_backend("auto", 2, gpu=True, runtime=Ranks(2, [0])) == "sharded"
    lacking = Ranks(2, [1])
    assert resolve_backend("auto", 2, gpu=False, runtime=lacking) == "sharded" and lacking.calls
    assert resolve_backend("sok", 2, gpu=False, runtime=Ranks(2, [0])) == "sok"  # explicit: no collective


def test_explicit_sok_with_legacy_version_is_a_one_line_error(installed) -> None:  # noqa: ANN001
    installed(legacy_sok())
    with pytest.raises(ValueError) as err:
        sok_backend.init_sok(SimpleNamespace(hvd=object()))
    message = str(err.value)
    assert "\n" not in message and "found sparse_operation_kit 1.2.0" in message and ">= 2.0" in message
    assert "sok.init" in message and "sok.lookup_sparse" in message  # what the legacy top level lacks
    installed(fake_sok("1.9.0"))
    with pytest.raises(ValueError, match=r"needs Merlin SOK >= 2\.0 .*found sparse_operation_kit 1\.9\.0"):
        sok_backend.init_sok(SimpleNamespace(hvd=object()))


def test_sok_2x_is_initialised_once_without_rebinding_keras_optimizers(installed) -> None:  # noqa: ANN001
    sok = fake_sok("2.1.0")
    installed(sok)
    runtime = SimpleNamespace(hvd=object())
    assert sok_backend.init_sok(runtime) is sok
    assert sok_backend.init_sok(runtime) is sok
    assert [c for c in sok.calls if c[0] == "init"] == [
        ("init", (), {"comm_tool": "horovod", "use_legacy_optimizer": False})]


def test_sok_without_horovod_is_an_error(installed) -> None:  # noqa: ANN001
    installed(fake_sok("2.1.0"))
    with pytest.raises(ValueError, match="needs Horovod"):
        sok_backend.init_sok(SimpleNamespace(hvd=None))


def placing_sok(rank: int, world: int) -> ModuleType:
    """SOK 2.x whose ``Variable`` places rows as pkg/distributed_variable.py does (v24.06.00): distributed ->
    ``rows // N + (rank < rows % N)`` local rows (``:192-194``); ``localized:r`` -> every row on rank r, a
    [0, dim] variable elsewhere (``:296-302``); ``lookup_sparse`` (one rank only) gathers and sums each row's
    ids; ``filter_variables`` splits by the marker the fake Variable sets."""
    import tensorflow as tf

    mod = fake_sok("2.1.0")

    def variable(shape: list[int], initializer, dtype, name: str, mode: str = "distributed"):  # noqa: ANN001, ANN202
        rows, dim = shape
        if mode == "distributed":
            local = rows // world + (rank < rows % world)
        else:
            local = rows if int(mode.split(":")[1]) == rank else 0
        var = tf.Variable(initializer(shape=(local, dim), dtype=dtype), name=name)
        mod.calls.append(("Variable", (name, mode), {}))
        mod.made.add(id(var))
        return var

    def lookup_sparse(params: list, sp_ids: list, combiners: list[str]) -> list:
        return [tf.reduce_sum(tf.gather(p, r), axis=1) for p, r in zip(params, sp_ids, strict=True)]

    mod.made = set()
    mod.Variable, mod.lookup_sparse = variable, lookup_sparse
    mod.filter_variables = lambda vs: ([v for v in vs if id(v) in mod.made], [v for v in vs if id(v) not in mod.made])
    return mod


PLACED = {"a": Placement("row_wise"), "b": Placement("table_wise", owner=1), "m": Placement("replicated")}


@pytest.mark.parametrize("rank", [0, 1])
def test_sok_places_tables_by_the_plan(installed, rank: int) -> None:  # noqa: ANN001
    """Row-wise -> SOK distributed, table-wise -> SOK localized on the owner, replicated -> a plain variable
    outside SOK (so its gradient is reduced with the dense weights); rows and checkpoint maps follow."""
    sok = placing_sok(rank, 2)
    installed(sok)
    tables = [TableConfig("a", 7, 3), TableConfig("b", 5, 2), TableConfig("m", 4, 2, 3, True)]
    emb = sok_backend.SokEmbedding(tables, "glorot_normal", 0, "deep",
                                   SimpleNamespace(rank=rank, size=2, hvd=object()), PLACED)
    assert [c[1] for c in sok.calls if c[0] == "Variable"] == [("deep_a", "distributed"), ("deep_b", "localized:1")]
    assert emb.table_variable("a").shape[0] == (4 if rank == 0 else 3)
    assert emb.table_variable("b").shape[0] == (5 if rank == 1 else 0)
    assert emb.table_variable("m").shape[0] == 4
    assert [id(v) for v in emb.sparse_variables] == [id(emb.table_variable("a")), id(emb.table_variable("b"))]
    assert emb.saved_rows("b").count == (5 if rank == 1 else 0)
    assert emb.saved_rows("m") == RowMap(rank, 2, 2, vstart=rank, vstride=2)
    mask, local = emb.owned("b", np.arange(5))
    assert mask.all() == (rank == 1) and list(local) == (list(range(5)) if rank == 1 else [])
    np.testing.assert_array_equal(emb.table_variable("m").numpy(), initial_rows(tables[2], np.arange(4), 0,
                                                                                 "glorot_normal"))
    if rank == 1:  # the owner holds b's rows as a single process would
        np.testing.assert_array_equal(emb.table_variable("b").numpy(),
                                      initial_rows(tables[1], np.arange(5), 0, "glorot_normal"))


def test_sok_lookup_mixes_sok_and_replicated_tables(installed) -> None:  # noqa: ANN001
    import tensorflow as tf

    installed(placing_sok(0, 1))
    tables = [TableConfig("a", 7, 3), TableConfig("m", 4, 2, 3, True, "mean")]
    places = {"a": Placement("row_wise"), "m": Placement("replicated")}
    emb = sok_backend.SokEmbedding(tables, "glorot_normal", 0, "deep", SimpleNamespace(rank=0, size=1, hvd=object()),
                                   places)
    ids = {"a": tf.constant([6, 0, 6]), "m": tf.ragged.constant([[1, 1, 3], [], [2]])}
    out = emb(ids)
    a = initial_rows(tables[0], np.arange(7), 0, "glorot_normal")
    m = initial_rows(tables[1], np.arange(4), 0, "glorot_normal")
    np.testing.assert_allclose(out["a"].numpy(), a[[6, 0, 6]], rtol=1e-6)
    np.testing.assert_allclose(out["m"].numpy(), [(2 * m[1] + m[3]) / 3, np.zeros(2), m[2]], rtol=1e-6)


# ------------------------------------------------------------------ GPU contract test
def _gpus() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


SOK_MISSING = importlib.util.find_spec("sparse_operation_kit") is None
GPU_ONLY = pytest.mark.skipif(
    SOK_MISSING or _gpus() == 0,
    reason="SOK backend needs merlin-sok (sparse_operation_kit) and a GPU; this machine has "
           + ("no sparse_operation_kit" if SOK_MISSING else "no GPU")
           + ": run scripts/gpu_check.sh on a GPU machine instead")


@GPU_ONLY
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
    assert report["failures"] == [] and report["cases"]["sum:row"]["backend"] == "sok"
