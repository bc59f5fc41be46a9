"""Stall watchdog: a rank that stops answering ends the job in bounded time with one line on every live rank.

Every rank runs one daemon thread that, each ``interval`` seconds, publishes a heartbeat (a counter, the rank's
current phase, whether that phase is declared long, whether the rank has finished) to the key-value store of
the ``horovodrun`` rendezvous server (``HOROVOD_GLOO_RENDEZVOUS_ADDR`` / ``_PORT``: an HTTP server every rank
already reached to start; no shared filesystem and no collective needed). Rank 0 reads every rank's heartbeat;
the others read rank 0's and rank 0's verdict. A peer whose counter has not moved for ``timeout`` seconds
(``long_timeout`` while it or the observer is in a long phase: save, restore, export, first step, start-up)
has stopped answering: the observer prints one line naming the rank(s) and their phase, rank 0 publishes the
verdict so that every live rank prints its own line, and each live rank leaves with :data:`EXIT_STALL`
(``os._exit``: a thread cannot unwind a main thread blocked inside a collective).

The heartbeat thread runs while the main thread works (TensorFlow, file I/O and numpy release the GIL), so
a rank that is merely slow keeps answering; what stops the counter is a stopped (SIGSTOP, debugger), frozen
(swapping to death) or vanished process or host. Measured here: Horovod's own collectives do not fail when
one rank works > 30 s while the others wait (each rank's background thread keeps the Gloo negotiation going);
Gloo's timeout fires only when a peer's process stops. That timeout is raised (:func:`configure_horovod`)
above the watchdog's so that the watchdog, which can name the rank, speaks first.

Settings (environment, seconds): ``WD_SOK_STALL_TIMEOUT`` (default 30), ``WD_SOK_LONG_PHASE_TIMEOUT``
(default 120), ``WD_SOK_HEARTBEAT`` (default 1); ``WD_SOK_STALL_TIMEOUT=0`` turns the watchdog off.
"""

from __future__ import annotations

import faulthandler
import http.client
import json
import os
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

EXIT_STALL = 3
STALL_TIMEOUT_S = 30.0
#: Longest silence allowed while a rank is in a long phase. At 2 x 1e7 x 32 (5.36 GB of table state, 2 ranks)
#: the published figures (benchmarks/README.md, checkpoint_scaling) are save 4.1 s, restore 4.0 s, export
#: 15.0 s on rank 0; the same step ran 3-6x slower at load 8-14 on these 2 cores. 120 s is 8x the longest.
LONG_PHASE_TIMEOUT_S = 120.0
HEARTBEAT_S = 1.0
ACK_WAIT_S = 3.0  # rank 0 waits this long for the live ranks to read its verdict (horovodrun kills after 5 s)
SCOPE = "wd_sok_watchdog"


def settings(env: MutableMapping[str, str]) -> tuple[float, float, float]:
    """(timeout, long_timeout, interval) from the environment (see the module docstring)."""
    def get(name: str, default: float) -> float:
        try:
            return float(env.get(name, default))
        except ValueError:
            return default

    timeout = get("WD_SOK_STALL_TIMEOUT", STALL_TIMEOUT_S)
    return timeout, max(get("WD_SOK_LONG_PHASE_TIMEOUT", LONG_PHASE_TIMEOUT_S), timeout), \
        get("WD_SOK_HEARTBEAT", HEARTBEAT_S)


def configure_horovod(env: MutableMapping[str, str]) -> None:
    """Before ``hvd.init()``: Gloo's collective timeout (30 s by default) above the watchdog's longest
    allowance, so a stopped peer is named by the watchdog rather than reported by Gloo as "Timed out waiting";
    Horovod's stall warning (60 s) no earlier than a long phase may last. Values the user set are kept."""
    timeout, long_timeout, interval = settings(env)
    if timeout > 0:
        env.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(int(long_timeout + 10 * interval + 20)))
        env.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(int(long_timeout)))


class HttpStore:
    """Put / get small JSON values in the horovodrun rendezvous server's key-value store (one scope)."""

    def __init__(self, addr: str, port: int, scope: str = SCOPE, timeout: float = 2.0) -> None:
        self.addr, self.port, self.scope, self.timeout = addr, port, scope, timeout

    def _request(self, method: str, key: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.addr, self.port, timeout=self.timeout)
        try:
            conn.request(method, f"/{self.scope}/{key}", body=body,
                         headers={"Content-Length": str(len(body or b""))})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def put(self, key: str, value: dict) -> None:
        """Raises OSError / http.client.HTTPException if the server cannot be reached."""
        self._request("PUT", key, json.dumps(value).encode())

    def get(self, key: str) -> dict | None:
        """The value, or None if the key was never put; raises OSError / HTTPException as :meth:`put`."""
        status, body = self._request("GET", key)
        return json.loads(body) if status == 200 and body else None


def store_from_env(env: MutableMapping[str, str]) -> HttpStore | None:
    addr, port = env.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"), env.get("HOROVOD_GLOO_RENDEZVOUS_PORT")
    if not addr or not port:
        return None
    return HttpStore(addr, int(port))


@dataclass
class Peer:
    """What an observer knows of one rank: its last heartbeat and when (observer's clock) the counter moved."""

    changed: float
    n: int = -1
    phase: str = "start-up"
    long: bool = True
    done: bool = False


@dataclass
class Verdict:
    """Ranks that stopped answering, with their last phase and silence (seconds), as seen by ``seen_by``."""

    ranks: list[int]
    phases: list[str]
    silent_s: list[float]
    seen_by: int
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self, rank: int, phase: str) -> str:
        """The one line a live rank prints."""
        who = ", ".join(f"{r} (phase {p}, no heartbeat for {s:.0f} s)"
                        for r, p, s in zip(self.ranks, self.phases, self.silent_s, strict=True))
        noun = "rank" if len(self.ranks) == 1 else "ranks"
        seen = f", seen by rank {self.seen_by}" if self.seen_by != rank else ""
        return (f"wd-sok: error (rank {rank}, phase {phase}): {noun} {who} stopped answering{seen}; every live "
                f"rank exits {EXIT_STALL}; rerun with --use_checkpoint auto to resume from the last checkpoint, "
                "if any")

    def to_dict(self) -> dict:
        return {"ranks": self.ranks, "phases": self.phases, "silent_s": self.silent_s, "seen_by": self.seen_by}

    @staticmethod
    def from_dict(d: dict) -> Verdict:
        return Verdict([int(r) for r in d["ranks"]], [str(p) for p in d["phases"]],
                       [float(s) for s in d["silent_s"]], int(d["seen_by"]))


class Watchdog:
    """Heartbeats and stall detection for one rank (see the module docstring); :meth:`start` runs the thread."""

    def __init__(self, rank: int, size: int, store: Any, timeout: float = STALL_TIMEOUT_S,
                 long_timeout: float = LONG_PHASE_TIMEOUT_S, interval: float = HEARTBEAT_S,
                 clock: Callable[[], float] = time.monotonic,
                 on_stall: Callable[[Verdict], None] | None = None) -> None:
        self.rank, self.size, self.store = rank, size, store
        self.timeout, self.long_timeout, self.interval, self.clock = timeout, long_timeout, interval, clock
        self.on_stall = on_stall or self._exit
        self.phase, self.long, self.done, self.debug = "start-up", True, False, False
        self.count = 0
        now = clock()
        watched = range(1, size) if rank == 0 else [0]
        self.peers = {r: Peer(changed=now) for r in watched}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fired = threading.Lock()

    # ------------------------------------------------------------------ what the main thread calls
    def set_phase(self, name: str, long: bool) -> None:
        self.phase, self.long = name, long

    def start(self) -> Watchdog:
        self.beat()
        self._thread = threading.Thread(target=self._run, name="wd-sok-watchdog", daemon=True)
        self._thread.start()
        return self

    def finish(self) -> None:
        """This rank is done (normal exit): peers stop watching it; the thread ends."""
        self.done = True
        self._stop.set()
        try:
            self.beat()
        except (OSError, http.client.HTTPException):
            pass

    def silent(self, min_s: float) -> list[int]:
        """Watched ranks (not finished) whose heartbeat has not moved for ``min_s`` seconds."""
        now = self.clock()
        return [r for r, p in self.peers.items() if not p.done and now - p.changed >= min_s]

    # ------------------------------------------------------------------ one round of the thread
    def beat(self) -> None:
        self.count += 1
        self.store.put(f"hb.{self.rank}", {"n": self.count, "phase": self.phase, "long": self.long,
                                           "done": self.done})

    def check(self) -> Verdict | None:
        """Read the peers' heartbeats (rank 0: all; others: rank 0's and its verdict); the stall, if any."""
        if self.rank != 0:
            published = self.store.get("verdict")
            if published is not None:
                return Verdict.from_dict(published)
        now = self.clock()
        for r, peer in self.peers.items():
            self._observe(peer, self.store.get(f"hb.{r}"), now)
        stale = [r for r, p in self.peers.items()
                 if not p.done and now - p.changed > (self.long_timeout if p.long or self.long else self.timeout)]
        if not stale:
            return None
        verdict = Verdict(stale, [self.peers[r].phase for r in stale],
                          [round(now - self.peers[r].changed, 1) for r in stale], self.rank)
        if self.rank == 0:
            self.store.put("verdict", verdict.to_dict())
        return verdict

    def rebase(self) -> None:
        """Give every peer a fresh window (after this rank itself was stopped, or the store was unreachable:
        the silence was ours, not theirs)."""
        now = self.clock()
        for peer in self.peers.values():
            peer.changed = now

    @staticmethod
    def _observe(peer: Peer, beat: dict | None, now: float) -> None:
        if beat is None:
            return
        if int(beat["n"]) != peer.n:
            peer.n, peer.changed = int(beat["n"]), now
        peer.phase, peer.long, peer.done = str(beat["phase"]), bool(beat["long"]), bool(beat["done"])

    def _run(self) -> None:
        last = self.clock()
        while not self._stop.wait(self.interval):
            now = self.clock()
            if now - last > max(self.timeout / 2, 5 * self.interval):
                self.rebase()  # this thread did not run for a while: do not blame the peers for it
            last = now
            try:
                self.beat()
                verdict = self.check()
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                self.rebase()  # the store is unreachable: no verdict on anyone (Gloo's timeout still holds)
                continue
            if verdict is not None and not self._stop.is_set():
                self.on_stall(verdict)
                return

    def _exit(self, verdict: Verdict) -> None:
        """Print the line, let the others read the verdict, leave with EXIT_STALL."""
        if not self._fired.acquire(blocking=False):
            return
        print(verdict.line(self.rank, self.phase), file=sys.stderr, flush=True)
        if self.debug:
            faulthandler.dump_traceback(all_threads=True)
        try:
            if self.rank == 0:
                self._await_acks(verdict)
            else:
                self.store.put(f"ack.{self.rank}", {"ack": True})
        except (OSError, http.client.HTTPException, ValueError):
            pass
        sys.stdout.flush()
        os._exit(EXIT_STALL)

    def _await_acks(self, verdict: Verdict) -> None:
        """Wait (at most ACK_WAIT_S) until every rank that is neither stalled nor finished has read the verdict."""
        live = [r for r, p in self.peers.items() if r not in verdict.ranks and not p.done]
        end = self.clock() + ACK_WAIT_S
        while live and self.clock() < end:
            live = [r for r in live if self.store.get(f"ack.{r}") is None]
            time.sleep(0.05)


def start(rank: int, size: int, env: MutableMapping[str, str] | None = None) -> Watchdog | None:
    """A running watchdog for this rank, or None (one rank, no rendezvous server, or turned off)."""
    env = os.environ if env is None else env
    timeout, long_timeout, interval = settings(env)
    store = store_from_env(env)
    if size < 2 or store is None or timeout <= 0:
        return None
    dog = Watchdog(rank, size, store, timeout, long_timeout, interval)
    try:
        return dog.start()
    except (OSError, http.client.HTTPException):
        return None
