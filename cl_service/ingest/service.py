"""The ingest path of one image: check the request, validate the image, store it durably, answer.

No gRPC here: the API layer turns protobuf messages into `IngestItem`s and `IngestOutcome`s back into
replies. One hop off the event loop per image: a pool thread validates and hashes the image (zlib,
Pillow and hashlib release the GIL) and hands it to the store's group committer; the committer's
results come back to the event loop through a mailbox that wakes the loop once per burst, not once
per image (per-image wake-ups cost more CPU than the durable write itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from cl_service.config import MIB, Settings
from cl_service.errors import ErrorCode, ServiceError, invalid, store_unavailable
from cl_service.ingest.images import ImageInfo, inspect_image
from replay_store.committer import CommitterClosedError, GroupCommitter
from replay_store.db import is_disk_full, is_unreachable, short_reason
from replay_store.naming import class_name_problem, identifier_problem
from replay_store.store import NewSample, StoredSample

log = logging.getLogger(__name__)

MAX_METADATA_ENTRIES = 32
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 1024


class IngestStatus(Enum):
    STORED = "stored"
    ALREADY_STORED = "already_stored"
    REJECTED = "rejected"


@dataclass(frozen=True)
class IngestItem:
    """One camera image as the core sees it."""

    request_id: str
    camera_id: str
    image: bytes
    label: str = ""
    captured_at: datetime | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IngestOutcome:
    """What happened to one IngestItem."""

    status: IngestStatus
    sample_id: int = 0
    sha256: str = ""
    error: ServiceError | None = None
    warnings: tuple[str, ...] = ()

    @classmethod
    def rejected(cls, error: ServiceError) -> IngestOutcome:
        return cls(IngestStatus.REJECTED, error=error)


class IngestService:
    """Validates and stores camera images; safe to call from many streams at once."""

    def __init__(self, settings: Settings, committer: GroupCommitter) -> None:
        self._settings = settings
        self._committer = committer
        threads = settings.decode_threads or max(2, os.cpu_count() or 2)
        self._decoder = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self._allowed = frozenset(settings.allowed_classes)
        self._disk = DiskGuard(settings.blob_dir, settings.min_free_disk_bytes)
        self._mailbox: _Mailbox | None = None
        self.accepted = 0
        self.rejected = 0

    def close(self) -> None:
        self._decoder.shutdown(wait=True)

    def check_request(self, item: IngestItem) -> None:
        """Cheap checks of the fields other than the image; raise ServiceError(INVALID_ARGUMENT)."""
        for kind, value, reason in (
            ("camera_id", item.camera_id, "CAMERA_ID_INVALID"),
            ("request_id", item.request_id, "REQUEST_ID_INVALID"),
        ):
            problem = identifier_problem(kind, value)
            if problem:
                raise invalid("CAMERA_ID_MISSING" if kind == "camera_id" and not value else reason, problem)
        if item.label:
            problem = class_name_problem(item.label)
            if problem:
                raise invalid("LABEL_INVALID", problem)
            if self._allowed and item.label not in self._allowed:
                allowed = ", ".join(sorted(self._allowed))
                raise invalid("LABEL_NOT_ALLOWED", f"the class {item.label!r} is not allowed here; allowed: {allowed}")
        _check_metadata(item.metadata)

    async def ingest(self, item: IngestItem) -> IngestOutcome:
        """Validate and durably store one image. Never raises for bad input: it is a REJECTED outcome."""
        try:
            self.check_request(item)
            self._disk.reserve(len(item.image))
            waiter = self._mailbox_of(asyncio.get_running_loop()).waiter()
            self._decoder.submit(self._inspect_and_store, item, waiter)
            info, stored = await waiter.future
        except ServiceError as error:
            self.rejected += 1
            return IngestOutcome.rejected(error)
        except CommitterClosedError as exc:
            return IngestOutcome.rejected(ServiceError(ErrorCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN", str(exc)))
        except OSError as exc:
            log.error("storing an image failed: %s", exc)
            return IngestOutcome.rejected(_storage_error(exc))
        except Exception as exc:
            if is_disk_full(exc):
                log.error("storing an image failed: %s", exc)
                return IngestOutcome.rejected(_storage_error(OSError(errno.ENOSPC, str(exc))))
            if is_unreachable(exc):
                return IngestOutcome.rejected(store_unavailable(short_reason(exc)))
            log.exception("storing an image failed")
            return IngestOutcome.rejected(
                ServiceError(ErrorCode.UNAVAILABLE, "STORE_UNAVAILABLE", f"the store could not save the image: {exc}")
            )
        self.accepted += 1
        notes: list[str] = []
        if info.frames > 1:
            notes.append(f"the image has {info.frames} frames; only the first is used")
        if stored.conflict:
            notes.append("this request_id was stored before with different image bytes; the original sample was kept")
        status = IngestStatus.STORED if stored.created else IngestStatus.ALREADY_STORED
        return IngestOutcome(status, stored.sample_id, stored.sha256, warnings=tuple(notes))

    def _mailbox_of(self, loop: asyncio.AbstractEventLoop) -> _Mailbox:
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = _Mailbox(loop)
        return self._mailbox

    def _inspect_and_store(self, item: IngestItem, waiter: _Waiter) -> None:
        """On a pool thread: validate and hash, then queue the durable write; `waiter` gets the outcome."""
        try:
            info = self._inspect(item.image)
            committed = self._committer.submit(_new_sample(item, info))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            waiter.post(None, exc)
            return

        def done(future: Future[StoredSample]) -> None:
            error = future.exception()
            waiter.post(None if error else (info, future.result()), error)

        committed.add_done_callback(done)

    def _inspect(self, data: bytes) -> ImageInfo:
        return inspect_image(data, max_bytes=self._settings.max_image_bytes, max_pixels=self._settings.max_image_pixels)


def _new_sample(item: IngestItem, info: ImageInfo) -> NewSample:
    return NewSample(
        camera_id=item.camera_id,
        request_id=item.request_id,
        sha256=info.sha256,
        image_format=info.image_format,
        width=info.width,
        height=info.height,
        data=item.image,
        captured_at=item.captured_at,
        metadata=dict(item.metadata),
        label=item.label or None,
    )


def _check_metadata(metadata: dict[str, str]) -> None:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise invalid("METADATA_INVALID", f"{len(metadata)} metadata entries; at most {MAX_METADATA_ENTRIES}")
    for key, value in metadata.items():
        if not key or len(key) > MAX_METADATA_KEY:
            raise invalid("METADATA_INVALID", f"metadata keys must have 1 to {MAX_METADATA_KEY} characters")
        if len(value) > MAX_METADATA_VALUE:
            raise invalid("METADATA_INVALID", f"metadata value of {key!r} is over {MAX_METADATA_VALUE} characters")
        if "\x00" in key or "\x00" in value:
            raise invalid("METADATA_INVALID", f"metadata entry {key[:64]!r} holds a NUL character")


class DiskGuard:
    """Refuses an image before it is written when the store's disk would drop below `min_free` bytes.

    The free space is measured at most every `every_s` seconds; in between, the bytes let through are counted
    against it, so a burst cannot run past the guard. Refusing early keeps the store whole: a write that fails
    half-way on a full disk is what the guard exists to avoid (the blob store would survive it, but SQLite's
    journal and the segment file should never have to).
    """

    def __init__(self, folder: Path, min_free: int, *, every_s: float = 0.5) -> None:
        self.folder = folder
        self.min_free = min_free
        self.every_s = every_s
        self._lock = threading.Lock()
        self._measured_at = -math.inf
        self._free = 0

    def reserve(self, size: int) -> None:
        if self.min_free <= 0:
            return
        with self._lock:
            now = time.monotonic()
            if now - self._measured_at >= self.every_s:
                self._free = shutil.disk_usage(_existing(self.folder)).free
                self._measured_at = now
            if self._free - size < self.min_free:
                raise ServiceError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    "DISK_LOW",
                    f"the store's disk has {self._free // MIB} MiB free, under the {self.min_free // MIB} MiB guard "
                    "(min_free_disk_bytes); the image was not stored. Free space on the data folder's disk",
                )
            self._free -= size


def _existing(folder: Path) -> Path:
    """The folder, or its nearest existing parent (the blob folder is made on first write)."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def _storage_error(exc: OSError) -> ServiceError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ServiceError(
            ErrorCode.RESOURCE_EXHAUSTED, "STORE_FULL", "the store's disk is full; the image was not stored"
        )
    return ServiceError(ErrorCode.UNAVAILABLE, "STORE_UNAVAILABLE", f"the store could not save the image: {exc}")


class _Waiter:
    """One awaiting coroutine's slot in a mailbox."""

    __slots__ = ("_mailbox", "future")

    def __init__(self, future: asyncio.Future[tuple[ImageInfo, StoredSample]], mailbox: _Mailbox) -> None:
        self.future = future
        self._mailbox = mailbox

    def post(self, result: tuple[ImageInfo, StoredSample] | None, error: BaseException | None) -> None:
        self._mailbox.post(self.future, result, error)


class _Mailbox:
    """Results posted from other threads for futures of one event loop; one wake-up per burst of posts."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._posted: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []

    def waiter(self) -> _Waiter:
        return _Waiter(self.loop.create_future(), self)

    def post(self, future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        with self._lock:
            self._posted.append((future, result, error))
            if len(self._posted) > 1:
                return  # a wake-up is already on its way
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody awaits these any more
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            posted, self._posted = self._posted, []
        for future, result, error in posted:
            if future.done():
                continue  # the awaiting coroutine was cancelled
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
