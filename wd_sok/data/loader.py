"""Merlin-dataloader input pipeline over a feature spec's parquet files, sharded per rank by file.

Rank r of N reads files r, r+N, r+2N, ... of the mapping (so every row is read by exactly one rank); the
training mapping is shuffled (file order and rows within Merlin's chunks) from a seed that every rank derives
from (seed, epoch), so a run and its resume see the same order. The test mapping is read in file order,
unshuffled, so rows stay sorted by the map (display) id that MAP@12 groups by.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf

from wd_sok.data.batch import Batch
from wd_sok.data.checks import check_file
from wd_sok.feature_spec import TEST, FeatureSpec, SpecError

# Merlin warns about GPU-less operation on every import; that is this project's normal CPU mode.
warnings.filterwarnings("ignore", message=".*(PyTorch|Triton) dtype mappings.*")
warnings.filterwarnings("ignore", message=".*Compute capability.*")
warnings.filterwarnings("ignore", message="Initializing an NVTabular Dataset in CPU mode.*")


def rank_files(files: list[Path], rank: int, world: int) -> list[Path]:
    """The files rank ``rank`` of ``world`` reads: every world-th file starting at ``rank``."""
    if len(files) < world:
        raise SpecError(f"{len(files)} file(s) for {world} ranks: each rank needs at least one file")
    return files[rank::world]


def parquet_rows(path: Path) -> int:
    """Row count of a parquet file from its footer (no data read)."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except FileNotFoundError:
        raise SpecError(f"{path}: parquet file listed in the feature spec does not exist") from None
    except Exception as e:  # pyarrow raises ArrowInvalid and friends for corrupt files
        raise SpecError(f"{path}: not a readable parquet file ({e})") from None


def check_columns(path: Path, spec: FeatureSpec, columns: list[str]) -> None:
    """Check that ``path`` holds every column with the spec's dtype; raise SpecError naming the mismatch."""
    schema = pq.read_schema(path)
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
        with_map: also yield the map (display) ids (test mapping with a map channel).
        check_values: scan the files once for out-of-range ids, over-long lists, NaN/inf, bad labels.
        nan_policy: "reject" non-finite numerics (an error naming file, feature, row), or fill them with "zero".
    """

    def __init__(self, spec: FeatureSpec, mapping: str, batch_size: int, rank: int = 0, world: int = 1,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False, with_map: bool = False,
                 device: str | None = None, check_values: bool = True, nan_policy: str = "reject") -> None:
        self.spec, self.mapping, self.batch_size = spec, mapping, batch_size
        self.shuffle, self.seed, self.drop_last, self.rank = shuffle, seed, drop_last, rank
        self.fill_nan = nan_policy == "zero"
        self.map_feature = spec.map_feature if (with_map and mapping == TEST) else None
        if with_map and mapping == TEST and self.map_feature is None:
            raise SpecError(f"{spec.origin}: MAP@12 needs a 'map' channel (or pass --disable_map_calculation)")
        self.files = rank_files(spec.files(mapping), rank, world)
        self.columns = spec.categorical + spec.numerical + [spec.label] + (
            [self.map_feature] if self.map_feature else [])
        self.rows = 0
        for path in self.files:
            n = parquet_rows(path)
            if n == 0:
                raise SpecError(f"{path}: parquet file has no rows")
            check_columns(path, spec, self.columns)
            if check_values:
                check_file(path, spec, self.columns, nan_policy)
            self.rows += n
        self.device = device or ("cpu" if not tf.config.list_physical_devices("GPU") else None)
        self.epoch = 0
        self._loader = None

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        full, rest = divmod(self.rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _make_loader(self):  # noqa: ANN202 - merlin types
        import merlin.io
        from merlin.dataloader.tensorflow import Loader

        from wd_sok.data import merlin_compat

        merlin_compat.apply()
        cpu = self.device == "cpu"
        # One partition per file: Merlin then never splits a file, so sharding and order are by file.
        dataset = merlin.io.Dataset([str(f) for f in self.files], engine="parquet", cpu=cpu,
                                    part_size="100GB")
        dataset.schema = dataset.schema.select_by_name(self.columns)
        return Loader(dataset, batch_size=self.batch_size, shuffle=self.shuffle,
                      seed_fn=self._epoch_seed, drop_last=self.drop_last,
                      device="cpu" if cpu else None)

    def _epoch_seed(self) -> int:
        return int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle order of ``epoch`` (call before iterating)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        if self._loader is None:
            self._loader = self._make_loader()
        # Merlin shuffles rows inside chunks with numpy's global RNG (in its loader thread): seed it so the
        # order is a function of (seed, epoch, rank) alone.
        np.random.seed((self._epoch_seed() + 7919 * self.rank) % 2**32)
        self._loader.stop()
        for inputs, _ in self._loader:
            yield self._to_batch(inputs)

    def first(self) -> Batch:
        """The first batch, without leaving Merlin's loader thread running (or spinning) afterwards."""
        try:
            return next(iter(self))
        finally:
            if self._loader is not None:
                self._loader.stop()

    def _to_batch(self, inputs: dict) -> Batch:
        spec = self.spec
        categorical: dict[str, tf.Tensor | tf.RaggedTensor] = {}
        for name in spec.onehot:
            categorical[name] = inputs[name]
        for name in spec.multihot:
            if name in inputs:  # declared fixed-shape list: dense [B, k]
                categorical[name] = tf.RaggedTensor.from_tensor(inputs[name])
            else:
                values = tf.cast(inputs[f"{name}__values"], spec.dtype(name))  # a batch of no ids comes as int64
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
