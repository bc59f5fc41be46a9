"""SavedModel export: main.py --export_dir, served in a fresh process that knows only TensorFlow + pyarrow.

End to end: a tiny model trained through main.py on planted-signal data is exported; a separate Python process
(no wd_sok import) loads the SavedModel, feeds the raw test parquet rows and recomputes BCE / AUC with numpy;
they must equal main.py's own evaluation to 1e-5, and a few rows must equal a forward of the restored
checkpoint. In process (no training, fast): every spec shape (no numerics, no one-hot, no categorical...),
both combiners, input validation and the atomic replace.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
import yaml

from tests.conftest import tiny_spec_dict
from tests.dist.common import check, env, final_metrics, horovodrun, launch
from wd_sok import checkpoint
from wd_sok.data.batch import Batch
from wd_sok.embedding import make_embedding
from wd_sok.export import export_saved_model
from wd_sok.feature_spec import FeatureSpec
from wd_sok.model import WideDeepModel
from wd_sok.state import import_dense, table_states
from wd_sok.tools.generate import generate

SPEC = {
    "channel_spec": {"onehot_categorical": ["c1", "c2"], "multihot_categorical": ["m"],
                     "numerical": ["x1", "x2"], "label": ["clicked"], "map": ["display_id"]},
    "feature_spec": {"c1": {"dtype": "int32", "cardinality": 20, "embedding_dim": 4},
                     "c2": {"dtype": "int64", "cardinality": 50, "embedding_dim": 3},
                     "m": {"dtype": "int32", "cardinality": 30, "max_hotness": 3, "embedding_dim": 4},
                     "x1": {}, "x2": {}, "clicked": {}, "display_id": {}},
    "source_spec": {
        "train": [{"type": "parquet", "features": ["c1", "c2", "m", "x1", "x2", "clicked"],
                   "files": ["train/part_0.parquet", "train/part_1.parquet"]}],
        "test": [{"type": "parquet", "features": ["c1", "c2", "m", "x1", "x2", "clicked", "display_id"],
                  "files": ["test/part_0.parquet", "test/part_1.parquet"]}]},
    "metadata": {},
}
HIDDEN = [16, 8]
TRAIN_ARGS = ["--num_epochs", "1", "--global_batch_size", "128", "--eval_batch_size", "512",
              "--deep_hidden_units", *map(str, HIDDEN), "--deep_dropout", "0.1", "--deep_warmup_epochs", "0",
              "--deep_learning_rate", "0.01", "--linear_learning_rate", "0.2", "--log_every", "1000"]
HEAD = 5  # rows checked exactly against an in-process forward

# Runs in a fresh interpreter: only TensorFlow, pyarrow and numpy. argv: out.json, export dirs...; stdin: files.
SERVE = r'''
import json, sys
import numpy as np, pyarrow.parquet as pq, tensorflow as tf
out_path, dirs = sys.argv[1], sys.argv[2:]
req = json.load(sys.stdin)
results = {}
for export_dir in dirs:
    info = json.load(open(f"{export_dir}/assets/signature.json"))
    serve = tf.saved_model.load(export_dir).signatures[info["signature"]]
    feats = info["features"]

    def request(t):
        x = {}
        for n in feats["onehot"]:
            x[n] = t[n].to_numpy()
        for n in feats["multihot"]:
            col = t[n].combine_chunks()
            off = col.offsets.to_numpy().astype(np.int64)
            x[n + "__values"], x[n + "__offsets"] = col.flatten().to_numpy(), off - off[0]
        for n in feats["numerical"]:
            x[n] = t[n].to_numpy()
        x = {k: tf.constant(np.asarray(v, info["inputs"][k]["dtype"])) for k, v in x.items()}
        return serve(**x)["probability"].numpy()

    tables = [pq.read_table(f) for f in req["files"]]
    p = np.concatenate([request(t) for t in tables]).astype(np.float64)
    y = np.concatenate([t[feats["label"]].to_numpy() for t in tables]).astype(np.float64)
    q = np.clip(p, 1e-7, 1 - 1e-7)
    bce = float(-(y * np.log(q) + (1 - y) * np.log1p(-q)).mean())
    T = req["thresholds"]  # the trainer's streaming AUC: T equal buckets, ties within a bucket count 1/2
    b = np.clip(np.floor(p * T), 0, T - 1).astype(np.int64)
    pos, neg = np.bincount(b[y > 0.5], minlength=T), np.bincount(b[y <= 0.5], minlength=T)
    above = np.cumsum(pos[::-1])[::-1] - pos
    auc = float(np.dot(neg, above + 0.5 * pos) / (pos.sum() * neg.sum()))
    head = request(tables[0].slice(0, req["head"]))
    results[export_dir] = {"bce": bce, "auc": auc, "head": head.tolist(), "probs": p.tolist(),
                           "rows": int(p.size)}
results["wd_sok_imported"] = "wd_sok" in sys.modules
json.dump(results, open(out_path, "w"))
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    (root / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    generate(FeatureSpec.from_yaml(root / "spec.yaml"), root / "data", n_train=3000, n_test=1500,
             train_files=2, test_files=2, seed=3)
    return root / "data"


def main_py(data: Path, run: Path, *args: str, ranks: int = 1) -> None:
    """Run main.py (on ``ranks`` Gloo ranks) writing checkpoints / results under ``run``."""
    argv = ["main.py", "--dataset_path", str(data), "--model_dir", str(run / "ckpt"),
            "--results_dir", str(run / "results"), *TRAIN_ARGS, *args]
    check(launch(ranks, argv, timeout=300))


def serve_fresh(data: Path, work: Path, *export_dirs: Path) -> dict:
    """Serve the test files through each SavedModel in a new interpreter; its results per export dir."""
    spec = FeatureSpec.from_yaml(data / "feature_spec.yaml")
    req = {"files": [str(f) for f in spec.files("test")], "thresholds": 8000, "head": HEAD}
    out = work / "served.json"
    proc = subprocess.run([sys.executable, "-c", SERVE, str(out), *map(str, export_dirs)], input=json.dumps(req),
                          capture_output=True, text=True, timeout=300, cwd=work,
                          env={k: v for k, v in env().items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results.pop("wd_sok_imported") is False
    return {Path(k): v for k, v in results.items()}


def checkpoint_forward(data: Path, model_dir: Path, combiner: str, rows: int) -> np.ndarray:
    """Probabilities [rows] of the first test rows from the latest checkpoint, restored in this process."""
    spec = FeatureSpec.from_yaml(data / "feature_spec.yaml")
    rt = SimpleNamespace(rank=0, size=1, is_chief=True, allgather_object=lambda obj, name: [obj],
                         broadcast_object=lambda obj, name: obj)
    model = build_model(spec, combiner, rt)
    batch = head_batch(spec, rows)
    model(batch, training=False)
    wide_opt, deep_opt = tf.keras.optimizers.legacy.Ftrl(), tf.keras.optimizers.legacy.RMSprop()
    checkpoint.restore_latest(model_dir, table_states(model, wide_opt, deep_opt),
                              lambda arrays, origin: import_dense(model, wide_opt, deep_opt, arrays, origin), rt)
    return tf.sigmoid(model(batch, training=False)).numpy()


def build_model(spec: FeatureSpec, combiner: str, rt: object, hidden: list[int] = HIDDEN) -> WideDeepModel:
    cat = spec.categorical
    return WideDeepModel(
        cat, len(spec.numerical),
        make_embedding("replicated", spec.tables(dict.fromkeys(cat, 1)), "glorot_normal", 1, "wide", rt),
        make_embedding("replicated", spec.tables(spec.embedding_dims(), combiner), "glorot_normal", 2, "deep", rt),
        hidden, dropout=0.5)


def head_batch(spec: FeatureSpec, rows: int) -> Batch:
    """The first ``rows`` rows of the first test file as a Batch (as the loader builds it)."""
    import pyarrow.parquet as pq

    t = pq.read_table(spec.files("test")[0]).slice(0, rows)
    cat = {n: tf.constant(t[n].to_numpy()) for n in spec.onehot}
    for n in spec.multihot:
        col = t[n].combine_chunks()
        off = col.offsets.to_numpy().astype(np.int64)
        cat[n] = tf.RaggedTensor.from_row_splits(col.flatten().to_numpy(), off - off[0])
    x = np.stack([t[n].to_numpy() for n in spec.numerical], 1).astype(np.float32)
    return Batch(tf.constant(x), cat, tf.constant(t[spec.label].to_numpy(), tf.float32))


# ----------------------------------------------------------------------------- end to end
def test_export_reproduces_evaluate_in_a_fresh_process(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    main_py(data, run, "--combiner", "mean", "--export_dir", str(tmp_path / "trained"))
    main_py(data, run, "--combiner", "mean", "--evaluate", "--use_checkpoint", "--export_dir",
            str(tmp_path / "evaluated"))
    logged = final_metrics(run / "results")
    served = serve_fresh(data, tmp_path, tmp_path / "trained", tmp_path / "evaluated")
    for export_dir, got in served.items():
        assert got["rows"] == 1500
        assert got["bce"] == pytest.approx(logged["loss_val"], abs=1e-5), export_dir
        assert got["auc"] == pytest.approx(logged["auc_roc"], abs=1e-5), export_dir
    a, b = served.values()
    np.testing.assert_array_equal(a["probs"], b["probs"])  # the same weights, exported after fit / evaluate
    expected = checkpoint_forward(data, run / "ckpt", "mean", HEAD)
    np.testing.assert_array_equal(np.float32(a["head"]), expected)  # exact
    info = json.loads((tmp_path / "trained" / "assets" / "signature.json").read_text())
    assert set(info["inputs"]) == {"c1", "c2", "m__values", "m__offsets", "x1", "x2"}
    assert info["inputs"]["c2"]["dtype"] == "int64" and info["inputs"]["m__offsets"]["dtype"] == "int64"
    assert [t["combiner"] for t in info["tables"]] == ["sum", "sum", "mean"]
    assert FeatureSpec.from_yaml(tmp_path / "trained" / "assets" / "feature_spec.yaml", validate=False).multihot
    assert not list(tmp_path.glob(".trained.*"))  # no temporary folder left behind


@pytest.mark.skipif(not horovodrun(), reason="horovodrun not installed")
def test_two_rank_sharded_export(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    main_py(data, run, "--embedding_backend", "sharded", "--export_dir", str(tmp_path / "sharded"), ranks=2)
    logged = final_metrics(run / "results")  # the 2-rank evaluation of the exported weights
    got = serve_fresh(data, tmp_path, tmp_path / "sharded")[tmp_path / "sharded"]
    assert got["bce"] == pytest.approx(logged["loss_val"], abs=1e-5)
    assert got["auc"] == pytest.approx(logged["auc_roc"], abs=1e-5)
    np.testing.assert_array_equal(np.float32(got["head"]), checkpoint_forward(data, run / "ckpt", "sum", HEAD))
    # an export that rank 0 refuses fails on every rank before the collective gather (no rank left hanging)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("not a SavedModel")
    argv = ["main.py", "--dataset_path", str(data), "--model_dir", str(run / "ckpt"), "--results_dir",
            str(tmp_path / "eval"), *TRAIN_ARGS, "--embedding_backend", "sharded", "--evaluate", "--use_checkpoint",
            "--export_dir", str(tmp_path / "busy")]
    failed = launch(2, argv, timeout=120)
    assert failed.returncode != 0 and "refusing to replace" in failed.stdout, failed.stdout[-3000:]


# ----------------------------------------------------------------------------- in process, every spec shape
VARIANTS = {
    "full_mean": ({}, "mean"),
    "full_sum": ({}, "sum"),
    "no_numerical": ({"numerical": []}, "sum"),
    "no_multihot": ({"multihot_categorical": []}, "sum"),
    "no_onehot": ({"onehot_categorical": []}, "mean"),
    "no_categorical": ({"onehot_categorical": [], "multihot_categorical": []}, "sum"),
    "multihot_only": ({"onehot_categorical": [], "numerical": []}, "mean"),
}


def fake_trainer(channels: dict, combiner: str, seed: int = 0, nan_policy: str = "reject"
                 ) -> tuple[SimpleNamespace, dict, Batch]:
    """A random (untrained) model for the tiny spec with ``channels`` overridden; a request and its Batch."""
    raw = tiny_spec_dict()
    raw["channel_spec"].update(channels)
    spec = FeatureSpec.from_dict(raw, validate=False)
    rt = SimpleNamespace(rank=0, size=1, is_chief=True, max_int=lambda value, name: value,
                         gather_to_chief=lambda tensor, name: tensor)  # a lone process's collectives
    model = build_model(spec, combiner, rt, hidden=[8, 4])
    rng = np.random.default_rng(seed)
    rows = 9
    request: dict[str, np.ndarray] = {}
    categorical: dict = {}
    for n in spec.onehot:
        request[n] = rng.integers(0, spec.cardinality(n), rows).astype(spec.dtype(n))
        categorical[n] = tf.constant(request[n])
    for n in spec.multihot:
        offsets = np.concatenate([[0], np.cumsum(rng.integers(0, 4, rows))]).astype(np.int64)  # empty rows too
        request[n + "__values"] = rng.integers(0, spec.cardinality(n), offsets[-1]).astype(spec.dtype(n))
        request[n + "__offsets"] = offsets
        categorical[n] = tf.RaggedTensor.from_row_splits(request[n + "__values"], offsets)
    for n in spec.numerical:
        request[n] = rng.normal(size=rows).astype(np.float32)
    x = np.stack([request[n] for n in spec.numerical], 1) if spec.numerical else np.zeros((rows, 0), np.float32)
    batch = Batch(tf.constant(x), categorical, tf.zeros([rows]))
    model(batch, training=False)
    for var in model.named_dense_variables().values():  # non-zero wide part too
        var.assign(rng.normal(size=var.shape).astype(np.float32))
    cfg = SimpleNamespace(amp=False, combiner=combiner, seed=0, nan_policy=nan_policy)
    trainer = SimpleNamespace(model=model, spec=spec, rt=rt, cfg=cfg, deep_opt=tf.keras.optimizers.legacy.RMSprop(),
                              backend="replicated", epoch=0)
    return trainer, request, batch


def call(export_dir: Path, request: dict[str, np.ndarray]) -> np.ndarray:
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    return serve(**{k: tf.constant(v) for k, v in request.items()})["probability"].numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_spec_shape_serves_the_model(variant: str, tmp_path: Path) -> None:
    channels, combiner = VARIANTS[variant]
    trainer, request, batch = fake_trainer(channels, combiner)
    export_saved_model(trainer, tmp_path / "sm")
    expected = tf.sigmoid(trainer.model(batch, training=False)).numpy()
    got = call(tmp_path / "sm", request)
    assert got.dtype == np.float32 and got.shape == (9,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
    info = json.loads((tmp_path / "sm" / "assets" / "signature.json").read_text())
    assert set(info["inputs"]) == set(request) and (tmp_path / "sm" / "assets" / "README.md").exists()
    empty = {k: v[:1] if k.endswith("__offsets") else v[:0] for k, v in request.items()}
    assert call(tmp_path / "sm", empty).shape == (0,)


def test_bad_requests_are_errors(tmp_path: Path) -> None:
    trainer, request, _ = fake_trainer({}, "mean")
    export_saved_model(trainer, tmp_path / "sm")
    serve = tf.saved_model.load(str(tmp_path / "sm")).signatures["serving_default"]
    bad = {"a": dict(request, a=np.full(9, 7, np.int32)),                       # id == cardinality
           "m__values": dict(request, m__values=request["m__values"] - 10),     # negative ids
           "x1": dict(request, x1=request["x1"][:3]),                          # 3 rows, others 9
           "m__offsets": dict(request, m__offsets=request["m__offsets"][::-1].copy()),  # decreasing
           "x2": dict(request, x2=np.where(np.arange(9) == 4, np.nan, request["x2"]).astype(np.float32))}
    for what, req in bad.items():
        with pytest.raises(tf.errors.InvalidArgumentError):
            serve(**{k: tf.constant(v) for k, v in req.items()})
            pytest.fail(f"bad {what} was served")


def test_nan_policy_zero_fills_like_the_loader(tmp_path: Path) -> None:
    trainer, request, batch = fake_trainer({}, "sum", nan_policy="zero")
    export_saved_model(trainer, tmp_path / "sm")
    x1 = request["x1"].copy()
    x1[[2, 5]] = [np.nan, np.inf]
    got = call(tmp_path / "sm", dict(request, x1=x1))
    filled = batch._replace(numerical=tf.where(tf.math.is_finite(tf.constant(np.stack([x1, request["x2"]], 1))),
                                               batch.numerical, 0.0))
    np.testing.assert_allclose(got, tf.sigmoid(trainer.model(filled)).numpy(), rtol=0, atol=1e-7)
    assert json.loads((tmp_path / "sm" / "assets" / "signature.json").read_text())["nan_policy"] == "zero"


def test_replaces_only_a_savedmodel_atomically(tmp_path: Path) -> None:
    first, request, _ = fake_trainer({}, "sum", seed=1)
    second, _, _ = fake_trainer({}, "sum", seed=2)
    export_saved_model(first, tmp_path / "sm")
    before = call(tmp_path / "sm", request)
    export_saved_model(second, tmp_path / "sm")  # replaces the previous export
    assert not np.array_equal(call(tmp_path / "sm", request), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sm"]  # no temporary or old folder left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace"):
        export_saved_model(first, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
