"""Equal per-rank batches: padding + masking in evaluation and the eval benchmark (issue 13, item 2).

SOK's lookup assumes every rank feeds the same number of rows (global batch = local x GPUs), so the eval loop
pads short and "ran out" batches to the local eval batch with masked rows. Checked here:

* :func:`pad_batch` by hand: exact shapes, mask, valid dummy ids (0), empty multi-hot rows, sorted map ids;
* masked rows count nowhere: BCE / AUC / MAP@12 of a padded stream (filtered by :func:`real_rows`) equal the
  unpadded stream's, against the metrics' exact values;
* the real loop (tests/dist/eval_padding.py): the sharded backend under ``horovodrun -np 2`` and ``-np 3`` on
  uneven test files (150, 210, 96 rows) gives the metrics of one process whose eval batch (6) divides every
  file, so it pads nothing (1e-6); every eval step on every rank sees exactly the local eval batch; all ranks
  run the same number of steps; ``benchmark_eval`` runs the same step count everywhere and finishes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tests.dist import common
from wd_sok.data.batch import Batch, head, pad_batch, real_rows
from wd_sok.metrics import StreamingAuc, StreamingBce, StreamingMap, exact_auc

LIMIT = 240
METRICS = ("loss_val", "auc_roc", "streaming_map_val", "map_groups")


def small_batch() -> Batch:
    return Batch(numerical=tf.constant([[1.0, 2.0], [3.0, 4.0]]),
                 categorical={"a": tf.constant([3, 4], tf.int32), "b": tf.constant([7, 9], tf.int64),
                              "m": tf.ragged.constant([[1, 2], []], tf.int32)},
                 label=tf.constant([1.0, 0.0]), map_ids=tf.constant([5, 6], tf.int64))


def test_pad_batch_by_hand() -> None:
    p = pad_batch(small_batch(), 5)
    assert p.size == 5 and p.real_size == 2
    np.testing.assert_array_equal(p.mask.numpy(), [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(p.numerical.numpy(), [[1, 2], [3, 4], [0, 0], [0, 0], [0, 0]])
    np.testing.assert_array_equal(p.categorical["a"].numpy(), [3, 4, 0, 0, 0])
    assert p.categorical["a"].dtype == tf.int32 and p.categorical["b"].dtype == tf.int64
    assert p.categorical["m"].to_list() == [[1, 2], [], [], [], []]
    np.testing.assert_array_equal(p.label.numpy(), [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(p.map_ids.numpy(), [5, 6, 6, 6, 6])  # still sorted
    full = pad_batch(small_batch(), 2)
    assert full.size == 2 and full.real_size == 2 and full.mask.numpy().tolist() == [1, 1]
    with pytest.raises(ValueError, match="2 rows cannot be padded to 1"):
        pad_batch(small_batch(), 1)


def test_all_padding_batch_from_an_empty_template() -> None:
    p = pad_batch(head(small_batch(), 0), 3)
    assert p.size == 3 and p.real_size == 0 and p.numerical.shape == (3, 2)
    assert p.categorical["m"].to_list() == [[], [], []]
    np.testing.assert_array_equal(p.map_ids.numpy(), [0, 0, 0])
    np.testing.assert_array_equal(p.mask.numpy(), [0, 0, 0])
    assert real_rows(p, np.arange(3))[0].size == 0


def test_masked_rows_count_nowhere() -> None:
    """A stream cut into batches and padded (padding with scores and labels that would change every metric)
    gives the metrics of the unpadded stream: BCE, AUC, and MAP@12 whose groups straddle batches."""
    rng = np.random.default_rng(0)
    n = 103
    map_ids = np.repeat(np.arange(40), rng.multinomial(n - 40, np.ones(40) / 40) + 1)[:n]
    probs = rng.uniform(0.01, 0.99, n)
    labels = (rng.uniform(size=n) < probs).astype(np.float32)
    ref = StreamingBce(), StreamingAuc(1000), StreamingMap(12)
    ref[0].update(probs, labels)
    ref[1].update(probs, labels)
    ref[2].update(map_ids, probs, labels)
    got = StreamingBce(), StreamingAuc(1000), StreamingMap(12)
    local = 16
    for start in range(0, n + 2 * local, local):  # two extra all-padding batches at the end
        rows = slice(start, min(start + local, n))
        k = max(0, min(start + local, n) - start)
        batch = pad_batch(Batch(tf.zeros([k, 0]), {}, tf.constant(labels[rows]),
                                tf.constant(map_ids[rows], tf.int64)), local)
        fake = np.full(local, 0.999)  # what the model "says" for padded rows: must be dropped
        fake[:k] = probs[rows]
        p, y, d = real_rows(batch, fake, batch.label.numpy(), batch.map_ids.numpy())
        got[0].update(p, y)
        got[1].update(p, y)
        got[2].update(d, p, y)
    assert got[0].result() == pytest.approx(ref[0].result(), abs=1e-12)
    np.testing.assert_array_equal(got[1].counts(), ref[1].counts())
    assert got[1].result() == pytest.approx(exact_auc(probs, labels), abs=0.01)
    np.testing.assert_array_equal(got[2].sums(), ref[2].sums())


# ------------------------------------------------------------------ the real loop, 1 to 3 processes
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return common.make_dataset(tmp_path_factory.mktemp("pad_data"))


def run(data: Path, out: Path, ranks: int, backend: str, eval_batch: int, bench_steps: int = 0,
        reference: Path | None = None) -> list[dict]:
    args = ["tests/dist/eval_padding.py", "--data", str(data), "--out", str(out), "--backend", backend,
            "--eval_batch_size", str(eval_batch), "--bench_steps", str(bench_steps)]
    if reference is not None:  # the script's own check, as scripts/gpu_check.sh uses it
        args += ["--reference", str(reference)]
    output = common.check(common.launch(ranks, args, LIMIT))
    if reference is not None:
        assert f"EVAL PADDING PASS ({ranks} ranks, {backend}" in output, output[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


@pytest.fixture(scope="module")
def reference_dir(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One replicated process, eval batch 6: divides 150, 210 and 96, so no step has a padded row."""
    out = tmp_path_factory.mktemp("ref")
    run(data, out, 1, "replicated", 6)
    return out


@pytest.fixture(scope="module")
def reference(reference_dir: Path) -> dict:
    report = json.loads((reference_dir / "rank0.json").read_text())
    assert all(size == real == 6 for size, real in report["eval_steps"])
    assert sum(real for _, real in report["eval_steps"]) == sum(common.TEST_ROWS)
    assert report["metrics"]["auc_roc"] > 0.6  # not a degenerate model: x1 carries the planted signal
    return report["metrics"]


def check_equal_shapes(reports: list[dict], key: str) -> None:
    counts = {len(r[key]) for r in reports}
    assert len(counts) == 1, f"{key}: ranks ran different step counts {counts}"
    for r in reports:
        assert all(size == r["local_eval_batch"] for size, _ in r[key]), (r["rank"], key, r[key])


def test_one_process_partial_final_batch(data: Path, tmp_path: Path, reference: dict) -> None:
    (report,) = run(data, tmp_path, 1, "replicated", 48)
    assert [real for _, real in report["eval_steps"]][-1] == sum(common.TEST_ROWS) % 48  # padded last batch
    check_equal_shapes([report], "eval_steps")
    for key in METRICS:
        assert report["metrics"][key] == pytest.approx(reference[key], abs=1e-6), key


@pytest.mark.parametrize("ranks", [2, 3])
def test_sharded_uneven_shards_equal_batches(data: Path, tmp_path: Path, reference: dict, reference_dir: Path,
                                             ranks: int) -> None:
    if not common.horovodrun():
        pytest.fail("horovodrun not found: install Horovod with Gloo (scripts/setup_env.sh)")
    reports = run(data, tmp_path, ranks, "sharded", 48, bench_steps=20, reference=reference_dir)
    check_equal_shapes(reports, "eval_steps")
    check_equal_shapes(reports, "bench_steps")
    for r in reports:
        assert r["local_eval_batch"] == 48 // ranks
        assert sum(real for _, real in r["eval_steps"]) == r["rows"]  # each real row exactly once
        assert len(r["bench_steps"]) == 2 + 20 and r["bench_rate"] > 0
    padded = sum(size - real for r in reports for size, real in r["eval_steps"])
    assert padded > 0, "the shards were meant to be uneven"
    # (with row-range sharding the ranks' test shares differ by less than one display group, so on this data no
    # rank runs out early: the ran-out path is test_a_rank_that_ran_out_feeds_padding_only below)
    for key in METRICS:
        got = reports[0]["metrics"][key]
        assert all(r["metrics"][key] == got for r in reports), key  # every rank reports the same
        assert got == pytest.approx(reference[key], abs=1e-6), (key, got, reference[key])


def test_the_scripts_check_reports_unequal_shapes_and_metric_drift() -> None:
    """tests/dist/eval_padding.py's --reference check (used on GPUs by scripts/gpu_check.sh) is not vacuous."""
    from tests.dist.eval_padding import check

    metrics = {"loss_val": 0.5, "auc_roc": 0.7, "streaming_map_val": 0.6, "map_groups": 10}
    good = [{"rank": r, "local_eval_batch": 4, "rows": 6, "metrics": metrics,
             "eval_steps": [[4, 4], [4, 2]], "bench_steps": [[4, 4]] * 3} for r in range(2)]
    assert check(good, {"metrics": metrics}, 1e-6) == []
    bad = json.loads(json.dumps(good))
    bad[1]["eval_steps"] = [[4, 4], [2, 2]]  # a short batch fed to the lookup
    bad[0]["bench_steps"] = [[4, 4]] * 2  # fewer benchmark steps on one rank
    bad[0]["metrics"]["auc_roc"] = 0.7001
    failures = check(bad, {"metrics": metrics}, 1e-6)
    assert any("rank 1 fed [2, 4] rows" in f for f in failures), failures
    assert any("bench_steps: ranks ran different step counts" in f for f in failures), failures
    assert any(f.startswith("auc_roc") for f in failures), failures


def test_a_rank_that_ran_out_feeds_padding_only() -> None:
    """Trainer.eval_batches: a rank with fewer batches than the agreed step count pads a full batch of masked
    rows from its template for every missing step; its own short last batch is padded too."""
    from types import SimpleNamespace

    from wd_sok.train import Trainer

    rng = np.random.default_rng(0)
    full = Batch(tf.constant(rng.normal(size=(5, 2)), tf.float32), {"a": tf.constant([1, 2, 3, 4, 5])},
                 tf.constant([0, 1, 0, 1, 0], tf.float32), tf.constant([7, 7, 8, 8, 9], tf.int64))
    short = Batch(full.numerical[:3], {"a": full.categorical["a"][:3]}, full.label[:3], full.map_ids[:3])
    fake = SimpleNamespace(rt=SimpleNamespace(max_int=lambda n, name: 4), eval_data=[full, short],
                           _eval_template=head(full, 0), local_eval_batch=5)
    got = list(Trainer.eval_batches(fake))
    assert [b.size for b in got] == [5, 5, 5, 5]
    assert [int(np.sum(b.mask.numpy())) for b in got] == [5, 3, 0, 0]
    assert all(np.all(b.categorical["a"].numpy()[b.mask.numpy() == 0] == 0) for b in got)  # padded ids are 0
