"""Per-camera rate limit on Ingest: a token bucket per camera id that slows the stream down instead of refusing.

A camera over its rate waits before its next image is read; gRPC flow control then holds the camera back. No
image is refused for it, so nothing a camera sends is lost to the limit, and one camera's burst cannot starve
the others of the decode pool and the disk. Streams of the same camera share its bucket; waiting is reserved in
order (a bucket may go below zero), so concurrent streams take turns.
"""

from __future__ import annotations

import asyncio
import time

from replay_store.naming import identifier_problem

MAX_CAMERAS = 10_000  # buckets kept; beyond it, full (idle) buckets are forgotten


class CameraRates:
    def __init__(self, per_s: float, burst: float | None = None) -> None:
        self.per_s = per_s
        self.burst = max(1.0, burst if burst is not None else 2.0 * per_s)
        self._buckets: dict[str, list[float]] = {}  # camera -> [tokens, refilled at]

    @property
    def limited(self) -> bool:
        return self.per_s > 0

    async def wait(self, camera_id: str) -> float:
        """Take one image's token for `camera_id`, sleeping first when there is none; returns the wait.

        An id that is not a valid camera id is not limited here: the request is refused right after.
        """
        if not self.limited or identifier_problem("camera_id", camera_id):
            return 0.0
        now = time.monotonic()
        bucket = self._buckets.get(camera_id)
        if bucket is None:
            if len(self._buckets) >= MAX_CAMERAS:
                self._forget_idle(now)
            bucket = self._buckets[camera_id] = [self.burst, now]
        bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.per_s)
        bucket[1] = now
        bucket[0] -= 1.0
        if bucket[0] >= 0.0:
            return 0.0
        delay = -bucket[0] / self.per_s
        await asyncio.sleep(delay)
        return delay

    def _forget_idle(self, now: float) -> None:
        for camera, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.per_s >= self.burst:
                del self._buckets[camera]
