"""Process group: Horovod when launched under horovodrun (or always, if installed), one process otherwise.

Everything the trainer needs from the collective layer goes through :class:`Runtime`, so the training loop
reads the same on 1 or N ranks: allreduce of dense gradients and metric sums, broadcast of dense variables,
agreement on small Python objects (checkpoint records, stop signals, errors).
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from wd_sok import watchdog


def launcher_world_size(env: Mapping[str, str]) -> tuple[str, int]:
    """The world size a multi-process launcher gave this process through its environment, with the variable
    that says so (Open MPI / mpirun, MPICH / Intel MPI / PMI, ``srun``, ``horovodrun``); ``("", 1)`` if none.
    ``SLURM_NTASKS`` alone is also set in an ``sbatch`` script's one process: only a step started by ``srun``
    (``SLURM_STEP_ID``) counts."""
    names = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "HOROVOD_SIZE"]
    if "SLURM_STEP_ID" in env:
        names += ["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"]
    for name in names:
        try:
            size = int(env.get(name, "1"))
        except ValueError:
            continue
        if size > 1:
            return name, size
    return "", 1


class Runtime:
    """Rank, world size and the few collectives the trainer uses (Horovod underneath when size > 1)."""

    def __init__(self) -> None:
        try:
            import horovod.tensorflow as hvd
        except ImportError:  # plain single-process run without Horovod installed
            hvd = None
            var, size = launcher_world_size(os.environ)
            if size > 1:  # one of N siblings, alone as "rank 0" into the same model_dir: refuse
                raise SystemExit(f"wd-sok: started as one of {size} processes ({var}={size}) but Horovod is not "
                                 "installed here, so this process cannot join them; install it (make setup-dist) "
                                 "or run one process") from None
        self.hvd = hvd
        if hvd is not None:
            watchdog.configure_horovod(os.environ)  # Gloo's timeout above the watchdog's: read by hvd.init()
            hvd.init()
            self.rank, self.size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        else:
            self.rank, self.size, self.local_rank = 0, 1, 0
        self.phase_name, self.phase_long = "start-up", True
        self.watchdog = watchdog.start(self.rank, self.size)  # None on one rank or without horovodrun's server
        if self.watchdog is not None:
            atexit.register(self.watchdog.finish)

    @contextlib.contextmanager
    def phase(self, name: str, long: bool = False) -> Iterator[None]:
        """Name what this rank is doing (the stall line says it); ``long``: a phase in which one rank may work
        long while the others wait (save, restore, export, first step), allowed a longer silence. A phase left
        by an exception stays current, so the error names the phase it came from."""
        previous = self.phase_name, self.phase_long
        self._set_phase(name, long)
        yield
        self._set_phase(*previous)

    def _set_phase(self, name: str, long: bool) -> None:
        self.phase_name, self.phase_long = name, long
        if self.watchdog is not None:
            self.watchdog.set_phase(name, long)

    def silent_ranks(self) -> list[int]:
        """Ranks whose heartbeat this rank has not seen move for a few intervals (what a failed collective
        blames); [] without a watchdog."""
        dog = self.watchdog
        return dog.silent(3 * dog.interval) if dog is not None else []

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @tf.autograph.experimental.do_not_convert  # plain Python over lists; TF 2.12's AutoGraph zip has no strict=
    def allreduce_grads(self, grads: list) -> list:
        """Sum gradients over ranks (IndexedSlices are allgathered by Horovod); identity on one rank."""
        if self.size == 1:
            return grads
        dense = [i for i, g in enumerate(grads) if not isinstance(g, tf.IndexedSlices)]
        out = list(grads)
        if dense:
            for i, g in zip(dense, self.hvd.grouped_allreduce([grads[i] for i in dense], op=self.hvd.Sum),
                            strict=True):
                out[i] = g
        for i, g in enumerate(grads):
            if isinstance(g, tf.IndexedSlices):
                out[i] = self.hvd.allreduce(g, op=self.hvd.Sum, name=f"sparse_grad_{i}")
        return out

    def sum_host(self, values: np.ndarray, name: str) -> np.ndarray:
        """Elementwise sum of a host array over ranks (metric counters), float64."""
        values = np.asarray(values, np.float64)
        if self.size == 1:
            return values
        return self.hvd.allreduce(tf.constant(values), op=self.hvd.Sum, name=name).numpy()

    def min_int(self, value: int, name: str) -> int:
        if self.size == 1:
            return int(value)
        return int(self.hvd.allreduce(tf.constant(int(value), tf.int64), op=self.hvd.Min, name=name).numpy())

    def max_int(self, value: int, name: str) -> int:
        if self.size == 1:
            return int(value)
        return int(self.hvd.allreduce(tf.constant(int(value), tf.int64), op=self.hvd.Max, name=name).numpy())

    def broadcast_variables(self, variables: list[tf.Variable]) -> None:
        """Copy rank 0's values of ``variables`` (dense weights, optimizer state) to every rank."""
        if self.size > 1 and variables:
            self.hvd.broadcast_variables(variables, root_rank=0)

    def gather_to_chief(self, tensor: tf.Tensor, name: str) -> tf.Tensor:
        """Rank 0 gets every rank's ``tensor`` concatenated along axis 0 (first dims may differ); the others
        get an empty tensor. One alltoall whose only non-empty split goes to rank 0 (Horovod has no gather)."""
        if self.size == 1:
            return tensor
        splits = tf.constant([int(tensor.shape[0])] + [0] * (self.size - 1), tf.int32)
        received, _ = self.hvd.alltoall(tensor, splits=splits, name=name)
        return received

    def allgather_object(self, obj: Any, name: str) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (one small collective)."""
        if self.size == 1:
            return [obj]
        return list(self.hvd.allgather_object(obj, name=name))

    def broadcast_object(self, obj: Any, name: str) -> Any:
        """Rank 0's picklable ``obj`` on every rank."""
        if self.size == 1:
            return obj
        return self.hvd.broadcast_object(obj, root_rank=0, name=name)

    def barrier(self) -> None:
        if self.size > 1:
            self.hvd.allreduce(tf.constant(0), name="barrier")
