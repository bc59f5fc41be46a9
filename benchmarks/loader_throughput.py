"""Merlin loader throughput (rows/s) through ``wd_sok.data.loader.DataLoader`` on CPU, per multi-hot layout.

Variants, same rows and numerics, training settings (shuffle on, drop_last), one full epoch per sample:

* ``onehot_numerical``: ``tests/feature_specs/no_multihot.yaml`` (13 one-hot + 13 numerical, no lists);
* ``ragged``: ``baseline.yaml`` (3 multi-hot lists of 1..3 ids): Merlin yields ``name__values`` /
  ``name__offsets``, DataLoader builds a RaggedTensor (the project's path: ``wd_sok.data.merlin_compat``
  splits each list column into values and offsets with pyarrow; tests/test_loader.py checks it equal to
  Merlin's own split, which an earlier ``_npflatten`` variant here patched with ``np.concatenate``);
* ``fixed_merlin``: the same files with every list padded to exactly ``max_hotness`` ids (a row's ids
  repeated cyclically) and the Merlin schema declaring shape ``(None, k)`` (value_count min = max = k), so
  Merlin yields a dense ``[B, k]`` tensor; read by :class:`FixedHotnessLoader` (a local DataLoader subclass);
* ``fixed_ragged``: the fixed-length files read as ragged (no schema change): isolates the data layout from
  Merlin's dense-list code path;
* ``fixed_reshape``: fixed-length files read as ragged by Merlin and turned into ``[B, k]`` by a reshape of
  the values (no per-row work): what a "fixed hotness" option in DataLoader could do instead of the schema.

Usage::

    .venv/bin/python benchmarks/loader_throughput.py                     # 500k rows, batch 4096 and 32768
    .venv/bin/python benchmarks/loader_throughput.py --rows 200000 --reps 3 --batch_sizes 4096 --profile

Writes ``benchmarks/results/loader_throughput.json`` (and ``.png``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VARIANTS = ("onehot_numerical", "ragged", "fixed_merlin", "fixed_ragged", "fixed_reshape")


# ----------------------------------------------------------------------------- data
def pad_lists_to_max(src: Path, dst: Path, hotness: dict[str, int]) -> Path:
    """Copy dataset ``src`` to ``dst`` with every multi-hot list made exactly ``hotness[name]`` long.

    Row ``[a, b]`` with k = 3 becomes ``[a, b, a]`` (ids repeated cyclically), so ids stay in range and the
    signal is roughly kept. The feature spec (same max_hotness) is copied unchanged.
    """
    stamp = dst / "padded_from.txt"
    if stamp.exists() and stamp.read_text() == str(src.resolve()):
        return dst
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.parquet"))
    for path in sorted(src.rglob("*.parquet")):
        tab = pq.read_table(path)
        for name, k in hotness.items():
            if name not in tab.column_names:
                continue
            col = tab.column(name).combine_chunks()
            values, offsets = col.values.to_numpy(), col.offsets.to_numpy().astype(np.int64)
            lengths = np.maximum(np.diff(offsets), 1)
            idx = offsets[:-1, None] + (np.arange(k)[None, :] % lengths[:, None])
            fixed = pa.ListArray.from_arrays(pa.array(np.arange(0, len(lengths) * k + 1, k, dtype=np.int32)),
                                             pa.array(values[idx].ravel()))
            tab = tab.set_column(tab.column_names.index(name), name, fixed.cast(col.type))
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(tab, out)
    stamp.write_text(str(src.resolve()))
    return dst


# ----------------------------------------------------------------------------- loaders
def fixed_hotness_loader_class() -> type:
    """DataLoader subclass for lists of exactly max_hotness ids, in one of two modes.

    ``mode="merlin"``: declare shape ``(None, k)`` in the Merlin schema so Merlin yields a dense ``[B, k]``
    (``DataLoader._to_batch`` already accepts a dense ``name`` key). ``mode="reshape"``: leave the schema
    ragged and reshape ``name__values`` to ``[B, k]`` (offsets unused).
    """
    import tensorflow as tf
    from merlin.schema import Schema

    from wd_sok.data.batch import Batch
    from wd_sok.data.loader import DataLoader

    class FixedHotnessLoader(DataLoader):
        def __init__(self, *args: Any, mode: str = "merlin", **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.mode = mode

        def _make_loader(self):  # noqa: ANN202 - merlin types
            if self.mode != "merlin":
                return super()._make_loader()
            import merlin.io
            from merlin.dataloader.tensorflow import Loader

            dataset = merlin.io.Dataset([str(f) for f in self.files], engine="parquet", cpu=True,
                                        part_size="100GB")
            schema = dataset.schema.select_by_name(self.columns)
            cols = [schema[n].with_shape((None, self.spec.max_hotness(n))) if n in self.spec.multihot
                    else schema[n] for n in schema.column_names]
            dataset.schema = Schema(cols)
            return Loader(dataset, batch_size=self.batch_size, shuffle=self.shuffle, seed_fn=self._epoch_seed,
                          drop_last=self.drop_last, device="cpu")

        def _to_batch(self, inputs: dict) -> Batch:
            if self.mode == "reshape":
                inputs = dict(inputs)
                for name in self.spec.multihot:
                    k = self.spec.max_hotness(name)
                    inputs[name] = tf.reshape(inputs.pop(f"{name}__values"), [-1, k])
                    inputs.pop(f"{name}__offsets")
            return super()._to_batch(inputs)

    return FixedHotnessLoader


def make_loader(variant: str, data: dict[str, Path], batch: int) -> Any:
    from wd_sok.data.loader import DataLoader
    from wd_sok.feature_spec import TRAIN, FeatureSpec

    folder = {"onehot_numerical": data["no_multihot"], "ragged": data["baseline"]}.get(variant, data["fixed"])
    spec = FeatureSpec.from_yaml(folder / "feature_spec.yaml")
    kw = {"shuffle": True, "seed": 0, "drop_last": True, "check_values": False}
    if variant == "fixed_merlin":
        return fixed_hotness_loader_class()(spec, TRAIN, batch, mode="merlin", **kw)
    if variant.startswith("fixed_reshape"):
        return fixed_hotness_loader_class()(spec, TRAIN, batch, mode="reshape", **kw)
    return DataLoader(spec, TRAIN, batch, **kw)


def one_epoch(loader: Any, epoch: int) -> tuple[int, float, dict[str, Any]]:
    """Rows and seconds of one full epoch (Merlin's thread start included, as in training)."""
    loader.set_epoch(epoch)
    rows, t0, shapes = 0, time.perf_counter(), {}
    for batch in loader:
        rows += batch.size
        if not shapes:
            shapes = {k: (type(v).__name__, list(v.shape)) for k, v in batch.categorical.items()
                      if k.endswith("_list")}
    return rows, time.perf_counter() - t0, shapes


def profile_epoch(loader: Any, top: int = 12) -> str:
    """cProfile one epoch; the ``top`` functions by own time, as text (Merlin's thread is not profiled:
    its work shows in the main thread only where the main thread waits, so read this with the rows/s)."""
    prof = cProfile.Profile()
    prof.enable()
    one_epoch(loader, 99)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=500_000, help="training rows per dataset")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--reps", type=int, default=3, help="epochs per variant and batch size (interleaved)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--profile", action="store_true", help="also cProfile one epoch per variant (top functions)")
    p.add_argument("--out", default="loader_throughput")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON")
    args = p.parse_args(argv)
    if args.replot:
        import json

        saved = json.loads((common.RESULTS / f"{args.out}.json").read_text())
        plot(saved["results"], saved["params"]["batch_sizes"], common.RESULTS / f"{args.out}.png")
        return 0

    common.log(f"datasets ({args.rows} train rows)")
    data = {"baseline": common.ensure_dataset(f"baseline_{args.rows}", "baseline", args.rows, 1000),
            "no_multihot": common.ensure_dataset(f"no_multihot_{args.rows}", "no_multihot", args.rows, 1000)}
    from wd_sok.feature_spec import FeatureSpec

    spec = FeatureSpec.from_yaml(data["baseline"] / "feature_spec.yaml")
    data["fixed"] = pad_lists_to_max(data["baseline"], common.DATA / f"baseline_fixed_{args.rows}",
                                     {n: spec.max_hotness(n) for n in spec.multihot})

    samples: dict[tuple[str, int], list[float]] = {}
    shapes: dict[str, Any] = {}
    loaders = {(v, b): make_loader(v, data, b) for v in args.variants for b in args.batch_sizes}
    for (v, b), loader in loaders.items():  # warm-up epoch: imports, Merlin/dask first-use costs
        rows, secs, shapes[v] = one_epoch(loader, 0)
        common.log(f"warm-up {v} batch {b}: {rows / secs:,.0f} rows/s")
    for rep in range(args.reps):
        for (v, b), loader in loaders.items():
            rows, secs, _ = one_epoch(loader, rep + 1)
            samples.setdefault((v, b), []).append(rows / secs)
            common.log(f"rep {rep} {v} batch {b}: {rows / secs:,.0f} rows/s ({rows} rows, {secs:.2f} s)")

    profiles = {}
    if args.profile:
        for v in args.variants:
            profiles[v] = profile_epoch(loaders[(v, args.batch_sizes[0])])

    rows_out = []
    for b in args.batch_sizes:
        base = common.median(samples.get(("ragged", b), [float("nan")]))
        for v in args.variants:
            s = common.spread(samples[(v, b)])
            rows_out.append({"variant": v, "batch": b, "rows_per_s": s["median"], "min": s["min"], "max": s["max"],
                             "vs_ragged": s["median"] / base, "categorical_shape": shapes.get(v)})
    print(common.table(rows_out, [("variant", "variant"), ("batch", "batch"), ("rows_per_s", "rows/s (median)"),
                                  ("min", "min"), ("max", "max"), ("vs_ragged", "x ragged")]))
    for v, text in profiles.items():
        print(f"\n--- cProfile, {v}, batch {args.batch_sizes[0]} (top by own time)\n{text}")
    path = common.write_json(args.out, {
        "params": vars(args), "datasets": {k: str(v) for k, v in data.items()},
        "unit": "rows per second through DataLoader (one full shuffled epoch, Merlin thread start included)",
        "results": rows_out,
        "samples": {f"{v}@{b}": s for (v, b), s in samples.items()},
        "profiles": profiles})
    plot(rows_out, args.batch_sizes, common.RESULTS / f"{args.out}.png")
    common.log(f"wrote {path}")
    return 0


def plot(rows: list[dict[str, Any]], batch_sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(batch_sizes)
    for i, b in enumerate(batch_sizes):
        vals = [next(r["rows_per_s"] for r in rows if r["variant"] == v and r["batch"] == b) for v in variants]
        ax.bar(np.arange(len(variants)) + i * width, vals, width, label=f"batch {b}")
    ax.set_xticks(np.arange(len(variants)) + width * (len(batch_sizes) - 1) / 2, variants, rotation=15)
    ax.set_yscale("log")
    ax.set_ylabel("rows/s (median, log scale)")
    for i, b in enumerate(batch_sizes):
        for j, v in enumerate(variants):
            val = next(r["rows_per_s"] for r in rows if r["variant"] == v and r["batch"] == b)
            ax.text(j + i * width, val, f"{val / 1e3:.0f}k", ha="center", va="bottom", fontsize=7)
    ax.set_title("DataLoader throughput on CPU by multi-hot layout")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
