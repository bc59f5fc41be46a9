"""Row-balanced sharding under ``horovodrun -np N``: each rank's rows per epoch, and every row read once.

Each rank iterates two epochs of the training mapping (shuffled, seed 1, batch ``--batch``) with and without
drop_last, and the first epoch again from a fresh loader; rank 0 writes ``--out`` (JSON) with, per rank, the
rows read and the x1 values seen (x1 is unique per row in the test data), for the test to check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from wd_sok.data.loader import DataLoader  # noqa: E402
from wd_sok.distributed import Runtime  # noqa: E402
from wd_sok.feature_spec import TRAIN, FeatureSpec  # noqa: E402


def keys(loader: DataLoader, epoch: int) -> list[float]:
    loader.set_epoch(epoch)
    return [float(v) for b in loader for v in b.numerical[:, 0].numpy()]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    rt = Runtime()
    spec = FeatureSpec.from_yaml(Path(args.data) / "feature_spec.yaml")
    kw = {"rank": rt.rank, "world": rt.size, "shuffle": True, "seed": 1}
    whole = DataLoader(spec, TRAIN, args.batch, **kw)
    dropped = DataLoader(spec, TRAIN, args.batch, drop_last=True, **kw)
    mine = {"epoch0": keys(whole, 0), "epoch1": keys(whole, 1), "again0": keys(DataLoader(spec, TRAIN, args.batch,
                                                                                        **kw), 0),
            "dropped0": keys(dropped, 0), "len_dropped": len(dropped), "total": whole.total_rows}
    every = rt.hvd.allgather_object(mine) if rt.size > 1 else [mine]
    if rt.is_chief:
        Path(args.out).write_text(json.dumps({"ranks": rt.size, "per_rank": every}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
