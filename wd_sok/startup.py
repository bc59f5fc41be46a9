"""Agreed start-up: every rank runs its local checks (no collectives), then all agree in one collective.

A rank that failed a check alone must not leave the others waiting inside a collective (they would die
with Horovod tracebacks), so start-up is "local checks -> :func:`agree` (one allgather) -> go": every rank
learns whether any rank failed and all stop together with the lowest failing rank's message.
"""

from __future__ import annotations

import signal

from wd_sok.distributed import Runtime


class StartupError(Exception):
    """Some rank could not start; the message is the lowest failing rank's one-line error."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


def agree(runtime: Runtime, error: str | None) -> None:
    """Collective: raise :class:`StartupError` on every rank if ``error`` is set on any rank.

    Under several ranks a failed start also ignores SIGTERM from then on: horovodrun terminates the other
    ranks as soon as the first one exits, and each rank must get to exit 2 by itself (printing its line).
    """
    errors = [error]
    if runtime.size > 1:
        errors = runtime.hvd.allgather_object(error, name="startup_errors")
    for rank, message in enumerate(errors):
        if message is not None:
            if runtime.size > 1:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise StartupError(message, rank)
