"""Dynamic tables over several processes (horovodrun --gloo): the exchange against a one-process oracle, and
checkpoints saved under N ranks restored under M ranks (and another backend), row by row, against an
independent numpy read of the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist import common

LIMIT = 240


def _need_horovod() -> None:
    if not common.horovodrun():
        pytest.fail("horovodrun not found: install Horovod with Gloo (scripts/setup_env.sh)")


def test_exchange_matches_one_process_oracle(tmp_path: Path) -> None:
    _need_horovod()
    out = tmp_path / "exchange.json"
    common.check(common.launch(2, ["tests/dist/dynamic_exchange.py", "--out", str(out)], LIMIT))
    report = json.loads(out.read_text())
    assert [r["failures"] for r in report] == [[], []], report
    assert all(r["keys"]["u"] > 0 and r["keys"]["m"] > 0 for r in report)  # both ranks own keys


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dynamic tables trained (with evictions and pending keys) and saved under 2 ranks."""
    _need_horovod()
    root = tmp_path_factory.mktemp("dynamic_ckpt")
    out = root / "save.json"
    common.check(common.launch(2, ["tests/dist/dynamic_ckpt.py", "--mode", "save", "--model_dir",
                                   str(root / "ckpt"), "--out", str(out)], LIMIT))
    report = json.loads(out.read_text())
    assert [r["failures"] for r in report] == [[], []], report
    evictions = sum(r["counters"][n][2] for r in report for n in ("u", "v"))
    assert evictions > 0, report  # the saved state went through evictions
    return root / "ckpt"


@pytest.mark.parametrize("ranks", [1, 3])
def test_checkpoint_restores_under_other_rank_counts(saved: Path, tmp_path: Path, ranks: int) -> None:
    out = tmp_path / "restore.json"
    common.check(common.launch(ranks, ["tests/dist/dynamic_ckpt.py", "--mode", "restore", "--model_dir",
                                       str(saved), "--out", str(out)], LIMIT))
    report = json.loads(out.read_text())
    assert [r["failures"] for r in report] == [[]] * ranks, report
    rows = [r["rows"]["u"] + r["rows"]["v"] for r in report]
    assert all(n > 0 for n in rows)
    if ranks == 1:  # everything fits one rank: nothing dropped
        assert not any(report[0]["dropped"].values())


def test_train_two_ranks_then_evaluate_on_one_matches(tmp_path: Path) -> None:
    """main.py end to end with dynamic features (b: LRU, min_count 2; n: multi-hot LFU): per-epoch counters
    logged, and the checkpoint evaluated under 1 rank gives the 2-rank run's final metrics."""
    import yaml

    _need_horovod()
    data = common.make_dataset(tmp_path / "data")
    spec = yaml.safe_load((data / "feature_spec.yaml").read_text())
    spec["feature_spec"]["b"] = {"dtype": "int64", "embedding_dim": 4,
                                 "dynamic": {"capacity": 1001, "min_count": 2, "evict": "lru"}}
    spec["feature_spec"]["n"] = {"dtype": "int32", "max_hotness": 2, "embedding_dim": 3,
                                 "dynamic": {"capacity": 13, "evict": "lfu"}}
    (data / "feature_spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = common.check(common.launch(2, common.main_args(data, tmp_path / "run", "--export_dir",
                                                         str(tmp_path / "sm")), LIMIT))
    lines = [line for line in out.splitlines() if "dynamic table deep/b: epoch 1" in line]
    assert len(lines) == 1 and " admissions" in lines[0], out[-3000:]
    want = common.final_metrics(tmp_path / "run" / "results")
    common.check(common.launch(1, common.main_args(data, tmp_path / "run", "--evaluate", "--use_checkpoint",
                                                   "--results_dir", str(tmp_path / "eval")), LIMIT))
    got = common.final_metrics(tmp_path / "eval")
    for key in ("loss_val", "auc_roc", "streaming_map_val"):
        assert abs(got[key] - want[key]) < 1e-5, (key, got, want)
    # the export streamed both ranks' keys and rows: the SavedModel's deep/b table holds exactly the keys and
    # values of the checkpoint's deep/b shard files
    import numpy as np
    import tensorflow as tf

    (ckpt,) = (tmp_path / "run" / "ckpt").glob("ckpt-*")
    keys = np.concatenate([np.load(f) for f in sorted(ckpt.glob("deep.b.key.r*.npy"))])
    values = np.concatenate([np.load(f) for f in sorted(ckpt.glob("deep.b.value.r*.npy"))])
    reader = tf.train.load_checkpoint(str(tmp_path / "sm" / "variables" / "variables"))
    tables = [n for n, _ in tf.train.list_variables(str(tmp_path / "sm" / "variables" / "variables"))
              if n.endswith("table-keys")]
    # hash tables in model order: wide b, wide n, deep b, deep n
    name = sorted(tables, key=lambda n: int(n.split("/")[1]))[2]
    exported = dict(zip(reader.get_tensor(name).tolist(),
                        reader.get_tensor(name.replace("table-keys", "table-values")).tolist(), strict=True))
    assert sorted(exported) == sorted(keys.tolist())
    rows = tf.saved_model.load(str(tmp_path / "sm"))
    table = next(v.numpy() for v in rows.weights if tuple(v.shape) == (1002, 4))
    np.testing.assert_array_equal(np.stack([table[exported[k]] for k in keys.tolist()]), values)
