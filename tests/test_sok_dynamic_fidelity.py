"""SOK's dynamic tables against the fake of tests/fake_sok.py, which follows SOK's source (HugeCTR v25.03.00):
slot tables separate from the value table, lookups that insert, the wrapper's own step counter, HKV capacities.

Each test names the behaviour of SOK it depends on; values are worked out by hand in the comments. The fake's
"random" row is 0.05; plain legacy RMSprop from rms 0 with rho 0.5 moves a row by lr * g / (sqrt(0.5 g^2) + eps).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests import fake_sok
from wd_sok import checkpoint
from wd_sok.distributed import Runtime
from wd_sok.embedding import make_embedding
from wd_sok.embedding import sok as sok_backend
from wd_sok.embedding.composite import CompositeEmbedding
from wd_sok.embedding.dynamic import DynamicEmbedding
from wd_sok.embedding.sok import SokDynamicEmbedding
from wd_sok.export import _copy_keyed, _replicated_like
from wd_sok.feature_spec import DynamicConfig, TableConfig
from wd_sok.optim import LazyRMSprop
from wd_sok.state import table_states

EPS = 1e-7


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.setattr(sok_backend, "_SOK_READY", False)
    mod = fake_sok.install()
    yield mod
    sys.modules.pop("sparse_operation_kit", None)


def table(cap: int = 128, dim: int = 2, evict: str = "lru") -> TableConfig:
    return TableConfig("s", cap, dim, dynamic=DynamicConfig(cap, 1, evict))


def step(emb, ids: dict[str, tf.Tensor], opt: tf.keras.optimizers.legacy.Optimizer | None = None) -> None:  # noqa: ANN001
    """One training step of loss = sum of the pooled vectors (every gradient row is the id's count); what the
    collection does not apply itself goes to ``opt``, as in wd_sok.steps."""
    with tf.GradientTape() as tape:
        out = emb(ids, training=True)
        loss = tf.add_n([tf.reduce_sum(v) for v in out.values()])
    variables = emb.sparse_variables
    rest = emb.apply_own(list(zip(tape.gradient(loss, variables), variables, strict=True)))
    if rest and opt is not None:
        opt.apply_gradients(rest)


def rms_step(value: float, g: float, lr: float) -> float:
    return value - lr * g / (np.sqrt(0.5 * g * g) + EPS)


def saved(part, name: str = "s") -> dict[str, np.ndarray]:  # noqa: ANN001
    """What a checkpoint writes of the table (KeyedTableState's reads, whole)."""
    n = part.keyed_count(name)
    arrays = ["key", "value", *(part.wrapper.get_slot_names() if part.wrapper else []), "count", "last"]
    return {a: part.read_keyed(name, a, 0, n) for a in arrays}


def ids(*keys: int) -> dict[str, tf.Tensor]:
    return {"s": tf.constant(keys, tf.int64)}


# ---------------------------------------------------------------- defect 1: slots out of line with their keys
def test_slots_are_saved_row_for_row_with_their_keys(fake) -> None:  # noqa: ANN001
    """SOK: lookups insert into the value table only; a slot table gets a key when it receives a gradient
    (optimizer.py:313-347 at v25.03.00). Train 10 and 20, evaluate 10 and 30: the saved rms of row i must be
    that of key i, and a key never trained is not saved (the CPU backend never gives it a row)."""
    part = SokDynamicEmbedding([table()], "glorot_normal", 0, "deep", Runtime())
    part.attach_optimizer(tf.keras.optimizers.legacy.RMSprop(0.1, rho=0.5))
    step(part, ids(20, 10, 10))  # g = 1 for 20, 2 for 10
    part(ids(10, 30), training=False)
    got = saved(part)
    assert got["rms"].shape == got["value"].shape, "slot rows out of line with the value rows"
    assert got["key"].tolist() == [10, 20]
    np.testing.assert_allclose(got["rms"], [[2.0, 2.0], [0.5, 0.5]], rtol=1e-6)  # 0.5 g^2, by key
    np.testing.assert_allclose(got["value"], [[rms_step(0.05, 2.0, 0.1)] * 2, [rms_step(0.05, 1.0, 0.1)] * 2],
                               rtol=1e-5)


def test_keys_restored_without_slots_save_fresh_slot_values(fake) -> None:  # noqa: ANN001
    """A key whose slot table has no row (restored from a checkpoint without that slot; on HKV, a slot row
    evicted apart from its value) saves the slot's fresh value: FTRL accumulator 0.1, linear 0 (the values the
    wrapper's slot tables start from, optimizer.py:236-249)."""
    part = SokDynamicEmbedding([table(dim=1)], "zeros", 0, "wide", Runtime())
    part.attach_optimizer(tf.keras.optimizers.legacy.Ftrl(0.1))
    part.insert_keyed("s", {"key": np.array([7, 3], np.int64), "value": np.array([[0.5], [-0.25]], np.float32)})
    step(part, ids(3))
    got = saved(part)
    assert got["key"].tolist() == [3, 7]
    np.testing.assert_allclose(got["accumulator"], [[0.1 + 1.0], [0.1]], rtol=1e-6)  # 3 trained with g = 1
    np.testing.assert_allclose(got["linear"][1], [0.0])
    np.testing.assert_allclose(got["value"][1], [0.5])


# ---------------------------------------------------------------- defect 2: the schedule restarts after a resume
class Ramp(tf.keras.optimizers.schedules.LearningRateSchedule):
    """lr(step) = 0.01 * (step + 1): lr 0.01 at step 0, 0.1 at step 9."""

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        return 0.01 * (tf.cast(step, tf.float32) + 1.0)

    def get_config(self) -> dict:
        return {}


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "dense"])
def test_learning_rate_schedule_continues_after_a_resume(fake, lazy: bool) -> None:  # noqa: ANN001
    """SOK's wrapper swaps its own counter (tf.Variable(0), optimizer.py:250) in for the optimizer's iterations
    while it applies (:352-362), so the wrapped schedule reads the wrapper's counter. A restore sets the deep
    optimizer's iterations to 9 (and calls set_clock, as the keyed reader does): the next step must use lr(9)."""
    part = SokDynamicEmbedding([table()], "glorot_normal", 0, "deep", Runtime())
    opt = (LazyRMSprop if lazy else tf.keras.optimizers.legacy.RMSprop)(Ramp(), rho=0.5)
    part.attach_optimizer(opt)
    opt.iterations.assign(9)  # wd_sok.state.set_iterations
    part.set_clock(0)
    step(part, ids(5))
    np.testing.assert_allclose(saved(part)["value"], [[rms_step(0.05, 1.0, 0.1)] * 2], rtol=1e-5)
    assert int(part.wrapper._iterations.numpy()) == 10  # noqa: SLF001


# ---------------------------------------------------------------- defect 3: capacity, evaluation ids, export
def test_capacity_is_sok_max_capacity_per_rank(fake) -> None:  # noqa: ANN001
    """capacity 128 on one rank: an HKV table (init = max = 128, powers of two, dynamic_variable.py:67) that
    never holds more than 128 keys; 200 distinct keys trained, the 128 most recent stay (LRU)."""
    part = SokDynamicEmbedding([table(128)], "glorot_normal", 0, "deep", Runtime())
    part.attach_optimizer(tf.keras.optimizers.legacy.RMSprop(0.1, rho=0.5))
    assert part.capacity["s"] == 128
    var = part.vars["s"]
    assert var.backend_type == "hybrid" and var.capacity == 128
    for lo in (0, 100):
        step(part, {"s": tf.range(lo, lo + 100, dtype=tf.int64)})
    got = saved(part)
    assert got["key"].tolist() == list(range(72, 200))


def serving_rows(part, name: str, keys: list[int]) -> np.ndarray:  # noqa: ANN001
    """Export the table the way wd_sok.export does (rank 0's serving copy), then serve ``keys``."""
    emb = CompositeEmbedding(list(part.tables.values()), [part], part.initializer, part.seed, part.prefix)
    serving = type("Serving", (), {f"{part.prefix}_embedding": _replicated_like(emb)})()
    _copy_keyed(emb, serving, part.prefix, name, Runtime())
    return getattr(serving, f"{part.prefix}_embedding")({name: tf.constant(keys, tf.int64)}).get(name).numpy()


def test_evaluation_ids_get_no_row_and_export_serves_the_zero_row(fake) -> None:  # noqa: ANN001
    """SOK's lookups insert; v25.03.00's low-frequency filter with filter_ratio 0 looks up without inserting
    (all2all_embedding_collection.cu:577-622): an id seen only in evaluation reads zeros, gets no row, and the
    exported model serves it the zero row."""
    part = SokDynamicEmbedding([table()], "glorot_normal", 0, "deep", Runtime())
    part.attach_optimizer(tf.keras.optimizers.legacy.RMSprop(0.1, rho=0.5))
    step(part, ids(10))
    trained = rms_step(0.05, 1.0, 0.1)
    out = part(ids(10, 77), training=False)["s"].numpy()
    np.testing.assert_allclose(out, [[trained] * 2, [0.0, 0.0]], rtol=1e-5)
    assert part.keyed_count("s") == 1
    np.testing.assert_allclose(serving_rows(part, "s", [10, 77, 5]), [[trained] * 2, [0, 0], [0, 0]], rtol=1e-5)


def test_export_of_a_full_table_fits_the_serving_table(fake) -> None:  # noqa: ANN001
    """The serving copy has capacity + 1 rows (row 0 the zero row): a table that was offered more keys than its
    capacity must export without overflowing it."""
    part = SokDynamicEmbedding([table(128)], "glorot_normal", 0, "deep", Runtime())
    part.attach_optimizer(tf.keras.optimizers.legacy.RMSprop(0.1, rho=0.5))
    for lo in (0, 100, 200):
        step(part, {"s": tf.range(lo, lo + 100, dtype=tf.int64)})
    rows = serving_rows(part, "s", [299, 0])
    np.testing.assert_allclose(rows, [[rms_step(0.05, 1.0, 0.1)] * 2, [0, 0]], rtol=1e-5)


# ---------------------------------------------------------------- what SOK can hold, and with which SOK
def test_sok_holds_lru_tables_whose_share_is_a_power_of_two(fake) -> None:  # noqa: ANN001
    assert sok_backend.sok_refusal(table(256), 2) is None
    assert "power of two" in sok_backend.sok_refusal(table(192), 1)
    assert "power of two" in sok_backend.sok_refusal(table(64), 1)  # below one 128-key bucket
    assert "evict" in sok_backend.sok_refusal(table(256, evict="none"), 1)
    tables = [table(256), TableConfig("t", 100, 2, dynamic=DynamicConfig(100, 1, "lru"))]
    with pytest.warns(UserWarning, match="'t'.*power of two"):
        emb = make_embedding("sok", tables, "glorot_normal", 0, "deep", Runtime())
    assert [type(p) for p in emb.parts] == [SokDynamicEmbedding, DynamicEmbedding]


def test_a_sok_without_the_low_frequency_filter_holds_no_dynamic_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """merlin-sok 2.1.0 from PyPI (HugeCTR 24.06) has no find-only lookup: its dynamic tables would grow on
    every evaluation id, so the TF hash tables hold them."""
    monkeypatch.setattr(sok_backend, "_SOK_READY", False)
    fake_sok.install("v24.06.00")
    try:
        assert "v25.03.00" in sok_backend.sok_refusal(table(256), 1)
    finally:
        sys.modules.pop("sparse_operation_kit", None)


# ---------------------------------------------------------------- CPU <-> SOK with keys looked up, never trained
def _model(backend: str, rt: Runtime) -> object:
    emb = make_embedding(backend, [table(256, dim=3)], "glorot_normal", 4, "deep", rt)
    wide = make_embedding(backend, [table(256, dim=1)], "zeros", 4, "wide", rt)
    model = type("M", (), {"wide_embedding": wide, "deep_embedding": emb})()
    model.wide_opt, model.deep_opt = tf.keras.optimizers.legacy.Ftrl(0.1), LazyRMSprop(0.05, rho=0.5)
    wide.attach_optimizer(model.wide_opt)
    emb.attach_optimizer(model.deep_opt)
    return model


def _train_and_look(model, backend: str) -> None:  # noqa: ANN001
    for emb, opt in ((model.wide_embedding, model.wide_opt), (model.deep_embedding, model.deep_opt)):
        step(emb, ids(11, 12, 12), opt)
        emb(ids(11, 900, 901), training=False)  # 900, 901: looked up, never trained
    if backend == "sharded":
        assert model.deep_embedding.part("s").keyed_count("s") == 2


def _save_restore(src: str, dst: str, tmp_path: Path) -> object:
    rt = Runtime()
    a = _model(src, rt)
    _train_and_look(a, src)
    dense = {"opt/wide_iterations": np.int64(1), "opt/deep_iterations": np.int64(1)}
    checkpoint.save(tmp_path, 1, table_states(a, a.wide_opt, a.deep_opt), dense, {"epoch": 0, "step_in_epoch": 1}, rt)
    b = _model(dst, rt)
    checkpoint.restore_latest(tmp_path, table_states(b, b.wide_opt, b.deep_opt), lambda arrays, origin: None, rt)
    for emb in (a.deep_embedding, b.deep_embedding):
        assert sorted(emb.part("s").read_keyed("s", "key", 0, emb.part("s").keyed_count("s")).tolist()) == [11, 12]
    want = a.deep_embedding.part("s")
    got = b.deep_embedding.part("s")
    for arr in ("value", "rms"):
        w = dict(zip(want.read_keyed("s", "key", 0, 2).tolist(), want.read_keyed("s", arr, 0, 2), strict=True))
        g = dict(zip(got.read_keyed("s", "key", 0, 2).tolist(), got.read_keyed("s", arr, 0, 2), strict=True))
        for k in (11, 12):
            np.testing.assert_allclose(np.reshape(g[k], -1), np.reshape(w[k], -1), rtol=1e-6)
    return b


@pytest.mark.parametrize(("src", "dst"), [("sharded", "sok"), ("sok", "sharded")])
def test_cpu_and_sok_restore_each_other_and_export_zeros_for_untrained_ids(fake, tmp_path: Path, src: str,
                                                                          dst: str) -> None:  # noqa: ANN001
    b = _save_restore(src, dst, tmp_path)
    part = b.deep_embedding.part("s")
    rows = serving_rows(part, "s", [900, 901, 11])
    assert not rows[:2].any() and rows[2].any()
