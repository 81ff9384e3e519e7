"""Scheduled updates on real servers: TriggerUpdate -> a worker process trains, checks and records -> the new version
goes live, WatchUpdate streams its stages; one update at a time with two server processes on one store; a worker
killed mid-update leaves the live model alone and its run failed; a run left "running" by a dead server is marked
failed at the next start; automatic triggers; the misfire catch-up."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import grpc
import psutil
import pytest
from apscheduler.triggers.cron import CronTrigger

from cl_service.api.server import server_in_thread
from cl_service.client import Client
from cl_service.config import Settings, load_settings
from cl_service.scheduler import UpdateScheduler
from cl_service.simulate.surface import SurfaceConfig, SurfaceGenerator, encode_image
from cl_service.v1 import inspection_pb2 as pb
from replay_store import runs
from replay_store.models import UpdateRun, UpdateState, utcnow
from replay_store.store import NewSample, Store
from tests.conftest import TINY_UPDATE, free_port, wait_for_listening, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _settings(data_dir: Path, **extra: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "bind": "127.0.0.1:0",
        "scheduler": True,
        "update_cron": "",
        "update_lease_s": 6,
        "model_poll_s": 0.3,
        "shutdown_grace_s": 2,
        "update": TINY_UPDATE,
        "anomaly": {"image_size": 32, "channels": [8, 16, 32], "min_steps": 40, "epochs": 1},
    }
    values.update(extra)
    return load_settings(**values)  # type: ignore[arg-type]


def _fill(store: Store, count: int = 40, start: int = 0) -> None:
    generator = SurfaceGenerator(SurfaceConfig(width=48, height=48, classes=("good", "scratch"), seed=start))
    batch = []
    for image in generator.stream(0, count):
        data = encode_image(image.pixels)
        digest = hashlib.sha256(data).hexdigest()
        batch.append(NewSample("cam-1", f"r{start + image.index}", digest, "png", 48, 48, data, label=image.label))
    store.add_samples(batch)


def test_trigger_update_trains_in_a_worker_and_the_new_version_goes_live(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "data")
    with server_in_thread(settings) as running:
        store = running.core.store
        _fill(store)
        target = f"127.0.0.1:{running.port}"
        with Client(target, timeout_s=30) as client:
            with pytest.raises(grpc.RpcError) as caught:
                client.trigger_update("")
            assert caught.value.details().startswith("REQUESTED_BY_INVALID")  # type: ignore[attr-defined]
            with pytest.raises(grpc.RpcError) as caught:
                next(client.watch_update(4242, timeout_s=10))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]

            run = client.trigger_update("alice", "first model")
            assert run.state == pb.UPDATE_STATE_QUEUED and run.trigger == pb.UPDATE_TRIGGER_MANUAL
            assert client.trigger_update("bob").run_id == run.run_id  # coalesced into the queued run
            reports = list(client.watch_update(run.run_id, timeout_s=300))
            stages = [r.stage for r in reports]
            assert reports[-1].state == pb.UPDATE_STATE_SUCCEEDED, reports[-1]
            assert stages[-1] == "done" and len(reports) >= 2
            # the worker's settings (with the database URL) were private to it and are gone
            assert not list((settings.data_dir / "runs").glob("*.settings.json"))
            ended = store_run(store, run.run_id)
            assert ended.candidate_version == "v0001" and ended.requested_by == "alice"
            assert ended.request_reason == "first model" and ended.started_at is not None
            assert ended.progress["anomaly_model"] in ("fitted", "too few images yet"), ended.progress
            wait_until(lambda: client.status().live_model_version == "v0001", 60, "the swap to v0001")
            assert client.classify(encode_image(SurfaceGenerator(SurfaceConfig(48, 48)).sample(1).pixels))
            assert client.status().current_update.run_id == 0  # nothing queued or running any more
            models = client.list_models().models
            assert models[0].engines == ["onnxruntime"]  # built by the worker


def store_run(store: Store, run_id: int) -> UpdateRun:
    run = runs.get(store, run_id)
    assert run is not None
    return run


def test_a_worker_killed_mid_update_fails_its_run_and_leaves_the_live_model(tmp_path: Path) -> None:
    slow = TINY_UPDATE.model_copy(update={"classifier": "trained", "epochs": 200})  # killed while it trains
    settings = _settings(tmp_path / "data", update=slow)
    with server_in_thread(settings) as running:
        store = running.core.store
        _fill(store)
        with Client(f"127.0.0.1:{running.port}") as client:
            run = client.trigger_update("alice")

            def worker() -> psutil.Process | None:
                for child in psutil.Process().children(recursive=True):
                    if "run-update" in " ".join(child.cmdline()):
                        return child
                return None

            wait_until(lambda: store_run(store, run.run_id).progress.get("stage") == "train", 120, "training")
            process = worker()
            assert process is not None
            process.send_signal(signal.SIGKILL)
            wait_until(lambda: store_run(store, run.run_id).state == UpdateState.FAILED.value, 60, "the failure")
            failed = store_run(store, run.run_id)
            assert "exited with code -9" in (failed.reason or "")
            log_file = settings.data_dir / "runs" / f"{run.run_id}.log"  # the worker's log stays for the operator
            assert f"(its log: {log_file})" in (failed.reason or "") and log_file.is_file()
            assert client.status().live_model_version == ""  # nothing went live
            assert store_run(store, run.run_id).candidate_version is None


def test_a_run_left_running_by_a_dead_server_is_failed_at_the_next_start(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "data")
    store = Store.open(settings.resolved_database_url, settings.blob_dir)
    old = utcnow() - timedelta(minutes=10)
    with store.session() as session:
        orphan = UpdateRun(
            trigger="manual", state="running", created_at=old, started_at=old, heartbeat_at=old, owner="gone:1:1"
        )
        session.add(orphan)
        session.commit()
        orphan_id = orphan.id or 0
    store.close()
    with server_in_thread(settings) as running:
        wait_until(lambda: store_run(running.core.store, orphan_id).state == "failed", 30, "the reaping")
        assert "no heartbeat" in (store_run(running.core.store, orphan_id).reason or "")


def test_two_server_processes_run_one_update_at_a_time(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    settings = _settings(data_dir)
    store = Store.open(settings.resolved_database_url, settings.blob_dir)
    _fill(store)
    ports = [free_port(), free_port()]
    environment = {**os.environ, "CL_SERVICE_SCHEDULER": "true"}
    command = [sys.executable, "-c", "import sys; from cl_service.cli import main; sys.exit(main())"]
    servers = [
        subprocess.Popen(
            [*command, "serve", "--config", str(_toml(tmp_path, settings, port)), "--bind", f"127.0.0.1:{port}"],
            env=environment,
        )
        for port in ports
    ]
    try:
        for port, server in zip(ports, servers, strict=True):
            wait_for_listening(port, server)
        with Client(f"127.0.0.1:{ports[0]}") as first, Client(f"127.0.0.1:{ports[1]}") as second:
            one = first.trigger_update("alice")
            wait_until(lambda: store_run(store, one.run_id).state == "running", 60, "the first run starting")
            two = second.trigger_update("bob")  # queued behind the running one
            assert two.run_id != one.run_id
            wait_until(lambda: store_run(store, two.run_id).state in runs.TERMINAL, 300, "the second run ending")
        a, b = store_run(store, one.run_id), store_run(store, two.run_id)
        assert a.state == UpdateState.SUCCEEDED.value, a.reason
        assert b.state == UpdateState.SKIPPED.value and "nothing new since v0001" in (b.reason or ""), b.reason
        assert a.finished_at is not None and b.started_at is not None and b.started_at >= a.finished_at
    finally:
        for server in servers:
            server.terminate()
            server.wait(30)
        store.close()


def _toml(folder: Path, settings: Settings, port: int) -> Path:
    path = folder / f"server-{port}.toml"
    model = settings.update.model
    path.write_text(
        "\n".join(
            [
                f'data_dir = "{settings.data_dir}"',
                'update_cron = ""',
                "update_lease_s = 6",
                "shutdown_grace_s = 2",
                "[update]",
                "epochs = 1",
                "min_steps = 1",
                "batch_size = 16",
                "replay_budget = 8",
                "cold_start_min_per_class = 3",
                "cold_start_min_accuracy = 0.0",
                "gate_tolerance = 1.0",
                "threads = 1",
                "[anomaly]",
                "image_size = 32",
                "channels = [8, 16, 32]",
                "min_steps = 40",
                "epochs = 1",
                "[update.model]",
                f"image_size = {model.image_size}",
                f'backbone = "{model.backbone}"',
                f'pretrained = "{model.pretrained}"',
            ]
        )
        + "\n"
    )
    return path


def test_automatic_triggers_and_the_misfire_catch_up(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "data", update_after_labels=30, update_after_alerts=0)
    store = Store.open(settings.resolved_database_url, settings.blob_dir)
    scheduler = UpdateScheduler(settings, store)
    _fill(store, count=20)
    assert scheduler.check_triggers() is None  # 20 human labels < 30
    _fill(store, count=20, start=100)
    run = scheduler.check_triggers()
    assert run is not None and run.trigger == "new_labels" and run.request_reason == "40 new human labels"
    assert scheduler.check_triggers() is None  # those labels are counted by the queued run already
    _fill(store, count=30, start=200)
    again = scheduler.check_triggers()
    assert again is not None and again.id == run.id  # still queued: requests coalesce into it

    # the nightly run was due an hour ago and did not happen (no server was up): caught up within the grace time
    with store.session() as session:
        queued = session.get(UpdateRun, run.id)
        assert queued is not None
        queued.state, queued.created_at = "succeeded", utcnow() - timedelta(days=2)
        session.commit()
    due = utcnow() - timedelta(hours=1)
    cron = CronTrigger.from_crontab(f"{due.minute} {due.hour} * * *", timezone="UTC")
    scheduler._catch_up(cron)
    caught = runs.active(store)
    assert caught is not None and caught.trigger == "schedule" and "catch-up" in (caught.request_reason or "")
    store.close()
