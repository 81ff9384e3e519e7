"""The store: idempotent batches, content dedupe, label precedence, migrations."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
import threading
from concurrent.futures import Future
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import insert, text
from sqlmodel import SQLModel

from cl_service.cli import main
from replay_store.batch_sql import BatchSQL, SqliteBatchSQL
from replay_store.blobs import BlobStore
from replay_store.committer import GroupCommitter
from replay_store.db import (
    SchemaTooNewError,
    alembic_config,
    create_store_engine,
    current_revision,
    head_revision,
    migrate,
)
from replay_store.models import Label, LabelSource, utcnow
from replay_store.store import NewSample, PseudoLabel, Store, StoredSample
from tests.conftest import sqlite_only, store_url


def _sample(request_id: str, data: bytes, camera: str = "cam", label: str | None = None) -> NewSample:
    return NewSample(camera, request_id, hashlib.sha256(data).hexdigest(), "png", 4, 4, data, label=label)


def _open(tmp_path: Path, batch_sql: BatchSQL | None = None) -> Store:
    store = Store.open(store_url(tmp_path), tmp_path / "blobs")
    return store if batch_sql is None else Store(store.engine, store.blobs, batch_sql=batch_sql)


@pytest.mark.parametrize(
    "batch_sql", [BatchSQL(), pytest.param(SqliteBatchSQL(), marks=sqlite_only)], ids=["generic", "sqlite"]
)
def test_batches_are_idempotent_by_camera_and_request_id(tmp_path: Path, batch_sql: BatchSQL) -> None:
    store = _open(tmp_path, batch_sql)
    first = store.add_samples([_sample("a", b"1"), _sample("b", b"2"), _sample("a", b"1")])
    assert [r.created for r in first] == [True, True, False]
    assert first[2].sample_id == first[0].sample_id
    again = store.add_samples([_sample("a", b"1"), _sample("a", b"1", camera="other")])
    assert (again[0].created, again[0].sample_id) == (False, first[0].sample_id)
    assert again[1].created  # the same request id from another camera is another image
    assert store.add_samples([_sample("a", b"changed")])[0].conflict
    assert store.counts().samples == 3
    store.close()


@sqlite_only
def test_sqlite_batch_statements_write_exactly_what_the_generic_ones_write(tmp_path: Path) -> None:
    when = datetime(2026, 5, 4, 3, 2, 1, 123456, tzinfo=UTC)
    batch = [
        replace(_sample("a", b"1", label="scratch"), captured_at=when, metadata={"line": "3", "ü": '"quoted"'}),
        replace(_sample("b", b"2"), captured_at=when),
        replace(_sample("c", b"1", camera="cam-2", label="good"), captured_at=when),
    ]
    dumps = []
    for name, batch_sql in (("generic", BatchSQL()), ("sqlite", SqliteBatchSQL())):
        store = _open(tmp_path / name, batch_sql)
        store.add_samples(batch)
        with store.engine.connect() as connection:
            dumps.append(
                {
                    table: [
                        tuple(v for k, v in row._mapping.items() if k not in ("segment", "offset", "created_at"))
                        for row in connection.execute(text(f"SELECT * FROM {table} ORDER BY 1"))
                    ]
                    for table in ("samples", "blobs", "labels", "classes")
                }
            )
            stored_at = connection.execute(text("SELECT captured_at FROM samples WHERE request_id = 'a'")).scalar()
        store.close()
        assert stored_at == "2026-05-04 03:02:01.123456"
    generic, sqlite = dumps
    generic["samples"] = [row[:-2] + row[-1:] for row in generic["samples"]]  # received_at differs by run
    sqlite["samples"] = [row[:-2] + row[-1:] for row in sqlite["samples"]]
    assert generic == sqlite


def test_identical_bytes_share_one_blob(tmp_path: Path) -> None:
    store = _open(tmp_path)
    store.add_samples([_sample(f"r{i}", b"same bytes") for i in range(4)])
    store.add_samples([_sample("r9", b"same bytes")])
    counts = store.counts()
    assert (counts.samples, counts.blobs, counts.blob_bytes) == (5, 1, len(b"same bytes"))
    assert store.read_blob(hashlib.sha256(b"same bytes").hexdigest(), verify=True) == b"same bytes"
    store.close()


def test_operator_beats_camera_beats_pseudo_and_history_is_kept(tmp_path: Path) -> None:
    store = _open(tmp_path)
    (stored,) = store.add_samples([_sample("x", b"x", label="scratch")])
    with store.engine.begin() as connection:
        connection.execute(
            insert(Label.__table__),
            [  # type: ignore[attr-defined]
                {
                    "sample_id": stored.sample_id,
                    "class_name": "scratch",
                    "source": LabelSource.PSEUDO.value,
                    "confidence": 0.99,
                    "model_version": "v1",
                    "created_at": utcnow(),
                },
            ],
        )
    assert store.effective_label(stored.sample_id).source == LabelSource.CAMERA.value  # type: ignore[union-attr]
    store.add_samples([_sample("y", b"y", label="pit")])
    with store.engine.begin() as connection:
        connection.execute(
            insert(Label.__table__),
            [  # type: ignore[attr-defined]
                {
                    "sample_id": stored.sample_id,
                    "class_name": "pit",
                    "source": LabelSource.OPERATOR.value,
                    "confidence": 1.0,
                    "author": "ana",
                    "created_at": utcnow(),
                },
            ],
        )
    effective = store.effective_label(stored.sample_id)
    assert effective is not None and (effective.class_name, effective.source) == ("pit", "operator")
    assert [label.source for label in store.labels_of(stored.sample_id)] == ["operator", "pseudo", "camera"]
    assert store.label_counts() == {
        "pit": {"operator": 1, "camera": 1, "pseudo": 0},
    }
    store.close()


def test_group_commit_batches_concurrent_writers(tmp_path: Path) -> None:
    store = _open(tmp_path)
    committer = GroupCommitter(store, max_batch=64)
    futures = []

    def submit(worker: int) -> None:
        for i in range(100):
            futures.append(committer.submit(_sample(f"w{worker}-{i}", f"{worker}-{i}".encode())))

    threads = [threading.Thread(target=submit, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = [future.result(30) for future in futures]
    committer.close()
    assert all(result.created for result in results)
    assert len({result.sample_id for result in results}) == 400
    assert committer.stats.items == 400 and committer.stats.batches < 400
    assert store.integrity_problems(verify_bytes=True) == []
    store.close()


def test_one_image_that_cannot_be_written_does_not_answer_for_its_batch(tmp_path: Path) -> None:
    """A batch fails when one new image's blob hits a full disk: the others are tried on their own, so an
    already-stored resend is answered as stored and an image that fits is stored."""
    store = _open(tmp_path)
    stored = store.add_samples([_sample("old", b"old")])[0]
    original = store.add_samples

    def full_for_big(batch: list[NewSample]) -> object:
        if any(item.request_id == "big" for item in batch):
            raise OSError(28, "No space left on device")
        return original(batch)

    store.add_samples = full_for_big  # type: ignore[method-assign]
    committer = GroupCommitter(store)
    batch = [(_sample(r, r.encode()), Future[StoredSample]()) for r in ("old", "big", "new")]
    committer._write(batch)  # one batch, as the writer thread forms it from images that arrive together
    resend, big, fits = (future for _, future in batch)
    assert (resend.result(0).created, resend.result(0).sample_id) == (False, stored.sample_id)
    with pytest.raises(OSError, match="No space left"):
        big.result(0)
    assert fits.result(0).created
    assert committer.stats.failed_batches == 1 and committer.stats.items == 2
    committer.close()
    assert store.counts().samples == 2  # 'old' once and 'new'
    store.close()


def test_a_failed_batch_fails_its_waiters_and_the_writer_goes_on(tmp_path: Path) -> None:
    store = _open(tmp_path)
    committer = GroupCommitter(store)
    original = store.add_samples
    calls = {"n": 0}

    def flaky(batch: list[NewSample]) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        return original(batch)

    store.add_samples = flaky  # type: ignore[method-assign]
    failed = committer.submit(_sample("f", b"f"))
    try:
        failed.result(10)
        raise AssertionError("expected the batch to fail")
    except OSError as exc:
        assert exc.errno == 28
    assert committer.submit(_sample("g", b"g")).result(10).created
    committer.close()
    store.close()


def test_processes_starting_together_on_an_empty_database_take_turns_to_migrate(tmp_path: Path) -> None:
    url = store_url(tmp_path)
    code = "import sys; from replay_store import db; db.migrate(db.create_store_engine(sys.argv[1]))"
    starts = [subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE) for _ in range(3)]
    errors = [process.communicate(timeout=120)[1].decode() for process in starts]
    assert [process.returncode for process in starts] == [0, 0, 0], errors
    engine = create_store_engine(url)
    assert current_revision(engine) == head_revision(engine)
    engine.dispose()


def test_a_schema_migrated_by_a_newer_version_is_refused_clearly(tmp_path: Path) -> None:
    store = _open(tmp_path)
    with store.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00dfacef00d'"))
    store.close()
    url = store_url(tmp_path)
    for migrate_schema in (True, False):  # the server and migrate; check-store
        with pytest.raises(SchemaTooNewError, match="'f00dfacef00d', which this version of cl-service does not know"):
            Store.open(url, tmp_path / "blobs", migrate_schema=migrate_schema)
    assert main(["migrate", "--database-url", url, "--data-dir", str(tmp_path)]) == 2


def test_migrations_match_the_models(tmp_path: Path) -> None:
    store = _open(tmp_path)
    assert current_revision(store.engine) == head_revision(store.engine)
    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    assert differences == [], "a model changed without a migration: run alembic revision --autogenerate"
    store.close()


def test_migrations_go_up_and_down_step_by_step_and_keep_data(tmp_path: Path) -> None:
    """Every revision upgrades from the one before and downgrades back (on SQLite and, in the PostgreSQL run, on
    PostgreSQL); samples stored before an upgrade are still there after it."""
    engine = create_store_engine(store_url(tmp_path))
    revisions = [
        r.revision for r in reversed(list(ScriptDirectory.from_config(alembic_config(engine)).walk_revisions()))
    ]
    assert len(revisions) >= 5 and revisions[-1] == head_revision(engine)
    migrate(engine, revisions[0])
    for previous, revision in itertools.pairwise(revisions):
        migrate(engine, revision)
        assert current_revision(engine) == revision
        command.downgrade(alembic_config(engine), previous)
        assert current_revision(engine) == previous
        migrate(engine, revision)
    store = Store(engine, BlobStore(tmp_path / "blobs"))
    stored = store.add_samples([_sample("a", b"1", label="good")])
    command.downgrade(alembic_config(engine), revisions[0])
    migrate(engine)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT id FROM samples")).scalars().all() == [stored[0].sample_id]
    command.downgrade(alembic_config(engine), "base")
    with engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() is None
    store.close()


@sqlite_only
def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    engine = create_store_engine(f"sqlite:///{tmp_path / 'x.sqlite'}")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_snapshot_reads_effective_labels_and_pseudo_labels_never_replace_human_ones(tmp_path: Path) -> None:
    store = _open(tmp_path)
    stored = store.add_samples(
        [_sample("a", b"1", label="scratch"), _sample("b", b"2"), _sample("c", b"3"), _sample("d", b"4")]
    )
    a, b, c, d = (r.sample_id for r in stored)
    added = store.add_pseudo_labels(
        [
            PseudoLabel(a, "good", 0.99, "v1"),  # a has a camera label: skipped
            PseudoLabel(b, "pit", 0.97, "v1"),
            PseudoLabel(c, "good", 0.96, "v1"),
        ]
    )
    assert added == 2
    with store.engine.begin() as connection:  # an operator corrects c after the teacher labeled it
        connection.execute(
            insert(Label),
            [{"sample_id": c, "class_name": "scratch", "source": LabelSource.OPERATOR.value, "created_at": utcnow()}],
        )
    snapshot = store.snapshot()
    by_id = {row.sample_id: row for row in snapshot.rows}
    assert (by_id[a].label, by_id[a].source) == ("scratch", LabelSource.CAMERA)
    assert (by_id[b].label, by_id[b].source) == ("pit", LabelSource.PSEUDO)
    assert (by_id[c].label, by_id[c].source) == ("scratch", LabelSource.OPERATOR)
    assert (by_id[d].label, by_id[d].source) == (None, None)
    assert [r.sample_id for r in snapshot.human] == [a, c]
    assert [r.sample_id for r in snapshot.unlabeled] == [b, d]
    assert snapshot.max_sample_id == d
    assert store.add_pseudo_labels([PseudoLabel(c, "good", 0.99, "v2")]) == 0  # c is human-labeled now
    assert store.effective_label(c).class_name == "scratch"  # type: ignore[union-attr]
    assert [r.sample_id for r in store.snapshot(up_to_sample_id=b).rows] == [a, b]
    blobs = store.read_blobs([by_id[a].sha256, by_id[d].sha256])
    assert blobs == {by_id[a].sha256: b"1", by_id[d].sha256: b"4"}
    with pytest.raises(KeyError, match="no blob"):
        store.read_blobs(["0" * 64])
    store.close()
