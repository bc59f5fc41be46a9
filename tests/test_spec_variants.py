"""Each reference spec variant: generate (CSV) -> transcode -> Merlin loader == the generated rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT
from wd_sok.data.loader import DataLoader
from wd_sok.feature_spec import FeatureSpec
from wd_sok.tools.generate import generate
from wd_sok.tools.transcode import transcode

VARIANTS = sorted((ROOT / "tests" / "feature_specs").glob("*.yaml"))


def _loaded(spec: FeatureSpec, mapping: str, world: int) -> dict[str, list]:
    cols: dict[str, list] = {n: [] for n in spec.categorical + spec.numerical + [spec.label]}
    with_map = mapping == "test" and spec.map_feature is not None
    if with_map:
        cols[spec.map_feature] = []
    for rank in range(world):
        for b in DataLoader(spec, mapping, 64, rank=rank, world=world, with_map=with_map):
            for n in spec.onehot:
                cols[n] += b.categorical[n].numpy().tolist()
                assert b.categorical[n].dtype.name == spec.dtype(n)
            for n in spec.multihot:
                cols[n] += b.categorical[n].to_list()
                assert b.categorical[n].dtype.name == spec.dtype(n)
            for i, n in enumerate(spec.numerical):
                cols[n] += b.numerical[:, i].numpy().tolist()
            cols[spec.label] += b.label.numpy().tolist()
            if with_map:
                cols[spec.map_feature] += b.map_ids.numpy().tolist()
    return cols


def _generated(spec: FeatureSpec, mapping: str) -> dict[str, list]:
    files = spec.files(mapping)
    # ranks read consecutive row ranges of the files in spec order (unshuffled): rank 0's rows, then rank 1's
    # ... are the files' rows in spec order, whatever ``world``
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return {n: table.column(n).to_pylist() for n in table.column_names}


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.stem for v in VARIANTS])
def test_generate_transcode_load(variant: Path, tmp_path: Path) -> None:
    spec_in = FeatureSpec.from_yaml(variant)
    generate(spec_in, tmp_path / "csv", n_train=300, n_test=150, train_files=2, test_files=2, seed=1,
             file_format="csv")
    transcode(tmp_path / "csv" / "feature_spec.yaml", tmp_path / "parquet", chunk_size=100)
    generate(spec_in, tmp_path / "direct", n_train=300, n_test=150, train_files=2, test_files=2, seed=1)
    spec = FeatureSpec.from_yaml(tmp_path / "parquet" / "feature_spec.yaml")
    direct = FeatureSpec.from_yaml(tmp_path / "direct" / "feature_spec.yaml")
    for mapping in ("train", "test"):
        for world in (1, 2):
            got = _loaded(spec, mapping, world)
            want = _generated(spec, mapping)
            assert len(got[spec.label]) == (300 if mapping == "train" else 150)
            for name, values in got.items():
                if name in spec.numerical:
                    np.testing.assert_array_equal(np.float32(values), np.float32(want[name]), err_msg=name)
                else:
                    assert values == want[name], (variant.stem, mapping, world, name)
        # the transcoded rows are the rows generated directly as parquet
        a, b = _loaded(spec, mapping, 1), _loaded(direct, mapping, 1)
        assert a == b
