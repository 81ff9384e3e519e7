"""The statements of one ingest batch, generic (SQLAlchemy Core) and for SQLite (one step each).

Why a SQLite variant: Python's sqlite3 releases the GIL around every step of a statement, and a
thread that wants it back waits for the running thread to drop it (up to `sys.getswitchinterval()`,
5 ms). `executemany` steps once per row and INSERT ... RETURNING once per returned row, so in a busy
server the group-commit thread waited for the GIL several times per image and a batch took 2-3 times
longer than on an idle machine. The SQLite variant passes a batch as one JSON array and each statement
runs in one step (`json_each`, `json_group_array`): a handful of GIL hand-offs per batch, not per row.
Values are converted by the columns' own SQLAlchemy bind processors, so the rows are exactly what the
generic path writes (the store's tests run both).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Table, insert, select

Key = tuple[str, str]  # (camera_id, request_id)


class BatchSQL:
    """Generic statements (PostgreSQL and any other SQLAlchemy backend)."""

    def existing_samples(
        self, connection: Connection, samples: Table, keys: Iterable[Key]
    ) -> dict[Key, tuple[int, str]]:
        """(camera_id, request_id) -> (sample id, sha256) of the keys already stored."""
        wanted = set(keys)
        cameras = {camera for camera, _ in wanted}
        requests = {request for _, request in wanted}
        query = select(samples.c.id, samples.c.camera_id, samples.c.request_id, samples.c.sha256).where(
            samples.c.camera_id.in_(cameras), samples.c.request_id.in_(requests)
        )
        found = {(cam, req): (sid, sha) for sid, cam, req, sha in connection.execute(query)}
        return {key: value for key, value in found.items() if key in wanted}

    def known_blobs(self, connection: Connection, blobs: Table, shas: Iterable[str]) -> set[str]:
        return set(connection.execute(select(blobs.c.sha256).where(blobs.c.sha256.in_(set(shas)))).scalars())

    def insert_rows(self, connection: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            connection.execute(insert(table), list(rows))

    def insert_samples(self, connection: Connection, samples: Table, rows: Sequence[Mapping[str, Any]]) -> list[int]:
        """Insert sample rows (none of them stored yet); return their ids in order."""
        returned = connection.execute(insert(samples).returning(samples.c.id, sort_by_parameter_order=True), list(rows))
        return [row[0] for row in returned]


class SqliteBatchSQL(BatchSQL):
    """The same statements for SQLite, each a single step over a JSON array of the batch."""

    def existing_samples(
        self, connection: Connection, samples: Table, keys: Iterable[Key]
    ) -> dict[Key, tuple[int, str]]:
        sql = (
            "SELECT json_group_array(json_array(s.id, s.camera_id, s.request_id, s.sha256)) "
            f"FROM json_each(?) AS k JOIN {_name(connection, samples)} AS s "
            "ON s.camera_id = json_extract(k.value, '$[0]') AND s.request_id = json_extract(k.value, '$[1]')"
        )
        found = _one_json(connection, sql, [list(key) for key in set(keys)])
        return {(cam, req): (sid, sha) for sid, cam, req, sha in found}

    def known_blobs(self, connection: Connection, blobs: Table, shas: Iterable[str]) -> set[str]:
        sql = (
            f"SELECT json_group_array(b.sha256) FROM json_each(?) AS k "
            f"JOIN {_name(connection, blobs)} AS b ON b.sha256 = k.value"
        )
        return set(_one_json(connection, sql, sorted(set(shas))))

    def insert_rows(self, connection: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        columns = list(rows[0])
        preparer = connection.dialect.identifier_preparer
        extract = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(columns)))
        sql = (
            f"INSERT INTO {_name(connection, table)} ({', '.join(preparer.quote(c) for c in columns)}) "
            f"SELECT {extract} FROM json_each(?) ORDER BY key"
        )
        dialect = connection.dialect
        processors = [table.c[c].type.dialect_impl(dialect).bind_processor(dialect) for c in columns]
        values = [
            [
                value if convert is None else convert(value)
                for convert, value in zip(processors, (r[c] for c in columns), strict=True)
            ]
            for r in rows
        ]
        connection.exec_driver_sql(sql, (json.dumps(values, separators=(",", ":")),))

    def insert_samples(self, connection: Connection, samples: Table, rows: Sequence[Mapping[str, Any]]) -> list[int]:
        self.insert_rows(connection, samples, rows)
        keys = [(row["camera_id"], row["request_id"]) for row in rows]
        ids = self.existing_samples(connection, samples, keys)
        return [ids[key][0] for key in keys]


def batch_sql_for(dialect_name: str) -> BatchSQL:
    return SqliteBatchSQL() if dialect_name == "sqlite" else BatchSQL()


def _name(connection: Connection, table: Table) -> str:
    return connection.dialect.identifier_preparer.format_table(table)


def _one_json(connection: Connection, sql: str, argument: Any) -> list[Any]:
    result = connection.exec_driver_sql(sql, (json.dumps(argument, separators=(",", ":")),)).scalar_one()
    return list(json.loads(result)) if result else []
