"""Feature specification: what the columns of a dataset are and where they live on disk.

The YAML format follows NVIDIA DeepLearningExamples' WideAndDeep (TF2)::

    channel_spec:            # role of each feature
      onehot_categorical: [ad_id, ...]
      multihot_categorical: [topic_id_list, ...]
      numerical: [ad_id_ctr, ...]
      label: [clicked]
      map: [display_id]      # optional; only in the test mapping
    feature_spec:            # what each feature is
      ad_id: {cardinality: 250000, dtype: int32, embedding_dim: 128}
      topic_id_list: {cardinality: 350, max_hotness: 3, embedding_dim: 64}
      uuid: {dynamic: {capacity: 1000000, min_count: 2, evict: lru}, dtype: int64, embedding_dim: 64}
      platform: {cardinality: 4, embedding_dim: 16, placement: replicated}
      ad_id_ctr: {dtype: float32}
    source_spec:             # where it is stored; paths relative to the YAML's folder
      train: [{type: parquet, features: [...], files: [train/part_0.parquet, ...]}]
      test:  [{type: parquet, features: [...], files: [test/part_0.parquet, ...]}]
    metadata: {}

A categorical feature either has a fixed ``cardinality`` (ids in [0, cardinality)) or is ``dynamic``: any
int64 id, rows handed out by hash tables (``capacity`` rows over all ranks; an id gets a row once seen
``min_count`` times; at capacity rows are evicted by ``evict``: ``lru``, ``lfu`` or ``none``). ``placement``
(``replicated``, ``table_wise`` or ``row_wise``) overrides the planner's choice for a fixed table.

Every rule violation raises :class:`SpecError` with one line naming the file, the feature and the rule.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wd_sok import storage

ONEHOT = "onehot_categorical"
MULTIHOT = "multihot_categorical"
NUMERICAL = "numerical"
LABEL = "label"
MAP = "map"
CHANNELS = (ONEHOT, MULTIHOT, NUMERICAL, LABEL, MAP)
TRAIN = "train"
TEST = "test"
MAPPINGS = (TRAIN, TEST)
TOP_KEYS = ("channel_spec", "feature_spec", "source_spec", "metadata")
FEATURE_KEYS = ("dtype", "cardinality", "max_hotness", "embedding_dim", "dynamic", "placement")
DYNAMIC_KEYS = ("capacity", "min_count", "evict")
EVICT_POLICIES = ("lru", "lfu", "none")
PLACEMENTS = ("replicated", "table_wise", "row_wise")
CHUNK_KEYS = ("type", "features", "files")
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32")
FLOAT_DTYPES = ("float16", "float32", "float64")
# dtype used when the spec declares none (the reference's specs declare none)
DEFAULT_DTYPES = {ONEHOT: "int32", MULTIHOT: "int32", NUMERICAL: "float32", LABEL: "float32", MAP: "int64"}
EMBEDDING_SIZES_FILE = "embedding_sizes.json"


class SpecError(ValueError):
    """A feature spec breaks a rule; the message is one line: ``<file>: feature '<name>': <rule>``."""


@dataclass(frozen=True)
class DynamicConfig:
    """A dynamic (hash-table) table's rules: ``capacity`` rows over all ranks, admission after ``min_count``
    sightings, eviction policy ``evict`` ("lru", "lfu" or "none": when full, new ids read the zero row)."""

    capacity: int
    min_count: int = 1
    evict: str = "lru"


@dataclass(frozen=True)
class TableConfig:
    """What an embedding table is (not where it lives).

    Attributes:
        name: feature (and table) name.
        cardinality: number of rows; ids must lie in [0, cardinality).
        dim: embedding width (1 for the wide part).
        max_hotness: most ids per row; 1 for one-hot features.
        multihot: rows are id lists (pooled by ``combiner``) rather than one id.
        combiner: pooling of multi-hot rows, "sum" or "mean" (mean divides by the row's id count).
        dynamic: None for a fixed table; else its hash-table rules (``cardinality`` is then its capacity,
            and ids are any int64).
        placement: the spec's placement override ("replicated", "table_wise", "row_wise"), "" to let the
            planner choose.
    """

    name: str
    cardinality: int
    dim: int
    max_hotness: int = 1
    multihot: bool = False
    combiner: str = "sum"
    dynamic: DynamicConfig | None = None
    placement: str = ""


@dataclass
class FeatureSpec:
    """A validated feature spec. Build with :meth:`from_yaml` or :meth:`from_dict`."""

    feature_spec: dict[str, dict[str, Any]]
    channel_spec: dict[str, list[str]]
    source_spec: dict[str, list[dict[str, Any]]]
    metadata: dict[str, Any] = field(default_factory=dict)
    base_directory: Path | str = Path(".")  # a str only for a URL (s3://...)
    origin: str = "<feature spec>"

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_yaml(cls, path: str | Path, validate: bool = True, allow_csv: bool = False) -> FeatureSpec:
        """Load and validate ``path`` (a local path or a URL, :mod:`wd_sok.storage`); relative file paths
        resolve against its folder."""
        path = path if storage.is_url(path) else Path(path)
        try:
            text = storage.read_text(path)
        except OSError as e:
            raise SpecError(f"{path}: cannot read feature spec ({e.strerror or e})") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise SpecError(f"{path}: malformed YAML{where}: {problem}") from None
        return cls.from_dict(raw, base_directory=storage.parent(path), origin=str(path), validate=validate,
                             allow_csv=allow_csv)

    @classmethod
    def from_dict(cls, raw: Any, base_directory: str | Path = ".", origin: str = "<feature spec>",
                  validate: bool = True, allow_csv: bool = False) -> FeatureSpec:
        if not isinstance(raw, dict):
            raise SpecError(f"{origin}: the spec must be a mapping with keys {', '.join(TOP_KEYS)}")
        unknown = sorted(set(raw) - set(TOP_KEYS))
        if unknown:
            raise SpecError(f"{origin}: unknown top-level key '{unknown[0]}' (allowed: {', '.join(TOP_KEYS)})")
        for key in ("channel_spec", "feature_spec", "source_spec"):
            if not isinstance(raw.get(key), dict):
                raise SpecError(f"{origin}: '{key}' is missing or not a mapping")
        spec = cls(
            feature_spec={k: dict(v or {}) if isinstance(v, dict) or v is None else v
                          for k, v in raw["feature_spec"].items()},
            channel_spec={k: list(v or []) if isinstance(v, list) or v is None else v
                          for k, v in raw["channel_spec"].items()},
            source_spec=copy.deepcopy(raw["source_spec"]),
            metadata=dict(raw.get("metadata") or {}),
            base_directory=base_directory if storage.is_url(base_directory) else Path(base_directory),
            origin=origin,
        )
        if validate:
            spec.validate(allow_csv=allow_csv)
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {"channel_spec": copy.deepcopy(self.channel_spec),
                "feature_spec": copy.deepcopy(self.feature_spec),
                "source_spec": copy.deepcopy(self.source_spec),
                "metadata": copy.deepcopy(self.metadata)}

    def to_yaml(self, path: str | Path) -> None:
        """Write the spec (paths stay as they are: relative to the folder it is written to)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    # ----------------------------------------------------------------- queries
    def channel(self, name: str) -> list[str]:
        return list(self.channel_spec.get(name) or [])

    @property
    def onehot(self) -> list[str]:
        return self.channel(ONEHOT)

    @property
    def multihot(self) -> list[str]:
        return self.channel(MULTIHOT)

    @property
    def categorical(self) -> list[str]:
        """One-hot then multi-hot features: the stable order of embedding tables and deep inputs."""
        return self.onehot + self.multihot

    @property
    def numerical(self) -> list[str]:
        return self.channel(NUMERICAL)

    @property
    def label(self) -> str:
        return self.channel(LABEL)[0]

    @property
    def map_feature(self) -> str | None:
        names = self.channel(MAP)
        return names[0] if names else None

    def dtype(self, name: str) -> str:
        """Declared dtype of ``name``, or its channel's default."""
        declared = self.feature_spec.get(name, {}).get("dtype")
        if declared:
            return str(declared)
        if isinstance(self.feature_spec.get(name), dict) and "dynamic" in self.feature_spec[name]:
            return "int64"  # raw ids
        for channel in CHANNELS:
            if name in self.channel(channel):
                return DEFAULT_DTYPES[channel]
        raise SpecError(f"{self.origin}: feature '{name}': not in any channel")

    def cardinality(self, name: str) -> int:
        """Rows of ``name``'s table: its ``cardinality``, or a dynamic feature's ``capacity``."""
        dyn = self.dynamic(name)
        return dyn.capacity if dyn is not None else int(self.feature_spec[name]["cardinality"])

    def dynamic(self, name: str) -> DynamicConfig | None:
        """The feature's :class:`DynamicConfig`, or None for a fixed-cardinality feature."""
        raw = self.feature_spec[name].get("dynamic")
        if raw is None:
            return None
        return DynamicConfig(capacity=int(raw["capacity"]), min_count=int(raw.get("min_count", 1)),
                             evict=str(raw.get("evict", "lru")))

    @property
    def dynamic_features(self) -> list[str]:
        """Categorical features with dynamic tables, in categorical order."""
        return [n for n in self.categorical if self.feature_spec[n].get("dynamic") is not None]

    def max_hotness(self, name: str) -> int:
        return int(self.feature_spec[name].get("max_hotness", 1))

    def files(self, mapping: str) -> list[Path | str]:
        """Paths of the mapping's files, in spec order: Paths, or URL strings when the spec's folder or the
        file's entry is a URL."""
        return [storage.join(self.base_directory, f) for chunk in self.source_spec.get(mapping, [])
                for f in chunk["files"]]

    def features_in(self, mapping: str) -> list[str]:
        return [f for chunk in self.source_spec.get(mapping, []) for f in chunk["features"]]

    def embedding_dims(self, sizes_file: str | Path | None = None) -> dict[str, int]:
        """Embedding width per categorical feature: the spec's ``embedding_dim`` or a JSON file.

        The JSON is ``sizes_file`` if given, else ``embedding_sizes.json`` beside the spec if present.
        A feature defined in both places, or in neither, is an error: each width has one source.
        """
        path = storage.join(sizes_file) if sizes_file else storage.join(self.base_directory, EMBEDDING_SIZES_FILE)
        from_file: dict[str, Any] = {}
        if sizes_file or storage.exists(path):
            try:
                from_file = json.loads(storage.read_text(path))
            except (OSError, ValueError) as e:
                raise SpecError(f"{path}: cannot read embedding sizes: {e}") from None
        dims: dict[str, int] = {}
        for name in self.categorical:
            in_spec = self.feature_spec[name].get("embedding_dim")
            in_file = from_file.get(name)
            if in_spec is not None and in_file is not None:
                raise SpecError(f"{self.origin}: feature '{name}': embedding_dim defined both in the spec and "
                                f"in {path}; keep one")
            dim = in_spec if in_spec is not None else in_file
            if dim is None:
                raise SpecError(f"{self.origin}: feature '{name}': no embedding_dim in the spec nor in {path}")
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
                raise SpecError(f"{self.origin}: feature '{name}': embedding_dim must be a positive integer, "
                                f"got {dim!r}")
            dims[name] = dim
        return dims

    def tables(self, dims: dict[str, int], combiner: str = "sum") -> list[TableConfig]:
        """Deep-part table configs in the stable categorical order (use dims of 1 for the wide part)."""
        return [TableConfig(name=n, cardinality=self.cardinality(n), dim=dims[n], max_hotness=self.max_hotness(n),
                            multihot=n in self.multihot, combiner=combiner if n in self.multihot else "sum",
                            dynamic=self.dynamic(n), placement=str(self.feature_spec[n].get("placement", "")))
                for n in self.categorical]

    # ----------------------------------------------------------------- validation
    def _fail(self, feature: str | None, rule: str) -> SpecError:
        who = f"feature '{feature}': " if feature else ""
        return SpecError(f"{self.origin}: {who}{rule}")

    def validate(self, world_size: int = 1, allow_csv: bool = False) -> None:
        """Check every rule; raise :class:`SpecError` at the first broken one."""
        self._validate_channels()
        self._validate_features()
        self._validate_sources(world_size, allow_csv)

    def _validate_channels(self) -> None:
        for channel, names in self.channel_spec.items():
            if channel not in CHANNELS:
                raise self._fail(None, f"unknown channel '{channel}' (allowed: {', '.join(CHANNELS)})")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise self._fail(None, f"channel '{channel}' must be a list of feature names")
        seen: dict[str, str] = {}
        for channel, names in self.channel_spec.items():
            for name in names:
                if name in seen:
                    raise self._fail(name, f"listed in two channels ('{seen[name]}' and '{channel}')")
                seen[name] = channel
                if name not in self.feature_spec:
                    raise self._fail(name, f"in channel '{channel}' but not defined in feature_spec")
        labels = self.channel(LABEL)
        if len(labels) != 1:
            raise self._fail(None, f"exactly one label feature is required, found {len(labels)} ({labels})")
        if len(self.channel(MAP)) > 1:
            raise self._fail(self.channel(MAP)[1], "at most one map feature is allowed")

    def _validate_features(self) -> None:
        for name, props in self.feature_spec.items():
            if not isinstance(props, dict):
                raise self._fail(name, "definition must be a mapping")
            unknown = sorted(set(props) - set(FEATURE_KEYS))
            if unknown:
                raise self._fail(name, f"unknown key '{unknown[0]}' (allowed: {', '.join(FEATURE_KEYS)})")
        for name in self.categorical:
            if "dynamic" in self.feature_spec[name]:
                self._validate_dynamic(name)
                continue
            self._validate_placement(name)
            card = self.feature_spec[name].get("cardinality")
            if not isinstance(card, int) or isinstance(card, bool) or card < 1:
                raise self._fail(name, f"categorical feature needs an integer cardinality >= 1, got {card!r}")
            dtype = self.dtype(name)
            if dtype not in INT_DTYPES:
                raise self._fail(name, f"categorical feature needs an integer dtype, got '{dtype}'")
            if dtype in ("int8", "int16", "uint8", "uint16", "int32") and card > 2 ** {"int8": 7, "int16": 15,
                    "uint8": 8, "uint16": 16, "int32": 31}[dtype]:
                raise self._fail(name, f"cardinality {card} does not fit dtype '{dtype}'")
        for name in self.multihot:
            hot = self.feature_spec[name].get("max_hotness")
            if not isinstance(hot, int) or isinstance(hot, bool) or hot < 1:
                raise self._fail(name, f"multi-hot feature needs an integer max_hotness >= 1, got {hot!r}")
        for name in self.onehot:
            if self.feature_spec[name].get("max_hotness", 1) != 1:
                raise self._fail(name, "one-hot feature cannot have max_hotness other than 1")
        for name in self.numerical + self.channel(LABEL):
            dtype = self.dtype(name)
            if dtype not in FLOAT_DTYPES:
                raise self._fail(name, f"{'label' if name == self.label else 'numerical'} feature needs a "
                                       f"float dtype, got '{dtype}'")
            for key in ("cardinality", "max_hotness", "embedding_dim", "dynamic", "placement"):
                if key in self.feature_spec[name]:
                    raise self._fail(name, f"'{key}' is only for categorical features")
        for name in self.channel(MAP):
            if self.dtype(name) not in INT_DTYPES:
                raise self._fail(name, f"map feature needs an integer dtype, got '{self.dtype(name)}'")

    def _validate_dynamic(self, name: str) -> None:
        """Rules of a ``dynamic: {capacity, min_count, evict}`` feature."""
        props = self.feature_spec[name]
        dyn = props["dynamic"]
        if "cardinality" in props:
            raise self._fail(name, "has both 'dynamic' and 'cardinality'; a dynamic table has no fixed "
                                   "cardinality (its ids are any int64): keep one")
        if "placement" in props:
            raise self._fail(name, "a dynamic table is placed by key hash; 'placement' is only for fixed tables")
        if not isinstance(dyn, dict):
            raise self._fail(name, f"'dynamic' must be a mapping with keys {', '.join(DYNAMIC_KEYS)}, got {dyn!r}")
        unknown = sorted(set(dyn) - set(DYNAMIC_KEYS))
        if unknown:
            raise self._fail(name, f"dynamic: unknown key '{unknown[0]}' (allowed: {', '.join(DYNAMIC_KEYS)})")
        for key, default in (("capacity", None), ("min_count", 1)):
            value = dyn.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise self._fail(name, f"dynamic: {key} must be an integer >= 1, got {value!r}")
        evict = dyn.get("evict", "lru")
        if evict not in EVICT_POLICIES:
            raise self._fail(name, f"dynamic: unknown eviction policy {evict!r} (allowed: "
                                   f"{', '.join(EVICT_POLICIES)})")
        dtype = self.dtype(name)
        if dtype not in INT_DTYPES:
            raise self._fail(name, f"categorical feature needs an integer dtype, got '{dtype}'")

    def _validate_placement(self, name: str) -> None:
        placement = self.feature_spec[name].get("placement")
        if placement is not None and placement not in PLACEMENTS:
            raise self._fail(name, f"unknown placement {placement!r} (allowed: {', '.join(PLACEMENTS)})")

    def _validate_sources(self, world_size: int, allow_csv: bool) -> None:
        for mapping, chunks in self.source_spec.items():
            if mapping not in MAPPINGS:
                raise self._fail(None, f"unknown mapping '{mapping}' (allowed: {', '.join(MAPPINGS)})")
            if not isinstance(chunks, list) or not chunks:
                raise self._fail(None, f"mapping '{mapping}' must be a non-empty list of chunks")
            for i, chunk in enumerate(chunks):
                where = f"mapping '{mapping}' chunk {i}"
                if not isinstance(chunk, dict):
                    raise self._fail(None, f"{where} must be a mapping with keys {', '.join(CHUNK_KEYS)}")
                unknown = sorted(set(chunk) - set(CHUNK_KEYS))
                if unknown:
                    raise self._fail(None, f"{where}: unknown key '{unknown[0]}' "
                                           f"(allowed: {', '.join(CHUNK_KEYS)})")
                allowed = ("parquet", "csv") if allow_csv else ("parquet",)
                if chunk.get("type") not in allowed:
                    raise self._fail(None, f"{where}: type must be {' or '.join(allowed)}, got "
                                           f"{chunk.get('type')!r}" + ("" if allow_csv else
                                           " (convert CSV with wd-sok-transcode)"))
                for key in ("features", "files"):
                    if not isinstance(chunk.get(key), list) or not chunk[key]:
                        raise self._fail(None, f"{where}: '{key}' must be a non-empty list")
                for name in chunk["features"]:
                    if name not in self.feature_spec:
                        raise self._fail(name, f"in {where} but not defined in feature_spec")
        for mapping in MAPPINGS:
            if mapping not in self.source_spec:
                raise self._fail(None, f"mapping '{mapping}' is missing from source_spec")
            present = self.features_in(mapping)
            for name in present:
                if present.count(name) > 1:
                    raise self._fail(name, f"listed twice in mapping '{mapping}'")
            for channel in CHANNELS:
                for name in self.channel(channel):
                    if channel == MAP and mapping == TRAIN:
                        if name in present:
                            raise self._fail(name, "map feature belongs only in the 'test' mapping")
                    elif name not in present:
                        raise self._fail(name, f"in channel '{channel}' but missing from mapping '{mapping}'")
            n_files = len(self.files(mapping))
            if n_files < world_size:
                raise self._fail(None, f"mapping '{mapping}' has {n_files} file(s) for {world_size} ranks; "
                                       f"each rank needs at least one (re-split the data)")
