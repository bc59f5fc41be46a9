"""Save dynamic tables under N ranks, restore under M, check every rank's rows against the files (numpy).

``--mode save`` (N ranks): a wide (dim 1, FTRL) and a deep (dim 3, lazy RMSprop) collection of two dynamic
tables each (``u``: LRU, min_count 2; ``v``: LFU), small capacities, raw ids drawn per (rank, step) so that
rows are evicted and keys are pending; a few training steps, then ``wd_sok.checkpoint.save``.

``--mode restore`` (M ranks, ``--backend sharded|sok``; sok uses the fake module of tests/fake_sok.py): the
same collections, ``restore_latest``, then, independently of the reader, every shard file is loaded whole
with numpy (test side only) and each rank checks, for every key of every table, that it holds it iff
``owner(k) == rank`` under M, and that its value, slots (legacy-format ``rms``; ``accumulator``,
``linear``), ``count`` and ``last`` equal the file's row; the same for the pending keys and the clock.
With ``--rules none|sok`` the save also looks up ids no step trained (evaluation) and the restore checks they
were not saved and that an export (wd_sok.export's block copy to rank 0) serves every saved row and the zero row
for them. ``--sok real`` uses the installed SOK instead of the fake (scripts/gpu_check.sh, on GPUs).
Rank 0 writes a JSON report to ``--out``; exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from wd_sok import checkpoint  # noqa: E402
from wd_sok.distributed import Runtime  # noqa: E402
from wd_sok.embedding import make_embedding  # noqa: E402
from wd_sok.feature_spec import DynamicConfig, TableConfig  # noqa: E402
from wd_sok.optim import LazyRMSprop  # noqa: E402
from wd_sok.state import KeyedTableState, table_states  # noqa: E402

CAP = 60
SOK_CAP = 256


def tables(dim: int, rules: str) -> list[TableConfig]:
    """``rules`` "evict": u LRU with min_count 2, v LFU; "none": both min_count 1, no eviction; "sok": both
    min_count 1, LRU, capacity 256 (SOK's rules: a power-of-two share >= 128 under 1 and 2 ranks)."""
    if rules == "sok":
        return [TableConfig("u", SOK_CAP, dim, dynamic=DynamicConfig(SOK_CAP, 1, "lru")),
                TableConfig("v", SOK_CAP, dim, 2, True, "sum", DynamicConfig(SOK_CAP, 1, "lru"))]
    u, v = (DynamicConfig(CAP, 2, "lru"), DynamicConfig(CAP, 1, "lfu")) if rules == "evict" else (
        DynamicConfig(CAP, 1, "none"), DynamicConfig(CAP, 1, "none"))
    return [TableConfig("u", CAP, dim, dynamic=u), TableConfig("v", CAP, dim, 2, True, "sum", v)]


class Model:
    """What table_states needs: two collections and their optimizers."""

    def __init__(self, backend: str, rt: Runtime, rules: str) -> None:
        self.wide_embedding = make_embedding(backend, tables(1, rules), "zeros", 4, "wide", rt)
        self.deep_embedding = make_embedding(backend, tables(3, rules), "glorot_normal", 4, "deep", rt)
        self.wide_opt = tf.keras.optimizers.legacy.Ftrl(0.1)
        self.deep_opt = LazyRMSprop(0.05, rho=0.5)
        self.wide_embedding.attach_optimizer(self.wide_opt)
        self.deep_embedding.attach_optimizer(self.deep_opt)


def batch(rank: int, step: int) -> dict:
    rng = np.random.default_rng([7, rank, step])
    u = (rng.zipf(1.3, 40) * 1_000_000_007 + step).astype(np.int64)
    lengths = rng.integers(0, 3, 40)
    v = (rng.integers(-60, 60, int(lengths.sum())) * 3).astype(np.int64)
    return {"u": tf.constant(u), "v": tf.RaggedTensor.from_row_lengths(tf.constant(v), tf.constant(lengths))}


def train(model: Model, rank: int, steps: int) -> None:
    pairs = ((model.wide_embedding, model.wide_opt), (model.deep_embedding, model.deep_opt))

    @tf.function(reduce_retracing=True)
    def step(ids: dict) -> None:
        for emb, opt in pairs:
            with tf.GradientTape() as tape:
                out = emb(ids, training=True)
                loss = tf.add_n([tf.reduce_sum(tf.square(out[n] - 0.3)) for n in out])
            variables = emb.sparse_variables
            grads = tape.gradient(loss, variables)
            rest = emb.apply_own([(g, v) for g, v in zip(grads, variables, strict=True)])
            if rest:
                opt.apply_gradients(rest)

    for s in range(steps):
        step(batch(rank, s))


UNSEEN = np.array([2**60 + 1, 2**60 + 2, -(2**59) - 3], np.int64)  # looked up in evaluation only, never trained


def look_unseen(model: Model) -> None:
    """An evaluation lookup of ids no training step saw: no backend may give them rows."""
    ids = {"u": tf.constant(UNSEEN), "v": tf.RaggedTensor.from_row_lengths(tf.constant(UNSEEN), [1, 1, 1])}
    for emb in (model.wide_embedding, model.deep_embedding):
        out = emb(ids, training=False)
        if any(np.asarray(v).any() for v in out.values()):
            raise AssertionError("an evaluation lookup of never-trained ids read non-zero rows")


def check_export(model: Model, folder: Path, rt: Runtime) -> list[str]:
    """Export the deep tables the way wd_sok.export does (to rank 0's serving copy): every saved key serves its
    saved value, the never-trained ids serve the zero row."""
    from wd_sok.export import _copy_keyed, _replicated_like

    emb = model.deep_embedding
    serving = type("Serving", (), {"deep_embedding": _replicated_like(emb)})()
    failures = []
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in ("u", "v"):
        _copy_keyed(emb, serving if rt.is_chief else None, "deep", name, rt)
        if not rt.is_chief:
            continue
        entry = manifest["tables"][f"deep/{name}"]
        keys = np.concatenate([np.load(folder / s["files"]["key"]) for s in entry["shards"]])
        values = np.concatenate([np.load(folder / s["files"]["value"]) for s in entry["shards"]])
        if np.isin(UNSEEN, keys).any():
            failures.append(f"deep/{name}: a never-trained id was saved")
        ids = tf.constant(np.concatenate([keys, UNSEEN]))
        both = {"u": ids, "v": tf.RaggedTensor.from_row_lengths(ids, tf.ones_like(ids))}
        got = serving.deep_embedding(both)[name].numpy()
        if not np.allclose(got[:keys.size], values, rtol=1e-6, atol=1e-7) or got[keys.size:].any():
            failures.append(f"deep/{name}: the export does not serve the saved rows and zeros for unseen ids")
    return failures


def dense(model: Model) -> dict[str, np.ndarray]:
    return {"opt/wide_iterations": np.int64(model.wide_opt.iterations.numpy()),
            "opt/deep_iterations": np.int64(model.deep_opt.iterations.numpy())}


def import_dense(model: Model, arrays: dict[str, np.ndarray], _origin: str) -> None:
    model.wide_opt.iterations.assign(int(arrays["opt/wide_iterations"]))
    model.deep_opt.iterations.assign(int(arrays["opt/deep_iterations"]))


def check(model: Model, folder: Path, rt: Runtime, owner_of, report_drops: dict) -> list[str]:  # noqa: ANN001
    manifest = json.loads((folder / "manifest.json").read_text())
    failures = []
    for state in table_states(model, model.wide_opt, model.deep_opt):
        assert isinstance(state, KeyedTableState)
        entry = manifest["tables"][state.key]
        if entry["placement"] != "dynamic":
            failures.append(f"{state.key}: placement {entry['placement']}")
        files = {a: np.concatenate([np.load(folder / s["files"][a]) for s in entry["shards"]])
                 for a in entry["arrays"]}
        mine = owner_of(files["key"], rt.size) == rt.rank
        # a rank whose share of the capacity is smaller than the keys it owns under M keeps the first ones in
        # file order (shards in the manifest's order) and drops the rest
        cap = state.collection.capacity[state.table.name]
        mine[np.flatnonzero(mine)[cap:]] = False
        report_drops[state.key] = int((owner_of(files["key"], rt.size) == rt.rank).sum() - mine.sum())
        n = state.count()
        held = {a: state.read(a, 0, n) for a in state.arrays()}
        order = np.argsort(held["key"])
        want_order = np.argsort(files["key"][mine])
        if not np.array_equal(held["key"][order], files["key"][mine][want_order]):
            failures.append(f"{state.key}: rank {rt.rank} holds {n} keys, owns {int(mine.sum())} in the files")
            continue
        sok = type(state.collection).__name__ == "SokDynamicEmbedding"  # SOK keeps no count / last / clock
        for a in state.arrays():
            got, want = held[a][order], files[a][mine][want_order]
            if sok and a in ("count", "last"):
                want = np.zeros_like(want)
            if not np.allclose(got, want, rtol=1e-6, atol=1e-7):
                failures.append(f"{state.key}: array {a} differs from the files")
        pk, pc = state.pending()
        pmine = owner_of(files["pending_key"], rt.size) == rt.rank
        if dict(zip(pk.tolist(), pc.tolist(), strict=True)) != dict(zip(
                files["pending_key"][pmine].tolist(), files["pending_count"][pmine].tolist(), strict=True)):
            failures.append(f"{state.key}: pending keys differ")
        if not sok and state.collection.clock_value() != max(s["clock"] for s in entry["shards"]):
            failures.append(f"{state.key}: clock not restored")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("save", "restore"), required=True)
    parser.add_argument("--backend", default="sharded")
    parser.add_argument("--rules", choices=("evict", "none", "sok"), default="evict")
    parser.add_argument("--sok", choices=("fake", "real"), default="fake",
                        help="--backend sok with tests/fake_sok.py (CPU) or the installed SOK (GPU)")
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.backend == "sok" and args.sok == "fake":
        from tests.fake_sok import install

        install()
    rt = Runtime()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:  # one GPU per rank, as main.py does (SOK needs it)
        gpu = gpus[rt.local_rank % len(gpus)]
        tf.config.set_visible_devices([gpu], "GPU")
        tf.config.experimental.set_memory_growth(gpu, True)
    model = Model(args.backend, rt, args.rules)
    report: dict = {"rank": rt.rank, "failures": []}
    if args.backend == "sok" and args.rules == "sok":
        kinds = {type(e.part(n)).__name__ for e in (model.wide_embedding, model.deep_embedding) for n in ("u", "v")}
        if kinds != {"SokDynamicEmbedding"}:
            report["failures"].append(f"SOK does not hold the dynamic tables (parts: {sorted(kinds)})")
    if args.mode == "save":
        train(model, rt.rank, 6)
        if args.rules != "evict":  # (the eviction test's tables may drop keys on restore: no export check there)
            look_unseen(model)
        states = table_states(model, model.wide_opt, model.deep_opt)
        checkpoint.save(args.model_dir, 6, states, dense(model) if rt.is_chief else None,
                        {"epoch": 0, "step_in_epoch": 6}, rt)
        report["counters"] = {k: v.tolist() for k, v in model.deep_embedding.counters().items()}
        for name in ("u", "v"):  # wide and deep saw the same ids with the same rules: the same keys have rows
            wide, deep = (np.sort(e.part(name).read_keyed(name, "key", 0, e.part(name).keyed_count(name)))
                          for e in (model.wide_embedding, model.deep_embedding))
            if not np.array_equal(wide, deep):
                report["failures"].append(f"{name}: wide and deep tables hold different keys")
    else:
        manifest, path = checkpoint.restore_latest(args.model_dir, table_states(model, model.wide_opt,
                                                                                model.deep_opt),
                                                   lambda a, o: import_dense(model, a, o), rt)
        owner_of = model.deep_embedding.parts[0].owner_of_keys
        report["dropped"] = {}
        report["failures"] = check(model, path, rt, owner_of, report["dropped"])
        if args.rules != "evict":
            look_unseen(model)
            report["failures"] += check_export(model, path, rt)
        report["rows"] = {n: int(model.deep_embedding.part(n).keyed_count(n)) for n in ("u", "v")}
    reports = rt.allgather_object(report, "report")
    if rt.is_chief:
        Path(args.out).write_text(json.dumps(reports))
    return 1 if any(r["failures"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
