"""wd-sok entry point: train (default), --evaluate or --benchmark; plain or under `horovodrun -np N`."""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    """``own_process``: this process is the run (the script's entry): TensorFlow's noise lines are filtered
    from its stderr (wd_sok/tflog.py)."""
    from wd_sok.config import parse_config

    cfg = parse_config(argv)  # before TensorFlow loads: -h and flag errors are instant
    if cfg.plan_only:  # no TensorFlow, no ranks: a dry run of the placement planner
        from wd_sok.embedding.plan import plan_main

        return plan_main(cfg)
    from wd_sok.tflog import quiet

    quiet(cfg.debug, filter_stderr=own_process)  # before TensorFlow loads; --debug / TF_CPP_MIN_LOG_LEVEL: all
    from wd_sok.run import run

    return run(cfg)


if __name__ == "__main__":
    code = main(own_process=True)
    if code > 128:  # stopped by a signal, checkpoint durable and logs closed: leave now, without the seconds
        sys.stdout.flush()  # of TensorFlow / Horovod / loader-thread teardown (horovodrun SIGKILLs the ranks
        sys.stderr.flush()  # 5 s after forwarding a signal)
        os._exit(code)
    sys.exit(code)
