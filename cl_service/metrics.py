"""Prometheus metrics: what the service did (counters, latency histograms, updated as it happens) and what the
store holds now (gauges, read from the store at scrape time).

`metrics_bind` ("host:port", empty: off) starts a plain HTTP endpoint at /metrics. It has no authentication:
bind it to loopback or to the network the scraper lives on (docs/security.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlmodel import col

from replay_store.models import ExemplarRow, ModelVersionRow, UpdateRun

if TYPE_CHECKING:
    from cl_service.app import ServiceCore

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """The registry of one server process."""

    def __init__(self, core: ServiceCore) -> None:
        self.registry = CollectorRegistry()
        self.rpc_seconds = Histogram(
            "cl_rpc_duration_seconds",
            "Time to answer a call (unary) or to the end of the stream, by RPC and status code.",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ingest_images = Counter(
            "cl_ingest_images", "Images received on Ingest streams, by outcome.", ["status"], registry=self.registry
        )
        self.ingest_bytes = Counter(
            "cl_ingest_bytes", "Encoded image bytes received on Ingest.", registry=self.registry
        )
        self.registry.register(_StoreCollector(core))

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpc_seconds.labels(method, code).observe(seconds)

    def observe_ingest(self, status: str, size: int) -> None:
        self.ingest_images.labels(status).inc()
        self.ingest_bytes.inc(size)


class _StoreCollector(Collector):
    """Gauges read when Prometheus scrapes: store contents, live model, queues, alerts, updates, replay buffer."""

    def __init__(self, core: ServiceCore) -> None:
        self.core = core

    def collect(self) -> Iterator[Metric]:
        core = self.core
        status = core.status()
        yield _gauge("cl_samples", "Stored samples.", status.samples_total)
        yield _gauge("cl_samples_unlabeled", "Stored samples without a label.", status.samples_unlabeled)
        yield _gauge("cl_blob_bytes", "Bytes of stored image blobs.", status.blob_bytes_total)
        yield _gauge("cl_ingest_streams", "Open Ingest streams.", status.active_streams)
        yield _gauge("cl_classify_queue_depth", "Classify requests waiting for a batch.", core.live.batcher.depth)
        yield _gauge("cl_alerts_open", "Open (unacknowledged) alert incidents.", status.open_alerts)
        live = GaugeMetricFamily("cl_live_model_info", "The live model version and its engine (value 1).",
                                 labels=["version", "engine"])  # fmt: skip
        if status.live_model_version:
            live.add_metric([status.live_model_version, status.live_engine], 1)
        yield live
        with core.store.engine.connect() as connection:
            exemplars = connection.execute(select(func.count()).select_from(ExemplarRow)).scalar_one()
            runs = connection.execute(select(col(UpdateRun.state), func.count()).group_by(col(UpdateRun.state))).all()
            last = connection.execute(
                select(col(UpdateRun.started_at), col(UpdateRun.finished_at))
                .where(col(UpdateRun.finished_at).is_not(None), col(UpdateRun.started_at).is_not(None))
                .order_by(col(UpdateRun.id).desc())
                .limit(1)
            ).first()
            report = connection.execute(
                select(col(ModelVersionRow.metrics)).where(col(ModelVersionRow.live).is_(True))
            ).scalar()
        yield _gauge("cl_replay_buffer_exemplars", "Exemplars in the replay buffer.", exemplars)
        outcomes = GaugeMetricFamily("cl_update_runs", "Update runs recorded, by state.", labels=["state"])
        for state, count in runs:
            outcomes.add_metric([state], count)
        yield outcomes
        if last is not None and last[0] is not None and last[1] is not None:
            seconds = (last[1] - last[0]).total_seconds()
            yield _gauge("cl_update_last_duration_seconds", "Duration of the latest finished update run.", seconds)
        counts: dict[str, Any] = (report or {}).get("counts", {}) if isinstance(report, dict) else {}
        ratio = pseudo_label_acceptance(counts)
        if ratio is not None:
            yield _gauge(
                "cl_pseudo_label_acceptance_ratio",
                "Share of the unlabeled images the live version's update judged that got a pseudo-label.",
                ratio,
            )


def pseudo_label_acceptance(counts: dict[str, Any]) -> float | None:
    """Pseudo-labelled / judged unlabeled images of an update report's counts (None: it judged none).

    Judged: the new unlabeled images less those flagged as unknown defects and those next to a new class
    (neither is the teacher's to label), plus those of the latter that took the new class by propagation;
    `pseudo_accepted` counts the teacher's and the propagated labels."""
    left_out = counts.get("unlabeled_flagged_unknown", 0) + counts.get("unlabeled_near_new_class", 0)
    left_out -= counts.get("pseudo_propagated", 0)
    judged = counts.get("new_unlabeled", 0) - left_out
    return counts.get("pseudo_accepted", 0) / judged if judged > 0 else None


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def start_endpoint(metrics: ServiceMetrics, bind: str) -> Any:
    """Serve /metrics on `bind` ("host:port", port 0: any free one); returns the HTTP server (`.server_port`)."""
    from prometheus_client import start_http_server

    host, _, port = bind.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=metrics.registry)
    return server
