"""Session persistence (relay_plugins.sessions): real SQLite and PostgreSQL, a relay process that is
killed and restarted, and a database that hangs or fails while the relay keeps working."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import trio
from relay_plugins.sessions import SessionEvent, SessionRecorder, report
from relay_plugins.sessions_postgres import PostgresStore
from relay_plugins.sessions_sqlite import SQLiteStore

import relay as relay_mod
from tests.conftest import STEP, Harness, http_get, start_relay
from tests.test_server import start_process

REASONS = ("next", "left", "disconnected")


async def end_session(ender, other, reason: str, session_id: str) -> None:
    if reason == "next":
        await ender.send(type="next")
        await ender.expect("queued")
        await ender.send(type="leave")  # out of the queue again
        await ender.expect("left")
    elif reason == "left":
        await ender.send(type="leave")
        await ender.expect("left")
    else:
        await ender.ws.aclose()
    await other.expect("peer_left", session_id=session_id, reason=reason)


async def run_sessions(h: Harness, count: int, first: int = 0) -> dict[str, dict]:
    """`count` sessions with mixed interests, end reasons and enders: the rows they must produce."""
    expected = {}
    for i in range(first, first + count):
        interests = [f"topic{i % 3}", "common"] if i % 2 else []
        a, b, ma, _ = await h.pair(interests=interests)
        reason = REASONS[i % 3]
        ender, other = (a, b) if i % 4 < 2 else (b, a)
        await end_session(ender, other, reason, ma["session_id"])
        expected[ma["session_id"]] = {
            "initiator": a.id,
            "answerer": b.id,
            "interests": sorted(interests),
            "end_reason": reason,
            "ended_by": ender.id,
        }
        for c in (a, b):
            await c.ws.aclose()
    return expected


async def rows_when(store_factory, condition, what: str) -> dict[str, dict]:
    """Poll the database (a fresh connection each time) until `condition(rows)` holds."""
    with trio.fail_after(STEP * 2):
        while True:
            store = store_factory()
            try:
                rows = {row["session_id"]: row for row in await trio.to_thread.run_sync(_all, store)}
            finally:
                store.close()
            if condition(rows):
                return rows
            await trio.sleep(0.05)


def _all(store) -> list[dict]:
    store.migrate()
    return store.recent(1000)


def check(rows: dict[str, dict], expected: dict[str, dict]) -> None:
    for session_id, want in expected.items():
        row = rows[session_id]
        got = {key: row[key] for key in want}
        got["interests"] = sorted(got["interests"])
        assert got == want, session_id
        assert row["started_at"] <= row["ended_at"]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    """(relay flags, a factory of read connections) for each real database."""
    if request.param == "sqlite":
        path = str(tmp_path / "sessions.db")
        return ["--sessions-db", path], lambda: SQLiteStore(path)
    url = request.getfixturevalue("postgres_url")
    store = PostgresStore(url)
    store.migrate()
    store._run(lambda cur: cur.execute("DROP TABLE IF EXISTS sessions, relay_schema"))  # a clean slate
    store.close()
    return ["--database-url", url], lambda: PostgresStore(url)


async def test_sessions_are_recorded_survive_a_crash_and_are_flushed_at_shutdown(nursery, tmp_path, backend):
    flags, store = backend
    p = await start_process(nursery, *flags, "--drain-seconds", "1", cwd=tmp_path)
    h = Harness(nursery, relay_mod.Relay())
    h.relay.port = p.port
    expected = await run_sessions(h, 20)
    _, _, ongoing, _ = await h.pair()  # still going when the relay dies

    def complete(rows: dict) -> bool:
        return all(rows.get(sid, {}).get("ended_at") for sid in expected) and ongoing["session_id"] in rows

    rows = await rows_when(store, complete, "20 ended sessions")
    check(rows, expected)
    assert len(rows) == 21

    p.proc.send_signal(signal.SIGKILL)  # a crash: what was committed stays
    await p.proc.wait()
    rows = await rows_when(store, lambda rows: len(rows) == 21, "the same rows after the crash")
    check(rows, expected)
    assert rows[ongoing["session_id"]]["ended_at"] is None  # it never ended, as far as anyone knows

    p = await start_process(nursery, *flags, "--drain-seconds", "1", cwd=tmp_path)  # the schema is there already
    h.relay.port = p.port
    rows = await rows_when(store, lambda rows: rows[ongoing["session_id"]]["ended_at"], "the crashed session ended")
    assert rows[ongoing["session_id"]]["end_reason"] == "crashed"  # ended at the restart, by the node that made it
    assert rows[ongoing["session_id"]]["node"] and rows[ongoing["session_id"]]["ended_by"] is None
    expected |= await run_sessions(h, 1, first=20)
    a, b, active, _ = await h.pair()
    p.proc.send_signal(signal.SIGTERM)  # graceful: the session is ended by the drain, and flushed
    for c in (a, b):
        await c.expect("draining")
        assert (await c.closed()).code == 1012
    with trio.fail_after(STEP * 2):
        await p.proc.wait()
    assert p.proc.returncode == 0
    rows = await rows_when(store, lambda rows: len(rows) == 23, "23 rows")
    check(rows, expected)
    assert rows[active["session_id"]]["end_reason"] == "disconnected"
    assert rows[active["session_id"]]["ended_at"] is not None


async def test_records_the_shutdown_could_not_write_are_logged_and_counted(nursery, tmp_path):
    import sqlite3

    path = tmp_path / "locked.db"
    p = await start_process(
        nursery, "--sessions-db", str(path), "--drain-seconds", "0", "--metrics", "--metrics-port", "0", cwd=tmp_path
    )
    private = int((await p.read_until(rb"metrics: /metrics on port (\d+)")).group(1))
    h = Harness(nursery, relay_mod.Relay())
    h.relay.port = p.port
    await run_sessions(h, 1)
    rows = await rows_when(lambda: SQLiteStore(str(path)), lambda rows: len(rows) == 1, "the first session")
    lock = sqlite3.connect(path, timeout=0)
    lock.execute("BEGIN EXCLUSIVE")  # the database is locked from now on (another process, a backup...)
    try:
        await run_sessions(h, 3, first=1)  # 6 events that cannot be written
        status, _, body = await http_get(private, "/metrics")
        assert status == 200 and b"relay_sessions_dropped_total 0.0" in body  # the counter is there, at 0
        p.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(relay_mod.SHUTDOWN_TIMEOUT + STEP * 2):
            await p.proc.wait()
        await p.read_until(rb"6 event\(s\) not written")
        assert p.proc.returncode == 0
    finally:
        lock.rollback()
        lock.close()
    assert len(rows) == 1


def test_report_command(tmp_path):
    store = SQLiteStore(str(tmp_path / "s.db"))
    store.migrate()
    now = 1_800_000_000.0
    events = []
    for i, length in enumerate([30, 60, 90, 600]):
        start = now - 3600 * i
        events += [
            SessionEvent("start", f"s{i}", start, "a", "b", ("chess",)),
            SessionEvent("end", f"s{i}", start + length, reason="left", ended_by="b" if i else "a"),
        ]
    events.append(SessionEvent("start", "s9", now - 10, "c", "d"))
    store.write(events)
    text = report(store, limit=10, now=now)
    # Five matches over the 3 hours the records cover (not 24): 1.7 an hour.
    assert "last 24 h: 5 matches (1.7 per hour over the 3.0 h covered), median session length 75 s" in text
    assert "ongoing" in text and "chess" in text and "left (initiator)" in text and "left (answerer)" in text
    store.write([SessionEvent("start", "one", now, "e", "f")])
    one = SQLiteStore(str(tmp_path / "one.db"))
    one.migrate()
    one.write([SessionEvent("start", "only", now - 120, "e", "f")])
    assert "last 24 h: 1 match (" in report(one, limit=10, now=now)
    store.close()
    one.close()


def test_the_report_command_as_people_type_it(tmp_path):
    import subprocess
    import sys

    relay_py = str(Path(relay_mod.__file__))
    store = SQLiteStore(str(tmp_path / "relay-sessions.db"))  # where a relay run in tmp_path writes
    store.migrate()
    store.write([SessionEvent("start", "s1", 1_800_000_000.0, "a", "b")])
    store.close()
    here = subprocess.run([sys.executable, relay_py, "sessions"], capture_output=True, text=True, cwd=tmp_path)
    assert here.returncode == 0 and "s1" in here.stdout
    assert here.stdout.startswith(f"sessions from {tmp_path / 'relay-sessions.db'}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    there = subprocess.run([sys.executable, relay_py, "sessions"], capture_output=True, text=True, cwd=elsewhere)
    assert there.returncode == 2 and "no session database at" in there.stderr and "Traceback" not in there.stderr
    assert not (elsewhere / "relay-sessions.db").exists()  # reading never creates one
    env = {"RELAY_SESSIONS_DB": str(tmp_path / "relay-sessions.db")}
    by_env = subprocess.run(
        [sys.executable, relay_py, "sessions"], capture_output=True, text=True, cwd=elsewhere, env=os.environ | env
    )
    assert by_env.returncode == 0 and "s1" in by_env.stdout


class GatedStore:
    """A store in memory whose writes can hang (``gate`` closed) or fail (``down``)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.down = False
        self.writing = threading.Event()  # set while a write waits at the gate
        self.failures = 0

    def migrate(self) -> None:
        pass

    def end_crashed(self, node: str, at: float) -> int:
        return 0

    def write(self, events: list[SessionEvent]) -> None:
        if self.down:
            self.failures += 1
            raise ConnectionError("database down")
        self.writing.set()
        self.gate.wait()
        self.writing.clear()
        for e in events:  # as the real stores: an end whose start was dropped (or comes later) makes the row
            row = self.rows.setdefault(e.session_id, {"reason": None})
            if e.kind == "end":
                row["reason"] = e.reason

    def close(self) -> None:
        self.gate.set()


async def relay_traffic(h: Harness, pairs: int, signals: int) -> list[str]:
    """Sessions that start, relay signals and end: all of it must work whatever the database does."""
    ids = []
    for _ in range(pairs):
        a, b, ma, _ = await h.pair()
        for i in range(signals):
            await a.send(type="signal", data={"i": i})
            await b.expect("signal", data={"i": i})
        await a.send(type="leave")
        await a.expect("left")
        await b.expect("peer_left")
        ids.append(ma["session_id"])
    return ids


async def test_a_hanging_database_never_slows_the_relay_and_drops_are_counted(nursery):
    store = GatedStore()
    recorder = SessionRecorder(store, queue=4, batch=2)
    r = await start_relay(nursery, plugins=[recorder])
    h = Harness(nursery, r)
    store.gate.clear()  # the database hangs
    await relay_traffic(h, 1, 1)
    with trio.fail_after(STEP):
        while not store.writing.is_set():  # the writer is stuck inside the database call
            await trio.sleep(0.01)
    during = await relay_traffic(h, 10, 20)  # 10 sessions, 200 signals relayed meanwhile
    assert store.writing.is_set() and store.rows == {}
    dropped = r.statistics().counters["sessions_dropped"]
    assert dropped == recorder.dropped > 0
    assert dropped <= 2 * len(during)
    store.gate.set()  # the database is back: once the writer has taken what is queued, nothing is dropped
    with trio.fail_after(STEP):
        while recorder._tx.statistics().current_buffer_used:
            await trio.sleep(0.01)
    after = await relay_traffic(h, 2, 1)
    with trio.fail_after(STEP):
        while not all(store.rows.get(sid, {}).get("reason") == "left" for sid in after):
            await trio.sleep(0.01)
    assert r.statistics().counters["sessions_dropped"] == dropped  # nothing more lost


async def test_a_failing_database_is_retried_until_it_is_back(nursery):
    store = GatedStore()
    store.down = True
    recorder = SessionRecorder(store)
    r = await start_relay(nursery, plugins=[recorder])
    ids = await relay_traffic(Harness(nursery, r), 3, 2)
    with trio.fail_after(STEP):
        while store.failures < 2:  # it keeps trying, backing off
            await trio.sleep(0.05)
    store.down = False
    with trio.fail_after(STEP * 2):
        while not all(store.rows.get(sid, {}).get("reason") == "left" for sid in ids):
            await trio.sleep(0.05)
    assert r.statistics().counters["sessions_dropped"] == 0  # there from the start, and nothing lost


def test_schema_migration_is_idempotent(tmp_path, postgres_url):
    for store in (SQLiteStore(str(tmp_path / "m.db")), PostgresStore(postgres_url)):
        store.migrate()
        store.migrate()
        store.write([SessionEvent("start", f"m-{type(store).__name__}", 1.0, "a", "b", ("x",))])
        assert any(row["session_id"].startswith("m-") for row in store.recent(10_000))
        store.close()


def test_an_end_written_before_its_start_is_kept(tmp_path, postgres_url):
    """In a cluster the node that ends a session may write before the node that made it: one row,
    with the end, the start's time and the start's node, whichever comes first."""
    for store in (SQLiteStore(str(tmp_path / "o.db")), PostgresStore(postgres_url)):
        store.migrate()
        sid = f"o-{type(store).__name__}"
        end = SessionEvent("end", sid, 20.0, "a", "b", ("x",), "next", "a", node="n0", started_at=9.5)
        store.write([end])
        store.write([SessionEvent("start", sid, 10.0, "a", "b", ("x",), node="n1")])
        [row] = [r for r in store.recent(10_000) if r["session_id"] == sid]
        assert (row["started_at"], row["ended_at"], row["end_reason"], row["ended_by"], row["node"]) == (
            10.0, 20.0, "next", "a", "n1",
        )  # fmt: skip
        store.close()


def test_sqlite_file_is_in_wal_mode(tmp_path: Path):
    import sqlite3

    store = SQLiteStore(str(tmp_path / "w.db"))
    store.migrate()
    store.close()
    assert sqlite3.connect(tmp_path / "w.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_version_1_database_is_upgraded_and_keeps_its_rows(tmp_path, postgres_url):
    import sqlite3

    import relay_plugins.sessions_postgres as pg
    import relay_plugins.sessions_sqlite as lite

    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)  # as version 1 of the relay left it
    for statement in lite._statements(lite.MIGRATIONS[1]):
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO sessions (session_id, initiator, answerer, started_at) VALUES ('old', 'a', 'b', 1.0)")
    db.commit()
    db.close()
    postgres = PostgresStore(postgres_url)
    postgres._run(lambda cur: cur.execute("DROP TABLE IF EXISTS sessions, relay_schema"))
    for statement in [*pg.MIGRATIONS[1], "CREATE TABLE relay_schema (version INTEGER NOT NULL)"]:
        postgres._run(lambda cur, statement=statement: cur.execute(statement))
    postgres._run(lambda cur: cur.execute("INSERT INTO relay_schema VALUES (1)"))
    postgres._run(
        lambda cur: cur.execute(
            "INSERT INTO sessions (session_id, initiator, answerer, started_at) VALUES ('old', 'a', 'b', 1.0)"
        )
    )
    for store in (SQLiteStore(str(path)), postgres):
        store.migrate()  # to version 2: user id columns
        store.write([SessionEvent("start", "new", 2.0, "c", "d", (), initiator_user="carol", answerer_user="dan")])
        rows = {row["session_id"]: row for row in store.recent(10)}
        assert rows["old"]["initiator"] == "a" and rows["old"]["initiator_user"] is None
        assert (rows["new"]["initiator_user"], rows["new"]["answerer_user"]) == ("carol", "dan")
        store.close()


async def test_user_ids_are_recorded_under_auth(nursery, tmp_path):
    import time

    import jwt
    from relay_plugins.auth_jwt import JwtAuth

    secret = "a-long-enough-hs256-secret-for-this-test"
    path = str(tmp_path / "users.db")
    r = await start_relay(nursery, plugins=[JwtAuth(secret=secret), SessionRecorder(SQLiteStore(path), gather=0)])
    h = Harness(nursery, r)

    async def as_user(name: str):
        token = jwt.encode({"sub": name, "exp": int(time.time()) + 60}, secret, algorithm="HS256")
        return await h.connect(headers={"Authorization": f"Bearer {token}"})

    alice, bob = await as_user("alice"), await as_user("bob")
    await alice.send(type="join")
    await alice.expect("queued")
    await bob.send(type="join")
    matched = await bob.expect("matched")
    rows = await rows_when(lambda: SQLiteStore(path), lambda rows: matched["session_id"] in rows, "the session")
    row = rows[matched["session_id"]]
    assert (row["initiator"], row["initiator_user"], row["answerer_user"]) == (alice.id, "alice", "bob")
