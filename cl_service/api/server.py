"""The gRPC server: start-up and shutdown in one place, in order.

Start: listen with health NOT_SERVING (calls are answered UNAVAILABLE STORE_NOT_OPEN) -> open the core (store,
committer), trying a database that cannot be reached again for `store_open_timeout_s` -> the service's handlers take
the calls -> health SERVING. While serving, health follows the database (NOT_SERVING while it cannot be reached,
checked every `store_check_s`). Stop (SIGINT/SIGTERM): health NOT_SERVING -> stop accepting and give in-flight calls
`shutdown_grace_s` -> close the core (queued writes are finished first) -> done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cl_service.api.servicer import SERVICE_NAME, InspectionServicer, LateHandler, generic_handler
from cl_service.app import ServiceCore
from cl_service.auth import Authenticator
from cl_service.config import Settings
from cl_service.metrics import ServiceMetrics, start_endpoint
from cl_service.v1 import inspection_pb2
from replay_store.db import is_unreachable, short_reason

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


@dataclass
class RunningServer:
    """A started server with what is needed to stop it."""

    server: grpc.aio.Server
    core: ServiceCore
    health: Any  # grpc_health's asyncio HealthServicer (an untyped package)
    port: int
    metrics_endpoint: Any = None  # the /metrics HTTP server, when metrics_bind is set
    store_watch: asyncio.Task[None] | None = None

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_endpoint is None else int(self.metrics_endpoint.server_port)

    async def stop(self, grace: float | None = None) -> None:
        grace = self.core.settings.shutdown_grace_s if grace is None else grace
        if self.store_watch is not None:
            self.store_watch.cancel()
            await asyncio.gather(self.store_watch, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.metrics_endpoint is not None:
            await asyncio.to_thread(self.metrics_endpoint.shutdown)
        if self.core.settings.scheduler:
            await self.core.updates.stop()
        if self.core.settings.inspect:
            await self.core.inspector.stop()
        await self.core.live.stop()
        await asyncio.to_thread(self.core.close)
        log.info("server stopped")


async def start_server(settings: Settings) -> RunningServer:
    """Open the core and start serving on settings.bind; returns once the port is listening."""
    host = settings.bind.rsplit(":", 1)[0]
    if not settings.auth and host not in LOOPBACK:
        raise RuntimeError(
            f"refusing to listen on {host} without authentication: anyone who can reach it could use it. "
            "Turn auth on (auth = true, then `cl-service token create`) or bind to 127.0.0.1"
        )
    limit = settings.transport_max_message_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ]
    )
    service = LateHandler()
    server.add_generic_rpc_handlers((service,))
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await _set_health(health_servicer, serving=False)
    reflection.enable_server_reflection(
        (
            inspection_pb2.DESCRIPTOR.services_by_name["InspectionService"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        credentials = server_credentials(settings)
        if credentials is None:
            port = server.add_insecure_port(settings.bind)
        else:
            port = server.add_secure_port(settings.bind, credentials)
    except (RuntimeError, ValueError) as exc:
        raise RuntimeError(f"cannot listen on {settings.bind}: {exc}") from exc
    await server.start()
    try:
        core = await open_core(settings)
    except BaseException:
        await server.stop(0)
        raise
    authenticator = Authenticator(core.store, cache_s=settings.auth_cache_s) if settings.auth else None
    metrics = ServiceMetrics(core)
    service.inner = generic_handler(InspectionServicer(core, metrics), authenticator)
    endpoint = None
    if settings.metrics_bind:
        try:
            endpoint = start_endpoint(metrics, settings.metrics_bind)
        except (OSError, ValueError) as exc:
            await server.stop(0)
            await asyncio.to_thread(core.close)
            raise RuntimeError(f"cannot serve metrics on {settings.metrics_bind}: {exc}") from exc
        log.info("Prometheus metrics on http://%s:%d/metrics", host, endpoint.server_port)
    core.alerts.bind(asyncio.get_running_loop())
    await core.live.start()
    if settings.scheduler:
        await core.updates.start()
    if settings.inspect:
        await core.inspector.start()
    await _set_health(health_servicer, serving=True)
    watch = None
    if settings.store_check_s > 0:
        watch = asyncio.create_task(watch_store(core, health_servicer, settings.store_check_s), name="store-watch")
    log.info("cl-service listening on %s:%d (store: %s)", host, port, core.store.backend)
    if not settings.auth:
        log.warning("authentication is off: listening on loopback only (auth = true to serve a network)")
    elif credentials is None and host not in LOOPBACK:
        log.warning("TLS is off: tokens and images cross the network in clear text (set tls_cert and tls_key)")
    return RunningServer(server, core, health_servicer, port, endpoint, watch)


async def open_core(settings: Settings) -> ServiceCore:
    """Open the store and the rest of the core; a database that cannot be reached (a PostgreSQL server starting
    beside this one, restarting) is tried again, with growing pauses, for `store_open_timeout_s`."""
    deadline = time.monotonic() + settings.store_open_timeout_s
    pause = 0.5
    while True:
        try:
            return await asyncio.to_thread(ServiceCore.open, settings)
        except Exception as exc:
            if not is_unreachable(exc) or time.monotonic() + pause > deadline:
                raise
            log.warning("the store's database cannot be reached (%s); trying again in %.1f s", short_reason(exc), pause)
        await asyncio.sleep(pause)
        pause = min(pause * 2, 10.0)


async def watch_store(core: ServiceCore, health_servicer: Any, every_s: float) -> None:
    """Health follows the database: NOT_SERVING while it cannot be reached (load balancers and probes then send
    the calls elsewhere; calls that come anyway are answered UNAVAILABLE STORE_UNAVAILABLE), SERVING once it answers."""
    reachable = True
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(core.store.ping)
        except Exception as exc:  # noqa: BLE001 - any failure to answer means not serving
            if reachable:
                log.warning("the store's database cannot be reached (%s): health NOT_SERVING", short_reason(exc))
                reachable = False
                await _set_health(health_servicer, serving=False)
            continue
        if not reachable:
            log.warning("the store's database answers again: health SERVING")
            reachable = True
            await _set_health(health_servicer, serving=True)


async def _set_health(health_servicer: Any, *, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files (mutual TLS with tls_client_ca); None: plaintext."""
    if settings.tls_cert is None and settings.tls_key is None:
        if settings.tls_client_ca is not None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key: mutual TLS is TLS first")
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ValueError("TLS needs both tls_cert and tls_key")
    files = {"tls_cert": settings.tls_cert, "tls_key": settings.tls_key}
    if settings.tls_client_ca is not None:
        files["tls_client_ca"] = settings.tls_client_ca
    pem: dict[str, bytes] = {}
    for name, path in files.items():
        try:
            pem[name] = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{name} {path} cannot be read: {exc.strerror}") from exc
        if b"-----BEGIN" not in pem[name]:
            raise ValueError(f"{name} {path} is not a PEM file")
    return grpc.ssl_server_credentials(
        [(pem["tls_key"], pem["tls_cert"])],
        root_certificates=pem.get("tls_client_ca"),
        require_client_auth="tls_client_ca" in pem,
    )


async def serve_forever(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    import torch

    # Requests run on the engines' own threads; torch here only scores stored images (the inspector) and checks
    # parity at a swap. With every core, its OpenMP threads spin against the serving threads (measured: a small
    # model's training 30x slower on a busy 2-core machine); one thread is plenty for that background work.
    torch.set_num_threads(settings.server_torch_threads)
    running = await start_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if ready is not None:
        ready.set()
    print(f"cl-service listening on {settings.bind.rsplit(':', 1)[0]}:{running.port}", flush=True)
    await stop.wait()
    log.info("shutting down (grace %.1f s)", settings.shutdown_grace_s)
    await running.stop()


@contextlib.contextmanager
def server_in_thread(settings: Settings, *, timeout_s: float = 60.0) -> Iterator[RunningServer]:
    """A real server on its own event-loop thread, for in-process use (stream evaluation, tests); stopped on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="cl-service-server", daemon=True)
    thread.start()
    try:
        running = asyncio.run_coroutine_threadsafe(start_server(settings), loop).result(timeout_s)
        try:
            yield running
        finally:
            asyncio.run_coroutine_threadsafe(running.stop(grace=1.0), loop).result(timeout_s)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        loop.close()
