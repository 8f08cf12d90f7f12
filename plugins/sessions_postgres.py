"""PostgreSQL backend for session persistence (for real deployments), through psycopg 3.

Used by ``relay_plugins.sessions`` when ``--database-url`` or ``DATABASE_URL`` is set; see there. The
connection is opened in the writer's worker thread and opened again after any failure, so the relay
rides out a database restart. Schema versions are kept in ``relay_schema``.
"""

from __future__ import annotations

from typing import Any

from .sessions import COLUMNS, SessionEvent, split

SCHEMA_VERSION = 3
MIGRATIONS = {
    1: [
        """CREATE TABLE IF NOT EXISTS sessions (
            session_id TEXT PRIMARY KEY,
            initiator  TEXT NOT NULL,
            answerer   TEXT NOT NULL,
            interests  TEXT[] NOT NULL DEFAULT '{}',
            started_at DOUBLE PRECISION NOT NULL,  -- unix time
            ended_at   DOUBLE PRECISION,
            end_reason TEXT,                       -- next, left, disconnected
            ended_by   TEXT                        -- client id
        )""",
        "CREATE INDEX IF NOT EXISTS sessions_started_at ON sessions (started_at)",
    ],
    2: [
        "ALTER TABLE sessions ADD COLUMN IF NOT EXISTS initiator_user TEXT",  # the JWT sub, under auth
        "ALTER TABLE sessions ADD COLUMN IF NOT EXISTS answerer_user TEXT",
    ],
    3: [
        "ALTER TABLE sessions ADD COLUMN IF NOT EXISTS node TEXT",  # the relay that recorded it
        "CREATE INDEX IF NOT EXISTS sessions_ongoing ON sessions (node) WHERE ended_at IS NULL",
    ],
}


class PostgresStore:
    def __init__(self, url: str, *, connect_timeout: int = 5) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self._conn: Any = None

    def _connect(self) -> Any:
        import psycopg  # an optional dependency: pip install 'relay[postgres]'

        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.url, connect_timeout=self.connect_timeout, autocommit=False)
        return self._conn

    def _run(self, work: Any) -> Any:
        conn = self._connect()
        try:
            with conn.transaction(), conn.cursor() as cur:
                return work(cur)
        except Exception:
            if conn.broken:  # reconnect on the next call
                self._conn = None
            raise

    def migrate(self) -> None:
        def migrate(cur: Any) -> None:
            cur.execute("CREATE TABLE IF NOT EXISTS relay_schema (version INTEGER NOT NULL)")
            cur.execute("LOCK TABLE relay_schema IN EXCLUSIVE MODE")  # two relays starting at once
            cur.execute("SELECT max(version) FROM relay_schema")
            version = cur.fetchone()[0] or 0
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    cur.execute(statement)
                cur.execute("INSERT INTO relay_schema (version) VALUES (%s)", (target,))

        self._run(migrate)

    def write(self, events: list[SessionEvent]) -> None:
        starts, ends = split(events)

        def write(cur: Any) -> None:
            cur.executemany(
                "INSERT INTO sessions (session_id, initiator, answerer, interests, started_at, initiator_user,"
                " answerer_user, node) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (session_id)"
                " DO UPDATE SET node = excluded.node, started_at = excluded.started_at",
                [
                    (
                        e.session_id,
                        e.initiator,
                        e.answerer,
                        list(e.interests),
                        e.at,
                        e.initiator_user,
                        e.answerer_user,
                        e.node,
                    )
                    for e in starts
                ],
            )
            cur.executemany(  # the whole row, if its start is not written yet (a cluster's other node)
                "INSERT INTO sessions (session_id, initiator, answerer, interests, started_at, initiator_user,"
                " answerer_user, node, ended_at, end_reason, ended_by)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (session_id) DO UPDATE SET"
                " ended_at = excluded.ended_at, end_reason = excluded.end_reason, ended_by = excluded.ended_by",
                [
                    (
                        e.session_id, e.initiator, e.answerer, list(e.interests), e.started_at, e.initiator_user,
                        e.answerer_user, e.node, e.at, e.reason, e.ended_by,
                    )
                    for e in ends
                ],
            )  # fmt: skip

        self._run(write)

    def end_crashed(self, node: str, at: float) -> int:
        def end(cur: Any) -> int:
            cur.execute(
                "UPDATE sessions SET ended_at = %s, end_reason = 'crashed'"
                " WHERE ended_at IS NULL AND (node = %s OR node IS NULL)",
                (at, node),
            )
            return cur.rowcount

        return self._run(end)

    def recent(self, limit: int) -> list[dict[str, Any]]:
        def recent(cur: Any) -> list[dict[str, Any]]:
            cur.execute(f"SELECT {', '.join(COLUMNS)} FROM sessions ORDER BY started_at DESC LIMIT %s", (limit,))
            return [dict(zip(COLUMNS, row, strict=True)) for row in cur.fetchall()]

        return self._run(recent)

    def lengths_and_starts(self, since: float) -> tuple[list[float], list[float]]:
        def rows(cur: Any) -> list[tuple[float, float | None]]:
            cur.execute("SELECT started_at, ended_at FROM sessions WHERE started_at >= %s", (since,))
            return cur.fetchall()

        data = self._run(rows)
        return [e - s for s, e in data if e is not None], [s for s, _ in data]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
