"""Restore the latest checkpoint of --model_dir under this launch's rank count and backend, and write the
restored state as whole arrays (gathered for the comparison, test side only) plus what each rank holds.

Run under ``horovodrun -np M`` (or plain python for M = 1) with the same model flags as the training run
(tests/dist/common.main_args); rank 0 writes --out (npz) and --out + ".json".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist.state import gathered_state  # noqa: E402
from wd_sok.config import parse_config  # noqa: E402
from wd_sok.distributed import Runtime  # noqa: E402
from wd_sok.train import Trainer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args, rest = parser.parse_known_args()
    cfg = parse_config(rest)
    rt = Runtime()
    trainer = Trainer(cfg, rt)
    trainer.restore()
    state = gathered_state(trainer.model, trainer.wide_opt, trainer.deep_opt, rt)
    collections = (trainer.model.wide_embedding, trainer.model.deep_embedding)
    held = rt.allgather_object({"rank": rt.rank, "rows": {
        f"{e.prefix}/{n}": int(np.prod(e.table_variable(n).shape[:1])) for e in collections for n in e.tables},
        "placements": {f"{e.prefix}/{n}": e.placement(n).describe() for e in collections for n in e.tables}},
        "held_rows")
    if rt.is_chief:
        np.savez(args.out, **state)
        Path(args.out + ".json").write_text(json.dumps({
            "epoch": trainer.epoch, "step_in_epoch": trainer.step_in_epoch, "global_step": trainer.global_step,
            "backend": trainer.backend, "ranks": rt.size, "held": held}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
