"""The live engine, swapped without dropping or stalling a request.

`EngineSlot.lease()` hands out the current engine together with its version and counts the lease; a request
(or a micro-batch) runs entirely on what it leased, so it finishes on the engine it started on and its reply
names the version that produced it. `swap` installs a loaded, warmed-up, parity-checked engine in one
assignment under a lock; new leases get the new engine at once, and the old one is closed only after its last
lease ends (drain), or after `drain_timeout_s` (a stuck request must not pin an engine's memory forever; it then
fails with the engine's "not loaded" error).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from cl_service.engines.base import Engine

log = logging.getLogger(__name__)


class NoLiveEngineError(RuntimeError):
    """No model version is live yet (before the first accepted update), so nothing can classify."""


@dataclass
class _Generation:
    version: str
    engine: Engine
    leases: int = 0
    retired: bool = False
    drained: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Lease:
    version: str
    engine: Engine


class EngineSlot:
    def __init__(self, *, drain_timeout_s: float = 30.0) -> None:
        self._lock = threading.Lock()
        self._current: _Generation | None = None
        self.drain_timeout_s = drain_timeout_s
        self.swaps = 0

    @property
    def version(self) -> str | None:
        current = self._current
        return current.version if current else None

    @contextlib.contextmanager
    def lease(self) -> Iterator[Lease]:
        with self._lock:
            generation = self._current
            if generation is None:
                raise NoLiveEngineError("no model version is live yet: the first update has not been accepted")
            generation.leases += 1
        try:
            yield Lease(generation.version, generation.engine)
        finally:
            with self._lock:
                generation.leases -= 1
                done = generation.retired and generation.leases == 0
            if done:
                generation.drained.set()

    def swap(self, version: str, engine: Engine) -> str | None:
        """Make `engine` (loaded and checked) live; returns the version it replaced after that one drained and
        was closed."""
        new = _Generation(version, engine)
        with self._lock:
            old, self._current = self._current, new
            self.swaps += 1
            if old is not None:
                old.retired = True
                if old.leases == 0:
                    old.drained.set()
        if old is None:
            return None
        started = time.monotonic()
        if not old.drained.wait(self.drain_timeout_s):
            log.warning(
                "engine of %s still had %d requests after %.0f s of draining; closing it anyway",
                old.version,
                old.leases,
                self.drain_timeout_s,
            )
        old.engine.close()
        log.info("%s -> %s: old engine drained in %.3f s and closed", old.version, version, time.monotonic() - started)
        return old.version

    def close(self) -> None:
        with self._lock:
            current, self._current = self._current, None
        if current is not None:
            current.retired = True
            if current.leases == 0 or current.drained.wait(self.drain_timeout_s):
                current.engine.close()
