"""Merlin-dataloader input pipeline over a feature spec's parquet files, sharded per rank by rows.

Rank r of N reads global rows [r*T/N, (r+1)*T/N) of the mapping's files concatenated (see
:mod:`wd_sok.data.sharding`): every rank reads within one row of T/N whatever the number of files, and at most
one global batch of rows is left out per epoch (drop_last). The training mapping's file order is shuffled
from (seed, epoch), the same on every rank, and Merlin shuffles rows within each piece from (seed, epoch,
rank), so a run and its resume see the same order. The test mapping is read in file order, unshuffled, with
the cuts moved to display-group starts, so rows stay sorted by the map id that MAP@12 groups by and every
group is on one rank.

Start-up reads footers only, plus one pass of value checks per file, shared out over the ranks (rank r
checks files r, r+N, ...) and remembered in a verdict cache (:mod:`wd_sok.data.cache`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf

from wd_sok import storage
from wd_sok.data import sharding
from wd_sok.data.batch import Batch
from wd_sok.data.cache import VerdictCache
from wd_sok.data.checks import check_file, rules
from wd_sok.feature_spec import TEST, FeatureSpec, SpecError

# Merlin warns about GPU-less operation on every import; that is this project's normal CPU mode.
warnings.filterwarnings("ignore", message=".*(PyTorch|Triton) dtype mappings.*")
warnings.filterwarnings("ignore", message=".*Compute capability.*")
warnings.filterwarnings("ignore", message="Initializing an NVTabular Dataset in CPU mode.*")


FOOTER_READERS = 16  # footers of remote files read in parallel at start-up (each a couple of ranged GETs)


def footer(path: Path | str) -> pq.FileMetaData:
    """The parquet footer of ``path`` (a local path or a URL; no data read); SpecError for a missing or
    unreadable file, :class:`~wd_sok.storage.StorageError` naming the URL when the store refuses."""
    try:
        return storage.parquet_file(path).metadata
    except FileNotFoundError:
        raise SpecError(f"{path}: parquet file listed in the feature spec does not exist") from None
    except storage.StorageError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid and friends for corrupt files
        raise SpecError(f"{path}: not a readable parquet file ({e})") from None


def footers(paths: list[Path | str]) -> list[pq.FileMetaData]:
    """:func:`footer` of every path, in order: remote ones read by up to :data:`FOOTER_READERS` threads
    (the first failure in path order is raised)."""
    if not any(storage.is_url(p) for p in paths):
        return [footer(p) for p in paths]
    with ThreadPoolExecutor(min(FOOTER_READERS, len(paths))) as pool:
        return list(pool.map(footer, paths))


def parquet_rows(path: Path | str) -> int:
    """Row count of a parquet file from its footer (no data read)."""
    return footer(path).num_rows


def check_columns(path: Path | str, spec: FeatureSpec, columns: list[str],
                  metadata: pq.FileMetaData | None = None) -> None:
    """Check that ``path`` holds every column with the spec's dtype; raise SpecError naming the mismatch.
    ``metadata``: its footer if already read (else it is read)."""
    schema = (metadata or footer(path)).schema.to_arrow_schema()
    for name in columns:
        if name not in schema.names:
            raise SpecError(f"{path}: feature '{name}': column missing from the parquet file")
        arrow_type = schema.field(name).type
        want = spec.dtype(name)
        if name in spec.multihot:
            if not hasattr(arrow_type, "value_type"):
                raise SpecError(f"{path}: feature '{name}': multi-hot column must be a list, got {arrow_type}")
            arrow_type = arrow_type.value_type
        got = arrow_type.to_pandas_dtype().__name__
        if got != want:
            raise SpecError(f"{path}: feature '{name}': dtype {got} does not match the spec's {want}")


class DataLoader:
    """Iterates :class:`Batch` es of ``batch_size`` rows (the last may be smaller) for one rank.

    Args:
        spec: validated feature spec.
        mapping: "train" or "test".
        batch_size: rows per batch on this rank (the global batch divided by the number of ranks).
        rank, world: this process's rank and the number of ranks.
        shuffle: shuffle file order and rows (train); test data is read in order.
        seed: base seed; epoch e shuffles with a seed derived from (seed, e), the same on every rank.
        drop_last: drop a final partial batch.
        with_map: also yield the map (display) ids (test mapping with a map channel); the rank cuts then
            keep display groups whole and the map ids must be sorted.
        check_values: scan the files once for out-of-range ids, over-long lists, nulls, NaN/inf, bad labels
            (this rank's share of the files; passes are remembered in the verdict cache).
        nan_policy: "reject" non-finite numerics (an error naming file, feature, row), or fill them with "zero".
        commit_checks: write the verdicts of this rank's passed files at once; False leaves that to
            :meth:`commit_checks` (the trainer calls it once every rank agreed to start).

    Attributes:
        total_rows: rows of the whole mapping; ``rows``: rows this rank reads per epoch.
    """

    def __init__(self, spec: FeatureSpec, mapping: str, batch_size: int, rank: int = 0, world: int = 1,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False, with_map: bool = False,
                 device: str | None = None, check_values: bool = True, nan_policy: str = "reject",
                 commit_checks: bool = True) -> None:
        self.spec, self.mapping, self.batch_size = spec, mapping, batch_size
        self.shuffle, self.seed, self.drop_last, self.rank, self.world = shuffle, seed, drop_last, rank, world
        self.fill_nan = nan_policy == "zero"
        self.map_feature = spec.map_feature if (with_map and mapping == TEST) else None
        if with_map and mapping == TEST and self.map_feature is None:
            raise SpecError(f"{spec.origin}: MAP@12 needs a 'map' channel (or pass --disable_map_calculation)")
        self.files = spec.files(mapping)
        self.columns = spec.categorical + spec.numerical + [spec.label] + (
            [self.map_feature] if self.map_feature else [])
        self.infos: list[sharding.FileInfo] = []
        for path, meta in zip(self.files, footers(self.files), strict=True):
            if meta.num_rows == 0:
                raise SpecError(f"{path}: parquet file has no rows")
            check_columns(path, spec, self.columns, meta)
            self.infos.append(sharding.read_info(path, meta, self.map_feature))
        self.total_rows = sum(i.rows for i in self.infos)
        if self.map_feature:
            sharding.check_map_order(self.infos, self.map_feature)
            self.cuts = sharding.group_cuts(self.infos, self.map_feature, world)
        else:
            self.cuts = sharding.even_cuts(self.total_rows, world)
        self.rows = self.cuts[rank + 1] - self.cuts[rank]
        self.verdicts = VerdictCache(spec.base_directory)
        if check_values:
            checked = rules(spec, self.columns, nan_policy)
            for path in self.files[rank::world]:
                if not self.verdicts.passed(path, checked):
                    check_file(path, spec, self.columns, nan_policy)
                    self.verdicts.add(path, checked)
        if commit_checks:
            self.verdicts.commit()
        self.device = device or ("cpu" if not tf.config.list_physical_devices("GPU") else None)
        self.epoch = 0
        self._loader = None
        self._loader_epoch: int | None = None
        self._schema = None

    def commit_checks(self) -> None:
        """Record this rank's passed files in the verdict cache."""
        self.verdicts.commit()

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        full, rest = divmod(self.rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def segments(self, epoch: int | None = None) -> list[sharding.Segment]:
        """This rank's (file, first row, end row) pieces in ``epoch`` (default: the current one)."""
        infos = self.infos
        if self.shuffle:
            infos = [infos[i] for i in sharding.epoch_order(len(infos), self.seed,
                                                            self.epoch if epoch is None else epoch)]
        return sharding.segments(infos, self.cuts[self.rank], self.cuts[self.rank + 1])

    def _make_loader(self, pieces: list[sharding.Segment] | None = None):  # noqa: ANN202 - merlin types
        """A Merlin Loader over ``pieces`` (default: this rank's segments of the current epoch)."""
        import dask
        import dask.dataframe as dd
        import merlin.io
        from merlin.dataloader.tensorflow import Loader

        from wd_sok.data import merlin_compat

        merlin_compat.apply()
        cpu = self.device == "cpu"
        if self._schema is None:  # Merlin's schema of the columns (dtypes, list-ness), from the footers
            full = merlin.io.Dataset([str(f) for f in self.files[:1]], engine="parquet", cpu=cpu,
                                     storage_options=storage.options() if storage.is_url(self.files[0]) else None)
            self._schema = full.schema.select_by_name(self.columns)
        groups = {info.path: info.group_rows for info in self.infos}
        meta = footer(self.files[0]).schema.to_arrow_schema().empty_table().select(self.columns).to_pandas()

        def read(path: Path, first: int, end: int):  # noqa: ANN202 - a pandas frame
            return sharding.read_segment(path, first, end, self.columns, groups[path]).to_pandas()

        # One partition per segment: Merlin reads them in this order (its own shuffle of the partition order
        # is seeded from (seed, epoch) too) and shuffles rows within each.
        pieces = self.segments() if pieces is None else pieces
        parts = [dask.delayed(read)(path, a, b) for path, a, b in pieces]
        if not parts:  # no rows for this rank: an empty partition
            parts = [dask.delayed(lambda: meta)()]
        dataset = merlin.io.Dataset(dd.from_delayed(parts, meta=meta, verify_meta=False), cpu=cpu)
        dataset.schema = self._schema
        return Loader(dataset, batch_size=self.batch_size, shuffle=self.shuffle,
                      seed_fn=self._epoch_seed, drop_last=self.drop_last,
                      device="cpu" if cpu else None)

    def _epoch_seed(self) -> int:
        return int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle order of ``epoch`` (call before iterating)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch if self.shuffle else 0  # unshuffled: the same pieces every epoch
        if self._loader is None or self._loader_epoch != epoch:
            if self._loader is not None:
                self._loader.stop()
            self._loader, self._loader_epoch = self._make_loader(), epoch
        # Merlin shuffles rows inside chunks with numpy's global RNG (in its loader thread): seed it so the
        # order is a function of (seed, epoch, rank) alone.
        np.random.seed((self._epoch_seed() + 7919 * self.rank) % 2**32)
        self._loader.stop()
        for inputs, _ in self._loader:
            yield self._to_batch(inputs)

    def first(self) -> Batch:
        """The first batch, without leaving Merlin's loader thread running (or spinning) afterwards.

        A rank with no rows of its own gets the mapping's first rows instead (a sample to build variables).
        """
        if self.rows == 0:
            loader = self._make_loader([(self.files[0], 0, min(self.batch_size, self.infos[0].rows))])
            try:
                return self._to_batch(next(iter(loader))[0])
            finally:
                loader.stop()
        try:
            return next(iter(self))
        finally:
            if self._loader is not None:
                self._loader.stop()

    def _to_batch(self, inputs: dict) -> Batch:
        spec = self.spec
        categorical: dict[str, tf.Tensor | tf.RaggedTensor] = {}
        for name in spec.onehot:  # dynamic features: int64 whatever the file's int type (raw ids)
            categorical[name] = inputs[name] if spec.dynamic(name) is None else tf.cast(inputs[name], tf.int64)
        for name in spec.multihot:
            dtype = "int64" if spec.dynamic(name) is not None else spec.dtype(name)
            if name in inputs:  # declared fixed-shape list: dense [B, k]
                categorical[name] = tf.RaggedTensor.from_tensor(tf.cast(inputs[name], dtype))
            else:
                values = tf.cast(inputs[f"{name}__values"], dtype)  # a batch of no ids comes as int64
                categorical[name] = tf.RaggedTensor.from_row_splits(
                    values, tf.cast(inputs[f"{name}__offsets"], tf.int64), validate=False)
        label = tf.reshape(tf.cast(inputs[spec.label], tf.float32), [-1])
        if spec.numerical:
            numerical = tf.stack([tf.cast(tf.reshape(inputs[n], [-1]), tf.float32) for n in spec.numerical], 1)
            if self.fill_nan:
                numerical = tf.where(tf.math.is_finite(numerical), numerical, tf.zeros_like(numerical))
        else:
            numerical = tf.zeros([tf.shape(label)[0], 0], tf.float32)
        map_ids = tf.cast(tf.reshape(inputs[self.map_feature], [-1]), tf.int64) if self.map_feature else None
        return Batch(numerical=numerical, categorical=categorical, label=label, map_ids=map_ids)


def default_device() -> str:
    """'gpu' when TensorFlow sees a GPU and WD_SOK_CPU is unset, else 'cpu'."""
    return "gpu" if tf.config.list_physical_devices("GPU") and not os.environ.get("WD_SOK_CPU") else "cpu"
