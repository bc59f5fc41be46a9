"""TensorFlow's C++ log lines in a run of ``main.py``: errors only, and none of the three that are not errors.

TensorFlow 2.15 logs through two C++ loggers. Its own honours ``TF_CPP_MIN_LOG_LEVEL`` (0 everything, 1 no
INFO, 2 no WARNING either, 3 no ERROR either); even at 2 a CPU run prints ``E ... SetPriority unimplemented for
this stream.``, an ERROR line that reports no error. XLA's code logs through its own static copy of Abseil, which
reads no environment variable and exports nothing to set: its ``I0000 ... Compiled cluster using XLA!`` line,
and absl's "All log messages before absl::InitializeLog() is called are written to STDERR" in front of it, come
out at any level.

:func:`quiet` (``main.py``, before TensorFlow loads) sets ``TF_CPP_MIN_LOG_LEVEL=2`` and passes the process's
stderr through a small child process that drops exactly those three lines (:data:`NOISE`) and forwards every
other byte. The child outlives a crash of the run: it ignores SIGINT / SIGTERM and exits once every writer of
the pipe has closed it, so a traceback or a fatal signal's report still arrives whole. ``--debug`` (level 0, no
filter) or a ``TF_CPP_MIN_LOG_LEVEL`` the user set (kept, no filter) brings every line back.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import sys
import time
from collections.abc import Iterable, MutableMapping

QUIET_LEVEL = "2"  # TensorFlow's own logger: errors only
NOISE = (  # whole lines, without their newline
    re.compile(rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"),
    re.compile(rb"I\d{4} [\d:.]+ +\d+ device_compiler\.h:\d+\] Compiled cluster using XLA!  This line is logged "
               rb"at most once for the lifetime of the process\."),
    re.compile(rb"[\d-]+ [\d:.]+: E \S+\] SetPriority unimplemented for this stream\."),
)


def quiet(debug: bool = False, environ: MutableMapping[str, str] = os.environ, filter_stderr: bool = False) -> bool:
    """Before TensorFlow loads: ``--debug`` sets ``TF_CPP_MIN_LOG_LEVEL=0``; a value the user set is kept;
    otherwise it becomes 2 and, with ``filter_stderr`` (a process of its own, not a library call), stderr goes
    through :func:`start_filter`. Returns whether this run is quieted."""
    if debug:
        environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        return False
    if "TF_CPP_MIN_LOG_LEVEL" in environ:
        return False
    environ["TF_CPP_MIN_LOG_LEVEL"] = QUIET_LEVEL
    if filter_stderr:
        start_filter()
    return True


def is_noise(line: bytes) -> bool:
    return any(p.fullmatch(line.rstrip(b"\r\n")) for p in NOISE)


def kept(chunks: Iterable[bytes]) -> Iterable[bytes]:
    """The bytes of ``chunks`` (a stream cut anywhere) less the :data:`NOISE` lines; a last line without a
    newline is kept as it is."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        out = b"".join(line + b"\n" for line in lines if not is_noise(line))
        if out:
            yield out
    if pending and not is_noise(pending):
        yield pending


def start_filter() -> int:
    """Point fd 2 at a pipe read by a forked child that writes :func:`kept` to the original stderr; returns the
    child's pid. Call it before any thread starts (TensorFlow's included)."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the filter: no Python-level cleanup of the parent's state, only bytes in and out
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C / horovodrun's SIGTERM reach the whole group:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the run's last lines must still get through
            os.close(write_end)

            def chunks() -> Iterable[bytes]:
                while data := os.read(read_end, 65536):
                    yield data

            for out in kept(chunks()):
                while out:
                    out = out[os.write(2, out):]
        finally:
            os._exit(0)
    os.close(read_end)
    original = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def drain() -> None:  # at a normal exit: close our end, let the filter write the rest before we return
        sys.stderr.flush()
        os.dup2(original, 2)
        deadline = time.monotonic() + 5.0  # a subprocess that inherited the pipe may hold it open
        try:
            while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
                time.sleep(0.01)
        except ChildProcessError:
            pass

    atexit.register(drain)
    return pid
