"""Session persistence: every match is recorded, written off the hot path, in batches.

Enabled by default with SQLite (``--sessions-db``, default ``relay-sessions.db``; ``''`` turns it
off); with ``--database-url`` (or ``DATABASE_URL``) it writes to PostgreSQL instead.

How it stays off the hot path: the ``relay_matched`` and ``relay_session_ended`` hooks only put an
event on a bounded ``trio`` memory channel (``send_nowait``). A task of this plugin takes events off
it in batches (gathered for up to ``GATHER`` seconds) and writes each batch in one transaction, in a
worker thread. If the database is slow
or down, matching and relaying go on: events wait on the channel up to ``--sessions-queue``, then
further ones are dropped, counted (``sessions_dropped``, also in ``/metrics``, present from the
start at 0) and logged; the writer retries with backoff and resumes when the database is back. On a
graceful shutdown the channel is flushed before the relay exits; whatever the flush deadline leaves
unwritten (a database that is locked, frozen or unwritable) is logged and counted as dropped too.

Each row records the node that wrote it (``FLY_MACHINE_ID``, else the host name; a cluster node's id
under ``relay_plugins.cluster``). At start-up, rows
of this node still "ongoing" were left by a crash: they are ended with the reason ``crashed`` (at
the time of the restart, an upper bound). Not by a cluster node: a dead node's sessions are taken
over by the node that reaps it, or ended there (and recorded), so they may still go on.

``relay sessions`` (or ``python relay.py sessions``) prints recent sessions and simple statistics.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import statistics
import sys
import time
from collections.abc import Iterable
from typing import Any, Protocol

import attrs
import trio

import relay
from relay import PluginError, Relay, Session

log = logging.getLogger(__name__)

DEFAULT_DB = "relay-sessions.db"  # the SQLite file, unless RELAY_SESSIONS_DB says otherwise
QUEUE: int = 10_000  # events held while the database is slow, before they are dropped
BATCH: int = 500  # events written per transaction at most
GATHER: float = 0.25  # seconds a batch gathers events before it is written: few thread hand-offs
RETRY_MIN, RETRY_MAX = 0.5, 30.0  # seconds between attempts while the database fails


@attrs.frozen
class SessionEvent:
    """What the writer writes: a session started ("start") or ended ("end")."""

    kind: str
    session_id: str
    at: float  # unix time
    initiator: str = ""
    answerer: str = ""
    interests: tuple[str, ...] = ()
    reason: str = ""  # "next", "left", "disconnected", "reported", "overflow"
    ended_by: str = ""  # client id
    initiator_user: str | None = None  # user ids, under auth
    answerer_user: str | None = None
    node: str = ""  # the relay that recorded it (a start's node wins over an end's)
    started_at: float = 0.0  # unix time (ends: in case the start is written after them)


class SessionStore(Protocol):
    """What a database backend provides. Every method is blocking; the recorder calls ``migrate``
    and ``write`` in a worker thread, one call at a time."""

    def migrate(self) -> None:
        """Connect if needed, and create or upgrade the schema. Idempotent."""

    def write(self, events: list[SessionEvent]) -> None:
        """Apply the events in one transaction: a "start" inserts a row, an "end" completes it, or
        writes the whole row if its start is not there (dropped, or a cluster's other node has not
        written it yet; the start then fills in its time and node). ``split`` orders them."""

    def end_crashed(self, node: str, at: float) -> int:
        """End the rows ``node`` left ongoing (reason ``crashed``, at ``at``); how many there were."""

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The latest sessions, newest first, as dicts with the columns below."""

    def lengths_and_starts(self, since: float) -> tuple[list[float], list[float]]:
        """Lengths (seconds) of the sessions that ended, and start times, since ``since``."""

    def close(self) -> None: ...


def split(events: list[SessionEvent]) -> tuple[list[SessionEvent], list[SessionEvent]]:
    """(starts, ends) of a batch. Writing all starts before all ends is right even when a session
    starts and ends within one batch, and lets a store write each kind in one statement."""
    return [e for e in events if e.kind == "start"], [e for e in events if e.kind == "end"]


COLUMNS = (
    "session_id", "initiator", "answerer", "interests", "started_at", "ended_at", "end_reason", "ended_by",
    "initiator_user", "answerer_user", "node",
)  # fmt: skip


def node_name() -> str:
    """This machine's name in session records: Fly.io's machine id, else the host name."""
    return os.environ.get("FLY_MACHINE_ID") or socket.gethostname()


class SessionRecorder:
    """The plugin object: turns hook calls into events and writes them from its own task."""

    def __init__(
        self, store: SessionStore, *, queue: int = QUEUE, batch: int = BATCH, gather: float = GATHER, node: str = ""
    ) -> None:
        self.store = store
        self.node = node or node_name()
        self.node_given = bool(node)
        self.batch = batch
        self.gather = gather
        self._tx, self._rx = trio.open_memory_channel[SessionEvent](queue)
        self._relay: Relay | None = None
        self._cluster = False  # a node of a cluster (relay_plugins.cluster)
        self._done = trio.Event()
        self.dropped = 0
        self.written = 0

    # -- hooks ----------------------------------------------------------------------------------

    @relay.hookimpl
    def relay_startup(self, relay: Relay, nursery: trio.Nursery) -> None:
        self._relay = relay
        cluster_node = getattr(relay.backend, "node", None)
        if cluster_node and not self.node_given:  # one of several nodes, maybe on one host: its own id
            self.node = cluster_node
        self._cluster = bool(cluster_node)
        relay.counters["sessions_dropped"] += self.dropped  # present from the start, at 0
        nursery.start_soon(self._writer)

    @relay.hookimpl
    def relay_matched(self, session: Session, users: dict[str, str | None]) -> None:
        self._put(
            SessionEvent(
                "start", session.id, time.time(), session.initiator, session.answerer, session.interests,
                initiator_user=users.get(session.initiator), answerer_user=users.get(session.answerer), node=self.node,
            )
        )  # fmt: skip

    @relay.hookimpl
    def relay_session_ended(
        self, session: Session, reason: str, ended_by: str, duration: float, users: dict[str, str | None]
    ) -> None:
        # The whole row: in a cluster another node records the start, and its write may come later.
        now = time.time()
        self._put(
            SessionEvent(
                "end", session.id, now, initiator=session.initiator, answerer=session.answerer,
                interests=session.interests, reason=reason, ended_by=ended_by, started_at=now - duration,
                initiator_user=users.get(session.initiator), answerer_user=users.get(session.answerer),
                node=self.node,
            )
        )  # fmt: skip

    @relay.hookimpl
    def relay_shutdown(self) -> Any:
        self._tx.close()  # the writer drains what is queued, then stops
        return self._done.wait

    # -- internals ------------------------------------------------------------------------------

    def _put(self, event: SessionEvent) -> None:
        try:
            self._tx.send_nowait(event)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):  # full, or writer gone
            self._drop(1)
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("session database behind: %d events dropped so far", self.dropped)

    def _drop(self, count: int) -> None:
        self.dropped += count
        if self._relay is not None:
            self._relay.counters["sessions_dropped"] += count

    async def _writer(self) -> None:
        batch: list[SessionEvent] = []
        try:
            await self._retry(self.store.migrate)
            # (A cluster node's sessions outlive it: the node that reaps a dead one takes them over,
            # or ends them, recorded. A node with a dead one's id has none of its sessions to end.)
            crashed = 0 if self._cluster else await self._retry(self.store.end_crashed, self.node, time.time())
            if crashed:
                log.warning("%d session(s) left ongoing by a crash of node %s: ended as 'crashed'", crashed, self.node)
            while True:
                try:
                    batch = [await self._rx.receive()]
                except trio.EndOfChannel:
                    return
                # Gather for a moment: each write is a hand-off to a thread, which then competes
                # with the relay for the GIL; one per match doubled match latency under load.
                with trio.move_on_after(self.gather):
                    while len(batch) < self.batch:
                        try:
                            batch.append(await self._rx.receive())
                        except trio.EndOfChannel:
                            break
                await self._retry(self.store.write, batch)
                self.written += len(batch)
                batch = []
        finally:
            lost = len(batch) + self._unread()  # cancelled: the shutdown's deadline passed, or a crash
            if lost:
                self._drop(lost)
                log.error("session database: %d event(s) not written (the database did not answer in time)", lost)
            self._done.set()
            with trio.CancelScope(deadline=trio.current_time() + 2, shield=True):
                await trio.to_thread.run_sync(self.store.close, abandon_on_cancel=True)

    def _unread(self) -> int:
        """Take what is left on the channel, and close it; how many events that was."""
        count = 0
        while True:
            try:
                self._rx.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            count += 1
        self._rx.close()
        return count

    async def _retry(self, operation: Any, *args: Any) -> Any:
        """Run a blocking store operation in a thread until it succeeds (backing off on errors)."""
        delay = RETRY_MIN
        failing = False
        while True:
            try:
                result = await trio.to_thread.run_sync(operation, *args, abandon_on_cancel=True)
            except Exception as exc:
                if not failing:
                    log.error("session database failed (%s: %s); retrying", type(exc).__name__, exc)
                failing = True
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            if failing:
                log.info("session database back")
            return result


# -- configuration and the `relay sessions` command ---------------------------------------------------


def check_database_flags(args: argparse.Namespace) -> None:
    """A typo in --database-url or --sessions-db stops the start (a database that is merely down
    does not: the writer retries); ``PluginError``."""
    if args.database_url:
        try:
            from psycopg.conninfo import conninfo_to_dict
        except ImportError:
            raise PluginError("--database-url needs psycopg: pip install 'roulette-relay[postgres]'") from None
        url = args.database_url
        if "://" in url and not url.startswith(("postgres://", "postgresql://")):
            raise PluginError("--database-url must be a postgresql://user@host/database URL (or key=value pairs)")
        try:
            conninfo_to_dict(url)
        except Exception as exc:
            raise PluginError(f"--database-url is malformed: {exc}") from None
    elif args.sessions_db:
        folder = os.path.dirname(os.path.abspath(args.sessions_db))
        if not os.path.isdir(folder):
            raise PluginError(f"--sessions-db {args.sessions_db}: the directory {folder} does not exist")


def _store_from(args: argparse.Namespace) -> SessionStore | None:
    if args.database_url:
        from .sessions_postgres import PostgresStore

        return PostgresStore(args.database_url)
    if args.sessions_db:
        from .sessions_sqlite import SQLiteStore

        return SQLiteStore(args.sessions_db)
    return None


@relay.hookimpl
def relay_addoption(parser: argparse.ArgumentParser, subparsers: Any) -> None:
    group = parser.add_argument_group("session persistence (relay_plugins.sessions)")
    _add_database_flags(group)
    group.add_argument(
        "--sessions-queue", type=int, default=QUEUE, help="events held while the database is slow (default %(default)s)"
    )
    command = subparsers.add_parser("sessions", help="print recent sessions and statistics")
    _add_database_flags(command)
    command.add_argument("--limit", type=int, default=20, help="how many recent sessions (default %(default)s)")
    command.set_defaults(command=print_report)


def _add_database_flags(parser: Any) -> None:
    parser.add_argument(
        "--sessions-db", default=os.environ.get("RELAY_SESSIONS_DB", DEFAULT_DB),
        help="SQLite file for session records ('' for none; env RELAY_SESSIONS_DB; default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--database-url", default=os.environ.get("DATABASE_URL", ""),
        help="PostgreSQL URL: record sessions there instead of SQLite (env DATABASE_URL)",
    )  # fmt: skip


@relay.hookimpl
def relay_configure(relay: Relay) -> None:
    args = relay.options
    if not hasattr(args, "sessions_db"):
        return  # built without the command line: nothing configured
    check_database_flags(args)
    store = _store_from(args)
    if store is None:
        return
    if args.sessions_queue < 1:
        raise PluginError("--sessions-queue must be at least 1")
    relay.pm.register(SessionRecorder(store, queue=args.sessions_queue), "sessions-recorder")


def report(store: SessionStore, limit: int, now: float | None = None) -> str:
    """Recent sessions (who ended each, and why) and statistics over the last 24 hours, as text;
    rates are over the time the records cover (a relay up for two hours has not had 24)."""
    now = time.time() if now is None else now
    lengths, starts = store.lengths_and_starts(now - 86400)
    lines = [f"{'started (UTC)':<20} {'length':>8}  {'ended by':<24} {'interests':<24} session"]
    for row in store.recent(limit):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["started_at"]))
        length = f"{row['ended_at'] - row['started_at']:.0f} s" if row["ended_at"] else "ongoing"
        side = {row["initiator"]: "initiator", row["answerer"]: "answerer"}.get(row["ended_by"], row["ended_by"])
        ended = f"{row['end_reason']} ({side})" if row["end_reason"] and side else row["end_reason"] or "-"
        interests = ",".join(row["interests"])[:24] or "-"
        lines.append(f"{started:<20} {length:>8}  {ended:<24} {interests:<24} {row['session_id']}")
    median = f"{statistics.median(lengths):.0f} s" if lengths else "-"
    hours = (now - min(starts)) / 3600 if starts else 0.0
    rate = f"{len(starts) / hours:.1f} per hour over the {hours:.1f} h covered" if hours >= 1 / 60 else "no rate yet"
    count = f"{len(starts)} match{'' if len(starts) == 1 else 'es'}"
    lines.append("")
    lines.append(f"last 24 h: {count} ({rate}), median session length {median}")
    per_hour = _per_hour(starts)
    if per_hour:
        lines.append("matches per hour (UTC), last 24 h: " + ", ".join(f"{h:02d}h {n}" for h, n in per_hour))
    return "\n".join(lines)


def _per_hour(starts: Iterable[float]) -> list[tuple[int, int]]:
    counts: dict[int, int] = {}
    for started in starts:
        hour = time.gmtime(started).tm_hour
        counts[hour] = counts.get(hour, 0) + 1
    return sorted(counts.items())


def print_report(args: argparse.Namespace) -> int:
    """``relay sessions``: reads the database the server writes (the same flags and variables, the
    same default: relay-sessions.db in the current directory), and never creates one."""
    try:
        check_database_flags(args)
    except PluginError as exc:
        print(f"relay sessions: error: {exc}", file=sys.stderr)
        return 2
    if args.database_url:
        from .sessions_postgres import PostgresStore

        store: SessionStore = PostgresStore(args.database_url)
        where = "PostgreSQL at " + _without_password(args.database_url)
    elif args.sessions_db:
        path = os.path.abspath(args.sessions_db)
        if not os.path.exists(path):
            print(
                f"relay sessions: error: no session database at {path} (the relay writes one in the directory it"
                " runs in; give --sessions-db PATH, RELAY_SESSIONS_DB or --database-url)",
                file=sys.stderr,
            )
            return 2
        from .sessions_sqlite import SQLiteStore

        store = SQLiteStore(path, readonly=True)
        where = path
    else:
        print("relay sessions: error: no session database: give --sessions-db or --database-url", file=sys.stderr)
        return 2
    try:
        print(f"sessions from {where}")
        print(report(store, args.limit))
    except Exception as exc:  # no table yet, a database that is down: one line
        print(f"relay sessions: error: cannot read {where}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def _without_password(url: str) -> str:
    return re.sub(r"(//[^:/@]+):[^@]*@", r"\1:***@", url)
