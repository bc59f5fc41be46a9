"""The SOK backend's dynamic tables, on CPU with the fake SOK of tests/fake_sok.py (shaped by SOK's source):
which tables go to sok.DynamicVariable, gradients through sok.OptimizerWrapper, and checkpoints that move
between SOK and the TF hash tables (and rank counts) row by row."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests import fake_sok
from tests.dist import common
from wd_sok.distributed import Runtime
from wd_sok.embedding import make_embedding
from wd_sok.embedding import sok as sok_backend
from wd_sok.feature_spec import DynamicConfig, TableConfig
from wd_sok.optim import LazyRMSprop

LIMIT = 240


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.setattr(sok_backend, "_SOK_READY", False)
    mod = fake_sok.install()
    yield mod
    sys.modules.pop("sparse_operation_kit", None)


def test_sok_holds_lru_tables_without_admission_and_applies_them_itself(fake) -> None:  # noqa: ANN001
    tables = [TableConfig("a", 7, 2), TableConfig("s", 128, 2, dynamic=DynamicConfig(128, 1, "lru")),
              TableConfig("t", 50, 2, dynamic=DynamicConfig(50, 2, "lru"))]
    with pytest.warns(UserWarning, match="'t'.*min_count 2"):
        emb = make_embedding("sok", tables[1:], "glorot_normal", 0, "deep", Runtime())
    kinds = [type(p).__name__ for p in emb.parts]
    assert kinds == ["SokDynamicEmbedding", "DynamicEmbedding"]
    opt = LazyRMSprop(0.1, rho=0.5)
    emb.attach_optimizer(opt)
    sok_part = emb.parts[0]
    assert type(sok_part.optimizer) is tf.keras.optimizers.legacy.RMSprop  # the plain stand-in (docstring)
    ids = {"s": tf.constant([2**50, 2**50, -3], tf.int64), "t": tf.constant([1, 2, 3], tf.int64)}
    with tf.GradientTape() as tape:
        out = emb(ids, training=True)
        loss = tf.reduce_sum(out["s"]) + tf.reduce_sum(out["t"])
    np.testing.assert_allclose(out["s"].numpy(), np.full((3, 2), 0.05), rtol=1e-6)  # the fake's "random"
    variables = emb.sparse_variables
    rest = emb.apply_own(list(zip(tape.gradient(loss, variables), variables, strict=True)))
    assert [v.name for _, v in rest] == [emb.parts[1].shards["t"].name]  # only the TF table is left
    var = sok_part.vars["s"]
    keys, values = fake.export(var)
    row = dict(zip(keys.numpy().tolist(), range(2), strict=True))
    # plain RMSprop, rho 0.5, step 1 from rms 0: rms = 0.5 g^2, update = lr g / (sqrt(rms) + eps)
    for key, g in ((2**50, 2.0), (-3, 1.0)):
        want = 0.05 - 0.1 * g / (np.sqrt(0.5 * g * g) + 1e-7)
        np.testing.assert_allclose(values.numpy()[row[key]], [want, want], rtol=1e-5)
    assert int(sok_part.wrapper._iterations.numpy()) == 1 and int(opt.iterations.numpy()) == 0
    from wd_sok.state import KeyedTableState, table_states

    model = type("M", (), {"wide_embedding": make_embedding("replicated", [], "zeros", 0, "wide", None),
                           "deep_embedding": emb})()
    states = table_states(model, None, opt)  # the plain optimizer gets no slots for SOK's variables
    assert [type(s).__name__ for s in states] == [KeyedTableState.__name__] * 2
    with pytest.raises(KeyError):
        opt.get_slot(var, "rms")
    with pytest.raises(tf.errors.InvalidArgumentError, match="INT64_MAX"):
        emb({"s": tf.constant([np.iinfo(np.int64).max], tf.int64), "t": tf.constant([1], tf.int64)})


def test_a_save_with_sok_dynamic_tables_is_full(fake) -> None:  # noqa: ANN001
    """SOK's dynamic tables are updated by sok.OptimizerWrapper (``apply_own``), which marks no rows for delta
    checkpoints (wd_sok.changes): a delta would hold none of their updates since its base, and a resume from it
    would silently put them back to the base. A save holding such a table is full (``delta.supported``,
    ``DeltaPolicy.choose``); the TF hash tables are tracked and may still be saved as deltas."""
    from wd_sok.checkpoint import delta
    from wd_sok.checkpoint.policy import DeltaPolicy
    from wd_sok.state import table_states

    tables = [TableConfig("s", 128, 2, dynamic=DynamicConfig(128, 1, "lru")),
              TableConfig("t", 50, 2, dynamic=DynamicConfig(50, 2, "lru"))]
    with pytest.warns(UserWarning, match="'t'.*min_count 2"):
        emb = make_embedding("sok", tables, "glorot_normal", 0, "deep", Runtime())
    opt = LazyRMSprop(0.1, rho=0.5)
    emb.attach_optimizer(opt)
    model = type("M", (), {"wide_embedding": make_embedding("replicated", [], "zeros", 0, "wide", None),
                           "deep_embedding": emb})()
    sok_state, tf_state = table_states(model, None, opt)
    with tf.GradientTape() as tape:
        out = emb({"s": tf.constant([7, 9], tf.int64), "t": tf.constant([1, 1], tf.int64)}, training=True)
        loss = tf.reduce_sum(out["s"]) + tf.reduce_sum(out["t"])
    variables = emb.sparse_variables
    emb.apply_own(list(zip(tape.gradient(loss, variables), variables, strict=True)))
    assert sok_state.count() == 2 and sok_state.changed_rows().size == 0  # updated by SOK, marked by nobody
    assert not delta.supported([sok_state]) and not delta.supported([sok_state, tf_state])
    assert delta.supported([tf_state])
    policy = DeltaPolicy(ratio=0.3, every=20)
    policy.base = Path("ckpt-1")  # a full base exists: only SOK's table stands in the way of a delta
    assert policy.choose([sok_state, tf_state], Runtime()) is None
    assert policy.choose([sok_state, tf_state], Runtime(), preempted=True) is None


def _launch(ranks: int, mode: str, backend: str, model_dir: Path, out: Path) -> list[dict]:
    common.check(common.launch(ranks, ["tests/dist/dynamic_ckpt.py", "--mode", mode, "--backend", backend,
                                       "--rules", "sok", "--model_dir", str(model_dir), "--out", str(out)], LIMIT))
    report = json.loads(out.read_text())
    assert [r["failures"] for r in report] == [[]] * ranks, report
    return report


def test_checkpoints_move_between_sok_and_tf_hash_tables(tmp_path: Path) -> None:
    if not common.horovodrun():
        pytest.fail("horovodrun not found: install Horovod with Gloo (scripts/setup_env.sh)")
    _launch(1, "save", "sok", tmp_path / "from_sok", tmp_path / "a.json")
    report = _launch(2, "restore", "sharded", tmp_path / "from_sok", tmp_path / "b.json")
    assert all(r["rows"]["u"] > 0 and r["rows"]["v"] > 0 for r in report)
    _launch(2, "save", "sharded", tmp_path / "from_tf", tmp_path / "c.json")
    report = _launch(1, "restore", "sok", tmp_path / "from_tf", tmp_path / "d.json")
    assert not any(report[0]["dropped"].values()) and report[0]["rows"]["u"] > 0
