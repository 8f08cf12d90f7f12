"""Scale-out: relay nodes on several machines (or cores) act as one, over Redis.

On with ``--redis-url`` (or ``RELAY_REDIS_URL``). Each node is a ``python relay.py`` process with
the same Redis; ``docs/scaling.md`` has the design, the guarantees and what is not built yet.

- **The queue lives in Redis.** Every matchmaking move (connect, join, next, leave, disconnect,
  report, hold, release, tick) is one call of one Lua script (``cluster_queue.lua``): one round
  trip, ``Matchmaker``'s rules to the letter (global FIFO by ticket, interest timeout, rematch
  cooldown, reports), every key in the hash slot ``{mm}`` (Redis Cluster runs it). Time is Redis's
  ``TIME``. The relay's handlers stay synchronous: a node's moves go, in order, to one task that
  runs them and hands the decisions to ``Relay.apply``; ``tests/test_cluster_queue.py`` holds the script
  against the naive reference model on a real Redis, through three node facades.
- **Signals between nodes go by streams.** A pair on one node relays as a single node does. A
  signal or message for another node's client is appended to that node's outbox; every
  ``--cluster-flush-ms`` one ``XADD`` per destination carries all of them, in order, to its inbox
  stream (``{mm}:inbox:<node>``), which one task of the destination reads (``XREAD BLOCK``) and
  delivers: the recipient's node numbers signals as for its own. Streams, not pub/sub: what a
  blip delays is read afterwards, in order, never dropped; each batch is numbered, so one sent
  again after its answer was lost is delivered once.
- **Decisions in Redis's order.** The script appends every call's decisions to ``{mm}:decisions``,
  which every node reads with its inbox and applies for its own clients. The node whose move made a
  decision calls the hooks (``relay_matched``, ``relay_session_ended``, ``relay_report``): once for
  the cluster.
- **Each node holds a lease** (``{mm}:node:<id>``, renewed every second, ``--cluster-node-timeout``):
  a second process with a live node's id refuses to start (one restarted under a dead node's id
  runs under that id and a suffix, as a node taken for dead goes on); one survivor reaps a dead
  node (below).
- **Resume anywhere.** A ``resume`` for a client another node holds asks that node, which hands it
  over (mailbox, session or place); draining on SIGTERM, a node hands every client over this way.
  The peer's node, told where the client went, sends a ``FENCE`` the old way; the new node holds
  what comes the new way until it arrives: nothing is reordered by the move.
- **A journal, for the node's death.** Each flush also writes the signals the node's clients were
  sent (``{mm}:journal:<node>``, kept JOURNAL_SECONDS, at most --cluster-journal-bytes) and each
  client's signal count and token digest (``{mm}:journaled:<node>``). The node that reaps a dead
  one takes its clients over (``_adopt``): away for the grace, in their sessions and places, their
  rings rebuilt from the journal and the dead node's unread inbox; a resume anywhere finds them.
- **Alone while Redis is away.** After DEGRADED_AFTER seconds of failing calls (or from the start,
  when Redis is unreachable then), a ``Matchmaker`` pairs the node's own clients. When Redis answers
  again, or turns out to have lost its data (its epoch, ``{mm}:epoch``, is gone), the node restores
  its clients into it (``_restore``): sessions, places and waits as the node has them.
- **Sentinel, Redis Cluster.** With a ``redis+sentinel://`` URL the node asks the Sentinels where
  the primary is once a second, and moves to a new one at once (the old one may take writes for
  seconds more). With ``redis+cluster://`` coredis's cluster client follows the cluster (every key
  is in one slot, ``{mm}``'s). When the primary moves, the node restores its clients
  there: the new primary may lack the old one's last writes.

Checked at start, each a one-line error and exit code 2: the URL, Redis >= 7.0, ``maxmemory-policy``
``noeviction`` (an evicted queue key would corrupt the queue), the node id not held by a live node
(once Redis answers: a lease renewed while watched). A process restarted under the id of one that
died and is not reaped yet runs under that id and a suffix, and the dead one is reaped as any other.
"""

from __future__ import annotations

import argparse
import array
import collections
import contextlib
import logging
import os
import random
import secrets
import struct
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Final

import orjson
import trio

import relay
from relay import (
    CLOSE_RESTART,
    MAX_BLOCKING_IDENTITIES,
    MAX_BLOCKS,
    SIGNAL,
    TEXT,
    WORKER_ENV,
    Decision,
    Ended,
    IllegalMove,
    Mailbox,
    Matchmaker,
    Paired,
    PluginError,
    ProtocolError,
    Queued,
    Relay,
    RemotePeer,
    Session,
)

log = logging.getLogger("relay.cluster")

SCRIPT: Final = (Path(__file__).with_name("cluster_queue.lua")).read_text()
KEYS: Final = tuple(
    "{mm}:" + name
    for name in (
        "members", "queue", "index", "deadlines", "sessions", "blocks", "blocklists", "blockers", "users", "counters",
        "decisions", "owners", "epoch",
    )
)  # fmt: skip
NODE_KEY: Final = "{mm}:node:"  # + node id: the node's lease
NODES_KEY: Final = "{mm}:nodes"  # the set of node ids that have not left (the living, and the dead not yet reaped)
REAP_KEY: Final = "{mm}:reaping:"  # + node id: who reaps that dead node (a lock with a TTL)
REAP_LOCK: Final = 30_000  # milliseconds a reaper holds its lock
INBOX_KEY: Final = "{mm}:inbox:"  # + node id: the stream other nodes send this node's messages to
DECISIONS_KEEP: Final = 100_000  # entries the decisions stream keeps (approximately)
INBOX_MAXLEN: Final = 100_000  # entries an inbox keeps (approximately): read ones are history
INBOX_BATCH: Final = 256  # entries read per XREAD
LEASE_INTERVAL: Final = 1.0  # seconds between lease renewals
LEASE_WATCH: Final = 2.5  # seconds a starting node watches a lease on its id for a renewal (live) or none (dead)
MAX_PENDING_MOVES: Final = 65_536  # joins and nexts waiting for the script; more are refused (rate_limited)
MAX_EARLY: Final = 4096  # messages kept for sessions this node has not heard of yet (decided elsewhere)
MAX_SENDERS: Final = 4096  # sending processes whose last batch number a node remembers, per inbox read
MAX_ENDED: Final = 65_536  # ids of sessions that ended, remembered to drop their late messages
REQUEST: Final = 2  # inbox item: another node's new connection resumes this node's client (JSON)
HANDOVER: Final = 3  # inbox item: the client asked for, as its node had it (JSON)
REFUSED: Final = 4  # inbox item: no such client there, or not that token
MOVED: Final = 5  # inbox item: your client's peer resumed on another node (payload: that node)
FENCE: Final = 6  # inbox item: nothing more for this client comes the old way (sent there, forwarded on)
FORWARDED: Final = 0x80  # added to an item's kind by a node that forwards it to where its client moved
FENCE_TIMEOUT: Final = 5.0  # seconds a node holds what comes the new way for a client that moved, at most
LINGER: Final = 1.0  # seconds a stopping node goes on forwarding after its last handover
HANDOVER_TIMEOUT: Final = 5.0  # seconds a resume waits for the client's node, then resume_failed
REPLAY_LOOKUP_TIMEOUT: Final = 0.5  # seconds a reconnection waits to learn its client's machine (fly-replay)
MAX_MOVED: Final = 65_536  # clients that resumed elsewhere, remembered to forward what still comes here
TICK_SAFETY: Final = 1.0  # seconds between ticks at most, when no interest timeout known here is due
FAILURE_LOG_INTERVAL: Final = 10.0  # seconds between log lines about Redis failing, while it does
DEGRADED_AFTER: Final = 2.0  # seconds of failing Redis calls before a node says it is degraded
RETRY_INTERVAL: Final = 0.5  # seconds between attempts while Redis does not answer
RESTORE_BATCH: Final = 100  # clients per script call when a node restores its clients into Redis
JOURNAL_KEY: Final = "{mm}:journal:"  # + node id: the signals its clients were sent, and how far it read its inbox
JOURNALED_KEY: Final = "{mm}:journaled:"  # + node id: hash, client id -> "count digest" (signals numbered, token)
JOURNAL_SECONDS: Final = 10.0  # seconds of signals a node's journal keeps for a resume after the node's death
JOURNAL_BATCH: Final = 64  # journal entries read per XRANGE when a node takes a dead one's clients over
MAX_JOURNAL: Final = 65_536  # signals a node keeps for its journal while Redis does not take them (older ones go)
ADOPT_LINGER: Final = 10.0  # seconds a node reads a dead node's inbox after taking its clients (senders learn late)
MIN_REDIS: Final = (7, 0)
SENTINEL_PORT: Final = 26379  # a Sentinel's port where a redis+sentinel:// URL gives none
MM_SLOT: Final = 125  # the hash slot of {mm} (CLUSTER KEYSLOT {mm}), in a Redis Cluster
SENTINEL_TIMEOUT: Final = 2.0  # seconds a Sentinel has to answer (connect, or where the primary is)
_LENGTH: Final = struct.Struct("!I")
_REASONS: Final = {"next": "next", "report": "reported"}  # a move's reason for ending a session


def _mb(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


########################################################################################################
# The queue script: Matchmaker's moves in Redis
########################################################################################################


class EpochChanged(Exception):
    """Redis's epoch is not the one this node knows (or is gone): Redis lost its data."""


class QueueScript:
    """The matchmaking script on one Redis: ``await move("join", client_id, ...)`` runs one move and
    returns its decisions, each with where its clients are: ``[(decision, {client_id: (node,
    identity)})]``. Raises ``IllegalMove`` (and changes nothing) as ``Matchmaker`` does; ``KeyError``
    for an unknown client. ``now`` (seconds) replaces Redis's clock (tests); ``offset`` turns Redis
    times into the node's clock (``trio.current_time``)."""

    def __init__(
        self,
        redis: Any,
        *,
        interest_timeout: float,
        rematch_cooldown: float,
        max_blocks: int = MAX_BLOCKS,
        max_blocking_identities: int = MAX_BLOCKING_IDENTITIES,
    ) -> None:
        self.redis = redis
        self.script = redis.register_script(SCRIPT)
        self.settings = [
            str(round(interest_timeout * 1000)), str(round(rematch_cooldown * 1000)),
            str(max_blocks), str(max_blocking_identities),
        ]  # fmt: skip
        self.offset = 0.0  # node clock - Redis clock, in seconds
        self.next_deadline = -1.0  # the earliest interest timeout the last call saw (Redis ms; -1: none)
        self.entry: tuple[bytes, bytes] | None = None  # the last call's (previous, own) decisions entry
        self.epoch = ""  # Redis's epoch as this node knows it ("": not checked)

    async def move(
        self, move: str, client_id: str = "", *args: str, node: str = "", now: float | None = None
    ) -> list[tuple[Decision, dict[str, tuple[str, str]]]]:
        answer = await self.call(move, client_id, *args, node=node, now=now)
        self.next_deadline = answer.get("next", self.next_deadline)
        self.entry = (answer["prev"].encode(), answer["id"].encode()) if "id" in answer else None
        if "illegal" in answer:
            if answer["illegal"] == "unknown":
                raise KeyError(f"unknown client {client_id!r}")
            raise IllegalMove(answer["illegal"], answer["message"])
        return [self.decision(d) for d in answer["d"]]

    async def call(self, move: str, client_id: str, *args: str, node: str, now: float | None = None) -> dict[str, Any]:
        """One call of the script: its answer, as JSON. ``EpochChanged`` if Redis lost its data."""
        argv = [
            "" if now is None else str(round(now * 1000)), *self.settings, secrets.token_hex(8), node,
            str(DECISIONS_KEEP), self.epoch, move, client_id,
        ]  # fmt: skip
        answer = orjson.loads(await self.script(keys=KEYS, args=[*argv, *args]))
        if "epoch" in answer:
            raise EpochChanged(answer["epoch"])
        return answer

    def session(self, s: dict[str, Any]) -> Session:
        ints = s["ints"]
        return Session(
            s["id"], s["a"], s["b"], tuple(ints) if isinstance(ints, list) else (),
            s["t"] / 1000 + self.offset, (s["w"][0] / 1000, s["w"][1] / 1000),
        )  # fmt: skip

    def decision(self, d: list[Any]) -> tuple[Decision, dict[str, tuple[str, str]]]:
        """One decision as the script (or another node) gave it, in JSON (not a restore's mark, "r")."""
        if d[0] == "q":
            return Queued(d[1], d[2], d[3]), {d[1]: (d[4], "")}
        s = self.session(d[1])
        if d[0] == "p":
            return Paired(s), {s.initiator: (d[2], d[4]), s.answerer: (d[3], d[5])}
        return Ended(s, d[2], d[3]), {s.initiator: (d[4], d[6]), s.answerer: (d[5], d[7])}


########################################################################################################
# The journal: what another node needs to take this node's clients over if it dies
########################################################################################################


class Journal:
    """What this node's clients were sent since the last flush, and which clients changed: each
    flush writes the signals to the node's journal stream (kept JOURNAL_SECONDS) and, for each
    client, its signal count and token digest to its journaled hash (at once for a new token or a
    client gone; else at most once every JOURNAL_SECONDS / 2, so the hash is never further behind
    than the stream reaches back)."""

    __slots__ = ("dirty", "ids", "size", "sizes", "texts", "urgent")

    def __init__(self) -> None:
        self.ids: list[str] = []  # the recipient of each signal since the last flush, in order
        self.texts: list[bytes] = []  # ... and the signal as sent (its "n" in it)
        self.dirty: dict[str, float] = {}  # client id -> when its count first changed unwritten (oldest first)
        self.urgent: set[str] = set()  # clients to write (or, gone, to delete) at the next flush
        self.sizes: collections.deque[tuple[int, int, int]] = collections.deque()  # the stream's: (ms, seq, bytes)
        self.size = 0  # their bytes

    def trim(self, size: int, max_bytes: int, oldest: int) -> bytes:
        """An entry of ``size`` bytes is about to go into the stream: the MINID (an entry id) below
        which entries go with it, so that the stream keeps none older than ``oldest`` (Redis's
        milliseconds, as this node reckons them) and at most ``max_bytes``, the new entry's too."""
        sizes, below = self.sizes, (max(oldest, 0), 0)
        while sizes and (sizes[0][0] < oldest or self.size + size > max_bytes):
            ms, seq, gone = sizes.popleft()
            self.size -= gone
            below = max(below, (ms, seq + 1))
        return b"%d-%d" % below

    def wrote(self, entry_id: bytes, size: int) -> None:
        """Redis took an entry of ``size`` bytes, as ``entry_id``."""
        ms, _, seq = entry_id.partition(b"-")
        self.sizes.append((int(ms), int(seq), size))
        self.size += size


_keep: Final = Mailbox.keep


class JournaledMailbox(Mailbox):
    """A mailbox whose signals go to its node's journal too. Rebuilt from a dead node's journal, it
    knows the count the journal had (``adopted``): the client may have got a few more signals from
    the dead node (sent in its last flush interval); those numbers are taken, and the resume
    numbers what came since after the client's last."""

    __slots__ = ("adopted", "client_id", "journal")

    def __init__(self, client_id: str, journal: Journal, max_messages: int, max_bytes: int) -> None:
        super().__init__(max_messages, max_bytes)
        self.client_id = client_id
        self.journal = journal
        self.adopted = -1  # the count a dead node's journal had for it (-1: not rebuilt from one)

    def resume(self, last: int) -> tuple[list[bytes], bool]:
        adopted, self.adopted = self.adopted, -1
        if 0 <= adopted < last:  # it got signals the journal never had: what came here since goes after them
            shift = last - adopted
            self.ring = [
                (n + shift, orjson.dumps({**orjson.loads(text), "n": n + shift})) if n > adopted else (n, text)
                for n, text in self.ring
            ]
            self.count += shift
        return Mailbox.resume(self, last)

    def keep(self, n: int, signal: bytes) -> bool:
        j = self.journal  # (two appends: what the flush packs, in C, is the rest of the cost)
        j.ids.append(self.client_id)
        j.texts.append(signal)
        return _keep(self, n, signal)


########################################################################################################
# The backend: one node of the cluster
########################################################################################################


class ClusterBackend:
    """``relay.Backend`` over Redis, for one node. See the module docstring."""

    def __init__(
        self, relay: Relay, url: str, node_id: str, flush_s: float, node_timeout: float, buffer_bytes: int,
        journal_bytes: int = 64 << 20,
    ) -> None:  # fmt: skip
        from coredis.tokens import PureToken

        self.token = PureToken  # SET's NX / XX, XADD's MAXLEN ~
        self.relay = relay
        self.clients = relay.clients  # (the relay's own mapping: read once per message from another node)
        self.url = url
        self._given_id = node_id  # --node-id: this node's id, but after a crash not reaped yet (_take_id)
        self.node = node_id
        self.flush_s = flush_s
        self.node_timeout = node_timeout
        self.buffer_bytes = buffer_bytes
        self.journal_bytes = journal_bytes  # --cluster-journal-bytes: the journal stream's bound
        self._outbox_bytes: dict[str, int] = {}  # node -> bytes waiting for it (in its outbox or being sent)
        self._dropped: set[str] = set()  # nodes whose waiting messages overflowed during the current flush
        self._failing_since: float | None = None  # since when Redis calls fail (None: they succeed)
        self._failure_logged = -FAILURE_LOG_INTERVAL  # when a failure was last logged
        self._degraded = False
        self._sentinel, self.redis, self.reader = connect(url)  # (XREAD BLOCK gets a pool of its own)
        self._primary: Any = None  # where the primary was when last seen (a Sentinel's may move)
        self._sentinel_answers = True  # the Sentinels said where the primary is, last time they were asked
        s = relay.settings
        self.script = QueueScript(self.redis, interest_timeout=s.interest_timeout, rematch_cooldown=s.rematch_cooldown)
        self._queue_changed = False
        #: Draining, the relay closes every client at once and keeps it away: it resumes on another
        #: node (this one hands it over), its session going on.
        self.hands_over = True
        self._queue_size = 0  # the cluster's, as the last move or position refresh saw it
        self._waiting: dict[str, int] = {}  # this node's waiting clients -> position
        self._interests: dict[str, list[str]] = {}  # this node's clients -> the interests of their last join
        self._since: dict[str, float] = {}  # this node's waiting clients -> when they began to wait
        self._moves: collections.deque[tuple[str, str, tuple[str, ...]]] = collections.deque()
        self._joins = 0  # joins and nexts among the moves
        self._tick_pending = False
        self._ticked = 0.0  # when the last tick was asked for
        self._wake = trio.lowlevel.ParkingLot()
        self._outbox: dict[str, list[bytes]] = {}  # node -> packed items, in order
        # Each flush sends what is for a node as a batch numbered for this process (_stamp, _batches):
        # a batch whose XADD's answer was lost (Redis died after writing it) goes again with its
        # number, and the node that reads it twice delivers it once (_seen: its last number read).
        self._stamp = secrets.token_hex(6).encode()
        self._batches = 0
        self._unsent: dict[str, list[tuple[bytes, bytes]]] = {}  # node -> (number, batch) to send again, in order
        self._seen: dict[tuple[str, bytes], int] = {}  # (inbox, sender's stamp) -> the last number read
        self._early: dict[str, list[tuple[int, str, str, bytes]]] = {}  # session id -> _deliver's arguments
        self._early_count = 0
        self._ended: dict[str, None] = {}  # recently ended session ids, oldest first
        self._last: dict[str, str] = {}  # client id -> the last session Redis paired it in, as applied here
        self._moved: dict[str, str] = {}  # client id -> the node it resumed on (late messages go there)
        self._asked: dict[str, tuple[Any, int, str, trio.Event]] = {}  # resumes waiting: new client id -> ...
        self._nursery: trio.Nursery | None = None
        self._decisions_read = b"0-0"  # the last entry of {mm}:decisions applied here
        self._applied_early: set[bytes] = set()  # entries applied from a call's answer, not yet read
        self._handed_over_at = -LINGER
        self.statistics: collections.Counter[str] = relay.counters
        # Alone (degraded): a Matchmaker pairs this node's clients; a restore then tells Redis.
        self._island: Matchmaker | None = None
        self._foreign: dict[str, Session] = {}  # alone: client -> its session from before (Matchmaker's are its own)
        self._fresh: set[str] = set()  # sessions made alone, not yet restored
        self._alone_ended: list[list[str]] = []  # [session id, reason, by]: ended alone (told and recorded)
        self._alone_blocks: collections.deque[list[str]] = collections.deque(maxlen=MAX_PENDING_MOVES)  # reports
        self._restore_needed = False
        self._lost = False  # Redis lost its data: the restore takes the new epoch
        self._reading = 0  # bumped by each restore: decisions read before it are stale
        self._healthy_since = 0.0  # since when Redis answers (a node reaps others only after node_timeout)
        self.machine = os.environ.get("FLY_MACHINE_ID", "")  # (Fly.io) this node's machine: its lease says it
        self._lease_value = self.machine.encode() or b"1"
        # The journal: another node takes this node's clients over from it if this one dies.
        self._journal = Journal()
        self._digests: dict[str, tuple[str, str]] = {}  # client id -> (secret, its digest), as last written
        self._inbox_read = b"0-0"  # the last entry of this node's inbox delivered here
        self._journaled_read = b"0-0"  # ... as the journal last said
        self._adopted: dict[str, tuple[bytes, float]] = {}  # a dead node's inbox read here -> (last read, until)
        self._adopting: list[tuple[str, dict[str, Any]]] | None = None  # resume requests, while taking clients
        self._after_restore: list[tuple[str, dict[str, Any]]] = []  # resume requests, until the restore is done
        # Clients that moved here, until what their peers sent the old way is through: client id ->
        # (until when, what came the new way meanwhile: _deliver's arguments).
        self._fences: dict[str, tuple[float, list[tuple[int, str, str, bytes]]]] = {}
        self._read_scope = trio.CancelScope()  # the inbox's XREAD in flight
        self._reads = 0  # XREADs made
        self._held = 0
        journal, m, b = self._journal, s.resume_buffer_messages, s.resume_buffer_bytes
        relay.new_mailbox = lambda client_id: JournaledMailbox(client_id, journal, m, b)

    # -- Backend: queries (this node's clients) ----------------------------------------------------

    @property
    def queue_size(self) -> int:
        return self._queue_size if self._island is None else self._island.queue_size

    @property
    def queue_changed(self) -> bool:
        island = self._island
        return self._queue_changed or (island is not None and island.queue_changed)

    @queue_changed.setter
    def queue_changed(self, value: bool) -> None:
        self._queue_changed = value
        if self._island is not None:
            self._island.queue_changed = value

    @property
    def session_count(self) -> int:
        """Sessions with a side on this node (counted when asked: /healthz and metrics only)."""
        return len({c.session.id for c in self.clients.values() if c.session is not None})

    @property
    def health(self) -> str:
        """``/healthz``'s "cluster": "ok", or "degraded" once Redis has failed for DEGRADED_AFTER
        seconds (the node pairs its clients alone)."""
        return "degraded" if self._degraded else "ok"

    def _redis_ok(self) -> None:
        if self._failing_since is not None:
            self._failing_since = None
            self._healthy_since = trio.current_time()
            self._failure_logged = -FAILURE_LOG_INTERVAL
            if self._degraded:
                self._degraded = False
                log.warning("cluster: Redis answers again")
        if self._island is not None and not self._restore_needed:
            self._restore_needed = True  # the move task restores this node's clients into Redis
            self._wake.unpark()

    def _redis_failed(self, what: str, exc: BaseException) -> None:
        now = trio.current_time()
        if self._failing_since is None:
            self._failing_since = now
        if not self._degraded and now - self._failing_since >= DEGRADED_AFTER:
            self._degraded = True
            self.statistics["cluster_degraded"] += 1
            if self._island is None:
                self._go_alone()
        if now - self._failure_logged >= FAILURE_LOG_INTERVAL:  # every task retries: say so now and then
            self._failure_logged = now
            log.warning("cluster: %s failed (%s); retrying (the same failures are not logged again for %g s)",
                        what, exc, FAILURE_LOG_INTERVAL)  # fmt: skip

    @property
    def queued_with_interests(self) -> int:
        if self._island is not None:
            return self._island.queued_with_interests
        return sum(1 for cid in self._waiting if self._interests.get(cid))

    def state(self, client_id: str) -> str:
        c = self.clients.get(client_id)
        if c is not None and c.session is not None:
            return "matched"
        island = self._island
        if island is not None:
            return island.state(client_id) if client_id in island else "idle"
        return "queued" if client_id in self._waiting else "idle"

    def position_of(self, client_id: str) -> int:
        return self._waiting[client_id] if self._island is None else self._island.position_of(client_id)

    def positions(self) -> Iterator[tuple[str, int]]:
        return iter(list(self._waiting.items() if self._island is None else self._island.positions()))

    # -- Backend: moves (decided by the script, in order, by _move_loop) ---------------------------

    def connect(self, client_id: str, identity: str | None = None) -> None:
        self._journal.urgent.add(client_id)
        if self._island is not None:
            self._island.connect(client_id, identity)  # (Redis hears of it at the restore)
            return
        self._enqueue("connect", client_id, identity or client_id, self.node)

    def join(self, client_id: str, interests: Iterable[str] = ()) -> list[Decision]:
        wanted = self._interests[client_id] = sorted(interests)
        if self._island is not None:
            return self._alone("join", client_id)
        self._enqueue_join("join", client_id, orjson.dumps(wanted).decode())
        return []

    def next(self, client_id: str) -> list[Decision]:
        if self._island is not None:
            return self._alone("next", client_id)
        self._enqueue_join("next", client_id)
        return []

    def leave(self, client_id: str, reason: str = "left") -> list[Decision]:
        if self._island is not None:
            return self._alone("leave", client_id, reason)
        self._unqueue(client_id)
        self._enqueue("leave", client_id, reason)
        return []

    def disconnect(self, client_id: str, reason: str = "disconnected") -> list[Decision]:
        self._interests.pop(client_id, None)
        self._last.pop(client_id, None)
        self._journal.urgent.add(client_id)
        if self._island is not None:
            return self._alone("disconnect", client_id, reason)
        self._unqueue(client_id)
        self._enqueue("disconnect", client_id, reason)
        return []

    def report(self, client_id: str) -> list[Decision]:
        if self._island is not None:
            return self._alone("report", client_id)
        self._enqueue("report", client_id)
        return []

    def hold(self, client_id: str) -> None:
        self._journal.urgent.add(client_id)  # (a resume away: a new token)
        if self._island is not None:
            self._alone("hold", client_id)
            return
        self._enqueue("hold", client_id)

    def release(self, client_id: str) -> list[Decision]:
        self._journal.urgent.add(client_id)  # (a resume: a new token)
        if self._island is not None:
            return self._alone("release", client_id)
        self._enqueue("release", client_id)
        return []

    def tick(self) -> list[Decision]:
        """A tick when an interest timeout this node heard of is due, else once every TICK_SAFETY
        seconds (for those only other nodes heard of): an idle node costs Redis a call a second."""
        if self._island is not None:
            return self._made(self._island.tick())
        now = trio.current_time()
        deadline = self.script.next_deadline
        due = deadline >= 0 and (now - self.script.offset) * 1000 >= deadline
        if not self._tick_pending and (due or now - self._ticked >= TICK_SAFETY):
            self._tick_pending = True
            self._ticked = now
            self._enqueue("tick", "")
        return []

    def _enqueue(self, move: str, client_id: str, *args: str) -> None:
        self._moves.append((move, client_id, args))
        self._wake.unpark()

    def _enqueue_join(self, move: str, client_id: str, *args: str) -> None:
        if self._joins >= MAX_PENDING_MOVES:
            raise ProtocolError("rate_limited", "the cluster is busy: join again in a moment")
        self._joins += 1
        self._enqueue(move, client_id, *args)

    def _unqueue(self, client_id: str) -> None:
        if self._waiting.pop(client_id, None) is not None:
            self._queue_changed = True
        self._since.pop(client_id, None)

    # -- alone: while Redis is away, and the restore after ------------------------------------------

    def _go_alone(self) -> None:
        """Redis has failed for DEGRADED_AFTER seconds: this node decides alone from now on. A
        ``Matchmaker`` pairs its own clients (those waiting first, held ones kept out, then the moves
        that waited for Redis); a session from before ends here when one of its sides here ends it,
        told and recorded now. When Redis answers again, ``_restore`` tells it all."""
        relay, s = self.relay, self.relay.settings
        island = self._island = Matchmaker(
            clock=trio.current_time, rng=random.Random(), interest_timeout=s.interest_timeout,
            rematch_cooldown=s.rematch_cooldown,
        )  # fmt: skip
        self._foreign = {}
        for c in relay.clients.values():
            island.connect(c.id, c.user_id)
            if c.session is not None and c.peer is not None:
                self._foreign[c.id] = c.session
        for peer in relay.remote_peers.values():  # (also those whose side here left, Redis not told yet)
            if peer.session is not None:
                self._foreign[peer.id] = peer.session
        decisions: list[Decision] = []
        waiting, away = self._waiting, relay.away
        for cid in sorted(waiting, key=lambda cid: (cid not in away, waiting[cid])):  # held ones first: kept out
            if cid in island:
                decisions += island.join(cid, self._interests.get(cid, ()))
                if cid in away:
                    island.hold(cid)
        self._waiting, self._since = {}, {}
        moves = list(self._moves)
        self._moves.clear()
        self._joins, self._tick_pending = 0, False
        for move, cid, args in moves:
            if move not in ("connect", "move", "tick"):  # (connected above, if still here)
                try:
                    decisions += self._alone(move, cid, *args[:1] if move in ("leave", "disconnect") else ())
                except IllegalMove as exc:
                    self._illegal(cid, exc)
        log.error("cluster: Redis has failed for %g s: degraded, pairing this node's clients alone", DEGRADED_AFTER)
        relay.apply(self._made(decisions))

    def _alone(self, move: str, client_id: str, reason: str = "") -> list[Decision]:
        """One move while alone: Matchmaker's decision, or the end of a session from before."""
        island = self._island
        assert island is not None
        session = self._foreign.get(client_id) or next(
            (s for s in self._foreign.values() if client_id in (s.initiator, s.answerer)), None
        )  # (the second: a side already gone here, or one that left at once)
        if client_id not in island:  # gone: only its session from before may be left
            return [self._end_alone(session, reason, client_id)] if session and move == "disconnect" else []
        if move == "hold":
            island.hold(client_id)
            return []
        if move == "release":
            return self._made(island.release(client_id))
        if move == "join":
            if session is not None:
                raise IllegalMove("already_matched", "already in a session: send next or leave first")
            return self._made(island.join(client_id, self._interests.get(client_id, ())))
        if move == "report":
            reported = session or island.session_of(client_id)
            if reported is None:
                raise IllegalMove("not_matched", "no session to report")
            self._alone_blocks.append([self._identity(client_id), self._identity(reported.peer_of(client_id))])
            if session is None:
                return self._made(island.report(client_id))
        out = [] if session is None else [self._end_alone(session, _REASONS.get(move, reason), client_id)]
        if move == "next":
            if session is None and island.session_of(client_id) is not None:
                out += island.leave(client_id, "next")
            out += island.join(client_id, self._interests.get(client_id, ()))
        elif move == "leave":
            out += island.leave(client_id, reason)
        elif move == "disconnect":
            out += island.disconnect(client_id, reason)
        return self._made(out)

    def _end_alone(self, session: Session, reason: str, by: str) -> Ended:
        for cid in (session.initiator, session.answerer):
            self._foreign.pop(cid, None)
        self._alone_ended.append([session.id, reason, by])
        return Ended(session, reason, by)

    def _made(self, decisions: list[Decision]) -> list[Decision]:
        """Matchmaker's decisions while alone: note the sessions it made (the restore creates them)."""
        for d in decisions:
            if type(d) is Paired:
                self._fresh.add(d.session.id)
            elif type(d) is Ended:
                self._fresh.discard(d.session.id)
        return decisions

    def _identity(self, client_id: str) -> str:
        c = self.clients.get(client_id) or self.relay.remote_peers.get(client_id)
        return c.user_id or client_id if c is not None else client_id

    def _snapshot(self, round_: str) -> list[dict[str, Any]]:
        """This node's clients as the restore tells Redis: interests, session and peer, or place and wait."""
        relay, island, now = self.relay, self._island, trio.current_time()
        if island is not None:
            waits = {cid: (since, held) for cid, _, since, _, held in island.waiting()}
        else:
            waits = {cid: (self._since.get(cid, now), cid in relay.away) for cid in self._waiting}
        out = []
        for c in relay.clients.values():
            item: dict[str, Any] = {"id": c.id, "ident": c.user_id or c.id, "ints": self._interests.get(c.id, []),
                                    "r": round_}  # fmt: skip
            s, peer = c.session, c.peer
            if s is not None and peer is not None:
                node = peer.node if peer.__class__ is RemotePeer else self.node
                item.update(s=self._session_json(s), p=[peer.id, peer.user_id or peer.id, node])
                item["fresh"] = s.id in self._fresh
            elif c.id in waits:
                since, held = waits[c.id]
                item["q"] = {"waited": round((now - since) * 1000), "held": held}
                item["last"] = self._last.get(c.id, "")
            out.append(item)
        out.sort(key=lambda item: -item["q"]["waited"] if "q" in item else 0)  # the longest wait queues first
        return out

    async def _restore(self) -> None:
        """Redis is back after this node was alone, or lost its data (a new epoch), or the primary
        moved: tell it this node's clients as they are here (Redis's view of them gives way, but for
        a session Redis made for a client waiting here, which this node never heard of: it stays,
        and its side here learns it now), then read the decisions on from there: those made before
        concern a state that no longer is."""
        r = self.redis
        if self._lost:
            await r.set(KEYS[12], secrets.token_hex(8).encode(), condition=self.token.NX)
            self.script.epoch = (await r.get(KEYS[12]) or b"").decode()
            await r.set(NODE_KEY + self.node, self._lease_value, px=round(self.node_timeout * 1000))
            await r.sadd(NODES_KEY, [self.node])
        round_ = secrets.token_hex(6)
        clients = self._snapshot(round_)
        island = self._island
        if island is not None:  # from now on, moves wait for Redis again (they run after the restore)
            self._waiting, self._island = dict(island.positions()), None
            self._since = {cid: since for cid, _, since, _, _ in island.waiting()}
        first, began, kept = None, 0, 0
        for at in range(0, len(clients) or 1, RESTORE_BATCH):
            head = at == 0
            batch = {
                "first": head, "lost": self._lost, "ended": self._alone_ended if head else [],
                "blocks": list(self._alone_blocks) if head else [], "c": clients[at : at + RESTORE_BATCH],
            }  # fmt: skip
            if not head:  # (a session made since the first call: this node reads it from there)
                batch["before"] = began
            answer = await self.script.call("restore", "", orjson.dumps(batch).decode(), node=self.node)
            if head:
                first, began = answer["prev"], answer["t"]
            if answer["gone"]:  # (this node's clients by session, once per call, not once per session)
                sides = collections.defaultdict(list)
                for c in self.clients.values():
                    if c.session is not None:
                        sides[c.session.id].append(c)
                for sid, reason, by in answer["gone"]:
                    self._gone(sides.get(sid, ()), sid, reason, by)
            for raw in answer["kept"] or ():  # sessions Redis made while this node did not hear
                self._apply(*self.script.decision(raw), decided_here=False)
                kept += 1
        seen = ""
        while seen := (await self.script.call("restored", "", round_, seen, node=self.node))["seen"]:
            pass
        assert first is not None
        self._decisions_read, self._reading = first.encode(), self._reading + 1
        self._applied_early.clear()
        self._alone_ended, self._fresh, self._foreign = [], set(), {}
        self._alone_blocks.clear()
        self._lost = self._restore_needed = False
        self._journal.urgent.update(self.clients)  # (Redis may have lost the journal too)
        self._primary = self._primary_now()  # (restored into this one)
        self.statistics["cluster_restores"] += 1
        log.warning("cluster: node %s restored its %d clients into Redis%s", self.node, len(clients),
                    f" ({kept} made matched meanwhile)" if kept else "")  # fmt: skip
        requests, self._after_restore = self._after_restore, []
        for client_id, request in requests:
            self._hand_over(client_id, request)

    def _gone(self, sides: Iterable[Any], session_id: str, reason: str, by: str) -> None:
        """A session of this node's (``sides``: its clients here) that Redis no longer has: it ended
        elsewhere while this node was alone (told and recorded there). Its side here learns it now."""
        relay = self.relay
        for c in sides:
            if c.session is not None and c.session.id == session_id:
                peer_id = c.session.peer_of(c.id)
                relay.apply([Ended(c.session, reason, by if by != c.id else peer_id)], decided_here=False)
                relay.remote_peers.pop(peer_id, None)

    # -- the node's tasks ---------------------------------------------------------------------------

    async def run(self, relay: Relay, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and check Redis, take the node's lease, then run the node's tasks until cancelled."""
        started = False
        self._healthy_since = trio.current_time()
        async with contextlib.AsyncExitStack() as clients:
            for client in (self._sentinel, self.redis, self.reader):
                if client is not None:
                    await clients.enter_async_context(client)
            try:
                await self._check()
            except PluginError:
                raise
            except Exception as exc:  # Redis unreachable (or failing): serve alone meanwhile
                log.error("cluster: cannot use Redis at %s (%s): degraded, pairing this node's clients alone "
                          "until it answers", _redacted(self.url), _why(exc))  # fmt: skip
                self._failing_since = trio.current_time() - DEGRADED_AFTER
                self._degraded = True
                self.statistics["cluster_degraded"] += 1
                self._go_alone()
                started = True
                task_status.started()
                await self._check_until_it_answers()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._lease_loop)
                nursery.start_soon(self._move_loop)
                nursery.start_soon(self._flush_loop)
                nursery.start_soon(self._inbox_loop, *await self._inbox_start())
                nursery.start_soon(self._position_loop)
                log.info("cluster: node %s on %s", self.node, _redacted(self.url))
                self._redis_ok()
                if not started:
                    task_status.started()

    async def _check_until_it_answers(self) -> None:
        while True:
            await trio.sleep(RETRY_INTERVAL)
            try:
                await self._check()
                return
            except PluginError:
                raise
            except Exception as exc:
                self._redis_failed("connecting", exc)

    @contextlib.asynccontextmanager
    async def _server(self) -> AsyncIterator[Any]:
        """Where INFO, CONFIG GET and TIME go: Redis, or in a Redis Cluster the primary of the
        slot of {mm} (every key is there)."""
        layout = getattr(self.redis.connection_pool, "cluster_layout", None)
        if layout is None:
            yield self.redis
            return
        await self.redis.exists([KEYS[12]])  # (the client learns the cluster's layout)
        node = layout.node_for_slot(MM_SLOT)
        async with node.as_client(**self.redis.connection_pool.connection_kwargs) as server:
            yield server

    async def _check(self) -> None:
        r = self.redis
        async with self._server() as server:
            info = await server.info("server")
            version = tuple(int(part) for part in str(info.get("redis_version", "0")).split(".")[:2])
            if version < MIN_REDIS:
                raise PluginError(f"--redis-url: Redis {info.get('redis_version')} is too old (7.0 or newer needed)")
            try:
                policy = (await server.config_get(["maxmemory-policy"])).get(b"maxmemory-policy", b"noeviction")
            except Exception as exc:  # managed Redis may refuse CONFIG: say so, go on
                log.warning("cluster: cannot read maxmemory-policy (%s); it must be noeviction", exc)
            else:
                if policy != b"noeviction":
                    raise PluginError(
                        f"--redis-url: maxmemory-policy is {policy.decode()}; the queue needs noeviction "
                        "(an evicted key would corrupt it)"
                    )
        await self._take_id()
        await r.sadd(NODES_KEY, [self.node])
        await r.set(KEYS[12], secrets.token_hex(8).encode(), condition=self.token.NX)  # the first node makes it
        self.script.epoch = (await r.get(KEYS[12]) or b"").decode()
        await self._forget_clients_of(self.node)  # (what a process with this id left that no reaper took)
        await r.delete([JOURNAL_KEY + self.node, JOURNALED_KEY + self.node])
        await self._sync_clock()
        self._primary = self._primary_now()

    async def _take_id(self) -> None:
        """Take the node's lease. Its id held by a live node (the lease is renewed while watched):
        a one-line error. Held by a process that died (a crash that Fly.io or a supervisor restarts
        at once: the lease runs on, unrenewed), or left by one that no node has reaped yet: this
        process runs under an id of its own (the given one and a suffix), so that the dead one is
        reaped like any dead node. Its clients are then taken over, here or on another node, and
        resume in their sessions and places instead of being forgotten."""
        r, base, lease = self.redis, self._given_id, round(self.node_timeout * 1000)
        held = await r.pttl(NODE_KEY + base)  # (-2: no lease)
        if held != -2 and await self._renewed(base):
            raise PluginError(f"--node-id {base}: a live node has this id (its lease is being renewed)")
        self.node = base
        if held != -2 or await r.sismember(NODES_KEY, base):
            self.node = self._new_id()
            log.warning("cluster: node %s died and is not reaped yet: this process runs as node %s, and its "
                        "clients are taken over", base, self.node)  # fmt: skip
        if not await r.set(NODE_KEY + self.node, self._lease_value, px=lease, condition=self.token.NX):
            raise PluginError(f"--node-id {self.node}: a live node has this id (it just started)")

    def _new_id(self) -> str:
        """An id for this process of its own, when the given one is a dead process's: ``<id>_<6 hex>``."""
        return f"{self._given_id}_{secrets.token_hex(3)}"

    async def _renewed(self, node: str) -> bool:
        """Whether ``node``'s lease is renewed while watched (LEASE_WATCH): a live node renews it
        every LEASE_INTERVAL."""
        key, deadline = NODE_KEY + node, trio.current_time() + LEASE_WATCH
        last = await self.redis.pttl(key)
        while last != -2 and trio.current_time() < deadline:
            await trio.sleep(LEASE_WATCH / 25)
            ttl = await self.redis.pttl(key)
            if ttl > last:
                return True
            last = ttl
        return False

    async def _sync_clock(self) -> None:
        async with self._server() as server:
            before = trio.current_time()
            when = await server.time()
        self.script.offset = (before + trio.current_time()) / 2 - when.timestamp()

    async def _inbox_start(self) -> tuple[bytes, bytes]:
        """Where this node starts reading its inbox and the decisions: after what is there now."""
        ids = []
        for key in (INBOX_KEY + self.node, KEYS[10]):
            last = await self.redis.xrevrange(key, count=1)
            ids.append(last[0].identifier if last else b"0-0")
        return ids[0], ids[1]

    async def _lease_loop(self) -> None:
        """Every second: renew this node's lease, and reap the nodes whose lease ran out."""
        lease = round(self.node_timeout * 1000)
        while True:
            await trio.sleep(LEASE_INTERVAL)
            if self._sentinel is not None:
                await self._ask_sentinel()
            try:
                if not await self.redis.set(NODE_KEY + self.node, self._lease_value, px=lease, condition=self.token.XX):
                    await self._lease_lost()
                    await self.redis.set(NODE_KEY + self.node, self._lease_value, px=lease)
                    await self.redis.sadd(NODES_KEY, [self.node])
                self._redis_ok()
                self._watch_primary()
                for cid, (until, _) in list(self._fences.items()):
                    if trio.current_time() > until:  # (the old way is lost: a node died, or Redis lost data)
                        self._lift(cid)
                for inbox, (_, until) in list(self._adopted.items()):
                    if trio.current_time() > until:  # every sender has heard where its clients are now
                        del self._adopted[inbox]
                        await self.redis.delete([inbox])
                if trio.current_time() - self._healthy_since < self.node_timeout:
                    continue  # Redis was away: the other nodes may not have renewed their leases yet
                nodes = [n.decode() for n in await self.redis.smembers(NODES_KEY)]
                async with self.redis.pipeline(transaction=False) as pipe:
                    alive = [pipe.exists([NODE_KEY + n]) for n in nodes]
                for node, live in zip(nodes, [await a for a in alive], strict=True):
                    if not live and node != self.node:
                        await self._reap(node)
            except Exception as exc:
                self._redis_failed("renewing the lease", exc)

    async def _ask_sentinel(self) -> None:
        """Where the Sentinels say the primary is now: moved, both clients drop their connections to
        the old one (which may take writes for seconds more, until Sentinel makes it a replica), and
        connect to the new one. Two commands a second, to a Sentinel; while none answers, the node
        goes on with the primary it has."""
        try:
            for client in (self.redis, self.reader):
                await client.connection_pool.get_primary_location()
        except Exception as exc:
            if self._sentinel_answers:
                log.warning("cluster: no Sentinel says where the primary is (%s): staying on %s", _why(exc),
                            self._primary)  # fmt: skip
            self._sentinel_answers = False
        else:
            self._sentinel_answers = True

    def _watch_primary(self) -> None:
        """Where the primary is (once a second, after each lease renewal). Moved (a Sentinel's or a
        Redis Cluster's failover), the new primary may lack what the old one had not passed on yet
        (replication is asynchronous), its epoch the same: this node restores its clients into it,
        as after being alone."""
        where = self._primary_now()
        if where != self._primary:
            if self._primary is not None:
                log.warning("cluster: the Redis primary moved from %s to %s: restoring this node's clients",
                            self._primary, where)  # fmt: skip
                self.statistics["cluster_failovers"] += 1
                self._restore_needed = True
                self._wake.unpark()
            self._primary = where

    def _primary_now(self) -> Any:
        """Where the primary is, as the client last learnt: a Sentinel's pool keeps it; in a Redis
        Cluster, the primary of {mm}'s slot (the client follows the cluster's failovers)."""
        pool = self.redis.connection_pool
        layout = getattr(pool, "cluster_layout", None)
        if layout is None:
            return getattr(pool, "location", None)
        with contextlib.suppress(Exception):  # (no layout yet)
            node = layout.node_for_slot(MM_SLOT)
            return f"{node.host}:{node.port}"
        return self._primary

    async def _forget_clients_of(self, node: str) -> None:
        with contextlib.suppress(EpochChanged):  # (Redis lost its data: nothing of that node is left)
            while (await self.script.call("reap", "", node, node=self.node))["left"]:
                pass

    async def _lease_lost(self) -> None:
        """This node's lease ran out. Redis lost its data (no epoch, or another): restore this node's
        clients. Else, if no node reaped or reaps it, Redis was away longer than the lease: renew
        it. Else it was taken for dead."""
        r = self.redis
        epoch = await r.get(KEYS[12])
        if epoch is None or epoch.decode() != self.script.epoch:
            self._epoch_changed()
            self._restore_needed = True
            self._wake.unpark()
        elif not await r.sismember(NODES_KEY, self.node) or await r.exists([REAP_KEY + self.node]):
            self._taken_for_dead()

    def _epoch_changed(self) -> None:
        if not self._lost:
            self._lost = True
            log.error("cluster: Redis lost its data (its epoch changed): restoring this node's clients")

    def _taken_for_dead(self) -> None:
        """This node's lease ran out (it was paused, or cut off from Redis) and another node may have
        reaped its clients: each may be served elsewhere now. Close them all (1012: reconnect); the
        node goes on empty, under a new id (its old one is the reaper's to end: a reap under way
        would otherwise take the new lease's id out of the node list, and the old inbox has
        one reader)."""
        old, self.node = self.node, self._new_id()
        self._inbox_read = self._journaled_read = b"0-0"  # (a new inbox)
        self._read_scope.cancel()  # (the XREAD in flight reads the old one)
        log.error("cluster: node %s: the lease had run out (taken for dead): closing its clients; it goes on "
                  "as node %s", old, self.node)  # fmt: skip
        self.statistics["cluster_lease_lost"] += 1
        relay = self.relay
        self._moves.clear()  # (moves for clients another node serves now)
        self._joins, self._tick_pending = 0, False
        j = self._journal
        j.ids.clear()
        j.texts.clear()
        j.dirty.clear()
        j.sizes.clear()  # (the reaper deleted the journal)
        j.size = 0
        for c in list(relay.clients.values()):
            relay.close_client(c, CLOSE_RESTART, "server restarting")

    async def _reap(self, node: str) -> None:
        """A node is dead (no lease): if no other node does, take its clients over from its journal
        (``_adopt``), forget those it cannot (their peers are told peer_left "disconnected", the
        hooks fire here), then the node itself."""
        if not await self.redis.set(REAP_KEY + node, self.node.encode(), px=REAP_LOCK, condition=self.token.NX):
            return
        if not await self.redis.sismember(NODES_KEY, node):  # another node reaped it just now
            await self.redis.delete([REAP_KEY + node])
            return
        log.warning("cluster: node %s is dead (no lease for %g s): taking its clients over", node, self.node_timeout)
        adopted = await self._adopt(node)
        await self._forget_clients_of(node)
        await self.redis.srem(NODES_KEY, [node])
        await self.redis.delete([JOURNAL_KEY + node, JOURNALED_KEY + node, REAP_KEY + node])
        await self.redis.hdel(KEYS[9], ["restored:" + node])
        self.statistics["cluster_nodes_reaped"] += 1
        self.statistics["cluster_clients_adopted"] += adopted
        log.warning("cluster: node %s reaped: %d of its clients are away here, for a resume", node, adopted)

    async def _adopt(self, node: str) -> int:
        """Dead ``node``'s clients are this node's from now on, away for ``--resume-grace``, in
        their sessions and places, with the signals its journal has (numbered as it numbered them)
        and then the ones its inbox still had for them; their peers are told ``peer_reconnecting``
        and where they are now. Those it never journaled (no token known) end. Answers how many."""
        self._adopting = []
        try:
            return await self._adopt_clients(node)
        finally:
            requests, self._adopting = self._adopting, None
            for client_id, request in requests:
                if request["node"] != self.node:  # (one of this node's: its _ask resumes it here)
                    self._hand_over(client_id, request)

    async def _adopt_clients(self, node: str) -> int:
        r, relay = self.redis, self.relay
        state = await r.hgetall(JOURNALED_KEY + node)
        rings: dict[str, list[tuple[int, bytes]]] = collections.defaultdict(list)
        read = b"0-0"
        last = b"-"
        while batch := await r.xrange(JOURNAL_KEY + node, last, count=JOURNAL_BATCH):  # (in bounded answers)
            last = b"(" + batch[-1].identifier
            for entry in batch:  # (at most JOURNAL_SECONDS of signals, at most --cluster-journal-bytes)
                fields = entry.field_values
                read, packed, at = fields.get(b"r", read), fields.get(b"m", b""), 0
                if not packed:
                    continue
                for cid, size in zip(fields[b"c"].split(b"\x1f"), array.array("I", fields[b"l"]), strict=True):
                    text = packed[at : at + size]
                    at += size
                    ring, n = rings[cid.decode()], orjson.loads(text)["n"]
                    if not ring or n > ring[-1][0]:  # (a flush whose answer was lost wrote its signals twice)
                        ring.append((n, text))
        taken: list[dict[str, Any]] = []
        while True:
            answer = await self.script.call("adopt", "", node, node=self.node)
            taken += answer["taken"]
            if not answer["left"]:
                break
        links, adopted = [], set()
        for t in taken:
            cid, known = t["id"], state.get(t["id"].encode())
            if known is None or cid in relay.clients:  # (never journaled: its token is unknown)
                self._enqueue("disconnect", cid, "disconnected")
                continue
            adopted.add(cid)
            count, digest = known.decode().split(" ")
            x = relay.adopted_client(cid, t["ident"] if t["ident"] != cid else None, trio.current_time(), digest)
            mb = x.mailbox
            for n, text in rings.get(cid, ()):
                mb.keep(n, text)  # (kept within the bounds, and in this node's journal)
            mb.count = max(int(count), mb.ring[-1][0] if mb.ring else 0)
            self._journal.urgent.add(cid)
            if t["queued"]:
                self._waiting[cid] = t["queued"]
                self._since[cid] = trio.current_time()
            if "s" in t:
                x.session = self.script.session(t["s"])
                links.append((x, t.get("p")))
        # This node's own clients whose peers it took reach them through its own inbox from now on,
        # after what they sent to the dead node: what is on its way there is read first (_inbox_loop).
        for peer in relay.remote_peers.values():
            if peer.node == node:
                peer.node = self.node
        notes = [note for x, p in links for note in self._link(x, p, adopted, node)]
        # What was sent to the dead node for them and not read there (what still goes there is read
        # with this node's inbox, for ADOPT_LINGER).
        inbox = INBOX_KEY + node
        for entry in await r.xrevrange(inbox, read, b"-", count=INBOX_BATCH):  # (the numbers it read last:
            self._seen_number(inbox, entry)  # a batch sent again after its answer was lost comes soon after)
        while entries := await r.xrange(inbox, b"(" + read, count=INBOX_BATCH):
            for entry in entries:
                read = entry.identifier
                self._receive_entry(entry, inbox)
        self._adopted[inbox] = (read, trio.current_time() + ADOPT_LINGER)
        reads = self._reads  # the XREAD in flight does not read that inbox: a new one does, before
        self._read_scope.cancel()  # anything sent here (after the notes) can be read
        while self._reads == reads:
            await trio.sleep(0)
        await trio.sleep(self.flush_s)
        for cid in adopted:  # what the inbox had, it numbered as the dead node did: numbers it may have used
            x = relay.clients.get(cid)
            if x is not None and isinstance(x.mailbox, JournaledMailbox):
                x.mailbox.adopted = x.mailbox.count
        for note in notes:  # (after that: what their nodes send here from now on comes after it)
            self._put(*note)
        return len(adopted)

    def _link(
        self, x: Any, p: list[str] | None, adopted: set[str], dead: str
    ) -> list[tuple[str, int, str, str, bytes]]:
        """Adopted client ``x`` and its peer ``p`` ([id, identity, node]) find each other. Answers
        what to tell the peer's node once the dead node's inbox is read: that ``x`` is here now,
        and, for the peer, that ``x`` is reconnecting."""
        relay, session = self.relay, x.session
        if p is None:  # its peer is gone (it left meanwhile): the session ends, nobody to tell
            x.session = None
            self._enqueue("leave", x.id, "disconnected")
            return []
        pid, ident, node = p
        if pid in adopted:  # both were the dead node's: they go on here as one node's pair
            x.peer = relay.clients[pid]
            return []
        if pid not in relay.clients and (node == dead or node == self.node):
            return []  # its peer is gone too (the dead node's, never journaled): its disconnect ends the session
        # A client of this node (reached through this node's own inbox, after what it sent to the
        # dead node, in order), or of another (whose node sends here from now on).
        via = self.node if pid in relay.clients else node
        peer = relay.remote_peers[pid] = RemotePeer(pid, ident if ident != pid else None, via, self._forward)
        peer.session, peer.peer, x.peer = session, x, peer
        reconnecting = orjson.dumps({"type": "peer_reconnecting", "session_id": session.id})
        notes = [(via, TEXT, pid, session.id, reconnecting)]
        if via != self.node:
            notes.insert(0, (via, MOVED, x.id, session.id, self.node.encode()))
        return notes

    async def _move_loop(self) -> None:
        """Run the moves in order, one script call each; hand their decisions out."""
        moves = self._moves
        while True:
            if self._restore_needed:
                try:
                    await self._restore()
                except EpochChanged:
                    self._epoch_changed()
                except Exception as exc:
                    self._redis_failed("restoring", exc)
                    await trio.sleep(RETRY_INTERVAL)
                continue
            if not moves:
                await self._wake.park()
                continue
            head = moves[0]
            move, client_id, args = head
            try:
                routed = await self.script.move(move, client_id, *args, node=self.node)
            except EpochChanged:  # Redis lost its data: the move waits for the restore
                self._epoch_changed()
                self._restore_needed = True
                continue
            except IllegalMove as exc:
                routed = []
                self._illegal(client_id, exc)
            except KeyError:
                routed = []  # the client disconnected (and was forgotten) before this move ran
            except Exception as exc:  # Redis does not answer: the move waits, in order
                self._redis_failed(move, exc)
                await trio.sleep(RETRY_INTERVAL)
                continue
            if not moves or moves[0] is not head:
                continue  # the node went alone meanwhile and decided this move itself: the restore will tell Redis
            self._redis_ok()
            entry = self.script.entry
            if routed and entry is not None and entry[0] == self._decisions_read:
                # Every decision before these was applied here: apply them now (a hop less for the
                # client waiting for them), and skip them when the stream brings them.
                self._decisions_read = entry[1]
                self._applied_early.add(entry[1])
                for d, where in routed:
                    self._apply(d, where, decided_here=True)
            moves.popleft()
            if move == "join" or move == "next":
                self._joins -= 1
            elif move == "tick":
                self._tick_pending = False

    def _illegal(self, client_id: str, exc: IllegalMove) -> None:
        c = self.clients.get(client_id)
        if c is not None:
            self.relay.send_error(c, exc.code, exc.message)

    def _apply(self, d: Decision, where: dict[str, tuple[str, str]], *, decided_here: bool) -> None:
        relay = self.relay
        if type(d) is Queued:
            if d.client_id in relay.clients:
                if d.client_id not in self._waiting:
                    self._since[d.client_id] = trio.current_time()
                self._waiting[d.client_id] = d.position
                self._queue_size = d.queue_size
            relay.apply([d], decided_here=decided_here)
            return
        s = d.session
        for cid, (node, identity) in where.items():
            if cid not in relay.clients and cid not in relay.remote_peers:
                user = identity if identity != cid else None
                relay.remote_peers[cid] = RemotePeer(cid, user, node, self._forward)
        local = [cid for cid in where if cid in relay.clients]
        if type(d) is Paired:
            for cid in local:
                self._unqueue(cid)
                self._last[cid] = s.id
            relay.apply([d], decided_here=decided_here)
            for early in self._early.pop(s.id, ()):  # what came before this node heard of the session
                self._early_count -= 1
                self._deliver(*early)
        else:
            self._remember_ended(s.id)
            relay.apply([d], decided_here=decided_here)
        ended = type(d) is Ended
        for cid in where:
            peer = relay.remote_peers.get(cid)
            if peer is not None and (
                peer.peer is None
                or relay.clients.get(peer.peer.id) is not peer.peer
                or (ended and peer.session is not None and peer.session.id == s.id)
            ):
                del relay.remote_peers[cid]

    def _remember_ended(self, session_id: str) -> None:
        self._ended[session_id] = None
        if len(self._ended) > MAX_ENDED:
            del self._ended[next(iter(self._ended))]
        dropped = self._early.pop(session_id, None)
        if dropped:
            self._early_count -= len(dropped)

    # -- messages between nodes ---------------------------------------------------------------------

    def _forward(self, client_id: str, kind: int, text: bytes) -> None:
        """RemotePeer.forward: a message for another node's client, into that node's outbox."""
        peer = self.relay.remote_peers[client_id]
        if peer.session is not None:  # else: its session is over, nobody to tell
            self._put(peer.node, kind, client_id, peer.session.id, text)

    def _put(self, node: str, kind: int, client_id: str, session_id: str, payload: bytes) -> None:
        item = b"%c%b\x1f%b\x1f%b" % (kind, client_id.encode(), session_id.encode(), payload)
        box = self._outbox.get(node)
        if box is None:
            box = self._outbox[node] = []
        box.append(_LENGTH.pack(len(item)))
        box.append(item)
        size = self._outbox_bytes[node] = self._outbox_bytes.get(node, 0) + len(item) + 4
        if size > self.buffer_bytes:
            self._overflow(node)

    def _overflow(self, node: str) -> None:
        """More waits for ``node`` than --cluster-buffer-bytes (Redis is down, or that node does not
        read): rather than lose messages silently, the sessions with its clients end ("overflow")."""
        self._outbox.pop(node, None)
        self._unsent.pop(node, None)
        del self._outbox_bytes[node]
        self._dropped.add(node)  # and what a flush in flight has for it, if that flush fails
        self.statistics["cluster_overflows"] += 1
        relay = self.relay
        ended = 0
        for c in list(relay.clients.values()):
            peer, session = c.peer, c.session
            if peer is not None and session is not None and peer.__class__ is RemotePeer and peer.node == node:
                relay.deliver_text(
                    c, orjson.dumps({"type": "peer_left", "session_id": session.id, "reason": "overflow"})
                )
                relay.end_session(c, "overflow")
                ended += 1
        log.error("cluster: more than %d bytes wait for node %s: %d sessions ended", self.buffer_bytes, node, ended)

    async def _flush_loop(self) -> None:
        """Every --cluster-flush-ms: one XADD per destination node with what is for it, in order,
        and what the journal has."""
        j = self._journal
        while True:
            await trio.sleep(self.flush_s)
            dirty = j.dirty
            if (
                self._outbox or self._unsent or j.ids or j.urgent or self._inbox_read != self._journaled_read
                or (dirty and next(iter(dirty.values())) <= trio.current_time() - JOURNAL_SECONDS / 2)
            ):  # fmt: skip
                await self.flush()

    def _journal_write(self, pipe: Any) -> tuple[list[str], list[bytes], list[str], tuple[Any, int] | None]:
        """Into ``pipe``: one XADD of the signals journaled since the last flush (their recipients,
        their lengths, the signals end to end) and how far the inbox was read, one HSET (and HDEL) of
        the clients whose count or token changed. Answers the signals and clients written (put back
        if the flush fails), and the XADD with its bytes (None: no XADD)."""
        j, node, now = self._journal, self.node, trio.current_time()
        ids, texts, j.ids, j.texts = j.ids, j.texts, [], []
        added = None
        if ids or self._inbox_read != self._journaled_read:
            entry = {
                b"c": "\x1f".join(ids), b"l": array.array("I", map(len, texts)).tobytes(),
                b"m": b"".join(texts), b"r": self._inbox_read,
            }  # fmt: skip
            size = len(entry[b"c"]) + len(entry[b"l"]) + len(entry[b"m"])
            oldest = j.trim(size, self.journal_bytes, round((now - self.script.offset - JOURNAL_SECONDS) * 1000))
            request = pipe.xadd(
                JOURNAL_KEY + node, entry, trim_strategy=self.token.MINID, threshold=oldest,
                trim_operator=self.token.APPROXIMATELY,
            )  # fmt: skip
            added = (request, size)
            fresh = set(ids) - j.dirty.keys()
            if fresh:
                j.dirty.update(dict.fromkeys(fresh, now))
        written = list(j.urgent)
        j.urgent.clear()
        dirty, due = j.dirty, now - JOURNAL_SECONDS / 2
        while dirty:
            cid, since = next(iter(dirty.items()))
            if since > due:
                break
            del dirty[cid]
            written.append(cid)
        fields, gone = {}, []
        for cid in written:
            c = self.clients.get(cid)
            if c is None:
                gone.append(cid)
                self._digests.pop(cid, None)
                continue
            known = self._digests.get(cid)
            if known is None or known[0] != c.secret:
                digest = c.secret[1:] if c.secret[0] == "#" else relay.secret_digest(c.secret)
                known = self._digests[cid] = (c.secret, digest)
            fields[cid] = b"%d %b" % (c.mailbox.count, known[1].encode())
        if fields:
            pipe.hset(JOURNALED_KEY + node, fields)
        if gone:
            pipe.hdel(JOURNALED_KEY + node, gone)
        return ids, texts, written, added

    async def flush(self) -> None:
        """One XADD per destination with what is for it (after the batches a failed flush left),
        and the journal's writes. ``_outbox_bytes`` counts what is sent meanwhile too, so the bound
        holds while Redis keeps failing."""
        batches, self._unsent = self._unsent, {}
        for node, items in self._outbox.items():
            self._batches += 1
            batches.setdefault(node, []).append((b"%b %d" % (self._stamp, self._batches), b"".join(items)))
        self._outbox = {}
        self._dropped.clear()
        j, read = self._journal, self._inbox_read
        ids: list[str] = []
        texts: list[bytes] = []
        written: list[str] = []
        added: tuple[Any, int] | None = None  # the XADD to the journal, and its bytes
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                ids, texts, written, added = self._journal_write(pipe)
                for node, sent in batches.items():
                    for number, batch in sent:
                        pipe.xadd(
                            INBOX_KEY + node, {b"m": batch, b"q": number}, trim_strategy=self.token.MAXLEN,
                            threshold=INBOX_MAXLEN, trim_operator=self.token.APPROXIMATELY,
                        )  # fmt: skip
        except Exception as exc:  # sent again before what came meanwhile: order kept, nothing lost
            self._redis_failed("sending to other nodes", exc)
            for node, sent in batches.items():
                if node not in self._dropped:  # (its sessions ended meanwhile, overflowing)
                    self._unsent[node] = sent + self._unsent.get(node, [])
            j.ids, j.texts = (ids + j.ids)[-MAX_JOURNAL:], (texts + j.texts)[-MAX_JOURNAL:]  # (older: history)
            j.urgent.update(written)
            await trio.sleep(RETRY_INTERVAL)
        else:
            self._journaled_read = read
            if added is not None:
                j.wrote(await added[0], added[1])
            self._redis_ok()
            for node, sent in batches.items():
                if node not in self._dropped:
                    self._outbox_bytes[node] -= sum(len(batch) for _, batch in sent)

    async def _inbox_loop(self, inbox_last: bytes, decisions_last: bytes) -> None:
        """Read this node's inbox and the decisions (one XREAD BLOCK: every key is in {mm}'s slot),
        and the inboxes of dead nodes whose clients this one took (first: what was sent there came
        before what was sent here)."""
        decisions = KEYS[10]
        self._decisions_read, self._inbox_read = decisions_last, inbox_last
        while True:
            reading, inbox = self._reading, INBOX_KEY + self.node  # (a node taken for dead gets a new id)
            streams = {key: last for key, (last, _) in self._adopted.items()}
            streams[inbox] = self._inbox_read
            streams[decisions] = self._decisions_read
            answer = None
            try:
                with trio.CancelScope() as self._read_scope:  # (cancelled to read a dead node's inbox too)
                    self._reads += 1
                    answer = await self.reader.xread(streams, count=INBOX_BATCH, block=1000)
            except Exception as exc:
                self._redis_failed("reading the inbox", exc)
                await trio.sleep(RETRY_INTERVAL)
                continue
            self._redis_ok()
            for raw_key, entries in (answer or {}).items():
                key = raw_key.decode()
                is_decisions = key == decisions
                if is_decisions and reading != self._reading:
                    continue  # read before a restore: stale (it reads on from where the restore began)
                for entry in entries:
                    if is_decisions:
                        if self._island is not None or self._restore_needed:
                            self._decisions_read = entry.identifier  # stale: the restore tells Redis how it is
                            continue
                        if entry.identifier in self._applied_early:
                            self._applied_early.discard(entry.identifier)
                            continue
                        self._decisions_read = entry.identifier
                    elif key == inbox:
                        self._inbox_read = entry.identifier
                    elif key in self._adopted:
                        self._adopted[key] = (entry.identifier, self._adopted[key][1])
                    else:
                        break  # (its time to be read is over)
                    if is_decisions:
                        self._read_entry(entry, key, self._decided, b"d")
                    else:
                        self._receive_entry(entry, key)

    def _read_entry(self, entry: Any, key: str, apply: Callable[[bytes], None], field: bytes) -> None:
        """``apply`` an entry's ``field`` (of stream ``key``); a malformed entry: say so, go on."""
        try:
            apply(entry.field_values[field])
        except Exception:
            self.statistics["cluster_bad_entries"] += 1
            log.exception("cluster: skipping malformed entry %s of %s", entry.identifier, key)

    def _receive_entry(self, entry: Any, inbox: str) -> None:
        """An entry of an inbox, once: a batch sent again (its first XADD's answer was lost) has the
        number of one read already. (An entry without a number, as a node of before sends: read.)"""
        if self._seen_number(inbox, entry):
            self._read_entry(entry, inbox, self._receive, b"m")
        else:
            self.statistics["cluster_batches_repeated"] += 1

    def _seen_number(self, inbox: str, entry: Any) -> bool:
        """Note the batch number of an entry of ``inbox``: False if its sender's number was read before."""
        stamp, _, number = entry.field_values.get(b"q", b"").partition(b" ")
        if not number.isdigit():
            return True
        sender, n = (inbox, stamp), int(number)
        last = self._seen.pop(sender, 0)
        self._seen[sender] = max(n, last)  # (the most recent last: the oldest go first)
        if len(self._seen) > MAX_SENDERS:
            del self._seen[next(iter(self._seen))]
        return n > last

    def _decided(self, payload: bytes) -> None:
        """One move's decisions, as every node reads them, in the order Redis made them."""
        entry = orjson.loads(payload)
        here = entry["n"] == self.node
        clients = self.clients
        for raw in entry["d"]:
            if raw[0] == "r":  # a restore's mark
                continue
            d, where = self.script.decision(raw)
            if here or any(cid in clients for cid in where):
                self._apply(d, where, decided_here=here and len(raw) < 9)  # (quiet: told and recorded alone)

    def _receive(self, packed: bytes) -> None:
        with self.relay.corked():  # a batch: each recipient's signals in one write
            self._receive_batch(packed)

    def _receive_batch(self, packed: bytes) -> None:
        view, at = memoryview(packed), 0
        while at < len(packed):
            (size,) = _LENGTH.unpack_from(view, at)
            item = packed[at + 4 : at + 4 + size]
            at += 4 + size
            client_id, session_id, payload = item[1:].split(b"\x1f", 2)
            kind = item[0]
            if kind & ~FORWARDED <= TEXT or kind & ~FORWARDED == FENCE:
                self._deliver(kind, client_id.decode(), session_id.decode(), payload)
            elif kind == REQUEST and self._adopting is not None:  # (once the clients it takes have their peers)
                self._adopting.append((client_id.decode(), orjson.loads(payload)))
            elif kind == REQUEST and (self._restore_needed or self._island is not None):
                # Once the restore has told Redis this node's clients: one handed over before it
                # would be missing from it, and the restore would forget it (ending its session).
                if len(self._after_restore) < MAX_EARLY:  # (else its asker times out: resume_failed)
                    self._after_restore.append((client_id.decode(), orjson.loads(payload)))
            elif kind == REQUEST:
                self._hand_over(client_id.decode(), orjson.loads(payload))
            elif kind == MOVED:
                peer = self.relay.remote_peers.get(client_id.decode())
                if peer is not None:  # what was sent to the old node, it forwards, then this fence
                    old, peer.node = peer.node, payload.decode()
                    self._put(old, FENCE, peer.id, session_id.decode(), b"")
            else:
                self._handed(client_id.decode(), kind, payload)

    def _deliver(self, kind: int, client_id: str, session_id: str, text: bytes) -> None:
        """A signal (SIGNAL) or message (TEXT) from another node for ``client_id``, in ``session_id``
        (or a FENCE); ``kind`` has FORWARDED if it came by the client's old node."""
        c = self.clients.get(client_id)
        if c is None:
            moved = self._moved.get(client_id)
            if moved is not None:  # it resumed on another node: on to there, in order
                self._put(moved, kind | FORWARDED, client_id, session_id, text)
            return
        fence = self._fences.get(client_id) if self._fences else None
        if fence is not None and not kind & FORWARDED and kind != FENCE:
            fence[1].append((kind, client_id, session_id, text))  # (after what still comes the old way)
            self._held += 1
            if self._held > MAX_EARLY:
                self._lift(client_id)
            return
        kind &= ~FORWARDED
        if kind == FENCE:
            if fence is not None:
                self._lift(client_id)
            return
        if c.session is None or c.session.id != session_id:
            if session_id in self._ended or self._early_count >= MAX_EARLY:
                return  # its session is over (the sender had not heard yet)
            self._early.setdefault(session_id, []).append((kind, client_id, session_id, text))
            self._early_count += 1
            return
        if kind == SIGNAL:
            if text[:1] != b"{" or text[-1:] != b"}":  # (what its node sends: type and data, checked there)
                raise ValueError(f"not a signal: {text[:40]!r}")
            self.relay.deliver_signal(c, text)
        elif kind == TEXT:
            self.relay.deliver_text(c, text)

    def _lift(self, client_id: str) -> None:
        """The fence of a client that moved here came (or its time is up): what came the new way
        meanwhile is delivered now, in order."""
        _, held = self._fences.pop(client_id)
        self._held -= len(held)
        for kind, cid, sid, text in held:
            self._deliver(kind | FORWARDED, cid, sid, text)

    # -- resume on another node -------------------------------------------------------------------

    def resume_elsewhere(self, c: Any, client_id: str, secret: str, last: int) -> bool:
        """Backend: ``c``'s ``resume`` names a client this node does not hold. Ask its node (which
        checks the token); ``Relay.take_back`` or ``resume_failed`` follows. Always True: pending."""
        done = trio.Event()
        self._asked[c.id] = (c, last, secret, done)
        assert self._nursery is not None
        self._nursery.start_soon(self._ask, c, client_id, secret, done)
        return True

    async def _ask(self, c: Any, client_id: str, secret: str, done: trio.Event) -> None:
        """Ask the client's node for it. A node that does not answer within HANDOVER_TIMEOUT and has
        no lease is dead: wait for the node that takes its clients over (and answers the request it
        finds in the dead node's inbox), within the node timeout; it may be this one. While Redis
        does not answer, ask again, within the same time."""
        r, asked, asked_at = self.redis, None, 0.0
        give_up = trio.current_time() + HANDOVER_TIMEOUT + self.node_timeout + 2 * LEASE_INTERVAL
        while not done.is_set() and trio.current_time() < give_up:
            try:
                record = await r.hget(KEYS[0], client_id)
                node = orjson.loads(record)["node"] if record else None
                if node == self.node and self._adopting is not None:  # being taken over here: wait
                    await trio.sleep(0.01)
                    continue
                if node == self.node:  # taken over here meanwhile (or unknown here: refused)
                    entry = self._asked.pop(c.id, None)
                    relay = self.relay
                    if entry is not None and relay.clients.get(c.id) is c:
                        if not relay.resume_here(c, client_id, secret, entry[1]):
                            self._refuse(c)
                    return
                if node is None:
                    break
                if node != asked:
                    asked, asked_at = node, trio.current_time()
                    request = {"secret": secret, "user": c.user_id, "node": self.node, "for": c.id}
                    self._put(node, REQUEST, client_id, "", orjson.dumps(request))
                with trio.move_on_after(RETRY_INTERVAL):
                    await done.wait()
                if trio.current_time() - asked_at >= HANDOVER_TIMEOUT and await r.exists([NODE_KEY + node]):
                    break  # a live node that does not answer
            except Exception as exc:  # Redis is away: ask again when it is back (the client's node holds it)
                self._redis_failed("looking up a client for a resume", exc)
                await trio.sleep(RETRY_INTERVAL)
        if self._asked.pop(c.id, None) is not None:  # no answer (or nobody to ask)
            self._refuse(c)

    async def replay_to(self, client_id: str) -> str | None:
        """Backend (Fly.io): the machine of the live node holding ``client_id``, if not this one's (a
        reconnection is replayed there); None if unknown, here, or Redis is slow to say."""
        if not self.machine or self._island is not None:
            return None
        with trio.move_on_after(REPLAY_LOOKUP_TIMEOUT):
            try:
                record = await self.redis.hget(KEYS[0], client_id)
                node = orjson.loads(record)["node"] if record else None
                if node is None or node == self.node:
                    return None
                machine = (await self.redis.get(NODE_KEY + node) or b"").decode()
            except Exception as exc:
                log.warning("cluster: looking up %s for fly-replay failed: %s", client_id, exc)
                return None
            return machine if machine not in ("", "1", self.machine) else None
        return None

    def _refuse(self, c: Any) -> None:
        relay = self.relay
        if relay.clients.get(c.id) is c:
            relay.send_error(c, "resume_failed", "cannot resume (too late, or not yours): join again")

    def _hand_over(self, client_id: str, request: dict[str, Any]) -> None:
        """Another node's new connection resumes ``client_id``: if the token is right, the client
        (its mailbox, session and place) goes there, and what still comes here for it follows."""
        relay, node = self.relay, request["node"]
        x = relay.release_client(client_id, request["secret"], request["user"])
        if x is None:
            self._put(node, REFUSED, request["for"], "", b"")
            return
        relay.hand_off(x)
        self._journal.urgent.add(x.id)  # (its journal entry goes: it is the new node's now)
        peer = x.peer
        if peer is not None and peer.__class__ is not RemotePeer:  # its peer stays here: x is remote now
            stand_in = relay.remote_peers[x.id] = RemotePeer(x.id, x.user_id, node, self._forward)
            stand_in.peer, stand_in.session, peer.peer = peer, x.session, stand_in
            peer_node = self.node
        elif peer is not None:
            peer_node = peer.node
            if relay.remote_peers.get(peer.id) is peer:
                del relay.remote_peers[peer.id]
        position = self._waiting.get(x.id)
        self._unqueue(x.id)
        self._interests.pop(x.id, None)  # (no longer this node's client: as at its disconnect)
        self._last.pop(x.id, None)
        self._moved[x.id] = node
        self._handed_over_at = trio.current_time()
        if len(self._moved) > MAX_MOVED:
            del self._moved[next(iter(self._moved))]
        mb = x.mailbox
        state = {
            "id": x.id, "user": x.user_id, "age": trio.current_time() - x.connected_at, "away": x.was_away,
            "count": mb.count, "adopted": getattr(mb, "adopted", -1),
            "ring": [[n, text.decode()] for n, text in mb.ring],
            "held": None if mb.held is None else [text.decode() for text in mb.held],
            "session": None if x.session is None else self._session_json(x.session),
            "peer": None if peer is None else [peer.id, peer.user_id, peer_node],
            "position": position, "for": request["for"],
        }  # fmt: skip
        self._put(node, HANDOVER, request["for"], "", orjson.dumps(state))
        log.debug("client %s: resumed on node %s", x.id, node)

    def _handed(self, new_id: str, kind: int, payload: bytes) -> None:
        """The answer to a resume this node asked another for."""
        asked = self._asked.pop(new_id, None)
        if asked is None:
            return  # too late: it was refused meanwhile
        c, last, secret, done = asked
        done.set()
        relay = self.relay
        if kind == REFUSED:
            self._refuse(c)
            return
        state = orjson.loads(payload)
        if relay.clients.get(c.id) is not c:  # the new connection closed meanwhile: the client ends here
            self._enqueue("move", state["id"], self.node)
            self._enqueue("disconnect", state["id"], "disconnected")
            return
        x = relay.rebuilt_client(c, state["id"], state["user"], trio.current_time() - state["age"])
        mb = x.mailbox
        mb.count = state["count"]
        if isinstance(mb, JournaledMailbox):
            mb.adopted = state.get("adopted", -1)
        mb.ring = [(n, text.encode()) for n, text in state["ring"]]
        mb.ring_bytes = sum(len(text) for _, text in mb.ring)
        if state["held"] is not None:
            mb.held = [text.encode() for text in state["held"]]
            mb.held_bytes = sum(map(len, mb.held))
        x.was_away = state["away"]
        stand_in = None
        if state["session"] is not None:
            x.session = self.script.session(state["session"])
        if x.session is not None and state["peer"] is not None:  # (no peer: it is gone, its end will come)
            session = x.session
            pid, user, node = state["peer"]
            # What the peer sent to the old node comes forwarded; what it sends here from now on
            # waits behind the fence, which comes the old way after the rest (_deliver).
            self._fences[x.id] = (trio.current_time() + FENCE_TIMEOUT, [])
            local = relay.clients.get(pid)
            if local is not None:  # the peer is here: through this node's inbox, behind the fence
                x.peer = local
                stand_in = relay.remote_peers.get(x.id)
                if stand_in is not None:
                    old, stand_in.node = stand_in.node, self.node
                    self._put(old, FENCE, x.id, session.id, b"")
            else:
                x.peer = relay.remote_peers[pid] = RemotePeer(pid, user, node, self._forward)
                x.peer.session = session
                self._put(node, MOVED, x.id, session.id, self.node.encode())  # its node sends here now
        if state["position"] is not None:
            self._waiting[x.id] = state["position"]
        self._enqueue("move", x.id, self.node)  # this node serves it now (before the release take_back asks)
        relay.take_back(c, x, last, secret)
        if stand_in is not None and c.peer is not None:  # (take_back linked them: the peer goes on the fenced way)
            c.peer.peer, stand_in.peer = stand_in, c

    def _session_json(self, s: Session) -> dict[str, Any]:
        """A Session as the script writes it (times in Redis's clock)."""
        return {
            "id": s.id, "a": s.initiator, "b": s.answerer, "ints": list(s.interests),
            "t": round((s.started_at - self.script.offset) * 1000),
            "w": [round(s.waits[0] * 1000), round(s.waits[1] * 1000)],
        }  # fmt: skip

    async def _position_loop(self) -> None:
        """Every POSITION_INTERVAL: the positions of this node's waiting clients (one round trip)."""
        while True:
            await trio.sleep(relay.POSITION_INTERVAL)
            ids = list(self._waiting)
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    ranks = [pipe.zrank(KEYS[1], cid) for cid in ids]
                    size = pipe.zcard(KEYS[1])
                results = [await rank for rank in ranks]
                self._queue_size = await size
            except Exception as exc:
                log.warning("cluster: reading positions failed: %s", exc)
                continue
            for cid, rank in zip(ids, results, strict=True):
                if rank is not None and cid in self._waiting:
                    self._waiting[cid] = rank + 1
            self.queue_changed = True

    async def finish(self) -> None:
        """At shutdown: wait (within SHUTDOWN_TIMEOUT) for the away clients to resume elsewhere,
        run the moves left (the clients' disconnects) and send what is still out; then give the
        lease up. If some clients were not taken over in time, the node stays in the node list
        without a lease: another node reaps it at once, so that nothing of them stays in Redis."""
        with trio.move_on_after(relay.SHUTDOWN_TIMEOUT - LINGER):
            while self.relay.away or self._moves or trio.current_time() - self._handed_over_at < LINGER:
                await trio.sleep(0.01)
            while self._outbox or self._unsent:
                await self.flush()
        left = len(self.relay.away) + len(self._moves)
        try:
            await self.redis.delete([NODE_KEY + self.node])
            if left:
                log.warning("cluster: node %s stops with %d clients or moves left: another node reaps them",
                            self.node, left)  # fmt: skip
            else:
                await self.redis.srem(NODES_KEY, [self.node])
                await self.redis.hdel(KEYS[9], ["restored:" + self.node])
                await self.redis.delete([JOURNAL_KEY + self.node, JOURNALED_KEY + self.node])
        except Exception as exc:
            log.warning("cluster: releasing the lease failed: %s", exc)


def _why(exc: BaseException) -> str:
    """The innermost reason in ``exc``, which anyio and trio may have grouped."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _redacted(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        parts = parts._replace(netloc=parts.netloc.replace(":" + parts.password + "@", ":***@"))
    return urllib.parse.urlunsplit(parts)


def check_url(url: str) -> None:
    """A Redis URL coredis takes (redis://, rediss://, unix://), or a redis+sentinel:// or
    redis+cluster:// one; else PluginError."""
    if url.startswith(("redis+sentinel://", "redis+cluster://")):
        hosts_url(url)
        return
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix") or (parts.scheme != "unix" and not parts.hostname):
        raise PluginError(
            f"--redis-url {_redacted(url)!r}: expected redis://host[:port][/db] (or rediss://, unix://, "
            "redis+sentinel://, redis+cluster://)"
        )
    try:
        parts.port  # noqa: B018 (validates it)
    except ValueError as exc:
        raise PluginError(f"--redis-url {_redacted(url)!r}: {exc}") from None


_HOSTS_URLS: Final = {  # scheme -> (the port unless given, what comes after the hosts)
    "redis+sentinel": (SENTINEL_PORT, "/service[/db]"),
    "redis+cluster": (6379, ""),
}


def hosts_url(url: str) -> tuple[list[tuple[str, int]], str, dict[str, Any]]:
    """``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]``: the
    Sentinels, the service (Sentinel's name for the primary), and what the connections to the
    primary take (db, user, password: the primary's, not the Sentinels');
    ``redis+cluster://[[user]:password@]host[:port][,host[:port]...]``: nodes of a Redis Cluster to
    start from ("" for the service, no db). PluginError if malformed."""
    scheme, _, rest = url.partition("://")
    default_port, after = _HOSTS_URLS[scheme]
    netloc, _, path = rest.partition("/")
    auth, _, hosts = netloc.rpartition("@")
    options: dict[str, Any] = {}
    if auth:
        user, _, password = auth.partition(":")  # (as in redis://: user@ is a user, :password@ a password)
        options.update(username=urllib.parse.unquote(user) or None, password=urllib.parse.unquote(password) or None)
    found = []
    service, _, db = path.partition("/")
    try:
        for host_port in hosts.split(","):
            if host_port.startswith("["):  # [IPv6]:port
                host, _, port = host_port[1:].partition("]")
                port = port.removeprefix(":")
            else:
                host, _, port = host_port.partition(":")
            if not host or not 0 < int(port or default_port) < 65536:
                raise ValueError(host_port)
            found.append((host, int(port or default_port)))
        if after:
            options["db"] = int(db.strip("/") or 0)
            if not service:
                raise ValueError("no service")
        elif path:
            raise ValueError("a Redis Cluster has no service or db")
    except ValueError:
        raise PluginError(
            f"--redis-url {_redacted(url)!r}: expected {scheme}://[:password@]host[:port][,host[:port]...]{after}"
        ) from None
    return found, urllib.parse.unquote(service), options


def connect(url: str) -> tuple[Any, Any, Any]:
    """The Sentinel client (None unless redis+sentinel://) and two clients of Redis (commands; the
    inbox's XREAD BLOCK): of the primary Sentinel names, or of a Redis Cluster, or plain. Nothing
    connects until used."""
    import coredis
    from coredis.connection import TCPLocation

    if not url.startswith(("redis+sentinel://", "redis+cluster://")):
        return None, coredis.Redis.from_url(url), coredis.Redis.from_url(url)
    hosts, service, options = hosts_url(url)
    where = [TCPLocation(h, p) for h, p in hosts]
    if not service:  # a Redis Cluster
        return None, *(coredis.RedisCluster(startup_nodes=where, **options) for _ in range(2))
    timeouts = {"connect_timeout": SENTINEL_TIMEOUT, "stream_timeout": SENTINEL_TIMEOUT}
    sentinel = coredis.Sentinel(where, sentinel_kwargs=timeouts)
    return sentinel, sentinel.primary_for(service, **options), sentinel.primary_for(service, **options)


########################################################################################################
# Hooks
########################################################################################################


@relay.hookimpl
def relay_addoption(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster (relay_plugins.cluster; on with --redis-url)")
    group.add_argument(
        "--redis-url", default=os.environ.get("RELAY_REDIS_URL"),
        help="Redis (>= 7.0, maxmemory-policy noeviction) shared by the nodes: redis://host[:port][/db], "
        "rediss://, unix://, redis+sentinel://host[:port][,host[:port]...]/service[/db], "
        "or redis+cluster://host[:port][,host[:port]...] (env RELAY_REDIS_URL)",
    )  # fmt: skip
    group.add_argument(
        "--node-id", default=os.environ.get("RELAY_NODE_ID") or os.environ.get("FLY_MACHINE_ID"),
        help="this node's id (env RELAY_NODE_ID, else FLY_MACHINE_ID, else random)",
    )  # fmt: skip
    group.add_argument(
        "--cluster-flush-ms", type=float, default=5.0,
        help="milliseconds between sends of cross-node messages (default %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--cluster-buffer-bytes", type=int, default=16 << 20,
        help="bytes of messages for one other node waiting for Redis; more ends those sessions (overflow)"
        " (default %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--cluster-journal-bytes", type=int, default=64 << 20,
        help="bytes of signals a node's journal keeps in Redis at most (older ones go; a takeover after "
        "its death rebuilds from it) (default %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--cluster-node-timeout", type=float, default=5.0,
        help="seconds without a lease renewal after which a node is taken for dead (default %(default)s)",
    )  # fmt: skip


_backends: dict[int, ClusterBackend] = {}


@relay.hookimpl
def relay_configure(relay: Relay) -> None:
    o = relay.options
    url = getattr(o, "redis_url", None)
    if not url:
        return
    try:
        import coredis  # noqa: F401
    except ImportError as exc:
        raise PluginError("--redis-url needs coredis: pip install 'roulette-relay[cluster]'") from exc
    check_url(url)
    node = o.node_id or secrets.token_hex(6)
    worker = os.environ.get(WORKER_ENV)  # one of --workers N: each is a node of its own
    if worker is not None:
        node = f"{node}-{worker}"
    if not 0 < len(node) <= 64 or not node.replace("-", "").replace("_", "").isalnum():
        raise PluginError(f"--node-id {node!r}: 1-64 letters, digits, - or _")
    if not 0.5 <= o.cluster_flush_ms <= 1000:
        raise PluginError("--cluster-flush-ms must be between 0.5 and 1000")
    if not 2 * LEASE_INTERVAL <= o.cluster_node_timeout <= 600:
        raise PluginError("--cluster-node-timeout must be between 2 and 600 seconds")
    if not 1 << 20 <= o.cluster_journal_bytes <= 1 << 32:
        raise PluginError("--cluster-journal-bytes must be between 1048576 and 4294967296")
    if not 64 * 1024 <= o.cluster_buffer_bytes <= 1 << 32:
        raise PluginError("--cluster-buffer-bytes must be between 65536 and 4294967296")
    _backends[id(relay)] = ClusterBackend(
        relay, url, node, o.cluster_flush_ms / 1000, o.cluster_node_timeout, o.cluster_buffer_bytes,
        o.cluster_journal_bytes,
    )  # fmt: skip


@relay.hookimpl
def relay_backend(relay: Relay) -> ClusterBackend | None:
    return _backends.get(id(relay))


@relay.hookimpl
def relay_shutdown(relay: Relay) -> Any:
    backend = _backends.pop(id(relay), None)
    return backend.finish if backend is not None else None
