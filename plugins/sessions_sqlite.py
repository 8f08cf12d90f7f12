"""SQLite backend for session persistence (the embedded default): one file, WAL mode.

Used by ``relay_plugins.sessions``; see there. Writes happen in a worker thread, one batch per
transaction; WAL keeps readers (``relay sessions``) from blocking the writer, and committed batches
survive a crash of the relay.
"""

from __future__ import annotations

import json
import sqlite3
import urllib.parse
from typing import Any

from .sessions import COLUMNS, SessionEvent, split

SCHEMA_VERSION = 3
MIGRATIONS = {
    1: """
        CREATE TABLE IF NOT EXISTS sessions (
            session_id TEXT PRIMARY KEY,
            initiator  TEXT NOT NULL,
            answerer   TEXT NOT NULL,
            interests  TEXT NOT NULL DEFAULT '[]',  -- JSON list
            started_at REAL NOT NULL,               -- unix time
            ended_at   REAL,
            end_reason TEXT,                        -- next, left, disconnected
            ended_by   TEXT                         -- client id
        );
        CREATE INDEX IF NOT EXISTS sessions_started_at ON sessions (started_at);
    """,
    2: """
        ALTER TABLE sessions ADD COLUMN initiator_user TEXT;  -- the JWT sub, under auth
        ALTER TABLE sessions ADD COLUMN answerer_user TEXT;
    """,
    3: """
        ALTER TABLE sessions ADD COLUMN node TEXT;  -- the relay that recorded it
        CREATE INDEX IF NOT EXISTS sessions_ongoing ON sessions (node) WHERE ended_at IS NULL;
    """,
}


class SQLiteStore:
    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly  # for reading an existing file only (``relay sessions``): never creates one
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None and self.readonly:
            uri = f"file:{urllib.parse.quote(self.path)}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=5)
        if self._db is None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across a crash of the process
            self._db = db
        return self._db

    def migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, one step per transaction. The version is read inside
        the write lock, so two processes migrating at once (a relay and ``relay sessions``) cannot
        both apply a step."""
        db = self._connect()
        while True:
            db.execute("BEGIN IMMEDIATE")
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version >= SCHEMA_VERSION:
                    db.execute("COMMIT")
                    return
                for statement in _statements(MIGRATIONS[version + 1]):  # not executescript: it would commit
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {version + 1}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def write(self, events: list[SessionEvent]) -> None:
        starts, ends = split(events)
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(  # an end written first (another node's) made the row: the start names its node
                "INSERT INTO sessions (session_id, initiator, answerer, interests, started_at,"
                " initiator_user, answerer_user, node) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (session_id) DO UPDATE SET node = excluded.node, started_at = excluded.started_at",
                [
                    (
                        e.session_id,
                        e.initiator,
                        e.answerer,
                        json.dumps(list(e.interests)),
                        e.at,
                        e.initiator_user,
                        e.answerer_user,
                        e.node,
                    )
                    for e in starts
                ],
            )
            db.executemany(  # the whole row, if its start is not written yet (a cluster's other node)
                "INSERT INTO sessions (session_id, initiator, answerer, interests, started_at, initiator_user,"
                " answerer_user, node, ended_at, end_reason, ended_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (session_id) DO UPDATE SET ended_at = excluded.ended_at,"
                " end_reason = excluded.end_reason, ended_by = excluded.ended_by",
                [
                    (
                        e.session_id, e.initiator, e.answerer, json.dumps(list(e.interests)), e.started_at,
                        e.initiator_user, e.answerer_user, e.node, e.at, e.reason, e.ended_by,
                    )
                    for e in ends
                ],
            )  # fmt: skip
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def end_crashed(self, node: str, at: float) -> int:
        cursor = self._connect().execute(
            "UPDATE sessions SET ended_at = ?, end_reason = 'crashed'"
            " WHERE ended_at IS NULL AND (node = ? OR node IS NULL)",
            (at, node),
        )
        return cursor.rowcount

    def recent(self, limit: int) -> list[dict[str, Any]]:
        rows = self._connect().execute(
            f"SELECT {', '.join(COLUMNS)} FROM sessions ORDER BY started_at DESC LIMIT ?", (limit,)
        )
        return [dict(zip(COLUMNS, row, strict=True), interests=json.loads(row[3])) for row in rows]

    def lengths_and_starts(self, since: float) -> tuple[list[float], list[float]]:
        rows = self._connect().execute("SELECT started_at, ended_at FROM sessions WHERE started_at >= ?", (since,))
        starts, lengths = [], []
        for started, ended in rows:
            starts.append(started)
            if ended is not None:
                lengths.append(ended - started)
        return lengths, starts

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _statements(script: str) -> list[str]:
    """The statements of a migration (no semicolons inside them)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [statement.strip() for statement in "\n".join(lines).split(";") if statement.strip()]
