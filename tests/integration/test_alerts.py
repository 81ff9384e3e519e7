"""Alerts: similar unusual images group into one incident, different ones open another; WatchAlerts streams the log
and resumes after a cursor, also across a server restart; AcknowledgeAlert; bad cursors and ids."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest

from cl_service.alerts import AlertBook, Unusual
from cl_service.api.server import server_in_thread
from cl_service.client import CameraClient, CameraImage, Client
from cl_service.config import Settings, load_settings
from cl_service.v1 import inspection_pb2 as pb
from replay_store.models import utcnow
from tests.conftest import ServerHandle, png_bytes

pytestmark = pytest.mark.integration

CRACK = np.array([1.0, 0.1, 0.0, 0.0], dtype=np.float32)
SPOT = np.array([0.0, 0.0, 1.0, 0.2], dtype=np.float32)


def _unusual(sample_id: int, direction: np.ndarray, noise: float, seed: int, minutes: float = 0) -> Unusual:
    vector = direction + np.random.default_rng(seed).normal(0, noise, direction.shape).astype(np.float32)
    return Unusual(sample_id, "cam-1", vector, 2.0 + seed / 10, 1.5, "v0001", utcnow() + timedelta(minutes=minutes))


def _samples(server: ServerHandle, count: int) -> list[int]:
    results = list(CameraClient(server.target, "cam-1").stream([CameraImage(png_bytes(i)) for i in range(count)]))
    return [r.sample_id for r in results]


def test_similar_unusual_images_are_one_incident(server: ServerHandle) -> None:
    book: AlertBook = server.running.core.alerts
    ids = _samples(server, 24)
    opened, event = book.record(_unusual(ids[0], CRACK, 0.0, 0))
    assert event.event_type == "opened" and opened.count == 1
    for n in range(1, 20):
        alert, event = book.record(_unusual(ids[n], CRACK, 0.05, n))
        assert alert.id == opened.id and event.event_type == "updated"
    assert alert.count == 20 and len(alert.example_sample_ids) == 16 and alert.example_sample_ids[0] == ids[0]
    assert alert.max_score == pytest.approx(2.0 + 19 / 10)
    spot, event = book.record(_unusual(ids[20], SPOT, 0.0, 0))
    assert spot.id != opened.id and event.event_type == "opened"
    later, _ = book.record(_unusual(ids[21], CRACK, 0.0, 0, minutes=120))  # past the grouping window: new incident
    assert later.id not in (opened.id, spot.id)
    with pytest.raises(ValueError, match="finite"):
        book.record(_unusual(ids[22], np.full(4, np.nan, dtype=np.float32), 0.0, 0))
    with Client(server.target) as client:
        assert client.status().open_alerts == 3


def _collect(target: str, cursor: str, count: int) -> list[pb.AlertEvent]:
    events: list[pb.AlertEvent] = []
    with Client(target) as client:
        stream = client.watch_alerts(cursor, timeout_s=30)
        for event in stream:
            events.append(event)
            if len(events) == count:
                stream.cancel()  # type: ignore[attr-defined]
                break
    return events


def test_watch_alerts_resumes_after_its_cursor_across_a_restart(tmp_path: Path) -> None:
    settings: Settings = load_settings(data_dir=tmp_path / "data", bind="127.0.0.1:0", alert_poll_s=0.1)
    with server_in_thread(settings) as running:
        handle = ServerHandle(running)
        ids = _samples(handle, 6)
        book = running.core.alerts
        first, _ = book.record(_unusual(ids[0], CRACK, 0.0, 0))
        book.record(_unusual(ids[1], CRACK, 0.0, 1))
        second, _ = book.record(_unusual(ids[2], SPOT, 0.0, 2))
        events = _collect(handle.target, "", 3)  # no cursor: the open alerts' events
        opened, updated = pb.ALERT_EVENT_TYPE_OPENED, pb.ALERT_EVENT_TYPE_UPDATED
        assert [e.type for e in events] == [opened, updated, opened]
        assert events[1].alert.count == 2 and events[0].alert.count == 1  # each as it was after its event
        assert list(events[1].alert.example_sample_ids) == ids[:2]
        cursor = events[-1].cursor

        # a watcher that follows: it sees an acknowledgement made by another client as it happens
        seen: list[pb.AlertEvent] = []
        follower = threading.Thread(target=lambda: seen.extend(_collect(handle.target, cursor, 1)))
        follower.start()
        with Client(handle.target) as client:
            acknowledged = client.acknowledge_alert(first.id or 0, "alice", "seen it, calling maintenance")
            assert acknowledged.state == pb.ALERT_STATE_ACKNOWLEDGED and acknowledged.acknowledged_by == "alice"
            again = client.acknowledge_alert(first.id or 0, "bob")
            assert again.acknowledged_by == "alice"  # the first acknowledgement stands
            for alert_id, operator, code, reason in (
                (424242, "bob", grpc.StatusCode.NOT_FOUND, "ALERT_NOT_FOUND"),
                (first.id or 0, "", grpc.StatusCode.INVALID_ARGUMENT, "OPERATOR_ID_INVALID"),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    client.acknowledge_alert(alert_id, operator)
                assert caught.value.code() == code and caught.value.details().startswith(reason)  # type: ignore[attr-defined]
            with pytest.raises(grpc.RpcError) as caught:
                next(client.watch_alerts("not-a-cursor", timeout_s=10))
            assert caught.value.details().startswith("CURSOR_INVALID")  # type: ignore[attr-defined]
        follower.join(30)
        assert [e.type for e in seen] == [pb.ALERT_EVENT_TYPE_ACKNOWLEDGED]
        assert seen[0].alert.note == "seen it, calling maintenance"
        book.record(_unusual(ids[3], SPOT, 0.0, 3))  # logged while nobody watches
    with server_in_thread(settings) as running:  # a restart: the log is in the store
        handle = ServerHandle(running)
        resumed = _collect(handle.target, seen[0].cursor, 1)
        assert resumed[0].type == pb.ALERT_EVENT_TYPE_UPDATED and resumed[0].alert.alert_id == second.id
        assert resumed[0].alert.count == 2
        fresh = _collect(handle.target, "", 2)  # without a cursor: the events of the open incident (SPOT) only
        assert [(e.alert.alert_id, e.type) for e in fresh] == [
            (second.id, pb.ALERT_EVENT_TYPE_OPENED),
            (second.id, pb.ALERT_EVENT_TYPE_UPDATED),
        ]
