"""relay: a matchmaking and WebRTC signaling server for random video chat.

Browsers open a WebSocket to ``/ws``, ask to ``join`` (optionally with interests), are paired with
another waiting person, and then pass WebRTC offers, answers and ICE candidates to each other through
the relay until their browsers connect directly (through TURN where needed). Then either side can
press *next* to meet someone else.

Run it::

    pip install -e . && python relay.py            # listens on 0.0.0.0:8080 (HOST / PORT env vars)
    python relay.py --help                          # every setting, with its default

Architecture
============
Read top to bottom, this file is: constants, exceptions and the public types plugins see
(``HttpRequest``, ``Auth``, ``HttpResponse``, ``RelayStatistics``), then

1. **The sans-I/O core.** ``Matchmaker``: a plain class with an injected clock and ``random.Random``.
   Its moves (``join``, ``next``, ``leave``, ``disconnect``, ``tick``) return *decisions*
   (``Paired``, ``Queued``, ``Ended``) and never do I/O; an illegal move raises ``IllegalMove`` and
   changes nothing. Waiting clients are indexed by interest in heaps keyed by their queue ticket, so
   a join costs O(interests * log n), never a scan of the queue. A client's lifecycle is one
   ``phase`` (``PHASES``: new, active, away, closing, gone; ``next_phase`` refuses any other move),
   and what a resume must hand over is one ``Mailbox``: the numbered ring of the latest signals and
   what waits for an away client, with the bounds at which it gives up rather than leave a gap.
2. **The protocol** (one section: ``parse_message``, the ``_msg_*`` builders, error and close codes):
   JSON text frames, documented with examples in ``docs/protocol.md``. Every message is validated
   (strict JSON, by orjson, from the frame's bytes); bad input gets an ``error`` message or a close
   code and never touches another client.
3. **WebSocket frames** (``FrameParser``, sans I/O): the server's side of RFC 6455, bytes in, whole
   messages out, every violation a close code; held against wsproto by a hypothesis test.
4. **Plugin hooks** (``HookSpecs``).
5. **The I/O shell.** ``_Port`` is every TCP connection on the one listening port, from accept to
   close. A connection counts against its address and the socket cap from accept on; its task
   reads the HTTP request head (``parse_head``) and routes it: ``/healthz`` is answered at once,
   ``GET /ws`` with an upgrade is answered by the relay itself (101), ``/ws`` without one gets 426,
   plugins' routes and the static files the rest, else 404. Before an upgrade: the handshake's
   headers, draining and capacity, the origin, the address's connection rate, then the auth hook
   (401 before any WebSocket exists; an error refuses). A plugin's route may answer with an
   ``HttpStream`` instead: admitted as an upgrade is, the connection is then a client whose messages
   go out in the plugin's framing and whose own come by other requests (``ClientLink``): the HTTP
   fallback. ``Relay`` is every client's state and the
   moves on it (synchronous: they decide and write, never wait), its timers and its public API.
   A WebSocket client then has one task: it waits until its socket is readable, reads, feeds the
   frame parser and acts on each message (rate-limit, parse, dispatch): no reader task, no channel.
   Every write to a client goes through its ``_Transport``: one non-blocking ``writev`` straight into
   the socket, no task switch. Only what the kernel refuses is kept (in order, up to
   ``--send-buffer-bytes``, whatever the frame: messages, pongs, close frames) and drained by a
   flusher task started on demand; a client whose buffer overflows is closed with 1013. So relaying
   a signal never waits for the peer, and a slow reader can only hurt itself. One task pings quiet
   clients. A connection that *vanishes* leaves its client away for ``--resume-grace``: held in
   the queue or kept in its session, its mailbox keeping what is sent to it, so that ``resume`` on
   a new connection replays exactly what was missed (or, if the mailbox overflowed, ends the
   session as ``overflow``: never a silent gap).
6. **Settings and the command line** (``Settings``: each setting declared once, with its flag,
   variable, bounds and help; the README's table is checked against it) and ``main()``. With
   ``--workers N`` ``main()`` is a supervisor (``_supervise``): N processes of this file on the
   port (``SO_REUSEPORT``), each a node of a cluster (they need a shared backend: ``--redis-url``).

Plugins (pluggy, project name ``relay``; ``docs/plugins.md``) add flags and commands, configure
themselves, start tasks, see connects, matches, session ends and disconnects, answer HTTP requests
on the shared port (or make them clients: ``HttpStream``), choose the ICE servers sent in
``matched`` and finish their work at shutdown.
Hooks are synchronous and never called per relayed message; a plugin needing I/O runs its own task.
Session persistence (SQLite by default, or PostgreSQL), Prometheus metrics and an admin dashboard
ship in ``plugins/``.

Shutdown (SIGTERM / SIGINT) drains: ``/healthz`` turns 503, new WebSockets are refused, every client
gets a ``draining`` note; idle and queued clients are closed with 1012 at once, matched ones when
their session ends or ``--drain-seconds`` pass. The process then exits 0.

Limits: one process, one core, all state in memory. A restart loses queue and sessions (clients
reconnect and re-join). Scale-out is a plugin's job, behind one seam: ``Backend`` (hook
``relay_backend``) is where moves are decided, ``Relay.apply`` takes decisions made later or
elsewhere, and a peer on another node is a ``RemotePeer`` whose messages its backend carries
(``relay_plugins.cluster``: several nodes share one Redis; ``docs/scaling.md``).
"""

from __future__ import annotations

import argparse
import base64
import codecs
import collections
import contextlib
import errno
import gc
import hashlib
import heapq
import hmac
import importlib
import importlib.metadata
import importlib.util
import ipaddress
import json
import logging
import os
import random
import re
import resource
import secrets
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final, NamedTuple, NoReturn, Protocol, TypeAlias

import attrs
import orjson
import pluggy
import trio

try:
    from websockets.speedups import apply_mask as _apply_mask  # C: 20-30x a pure-Python XOR
except ImportError:  # a platform without websockets' compiled speedups
    from websockets.utils import apply_mask as _apply_mask

__all__ = [
    "PHASES",
    "SHUTDOWN_TIMEOUT",
    "SIGNAL",
    "TEXT",
    "Auth",
    "Backend",
    "ClientLink",
    "Ended",
    "FrameParser",
    "HttpError",
    "HttpRequest",
    "HttpResponse",
    "HttpStream",
    "IllegalMove",
    "IllegalTransition",
    "Mailbox",
    "Matchmaker",
    "Paired",
    "PluginError",
    "ProtocolError",
    "Queued",
    "Relay",
    "RelayStatistics",
    "RemotePeer",
    "Session",
    "SettingError",
    "Settings",
    "StartupError",
    "StreamFraming",
    "WebSocketError",
    "hookimpl",
    "hookspec",
    "main",
    "make_plugin_manager",
    "next_phase",
    "parse_head",
    "parse_interests",
    "parse_message",
    "relayed_signal",
    "secret_digest",
    "serve_http",
    "setting",
]

log = logging.getLogger("relay")

try:
    __version__ = importlib.metadata.version("roulette-relay")
except importlib.metadata.PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"

########################################################################################################
# Constants
########################################################################################################

PROTOCOL_VERSION: Final = 1  # the "protocol" number sent in welcome; bumped on incompatible change
WS_PATH: Final = "/ws"  # the WebSocket endpoint
HEALTH_PATH: Final = "/healthz"  # health check endpoint (fly.toml points at it)
STATIC_DIR: Final = Path(__file__).resolve().with_name("static")  # demo page and browser client, served at /
DEFAULT_HOST: Final = "0.0.0.0"  # listen address when neither --host nor HOST is given
DEFAULT_PORT: Final = 8080  # listen port when neither --port nor PORT is given (fly.toml internal_port)
MAX_INTERESTS: Final = 10  # interests per client
MAX_INTEREST_CHARS: Final = 32  # characters per interest (after trimming and case-folding)
MAX_RECENT_PEERS: Final = 16  # past peers remembered per client for the rematch cooldown
MAX_BLOCKS: Final = 1000  # people one identity has blocked by reporting (the oldest are forgotten)
MAX_BLOCKING_IDENTITIES: Final = 100_000  # identities with a block list kept (the oldest are forgotten)
MAX_REQUEST_HEAD: Final = 16 * 1024  # bytes of HTTP request line + headers before 431
MAX_REQUEST_BODY: Final = 64 * 1024  # bytes of an HTTP request body (plugins' POSTs) before 413
MAX_LINGER_BYTES: Final = 1024 * 1024  # bytes of a refused request's body read away so the answer arrives
LISTEN_BACKLOG: Final = 4096  # connections the kernel queues for accept (capped by net.core.somaxconn)
ACCEPT_BATCH: Final = 256  # connections accepted per wake-up of the accept loop, at most
CLOSE_TIMEOUT: Final = 5.0  # seconds a closing client gets to take its last messages and close frame
TICK_INTERVAL: Final = 0.1  # seconds between checks for expired interest timeouts
POSITION_INTERVAL: Final = 1.0  # seconds between queue-position updates (at most one per client)
SHUTDOWN_TIMEOUT: Final = 5.0  # seconds plugins get to finish (flush) once every client is gone
WORKER_ENV: Final = "RELAY_WORKER"  # set in a --workers process: "<index>-<restarts>" (its node id's suffix)
READY_ENV: Final = "RELAY_READY_FD"  # a pipe a --workers process writes one byte to once it listens
WORKER_RESTART_DELAY: Final = 1.0  # seconds before a worker that exited on its own is started again
FLOOD_WINDOW: Final = 10.0  # seconds over which refused (rate-limited) messages are counted
MAX_TOKEN_CHARS: Final = 128  # characters of a resume token
MAX_REPORT_REASON: Final = 200  # characters of a report's reason
SWEEP_INTERVAL: Final = 10.0  # seconds between clean-ups of the per-address and per-user tables
GC_THRESHOLDS: Final = (50_000, 50, 100)  # the cyclic collector's (Python's: 700, 10, 10); see _run
FD_RESERVE: Final = 64  # file descriptors kept free of sockets (files, databases, plugins) under --max-sockets
FLY_PROXIES: Final = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")  # trusted on Fly.io (see README)
RECEIVE_BYTES: Final = 64 * 1024  # bytes asked of a WebSocket's socket per read
MAX_FRAGMENTS: Final = 64  # frames one WebSocket message may come in; more closes 1009

########################################################################################################
# Exceptions
########################################################################################################


class ProtocolError(Exception):
    """A client message the relay refuses. ``code`` (one of ``ERROR_CODES``) and ``message`` go
    back to the client in an ``error`` message; the connection stays open."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class IllegalMove(ProtocolError):
    """A move the client's state does not allow (``join`` while matched); nothing was changed."""


class PluginError(Exception):
    """Raised by a plugin's ``relay_configure`` to refuse to start (bad or missing configuration).
    ``main()`` prints it on one line and exits with 2."""


class StartupError(Exception):
    """The relay cannot start as configured (say, its port is in use): one line, exit 2."""


class IllegalTransition(RuntimeError):
    """A client was moved to a phase its own does not lead to (a bug in the relay: nothing changed)."""


class WebSocketError(Exception):
    """A client broke RFC 6455 (or a limit): its connection closes with ``code`` and ``reason``.
    ``events`` are those the same bytes completed before the violation: act on them first."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.events: list[tuple[int, bytes]] = []


class HttpError(Exception):
    """A request the relay cannot read: answered with ``status`` (400, 411, 431, 501), then closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SettingError(ValueError):
    """A setting out of its range or not of its form; the message names the flag."""


########################################################################################################
# What plugins see: the HTTP side of the port, and the relay's statistics
########################################################################################################


@attrs.frozen
class HttpRequest:
    """A plain HTTP request on the relay's port, as ``relay_http_request`` sees it."""

    method: str
    path: str  # the target up to "?", not decoded: compare it exactly
    query: str  # after "?", not decoded
    headers: dict[str, str]  # names in lower case; a header sent several times is joined with ", "
    body: bytes  # at most MAX_REQUEST_BODY bytes
    remote: str  # "host:port" of the TCP connection (a proxy's, behind one)
    ip: str = ""  # the client's IP address: the connection's, or what a --trusted-proxy says


@attrs.frozen
class Auth:
    """What ``relay_authenticate`` decides about a WebSocket upgrade."""

    user_id: str | None = None  # accepted as this user
    refuse: int = 0  # an HTTP status (401, 403) to refuse with; 0 accepts
    reason: str = ""  # why, sent with the refusal
    subprotocol: str | None = None  # the Sec-WebSocket-Protocol value to accept with


@attrs.frozen
class HttpResponse:
    """What a plugin answers to an ``HttpRequest``. The connection closes after it."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    cache: str = "no-store"  # the Cache-Control header


class StreamFraming(Protocol):
    """How a plugin's ``HttpStream`` writes the relay's messages into an HTTP response (one object per
    stream; every method is called on the hot path and must only build bytes)."""

    def opening(self, link: ClientLink) -> bytes:
        """The first bytes after the head, before ``welcome``: ``link`` is this stream's client."""

    def message(self, text: bytes) -> bytes:
        """One protocol message (compact JSON) to the client."""

    def keepalive(self) -> bytes:
        """Written when the client has been quiet for ``--heartbeat-interval``: it must show a sign
        of life (send anything) within ``--heartbeat-timeout``, as a WebSocket answers a ping."""

    def closing(self, code: int, reason: str) -> bytes:
        """The last bytes, when the relay ends the client (a WebSocket close code and reason)."""

    def closed(self) -> None:
        """The stream ended (either side): forget its link."""


@attrs.frozen
class HttpStream:
    """What a plugin answers to an ``HttpRequest`` to make its connection a client of the relay
    without a WebSocket (``relay_plugins.fallback``). The relay admits it as it admits an upgrade
    (draining and capacity, ``--allowed-origin``, the address's connection rate, then
    ``relay_authenticate``: a refusal is an ordinary 401/403/429/503), sends a 200 head without a
    length (``Cache-Control: no-store``, ``X-Accel-Buffering: no``, then ``headers``) and serves a
    client on the connection: queue, sessions, resume, limits and hooks as for a WebSocket. What
    the client sends comes by other requests, which the plugin passes on with ``ClientLink.receive``.
    The connection's end without the relay closing it leaves the client away (resumable)."""

    framing: StreamFraming
    content_type: str = "text/event-stream"
    headers: tuple[tuple[str, str], ...] = ()


class ClientLink:
    """A client served on an ``HttpStream``, as the plugin that opened it sees it."""

    __slots__ = ("_client", "_port")

    def __init__(self, port: _Port, client: _Client) -> None:
        self._port = port
        self._client = client

    @property
    def open(self) -> bool:
        """Whether the client can still send (its stream is up and the relay is not closing it)."""
        return self._client.phase is NEW or self._client.phase is ACTIVE

    def receive(self, texts: list[bytes]) -> bool:
        """Messages the client sent, in order: each is rate-limited, parsed and acted on exactly as
        a WebSocket text frame would be (up to one that makes the relay close the client). False,
        and nothing done, if the link was not ``open``."""
        if not self.open:
            return False
        c = self._client
        c.transport.received += 1  # a sign of life, for the heartbeat
        self._port._act(c, c.transport, [(OP_TEXT, text) for text in texts], None)
        return True


class Backend(Protocol):
    """Where the matchmaking moves are decided (hook ``relay_backend``): ``Matchmaker`` is the
    local one, and its methods are the contract. The relay makes each move synchronously; what a
    move returns is decided now. A backend that decides elsewhere (``relay_plugins.cluster``:
    Redis, shared by several nodes) returns what it can now (often nothing) and hands the rest to
    ``Relay.apply`` from its own task, in the order of the moves. Its queries answer for this
    node's clients. If it has ``async run(relay, *, task_status)``, ``serve()`` starts it before
    listening (a ``PluginError`` raised before ``task_status.started()`` refuses to start)."""

    queue_changed: bool  # set when positions moved; the relay clears it
    queued_with_interests: int

    @property
    def queue_size(self) -> int: ...
    @property
    def session_count(self) -> int: ...
    def state(self, client_id: str) -> str: ...
    def position_of(self, client_id: str) -> int: ...
    def positions(self) -> Iterator[tuple[str, int]]: ...
    def connect(self, client_id: str, identity: str | None = None) -> None: ...
    def join(self, client_id: str, interests: Iterable[str] = ()) -> list[Decision]: ...
    def next(self, client_id: str) -> list[Decision]: ...
    def leave(self, client_id: str, reason: str = "left") -> list[Decision]: ...
    def disconnect(self, client_id: str, reason: str = "disconnected") -> list[Decision]: ...
    def report(self, client_id: str) -> list[Decision]: ...
    def hold(self, client_id: str) -> None: ...
    def release(self, client_id: str) -> list[Decision]: ...
    def tick(self) -> list[Decision]: ...


SIGNAL: Final = 0  # RemotePeer.forward: a signal from the peer, to be numbered by the recipient's node
TEXT: Final = 1  # RemotePeer.forward: a message to send as it is


class RemotePeer:
    """The peer of one of this node's clients that is a client of another node (a cluster backend
    makes it and keeps it in ``Relay.remote_peers``). What the relay sends it goes to ``forward``
    (``forward(client_id, SIGNAL | TEXT, text)``): its node delivers it, in order. A signal's text
    is a JSON object of ``type`` and ``data`` only (``Relay.deliver_signal`` numbers it unparsed)."""

    __slots__ = ("forward", "id", "mailbox", "node", "peer", "phase", "session", "transport", "user_id")

    def __init__(
        self, client_id: str, user_id: str | None, node: str, forward: Callable[[str, int, bytes], None]
    ) -> None:
        self.id, self.user_id, self.node, self.forward = client_id, user_id, node, forward
        self.phase = ACTIVE  # for the relay, always reachable: its node holds what it cannot take yet
        self.transport = self  # what Relay._send writes to
        self.mailbox = None  # its node's: signals to it are numbered there (Relay._message checks this)
        self.peer: _Client | None = None
        self.session: Session | None = None

    def send_text(self, payload: bytes) -> bool:
        self.forward(self.id, TEXT, payload)
        return True


@attrs.frozen
class RelayStatistics:
    """A snapshot of the relay, read by ``/healthz`` and metrics plugins."""

    connections: int  # clients connected now (WebSockets and HTTP streams)
    sockets: int  # TCP connections open now (WebSockets, HTTP requests, handshakes)
    queued: int  # clients waiting for a match
    queued_with_interests: int  # of those, the ones with interests
    sessions: int  # sessions in progress
    uptime_s: float
    draining: bool
    connections_total: int  # clients accepted since start
    matches_total: int
    signals_relayed: int
    sessions_ended: dict[str, int]  # by reason
    errors: dict[str, int]  # error messages sent, by code
    closed_slow: int  # clients closed (1013) because their send buffer overflowed
    away: int  # vanished clients that may still resume
    resumed: int  # clients that resumed since start
    counters: dict[str, int]  # what plugins counted in ``Relay.counters`` (e.g. ``sessions_dropped``)


########################################################################################################
# The sans-I/O core: matchmaking
########################################################################################################


@attrs.frozen
class Session:
    """Two clients paired by the matchmaker. ``initiator`` is the one that waited (it sends the offer)."""

    id: str
    initiator: str
    answerer: str
    interests: tuple[str, ...]  # shared interests, sorted
    started_at: float
    waits: tuple[float, float]  # seconds each side waited in the queue (initiator, answerer)

    def peer_of(self, client_id: str) -> str:
        return self.answerer if client_id == self.initiator else self.initiator


@attrs.frozen
class Paired:
    """Decision: a new session; tell both sides (``matched``), the initiator first."""

    session: Session


@attrs.frozen
class Queued:
    """Decision: the client waits at ``position`` (1 = next in line) of ``queue_size``."""

    client_id: str
    position: int
    queue_size: int


@attrs.frozen
class Ended:
    """Decision: a session ended. ``by`` ended it; the other side gets ``peer_left`` once."""

    session: Session
    reason: str  # "next", "left", "disconnected", "reported" or "overflow"
    by: str

    @property
    def notify(self) -> str:
        return self.session.peer_of(self.by)


Decision: TypeAlias = Paired | Queued | Ended
_Entry: TypeAlias = tuple[int, str]  # (queue ticket, client id) in the interest and open heaps


@attrs.define(eq=False, slots=True)
class _Member:
    """A connected client as the matchmaker sees it."""

    id: str
    identity: str  # whom blocks apply to: the user id under auth, else the client id
    interests: frozenset[str] = frozenset()
    seq: int | None = None  # queue ticket while waiting (smaller = waited longer), else None
    held: bool = False  # waiting, but away (connection lost): keeps its place, is not matched
    since: float = 0.0  # when the current wait began (join or next): the interest timer's start
    open: bool = False  # while waiting: accepts anyone (no interests, or the interest timeout passed)
    session: Session | None = None
    recent: dict[str, float] | None = None  # past peer id -> when that session ended (None: none yet)


class Matchmaker:
    """The queue and the sessions: who waits, who is paired with whom. No I/O.

    Rules (the hypothesis state machine in ``tests/test_matchmaker.py`` checks them after every step):

    * A client with interests accepts only clients sharing one, until it has waited
      ``interest_timeout`` seconds (counted from its join or next); then it accepts anyone. A client
      without interests accepts anyone. Two clients are *compatible* when each accepts the other.
    * Two clients one of whom reported the other (``report``) are never compatible again.
    * A joining client is paired at once with the longest-waiting compatible client, skipping a
      client it ended a session with less than ``rematch_cooldown`` seconds ago while any other
      compatible client waits. The one that waited is the session's initiator.
    * So no two waiting clients are ever compatible: the matching is maximal. ``tick()`` keeps it so
      as interest timeouts pass; call it whenever the clock moves (the server does, every 0.1 s and
      before each join).
    * A waiting client can be *held* (its connection dropped; it may come back): it keeps its place
      and its wait, and nobody is paired with it until ``release``.

    Each waiting client sits in one heap per interest and, once it accepts anyone, in the open heap,
    all keyed by queue ticket. Entries are deleted lazily (checked against the member when they reach
    the top) and the heaps are rebuilt when more than half their entries are stale, so every
    operation costs O(interests * log n), never a scan of the queue.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        interest_timeout: float = 10.0,
        rematch_cooldown: float = 30.0,
        compact_after: int = 1024,
        max_blocks: int = MAX_BLOCKS,
        max_blocking_identities: int = MAX_BLOCKING_IDENTITIES,
    ) -> None:
        self._clock = clock
        self._rng = rng
        self.interest_timeout = interest_timeout
        self.rematch_cooldown = rematch_cooldown
        self._compact_after = compact_after  # stale heap entries at least, before a rebuild is considered
        self._max_blocks = max_blocks
        self._max_blocking_identities = max_blocking_identities
        self._members: dict[str, _Member] = {}
        self._queue: dict[str, _Member] = {}  # waiting members in ticket order
        self._sessions: dict[str, Session] = {}
        self._by_interest: dict[str, list[_Entry]] = {}
        self._open: list[_Entry] = []
        self._deadlines: list[tuple[float, int, str]] = []  # (interest timeout, ticket, client id)
        self._blocked: dict[str, dict[str, None]] = {}  # identity -> identities it must never meet (ordered)
        self._users: dict[str, dict[str, None]] = {}  # user identity -> its connected clients (in order)
        self._tickets = 0
        self._entries = 0  # heap entries, live or stale
        self._stale = 0  # heap entries known to be stale
        #: Set whenever a client leaves the queue (positions behind it moved); the caller clears it.
        self.queue_changed = False
        #: How many waiting clients have interests.
        self.queued_with_interests = 0
        #: Heap rebuilds and block lists forgotten so far (for tests and curious operators).
        self.compactions = 0
        self.evictions = 0

    # -- queries ----------------------------------------------------------------------------------

    @property
    def queue_size(self) -> int:
        return len(self._queue)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def __contains__(self, client_id: str) -> bool:
        return client_id in self._members

    def state(self, client_id: str) -> str:
        """``"idle"``, ``"queued"`` or ``"matched"``."""
        m = self._member(client_id)
        return "matched" if m.session else "queued" if m.seq is not None else "idle"

    def session_of(self, client_id: str) -> Session | None:
        return self._member(client_id).session

    def interests_of(self, client_id: str) -> frozenset[str]:
        return self._member(client_id).interests

    def sessions(self) -> Iterator[Session]:
        return iter(self._sessions.values())

    def positions(self) -> Iterator[tuple[str, int]]:
        """Every waiting client with its position, 1 (next in line) to n, in queue order."""
        for position, cid in enumerate(self._queue, 1):
            yield cid, position

    def position_of(self, client_id: str) -> int:
        """A waiting client's position (O(n): for the rare moves that need it, not per message)."""
        for position, cid in enumerate(self._queue, 1):
            if cid == client_id:
                return position
        raise KeyError(f"client {client_id!r} is not waiting")

    def waiting(self) -> Iterator[tuple[str, int, float, frozenset[str], bool]]:
        """(client id, ticket, wait start, interests, held) of every waiting client, in queue order."""
        for m in self._queue.values():
            assert m.seq is not None
            yield m.id, m.seq, m.since, m.interests, m.held

    # -- moves ------------------------------------------------------------------------------------

    def connect(self, client_id: str, identity: str | None = None) -> None:
        """Register a new client; it starts idle. ``identity`` (default: the client id) is what a
        report blocks: give the user id when clients are authenticated."""
        if client_id in self._members:
            raise ValueError(f"client {client_id!r} is already connected")
        self._members[client_id] = _Member(client_id, identity or client_id)
        if identity and identity != client_id:
            self._users.setdefault(identity, {})[client_id] = None

    def join(self, client_id: str, interests: Iterable[str] = ()) -> list[Decision]:
        """Queue the client (or, if it waits already, replace its interests, keeping its place)."""
        m = self._member(client_id)
        if m.session is not None:
            raise IllegalMove("already_matched", "already in a session: send next or leave first")
        wanted = frozenset(interests)
        if m.seq is None:
            m.interests = wanted
            return [self._enter(m, self._clock())]
        return [self._update(m, wanted)]

    def next(self, client_id: str) -> list[Decision]:
        """End the client's session (if any) and queue it again with its last interests."""
        m = self._member(client_id)
        out: list[Decision] = []
        if m.session is not None:
            out.append(self._end(m.session, "next", client_id))
        out.extend(self.join(client_id, m.interests))
        return out

    def leave(self, client_id: str, reason: str = "left") -> list[Decision]:
        """Leave the queue or end the session; the client becomes idle."""
        m = self._member(client_id)
        if m.session is not None:
            return [self._end(m.session, reason, client_id)]
        if m.seq is not None:
            self._dequeue(m)
        return []

    def disconnect(self, client_id: str, reason: str = "disconnected") -> list[Decision]:
        """Forget the client, ending its session (``reason``: ``disconnected``, or ``overflow`` when
        a held client's messages did not fit)."""
        m = self._member(client_id)
        out = self.leave(client_id, reason)
        del self._members[client_id]
        if m.identity == client_id:  # a client's own blocks end with it; a user's stay
            self._blocked.pop(client_id, None)
        else:
            clients = self._users[m.identity]
            del clients[client_id]
            if not clients:
                del self._users[m.identity]
        return out

    def report(self, client_id: str) -> list[Decision]:
        """End the client's session (reason ``reported``) and never pair these two again."""
        m = self._member(client_id)
        if m.session is None:
            raise IllegalMove("not_matched", "no session to report")
        other = self._members[m.session.peer_of(client_id)]
        forgotten: list[str] = []  # identities some of whose blocks the bounds made the relay forget
        for a, b in ((m.identity, other.identity), (other.identity, m.identity)):
            blocked = self._blocked.pop(a, {})  # re-inserted: the most recent identities are kept
            blocked[b] = None
            if len(blocked) > self._max_blocks:
                oldest = next(iter(blocked))
                del blocked[oldest]
                forgotten += (a, oldest)
            self._blocked[a] = blocked
            if len(self._blocked) > self._max_blocking_identities:
                oldest = next(iter(self._blocked))
                forgotten += (oldest, *self._blocked.pop(oldest))
                self.evictions += 1
        return [self._end(m.session, "reported", client_id), *self._rematch(forgotten)]

    def _rematch(self, identities: list[str]) -> list[Decision]:
        """Blocks were forgotten: clients of these identities that wait may now accept each other
        (the matching must stay maximal): look for a partner for each, in this order."""
        out: list[Decision] = []
        now = self._clock()
        for identity in identities:
            users = self._users.get(identity)
            for cid in list(users) if users is not None else [identity]:
                m = self._members.get(cid)
                if m is not None and m.seq is not None and not m.held and m.identity == identity:
                    partner = self._find(m, now)
                    if partner is not None:
                        out.append(self._pair(partner, m, now))
        return out

    def hold(self, client_id: str) -> None:
        """The client is away: if it waits, it keeps its place but is not matched until released."""
        m = self._member(client_id)
        if m.seq is not None and not m.held:
            m.held = True
            self._stale += len(m.interests) + 1  # its entries are skipped from now on

    def release(self, client_id: str) -> list[Decision]:
        """The client is back: if it was held in the queue, it may be paired again (same place)."""
        m = self._member(client_id)
        if not m.held:
            return []
        m.held = False
        now = self._clock()
        m.open = self._is_open(m, now)
        self._index(m)
        partner = self._find(m, now)
        return [self._pair(partner, m, now)] if partner is not None else []

    def blocked(self, client_id: str, other_id: str) -> bool:
        """Whether either of the two reported the other (or the users behind them did)."""
        a, b = self._member(client_id).identity, self._member(other_id).identity
        return b in self._blocked.get(a, ()) or a in self._blocked.get(b, ())

    def tick(self) -> list[Decision]:
        """Let time pass: clients whose interest timeout ran out now accept anyone."""
        now = self._clock()
        out: list[Decision] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, seq, cid = heapq.heappop(deadlines)
            self._entries -= 1
            m = self._members.get(cid)
            if m is None or m.seq != seq or m.open or m.held:  # a held client is re-indexed on release
                continue
            m.open = True
            self._push(self._open, m)
            partner = self._find(m, now)
            if partner is not None:
                out.append(self._pair(partner, m, now))
        return out

    # -- internals --------------------------------------------------------------------------------

    def _member(self, client_id: str) -> _Member:
        try:
            return self._members[client_id]
        except KeyError:
            raise KeyError(f"unknown client {client_id!r}") from None

    def _is_open(self, m: _Member, now: float) -> bool:
        return not m.interests or now - m.since >= self.interest_timeout

    def _blocks(self, m: _Member, o: _Member) -> bool:
        blocked = self._blocked
        return bool(blocked) and (
            o.identity in blocked.get(m.identity, ()) or m.identity in blocked.get(o.identity, ())
        )

    def _cooling(self, m: _Member, other_id: str, now: float) -> bool:
        ended = m.recent.get(other_id) if m.recent else None
        return ended is not None and now - ended < self.rematch_cooldown

    def _push(self, heap: list[_Entry], m: _Member) -> None:
        assert m.seq is not None
        heapq.heappush(heap, (m.seq, m.id))
        self._entries += 1

    def _enter(self, m: _Member, now: float) -> Decision:
        """Pair a client that is not waiting, or queue it."""
        m.since = now
        m.open = self._is_open(m, now)
        partner = self._find(m, now)
        if partner is not None:
            return self._pair(partner, m, now)
        m.seq = self._tickets
        self._tickets += 1
        self._queue[m.id] = m
        self.queued_with_interests += bool(m.interests)
        self._index(m)
        return Queued(m.id, len(self._queue), len(self._queue))

    def _index(self, m: _Member) -> None:
        """Put a waiting client in its heaps: one per interest, and the open heap or the deadlines."""
        for interest in m.interests:
            self._push(self._by_interest.setdefault(interest, []), m)
        if m.open:
            self._push(self._open, m)
        else:
            assert m.seq is not None
            heapq.heappush(self._deadlines, (m.since + self.interest_timeout, m.seq, m.id))
            self._entries += 1

    def _update(self, m: _Member, wanted: frozenset[str]) -> Decision:
        """New interests for a waiting client: same ticket, same wait, maybe a partner now."""
        if m.held:
            raise IllegalMove("bad_message", "a held client cannot change its interests")
        now = self._clock()
        old, was_open = m.interests, m.open
        m.interests = wanted
        self.queued_with_interests += bool(wanted) - bool(old)
        m.open = self._is_open(m, now)
        for interest in wanted - old:
            self._push(self._by_interest.setdefault(interest, []), m)
        self._stale += len(old - wanted)
        if m.open and not was_open:
            self._stale += 1  # its deadline entry
            self._push(self._open, m)
        elif was_open and not m.open:
            self._stale += 1
            assert m.seq is not None
            heapq.heappush(self._deadlines, (m.since + self.interest_timeout, m.seq, m.id))
            self._entries += 1
        self._maybe_compact()
        partner = self._find(m, now)
        if partner is not None:
            return self._pair(partner, m, now)
        return Queued(m.id, self.position_of(m.id), len(self._queue))

    def _find(self, m: _Member, now: float) -> _Member | None:
        """The longest-waiting client compatible with ``m``, preferring ones not in cooldown."""
        fresh: list[tuple[int, _Member]] = []
        cool: list[tuple[int, _Member]] = []
        for interest in m.interests:
            heap = self._by_interest.get(interest)
            if heap:
                self._scan(heap, m, now, interest, fresh, cool)
                if not heap:
                    del self._by_interest[interest]
        if m.open and self._open:
            self._scan(self._open, m, now, None, fresh, cool)
        best = min(fresh or cool, default=None)
        return best[1] if best is not None else None

    def _scan(
        self,
        heap: list[_Entry],
        m: _Member,
        now: float,
        interest: str | None,
        fresh: list[tuple[int, _Member]],
        cool: list[tuple[int, _Member]],
    ) -> None:
        """Add the top of ``heap`` for ``m`` to ``fresh`` (not cooling) and ``cool`` (cooling).

        An ``interest`` heap holds clients sharing it (they accept ``m`` and ``m`` accepts them);
        the open heap (``interest`` None) holds clients accepting anyone. Stale entries are dropped;
        ``m`` itself, clients it blocked or that blocked it, and cooling partners are set aside and
        pushed back: at most ``MAX_RECENT_PEERS + MAX_BLOCKS + 1`` of them.
        """
        members = self._members
        aside: list[_Entry] = []
        found_cool = False
        while heap:
            seq, cid = heap[0]
            o = members.get(cid)
            if o is None or o.seq != seq or o.held or (not o.open if interest is None else interest not in o.interests):
                heapq.heappop(heap)
                self._entries -= 1
                if self._stale:
                    self._stale -= 1
                continue
            if o is m or self._blocks(m, o):
                aside.append(heapq.heappop(heap))
                continue
            if self._cooling(m, cid, now):
                if not found_cool:
                    found_cool = True
                    cool.append((seq, o))
                aside.append(heapq.heappop(heap))
                continue
            fresh.append((seq, o))
            break
        for entry in aside:
            heapq.heappush(heap, entry)

    def _dequeue(self, m: _Member) -> None:
        del self._queue[m.id]
        self.queued_with_interests -= bool(m.interests)
        if not m.held:
            self._stale += len(m.interests) + 1  # its interest entries, and its open or deadline entry
        m.seq = None
        m.open = m.held = False
        self.queue_changed = True
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        if self._stale > self._compact_after and 2 * self._stale > self._entries:
            self._compact()

    def _compact(self) -> None:
        """Rebuild the heaps without stale entries (amortised over the removals that made them)."""
        by_interest: dict[str, list[_Entry]] = {}
        opened: list[_Entry] = []
        deadlines: list[tuple[float, int, str]] = []
        for m in self._queue.values():
            assert m.seq is not None
            if m.held:
                continue
            entry = (m.seq, m.id)
            for interest in m.interests:
                by_interest.setdefault(interest, []).append(entry)
            if m.open:
                opened.append(entry)
            else:
                deadlines.append((m.since + self.interest_timeout, m.seq, m.id))
        for heap in by_interest.values():
            heapq.heapify(heap)
        heapq.heapify(opened)
        heapq.heapify(deadlines)
        self._by_interest, self._open, self._deadlines = by_interest, opened, deadlines
        self._entries = sum(map(len, by_interest.values())) + len(opened) + len(deadlines)
        self._stale = 0
        self.compactions += 1

    def _pair(self, a: _Member, b: _Member, now: float) -> Paired:
        """Pair two clients; the one with the older ticket (``a`` if ``b`` never queued) initiates."""
        if b.seq is not None and (a.seq is None or b.seq < a.seq):
            a, b = b, a
        for m in (a, b):
            if m.seq is not None:
                self._dequeue(m)
        sid = f"{self._rng.getrandbits(64):016x}"
        while sid in self._sessions:
            sid = f"{self._rng.getrandbits(64):016x}"
        shared = tuple(sorted(a.interests & b.interests))
        session = Session(sid, a.id, b.id, shared, now, (now - a.since, now - b.since))
        self._sessions[sid] = a.session = b.session = session
        return Paired(session)

    def _end(self, session: Session, reason: str, by: str) -> Ended:
        del self._sessions[session.id]
        now = self._clock()
        a, b = self._members[session.initiator], self._members[session.answerer]
        a.session = b.session = None
        for m, other in ((a, b.id), (b, a.id)):
            recent = m.recent = m.recent or {}
            recent.pop(other, None)
            recent[other] = now
            if len(recent) > MAX_RECENT_PEERS:
                del recent[next(iter(recent))]
        return Ended(session, reason, by)


########################################################################################################
# The sans-I/O core: a client's lifecycle, and what it missed (resume)
########################################################################################################

NEW: Final = "new"  # connected, welcomed, nothing read yet: its first message may resume another client
ACTIVE: Final = "active"  # talking
AWAY: Final = "away"  # its connection vanished: it keeps its place or session for --resume-grace
CLOSING: Final = "closing"  # the relay decided to close it (a code and reason): nothing more is sent
GONE: Final = "gone"  # detached: its session ended and plugins were told; the end
PHASES: Final = {  # a client's phase -> the phases it may move to (Client.move raises on any other)
    NEW: frozenset({ACTIVE, AWAY, CLOSING, GONE}),
    ACTIVE: frozenset({AWAY, CLOSING, GONE}),
    CLOSING: frozenset({AWAY, GONE}),  # a client closed for not answering pings may still come back
    AWAY: frozenset({GONE}),  # a resume takes it over: the new connection's client goes on in its stead
    GONE: frozenset(),
}


def next_phase(phase: str, to: str) -> str:
    """``to``, if a client in ``phase`` may move there (``PHASES``); else IllegalTransition."""
    if to not in PHASES[phase]:
        raise IllegalTransition(f"{phase} -> {to}")
    return to


class Mailbox:
    """What a client was sent, kept so that a new connection can take up where a lost one left off.

    Every signal relayed to the client takes the next number (``number``) and is kept in a ring of
    the latest (``keep``), at most ``max_messages`` of at most ``max_bytes`` together; while the
    client is away (``go_away``), the other messages sent to it wait too (``hold``), within the
    same bounds. ``resume(last)`` hands over what it missed after signal number ``last``, in order:
    those signals, then what was held. The bounds are where a resume must give up rather than leave
    a silent gap: ``keep`` and ``hold`` answer False when something the away client has not received
    would be lost, ``resume`` answers False when some of what it missed is gone; the relay then ends
    the session (``overflow``). Pure: tests/test_mailbox.py drives it with a state machine.
    """

    __slots__ = ("count", "held", "held_bytes", "max_bytes", "max_messages", "ring", "ring_bytes")

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.count = 0  # signals numbered so far: the last one's "n"
        self.ring: list[tuple[int, bytes]] = []  # (n, the signal as sent), oldest first (a list: smaller than a deque)
        self.ring_bytes = 0
        self.held: list[bytes] | None = None  # while away: the other messages sent to it; else None
        self.held_bytes = 0

    @property
    def away(self) -> bool:
        return self.held is not None

    def number(self) -> int:
        """The next signal's number."""
        self.count += 1
        return self.count

    def keep(self, n: int, signal: bytes) -> bool:
        """Keep signal ``n`` for a resume; False if, away, the ring lost one the client never got."""
        ring = self.ring
        ring.append((n, signal))
        self.ring_bytes += len(signal)
        if self.ring_bytes <= self.max_bytes and len(ring) <= self.max_messages:
            return True
        drop = 0
        while drop < len(ring) and (self.ring_bytes > self.max_bytes or len(ring) - drop > self.max_messages):
            self.ring_bytes -= len(ring[drop][1])
            drop += 1
        del ring[:drop]
        return self.held is None  # connected, the dropped ones were delivered (or resume will say)

    def go_away(self) -> None:
        """The connection vanished: from now on, messages are held for a resume."""
        self.held, self.held_bytes = [], 0

    def hold(self, message: bytes) -> bool:
        """Keep a message (not a signal) for the away client; False if it does not fit."""
        assert self.held is not None, "hold() is for an away client"
        if len(self.held) >= self.max_messages or self.held_bytes + len(message) > self.max_bytes:
            return False
        self.held.append(message)
        self.held_bytes += len(message)
        return True

    def replace_held(self, message: bytes) -> None:
        """Drop what was held and keep just this (the session ended: only its end matters)."""
        self.held, self.held_bytes = [message], len(message)

    def resume(self, last: int) -> tuple[list[bytes], bool]:
        """The client is back, having received signals up to number ``last``: what it missed, in
        order (those signals, then what was held), and True; or, if some of those signals fell out
        of the ring, only what was held, and False (never some of the signals: that would be a
        silent gap). It is connected again."""
        missed = [signal for n, signal in self.ring if n > last]
        held, self.held, self.held_bytes = self.held or [], None, 0
        if self.count - last > len(missed):
            return held, False
        return missed + held, True


########################################################################################################
# The protocol, version 1 (docs/protocol.md has every message with examples)
########################################################################################################
#
# JSON text frames on GET /ws. The server speaks first: {"type":"welcome", ...}. Then the client sends
#   {"type":"join","interests":[...]}  queue up (interests optional); while queued: replace interests
#   {"type":"next"}                    end the session (peer gets peer_left "next"), queue up again
#   {"type":"leave"}                   leave the queue or end the session (peer gets peer_left "left")
#   {"type":"signal","data":{...}}     to the current peer, who gets {"type":"signal","data":...}
#   {"type":"ping"}                    answered {"type":"pong"}
#   {"type":"report","reason":"..."}   end the session and never meet this peer again
#   {"type":"resume","token":"...","last":N}  as the first message after a reconnect: take back the
#                                      place or session the lost connection had (within --resume-grace),
#                                      and every signal numbered above N (signals carry "n": 1, 2, ...)
# and the server sends welcome, queued, matched, signal, peer_left, left, pong, error, draining,
# reported, resumed, peer_reconnecting and peer_resumed.
# Unknown fields are ignored. Every refusal is an error message; the connection stays usable.

CLIENT_TYPES: Final = frozenset({"join", "next", "leave", "signal", "ping", "report", "resume"})
ERROR_CODES: Final = (
    "bad_json", "bad_message", "unknown_type", "not_matched", "already_matched", "rate_limited", "resume_failed",
)  # fmt: skip
CLOSE_NORMAL: Final = 1000  # an orderly end (the client closed, or nothing more to say)
CLOSE_HEARTBEAT: Final = 1001  # "going away": no pong within --heartbeat-timeout
CLOSE_POLICY: Final = 1008  # "policy violation": closed by an operator (kick)
CLOSE_PROTOCOL_ERROR: Final = 1002  # a malformed WebSocket frame (FrameParser)
CLOSE_BAD_DATA: Final = 1007  # a text frame that is not UTF-8 (FrameParser)
CLOSE_TOO_BIG: Final = 1009  # a message over --max-message-bytes, or in too many fragments (FrameParser)
CLOSE_INTERNAL: Final = 1011  # a bug in the relay while serving this client (logged)
CLOSE_RESTART: Final = 1012  # the relay is shutting down, after a "draining" message: reconnect
CLOSE_TOO_SLOW: Final = 1013  # "try again later": the client did not read its messages fast enough
CLOSE_RESUMED: Final = 4000  # the client resumed on another connection (this one may have been half dead)
_FAIL_CODES: Final = frozenset((CLOSE_PROTOCOL_ERROR, CLOSE_BAD_DATA, CLOSE_TOO_BIG, CLOSE_TOO_SLOW))  # not waited for

_loads = orjson.loads  # strict JSON: no NaN or Infinity, no lone surrogates, numbers that fit a double, depth 1024
_dumps = orjson.dumps  # compact UTF-8 JSON: what the relay sends is built by this, or spliced from parsed input


def parse_message(text: bytes) -> dict[str, Any]:
    """Decode one client text message (UTF-8 JSON) and check what the relay reads of it; raise
    ``ProtocolError``. A ``join``'s ``interests`` are replaced by their parsed form (``parse_interests``).
    """
    try:
        msg = _loads(text)
    except ValueError:  # also NaN, Infinity, lone surrogates ("\ud800"), 1e999, nesting over 1024
        raise ProtocolError("bad_json", "message is not valid JSON") from None
    if type(msg) is not dict or type(kind := msg.get("type")) is not str:
        raise ProtocolError("bad_message", "a message must be a JSON object with a string 'type'")
    if kind == "signal":
        if type(msg.get("data")) is not dict:
            raise ProtocolError("bad_message", "signal needs 'data', a JSON object")
    elif kind == "join":
        msg["interests"] = parse_interests(msg.get("interests"))
    elif kind == "resume":
        token = msg.get("token")
        if type(token) is not str or not 0 < len(token) <= MAX_TOKEN_CHARS:
            raise ProtocolError("bad_message", "resume needs 'token', the resume_token of welcome or resumed")
        last = msg.setdefault("last", 0)
        if type(last) is not int or last < 0:
            raise ProtocolError("bad_message", "resume's 'last' is the number of the last signal received")
    elif kind == "report":
        reason = msg.get("reason", "")
        if type(reason) is not str or len(reason) > MAX_REPORT_REASON or not reason.isprintable():
            raise ProtocolError("bad_message", f"a report's reason is text of at most {MAX_REPORT_REASON} characters")
        msg["reason"] = reason
    elif kind not in CLIENT_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {kind[:40]!r}")
    return msg


def parse_interests(value: object) -> frozenset[str]:
    """A ``join``'s interests: at most 10 strings of 1-32 printable characters, trimmed and
    case-folded, duplicates dropped. Missing means none. Raises ``ProtocolError("bad_message")``."""
    if value is None:
        return frozenset()
    if type(value) is not list or len(value) > MAX_INTERESTS:
        raise ProtocolError("bad_message", f"interests must be a list of at most {MAX_INTERESTS} strings")
    out = set()
    for item in value:
        if type(item) is not str:
            raise ProtocolError("bad_message", "each interest must be a string")
        interest = item.strip().casefold()
        if not 0 < len(interest) <= MAX_INTEREST_CHARS or not interest.isprintable():
            raise ProtocolError("bad_message", f"each interest must be 1-{MAX_INTEREST_CHARS} printable characters")
        out.add(interest)
    return frozenset(out)


def _msg_welcome(client_id: str, resume_token: str) -> bytes:
    return _dumps(
        {"type": "welcome", "protocol": PROTOCOL_VERSION, "client_id": client_id, "resume_token": resume_token}
    )


def _msg_queued(position: int, queue_size: int) -> bytes:
    return _dumps({"type": "queued", "position": position, "queue_size": queue_size})


def _msg_matched(session: Session, client_id: str, ice_servers: list[dict[str, Any]]) -> bytes:
    return _dumps(
        {
            "type": "matched",
            "session_id": session.id,
            "peer_id": session.peer_of(client_id),
            "initiator": client_id == session.initiator,
            "interests": list(session.interests),
            "ice_servers": ice_servers,
        }
    )


def _msg_signal(data: dict[str, Any], n: int) -> bytes:
    return _dumps({"type": "signal", "data": data, "n": n})


def relayed_signal(text: bytes, msg: dict[str, Any], mailbox: Mailbox) -> bytes:
    """A ``signal`` as its recipient gets it: numbered for the recipient (``mailbox.number()``).
    When the sender's text holds nothing but type and data, the number is spliced into it: the
    relay path never encodes JSON (nor decodes text)."""
    n = mailbox.number()
    if len(msg) == 2 and text[0] == 0x7B:  # 0x7B: "{"
        return b'{"n":%d,%b' % (n, text[1:])
    return _msg_signal(msg["data"], n)


def secret_digest(secret: str) -> str:
    """What a cluster writes down of a resume token's secret (SHA-256, hex): enough to check a
    token with, not to make one."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _msg_peer_left(session_id: str, reason: str) -> bytes:
    return _dumps({"type": "peer_left", "session_id": session_id, "reason": reason})


def _msg_error(code: str, message: str) -> bytes:
    return _dumps({"type": "error", "code": code, "message": message})


def _msg_resumed(client_id: str, token: str, state: str, **details: Any) -> bytes:
    return _dumps({"type": "resumed", "client_id": client_id, "resume_token": token, "state": state, **details})


def _msg_peer(kind: str, session_id: str) -> bytes:
    """peer_reconnecting or peer_resumed."""
    return _dumps({"type": kind, "session_id": session_id})


def _msg_draining(seconds: float | None) -> bytes:
    return _dumps({"type": "draining", "deadline_s": seconds})


_PONG: Final = _dumps({"type": "pong"})
_LEFT: Final = _dumps({"type": "left"})
_REPORTED: Final = _dumps({"type": "reported"})


########################################################################################################
# WebSocket frames (RFC 6455, the server's side), sans I/O: held against wsproto by tests/test_frames.py
########################################################################################################

OP_CONTINUATION: Final = 0x0  # frame opcodes
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
_OPCODES: Final = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))
_REMOTE_CLOSE_CODES: Final = frozenset((1000, 1001, 1002, 1003, *range(1007, 1014), *range(3000, 5000)))
_ACCEPT_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's suffix for Sec-WebSocket-Accept


class FrameParser:
    """The reading half of a WebSocket server: bytes from a client in, whole messages out.

    ``feed(data)`` returns the events that ``data`` completes, in order, as ``(opcode, payload)``:
    ``OP_TEXT`` (a whole message, valid UTF-8, as bytes), ``OP_BINARY``, ``OP_PING``, ``OP_PONG`` and
    ``OP_CLOSE`` (its payload: a valid code and UTF-8 reason, or empty), after which nothing more is
    read. A client that breaks the protocol raises ``WebSocketError`` (carrying the events before
    the violation; feed no more after it): 1002 for a malformed frame
    (reserved bits or opcodes, unmasked, a fragmented or long control frame, a stray or missing
    continuation, a length not in its shortest form, a bad close code), 1007 for text that is not
    UTF-8, 1009 for a message over ``max_size`` bytes or in more than ``MAX_FRAGMENTS`` frames. What
    an incomplete frame has sent so far waits here; a frame's length is checked from its header, so
    nothing larger than ``max_size`` plus a header is ever held.
    """

    __slots__ = ("_buffer", "_decoder", "_fragments", "_opcode", "_parts", "_size", "closed", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.closed = False  # a close frame came: nothing after it is read
        self._buffer = b""  # the start of a frame not complete yet
        self._opcode = 0  # the opcode of a fragmented message under way, else 0
        self._parts: list[bytes] = []  # its fragments so far
        self._size = 0  # and their bytes
        self._fragments = 0
        self._decoder: Any = None  # an incremental UTF-8 decoder for fragmented text

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        events: list[tuple[int, bytes]] = []
        try:
            self._parse(self._buffer + data if self._buffer else data, events)
        except WebSocketError as exc:
            exc.events = events
            raise
        return events

    def _parse(self, buffer: bytes, events: list[tuple[int, bytes]]) -> None:
        pos, end = 0, len(buffer)
        while end - pos >= 2 and not self.closed:
            b0, b1 = buffer[pos], buffer[pos + 1]
            opcode, length, start = b0 & 0x0F, b1 & 0x7F, pos + 2
            # The header's checks, in wsproto's order (so that the two agree on the close code)
            if opcode not in _OPCODES:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"invalid opcode {opcode:#x}")
            control = opcode >= OP_CLOSE
            if control and not b0 & 0x80:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
            if control and length > 125:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "control frame over 125 bytes")
            if length == 126:
                if end - start < 2:
                    break
                length, start = int.from_bytes(buffer[start : start + 2], "big"), start + 2
                if length < 126:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "payload length not in its shortest form")
            elif length == 127:
                if end - start < 8:
                    break
                length, start = int.from_bytes(buffer[start : start + 8], "big"), start + 8
                if length < 65536 or length >> 63:
                    raise WebSocketError(CLOSE_PROTOCOL_ERROR, "payload length not in its shortest form")
            if b0 & 0x70:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "reserved bit set (no extension was agreed)")
            if not b1 & 0x80:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "unmasked frame from a client")
            if not control and self._size + length > self.max_size:
                raise WebSocketError(CLOSE_TOO_BIG, f"message over {self.max_size} bytes")
            if end - start < 4 + length:
                break
            payload = _apply_mask(buffer[start + 4 : start + 4 + length], buffer[start : start + 4])
            pos = start + 4 + length
            if control:
                if opcode == OP_CLOSE:
                    _check_close(payload)
                    self.closed = True
                events.append((opcode, payload))
            else:
                message = self._message(opcode, b0 & 0x80, payload)
                if message is not None:
                    events.append(message)
        self._buffer = buffer[pos:] if pos < end and not self.closed else b""

    def _message(self, opcode: int, fin: int, payload: bytes) -> tuple[int, bytes] | None:
        """A data frame: a whole message, or a fragment kept until the last one comes."""
        if opcode == OP_CONTINUATION:
            if not self._opcode:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "continuation frame without a message")
        elif self._opcode:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "a new message before the last one ended")
        elif fin:  # the usual case: a message in one frame
            if opcode == OP_TEXT:
                _check_utf8(payload)
            return opcode, payload
        else:
            self._opcode = opcode
            self._decoder = codecs.getincrementaldecoder("utf-8")() if opcode == OP_TEXT else None
        self._fragments += 1
        if self._fragments > MAX_FRAGMENTS:
            raise WebSocketError(CLOSE_TOO_BIG, f"message in over {MAX_FRAGMENTS} frames")
        if self._decoder is not None:
            try:
                self._decoder.decode(payload, bool(fin))
            except UnicodeDecodeError:
                raise WebSocketError(CLOSE_BAD_DATA, "text that is not UTF-8") from None
        self._parts.append(payload)
        self._size += len(payload)
        if not fin:
            return None
        message = (self._opcode, b"".join(self._parts))
        self._opcode, self._parts, self._size, self._fragments, self._decoder = 0, [], 0, 0, None
        return message


def _check_utf8(payload: bytes) -> None:
    try:
        payload.decode()
    except UnicodeDecodeError:
        raise WebSocketError(CLOSE_BAD_DATA, "text that is not UTF-8") from None


def _check_close(payload: bytes) -> None:
    """A close frame's payload: empty, or a code a peer may send and a UTF-8 reason."""
    if not payload:
        return
    if len(payload) == 1 or int.from_bytes(payload[:2], "big") not in _REMOTE_CLOSE_CODES:
        raise WebSocketError(CLOSE_PROTOCOL_ERROR, "close frame with an invalid code")
    try:
        payload[2:].decode()
    except UnicodeDecodeError:
        raise WebSocketError(CLOSE_BAD_DATA, "close reason that is not UTF-8") from None


def close_code(payload: bytes) -> int:
    """The code of a (checked) close frame's payload: 1005 when it has none."""
    return int.from_bytes(payload[:2], "big") if payload else 1005


def _frame_header(opcode: int, size: int) -> bytes:
    """The header of an unmasked, final server frame carrying ``size`` payload bytes."""
    if size < 126:
        return bytes((0x80 | opcode, size))
    if size < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, size)
    return struct.pack("!BBQ", 0x80 | opcode, 127, size)


_TEXT_HEADERS: Final = [bytes((0x80 | OP_TEXT, n)) for n in range(126)]  # headers of short text frames, made once


def _close_payload(code: int, reason: str) -> bytes:
    """A close frame's payload: the code and as much of the reason as fits (whole characters)."""
    return struct.pack("!H", code) + reason.encode()[:123].decode("utf-8", "ignore").encode()


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value answering a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _ACCEPT_GUID).digest()).decode("ascii")


def handshake_refusal(method: str, headers: dict[str, str]) -> tuple[int, str, tuple[tuple[str, str], ...]] | None:
    """Why an upgrade request to ``/ws`` is not a WebSocket handshake the relay accepts (RFC 6455
    4.2.1), as (HTTP status, reason, headers), or None."""
    if method != "GET":
        return 405, "a WebSocket handshake is a GET", (("Allow", "GET"),)
    if "upgrade" not in [token.strip().lower() for token in headers.get("connection", "").split(",")]:
        return 400, "a WebSocket handshake needs 'Connection: Upgrade'", ()
    if headers.get("sec-websocket-version", "").strip() != "13":
        return 426, "this relay speaks WebSocket version 13", (("Sec-WebSocket-Version", "13"),)
    try:
        key = base64.b64decode(headers.get("sec-websocket-key", "").strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) != 16:
        return 400, "a WebSocket handshake needs a Sec-WebSocket-Key of 16 bytes in base64", ()
    return None


def _switching_protocols(key: str, subprotocol: str | None) -> bytes:
    """The handshake's answer: 101, the accept key, the subprotocol chosen (no extensions: no compression)."""
    protocol = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else ""
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key.strip())}\r\n{protocol}\r\n"
    ).encode("latin-1")


########################################################################################################
# Plugin hooks
########################################################################################################

hookspec = pluggy.HookspecMarker("relay")
hookimpl = pluggy.HookimplMarker("relay")


class HookSpecs:
    """The hooks a plugin may implement. Every hook is called with keyword arguments only and is
    synchronous: it must return quickly and never block (do I/O in a task started from
    ``relay_startup``, fed through a bounded ``trio.open_memory_channel``). A hook that raises is
    logged and skipped; it never takes the relay down (only ``relay_addoption`` and
    ``relay_configure`` run before the relay is up, and their errors stop it from starting). No hook
    is called per relayed signal. ``docs/plugins.md`` documents each one (a test checks it does)."""

    @hookspec
    def relay_addoption(self, parser: argparse.ArgumentParser, subparsers: Any) -> None:
        """Called once by ``main()``, before the command line is parsed.

        Add the plugin's flags to ``parser`` (in a group: ``parser.add_argument_group("name")``).
        For a command of its own (``relay NAME``), add a parser to ``subparsers`` (argparse's
        ``add_subparsers()`` object) and ``set_defaults(command=func)``: ``func(args)`` then runs
        instead of the server and returns the exit code. Return nothing.
        """

    @hookspec
    def relay_configure(self, relay: Relay) -> None:
        """Called once when ``serve()`` starts, before it listens.

        Read the plugin's flags from ``relay.options`` (the parsed command line; an empty
        ``argparse.Namespace`` when the relay was built without one) and register the objects that
        do the work with ``relay.pm.register(...)``. Raise ``PluginError`` to refuse to start.
        Return nothing.
        """

    @hookspec
    def relay_startup(self, relay: Relay, nursery: trio.Nursery) -> None:
        """Called once, when the relay is listening and before it accepts a client.

        ``nursery`` is the server's root nursery: start long-running tasks in it (they are
        cancelled at shutdown). ``relay`` gives ``settings`` and ``statistics()``. Return nothing.
        """

    @hookspec(firstresult=True)
    def relay_authenticate(self, request: HttpRequest) -> Auth | None:
        """Called for each WebSocket upgrade request to ``/ws``, before the WebSocket exists (after
        the origin and per-address checks).

        Return ``Auth(user_id=...)`` to accept it as that user (``subprotocol=`` to select the
        ``Sec-WebSocket-Protocol`` value the token came in), ``Auth(refuse=401, reason=...)`` to
        refuse it with that HTTP status, or ``None`` to leave it to others. With no answer the client
        is accepted without a user: the relay is open unless an auth plugin is installed.
        """

    @hookspec
    def relay_client_connected(self, client_id: str, remote: str, user_id: str | None) -> None:
        """Called when a WebSocket client has completed the handshake, before its ``welcome``.

        ``remote`` is the client's address (``host:port``; behind a ``--trusted-proxy``, the
        client IP it named); ``user_id`` what ``relay_authenticate`` said, else ``None``. A
        connection that then resumes an earlier client is reported disconnected at once (its own
        id was never used). Return nothing.
        """

    @hookspec
    def relay_client_disconnected(self, client_id: str, code: int | None, duration: float) -> None:
        """Called once when a client's connection ends, after its session (if any) has ended.

        ``code`` is the WebSocket close code (``None`` if the TCP connection just dropped);
        ``duration`` the seconds it was connected. Return nothing.
        """

    @hookspec
    def relay_matched(self, session: Session, users: dict[str, str | None]) -> None:
        """Called when two clients are paired, after both were sent ``matched``.

        ``session`` carries the id, both client ids, shared interests, the start time (trio clock)
        and how long each side waited; ``users`` maps each client id to its user id (``None``
        without auth). Return nothing.
        """

    @hookspec
    def relay_session_ended(
        self, session: Session, reason: str, ended_by: str, duration: float, users: dict[str, str | None]
    ) -> None:
        """Called once when a session ends, after the peer was sent ``peer_left``.

        ``reason`` is ``"next"``, ``"left"``, ``"disconnected"``, ``"reported"`` or ``"overflow"``
        (a vanished client's messages did not fit); ``ended_by`` the client id that ended it;
        ``duration`` its length in seconds; ``users`` as in ``relay_matched``. Return nothing.
        """

    @hookspec
    def relay_report(
        self, session: Session, reporter: str, reported: str, reason: str, users: dict[str, str | None]
    ) -> None:
        """Called when a client reports its peer, after the session ended and the two were blocked
        from meeting again (per user when authenticated).

        ``reporter`` and ``reported`` are client ids, ``reason`` the reporter's text (may be
        empty), ``users`` as in ``relay_matched``. Return nothing; act (ban, review) in a task.
        """

    @hookspec(firstresult=True)
    def relay_http_request(self, request: HttpRequest) -> HttpResponse | HttpStream | None:
        """Called for each plain HTTP request on the relay's port other than ``/ws`` and
        ``/healthz``, before the static files are looked at.

        ``request`` has the method, the path (not decoded), the query string, the headers (names in
        lower case), the body (at most 64 KiB) and the remote address. Return an ``HttpResponse`` to
        answer it, an ``HttpStream`` to make the connection a client of the relay that is not a
        WebSocket (admitted and authenticated as an upgrade is; ``relay_plugins.fallback``), or
        ``None`` to let others (then the static files, then 404) answer.
        """

    @hookspec
    def relay_shutdown(self, relay: Relay) -> Callable[[], Awaitable[None]] | None:
        """Called once, when the relay is stopping and every client is gone (so every session's
        ``relay_session_ended`` has been called).

        Return an async function that finishes the plugin's work (flushes a queue): the relay
        awaits all of them together, for at most ``SHUTDOWN_TIMEOUT`` seconds, then cancels every
        task. Return ``None`` if there is nothing to finish.
        """

    @hookspec(firstresult=True)
    def relay_backend(self, relay: Relay) -> Backend | None:
        """Called once by ``configure()``, after every ``relay_configure``.

        Return a ``Backend`` to decide the matchmaking moves instead of this process's
        ``Matchmaker`` (``relay_plugins.cluster`` returns its Redis one when ``--redis-url`` is
        set), or ``None``. The first answer wins.
        """

    @hookspec(firstresult=True)
    def relay_ice_servers(self, session: Session, client_id: str) -> list[dict[str, Any]] | None:
        """Called twice per match (once per side) to build the ``ice_servers`` list of ``matched``.

        Return a list of ``RTCIceServer`` dicts (``{"urls": ..., "username": ..., "credential":
        ...}``) to use it, or ``None`` to defer. The first non-``None`` answer wins; with none, the
        ``--ice-server`` flags are used (an empty list when none is set).
        """


def make_plugin_manager(modules: Iterable[str] = (), *, entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with the relay's hooks, the ``relay`` entry points and the given plugins
    (module names, or paths of ``.py`` files). Raises ``PluginError`` for one that cannot be loaded
    or that implements a hook as a wrapper (``hookwrapper``/``wrapper``: the relay calls each
    implementation on its own, so that one plugin's error never reaches another)."""
    pm = pluggy.PluginManager("relay")
    pm.add_hookspecs(HookSpecs)
    if entry_points:
        try:
            pm.load_setuptools_entrypoints("relay")
        except Exception as exc:
            raise PluginError(f"an installed plugin (entry point group 'relay') failed to load: {_why(exc)}") from None
    for name in modules:
        module = _import_plugin(name)
        if not pm.is_registered(module):  # also installed through an entry point
            pm.register(module, name)
    check_plugins(pm)
    return pm


def _import_plugin(name: str) -> Any:
    """``--plugin``: a module (found on the path, the current directory included) or a .py file."""
    try:
        if name.endswith(".py") or os.sep in name:
            path = Path(name)
            if not path.is_file():
                raise PluginError(f"--plugin {name}: no such file")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
            return module
        if os.getcwd() not in sys.path:  # `--plugin my_plugin` for my_plugin.py right here
            sys.path.append(os.getcwd())
        return importlib.import_module(name)
    except PluginError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise PluginError(
                f"--plugin {name}: no module named {exc.name!r} (a module must be on the Python path or in the"
                f" current directory; a file is given by its path, e.g. --plugin ./{name.split('.')[-1]}.py)"
            ) from None
        raise PluginError(f"--plugin {name}: it imports a module that is missing: {_why(exc)}") from None
    except Exception as exc:
        raise PluginError(f"--plugin {name}: importing it failed: {_why(exc)}") from None


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def check_plugins(pm: pluggy.PluginManager) -> None:
    """Refuse hook wrappers (the relay calls each implementation on its own); ``PluginError``."""
    for name in dir(HookSpecs):
        if name.startswith("relay_"):
            for impl in getattr(pm.hook, name).get_hookimpls():
                if impl.hookwrapper or impl.wrapper:
                    raise PluginError(f"plugin {impl.plugin_name}: {name} is a hook wrapper; the relay supports none")


def describe_plugins(pm: pluggy.PluginManager) -> list[str]:
    """Every plugin registered, with where it comes from: for the start-up log."""
    dists = {id(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in pm.list_plugin_distinfo()}
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        where = getattr(plugin, "__file__", None) or f"{type(plugin).__qualname__} from {type(plugin).__module__}"
        out.append(f"{name} ({where}{', ' + dists[id(plugin)] if id(plugin) in dists else ''})")
    return out


def call_hooks(hook: pluggy.HookRelay, name: str, *, on_error: Any = None, **kwargs: Any) -> Any:
    """Call every implementation of a hook, each on its own: one that raises is logged and
    skipped, so a plugin bug never reaches the relay or another plugin; but when ``on_error`` is
    given (a security decision: fail closed), the first that raises makes the answer
    ``on_error``. A ``firstresult`` hook returns the first answer that is not ``None``
    (pluggy's order: last registered first); others return the list of answers that are not
    ``None``. (Not pluggy's own loop: that one stops at the first plugin that raises.)"""
    caller = getattr(hook, name)
    first = caller.spec is not None and caller.spec.opts.get("firstresult")
    results = []
    for impl in reversed(caller.get_hookimpls()):
        try:
            result = impl.function(*[kwargs[arg] for arg in impl.argnames])
        except Exception:
            log.exception("plugin %s failed in %s", impl.plugin_name, name)
            if on_error is not None:
                return on_error
            continue
        if result is not None:
            if first:
                return result
            results.append(result)
    return None if first else results


async def _finish_plugin(finish: Callable[[], Awaitable[None]]) -> None:
    try:
        await finish()
    except Exception:
        log.exception("plugin failed to finish at shutdown")


########################################################################################################
# I/O: clients, HTTP, the server
########################################################################################################


_HEAD_END = re.compile(rb"\n\r?\n")  # the blank line after a request head, as h11 finds it


class _Cork:
    """Holds writes while the messages of one read are acted on, then sends each connection's in one
    ``writev``: a client's read of eleven signals costs its peer one system call, not eleven."""

    __slots__ = ("dirty", "on")

    def __init__(self) -> None:
        self.on = False  # acting on a read's messages: writes wait in their transport's `_out`
        self.dirty: list[_Transport] = []  # the transports written to meanwhile

    def release(self) -> None:
        self.on = False
        for transport in self.dirty:
            transport.uncork()
        self.dirty.clear()


class _Transport:
    """A client's WebSocket connection: the socket, its frame parser, and every write to it.

    Writes never wait: frames go to the kernel at once (one non-blocking ``writev``; under the
    ``_Cork``, one per read acted on); what it does not take waits in ``_pending``, in order, drained
    by a flusher task started only then. Every frame written for the client, messages, pongs, pings
    and close frames alike, fits in ``limit`` bytes of pending data or is refused (the client is too
    slow: 1013). Reads are done by the connection's own task (``receive``); reads that return data
    count as signs of life.
    """

    __slots__ = (
        "_cork", "_drained", "_nursery", "_out", "_pending", "close_received", "close_sent", "ended", "fd", "limit",
        "parser", "received", "waiting",
    )  # fmt: skip

    def __init__(self, fd: int, limit: int, max_message: int, nursery: trio.Nursery, cork: _Cork) -> None:
        self.fd = fd  # -1 once drained: the connection's task closes the socket, and its number gets reused
        self._nursery = nursery  # where a flusher runs when one is needed
        self._cork = cork
        self._out: list[bytes] | None = None  # frames held by the cork
        self._pending = bytearray()  # bytes the kernel has not taken yet; non-empty iff a flusher runs
        self._drained: trio.Event | None = None  # set when _pending empties (while a flusher runs)
        self.waiting = True  # the last read emptied the socket (or none was made): wait before reading
        self.limit = limit
        self.parser = FrameParser(max_message)
        self.close_sent: int | None = None  # the code of the close frame the relay sent
        self.close_received: int | None = None  # the code of the client's close frame
        self.ended = False  # the connection dropped (end of stream, or reset)
        self.received = 0  # reads that returned data: the heartbeat watches it move

    # -- writing (from any task, never waiting) ---------------------------------------------------

    def send_text(self, payload: bytes) -> bool:
        """Write one text frame now. False (and nothing written) if the client is too slow."""
        size = len(payload)
        if self._pending and len(self._pending) + size > self.limit:
            return False
        self._write(_TEXT_HEADERS[size] if size < 126 else _frame_header(OP_TEXT, size), payload)
        return True

    def send_control(self, opcode: int, payload: bytes = b"") -> bool:
        """Write a ping, pong or close frame now, within the same bound."""
        if self._pending and len(self._pending) + len(payload) + 2 > self.limit:
            return False
        if opcode == OP_CLOSE:
            self.close_sent = close_code(payload)
        self._write(_frame_header(opcode, len(payload)), payload)
        return True

    def send_ping(self) -> bool:
        return self.send_control(OP_PING)

    def send_raw(self, data: bytes) -> None:
        """The handshake's answer (nothing is pending yet)."""
        self._write(b"", data)

    def _write(self, header: bytes, payload: bytes) -> None:
        out = self._out
        if out is not None:
            out += (header, payload)
        elif self._cork.on:
            self._out = [header, payload]
            self._cork.dirty.append(self)
        else:
            self._send([header, payload])

    def uncork(self) -> None:
        out, self._out = self._out, None
        if out:
            self._send(out if len(out) <= 64 else [b"".join(out)])  # writev takes at most IOV_MAX buffers

    def _send(self, buffers: list[bytes]) -> None:
        pending = self._pending
        if pending or self.fd < 0:
            if self.fd >= 0:
                for data in buffers:
                    pending += data
            return
        try:
            sent = os.writev(self.fd, buffers)
        except BlockingIOError:
            sent = 0
        except OSError:  # reset or broken: the read side sees it and ends the connection
            return
        if sent < sum(map(len, buffers)):  # the kernel buffer is full: keep the rest, in order
            pending += b"".join(buffers)[sent:]
            self._drained = trio.Event()
            self._nursery.start_soon(self._flush)

    async def _flush(self) -> None:
        pending = self._pending
        try:
            while pending and self.fd >= 0:
                try:
                    await trio.lowlevel.wait_writable(self.fd)
                except trio.ClosedResourceError:
                    continue  # interrupt() meant for the reader, or the end (then fd < 0 ends the loop)
                try:
                    sent = os.write(self.fd, pending)
                except BlockingIOError:
                    continue
                del pending[:sent]
        except (OSError, trio.ClosedResourceError):
            pass
        finally:
            pending.clear()
            if self._drained is not None:
                self._drained.set()

    # -- reading (the connection's task only) -----------------------------------------------------

    def interrupt(self) -> None:
        """Wake the connection's task if it waits for the client to send (it gets
        ClosedResourceError and sees that its client is closing). The socket stays open and usable:
        trio's ``notify_closing`` only wakes and forgets the waiters of a descriptor, and a flusher
        it wakes too goes back to waiting. This, not a cancel scope per connection, is how the relay
        stops a read loop from outside: a scope costs some 600 bytes an idle connection holds all day."""
        if self.fd >= 0:
            trio.lowlevel.notify_closing(self.fd)

    def read(self) -> bytes | None:
        """What the client sent, without waiting: None if nothing came yet, b"" once the connection
        ended (closed or reset). A read that emptied the socket sets ``waiting``: wait until it is
        readable before the next, so that a wake-up costs one read, not one that finds nothing."""
        try:
            data = os.read(self.fd, RECEIVE_BYTES)
        except BlockingIOError:
            self.waiting = True
            return None
        except OSError:  # reset
            data = b""
        if not data:
            self.ended = True
            return b""
        self.waiting = len(data) < RECEIVE_BYTES
        self.received += 1
        return data

    async def receive(self) -> bytes:
        """The next bytes the client sent (b"": the end), waiting for them; a checkpoint always."""
        while True:
            if self.waiting:
                await trio.lowlevel.wait_readable(self.fd)  # ClosedResourceError: interrupted
            else:
                await trio.lowlevel.checkpoint()
            data = self.read()
            if data is not None:
                return data

    # -- the end ----------------------------------------------------------------------------------

    def discard_unread(self) -> None:
        """Read away, without waiting, what the client has sent and nobody will read."""
        for _ in range(64):
            try:
                if len(os.read(self.fd, RECEIVE_BYTES)) < RECEIVE_BYTES:
                    return
            except OSError:
                return

    async def drain(self) -> None:
        """Give what is pending ``CLOSE_TIMEOUT`` seconds to go out; then write nothing more."""
        try:
            if self._pending and self._drained is not None:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self._drained.wait()
        finally:
            self.fd = -1  # never written to again, whatever reuses the number
            self._pending.clear()


class _StreamTransport(_Transport):
    """A client's ``HttpStream``: the same socket, bound and writes as a WebSocket's, in the plugin's
    framing; no frames come back on it (the client sends by other requests, ``ClientLink``)."""

    __slots__ = ("framing",)

    def __init__(self, fd: int, limit: int, max_message: int, nursery: trio.Nursery, cork: _Cork, framing: Any) -> None:
        super().__init__(fd, limit, max_message, nursery, cork)
        self.framing = framing

    def send_text(self, payload: bytes) -> bool:
        return self._put(self.framing.message(payload))

    def send_ping(self) -> bool:
        return self._put(self.framing.keepalive())

    def _put(self, data: bytes) -> bool:
        """Write ``data`` now, within the same bound as a WebSocket's frames."""
        if self._pending and len(self._pending) + len(data) > self.limit:
            return False
        self._write(b"", data)
        return True


def _stream_head(stream: HttpStream) -> bytes:
    """The head of an ``HttpStream``'s response: no length (it ends when the connection does), never
    cached, never buffered by a proxy (nginx reads ``X-Accel-Buffering``)."""
    lines = [
        "HTTP/1.1 200 OK", f"Content-Type: {stream.content_type}", "Cache-Control: no-store", "X-Accel-Buffering: no",
        "X-Content-Type-Options: nosniff", "Connection: close", *(f"{name}: {value}" for name, value in stream.headers),
    ]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _close_handshake(transport: _Transport, code: int, reason: str) -> None:
    """End a WebSocket within ``CLOSE_TIMEOUT``. If the client closed first, its code is echoed. Else
    the relay's close frame goes out, and, for an orderly close, the client's answer (or the end of
    its connection) is awaited, messages it still sends being dropped; a client that broke the
    protocol or a limit is not waited for (RFC 6455's "fail the connection"). A connection that
    dropped gets nothing."""
    if transport.ended:
        return
    with trio.move_on_after(CLOSE_TIMEOUT):
        if transport.close_received is not None:
            echo = transport.close_received
            transport.send_control(OP_CLOSE, b"" if echo == 1005 else struct.pack("!H", echo))
            return
        transport.send_control(OP_CLOSE, _close_payload(code, reason))
        if code in _FAIL_CODES:
            transport.discard_unread()  # so that closing sends a FIN, not a reset that could lose the close frame
            return
        while not transport.parser.closed:
            try:
                data = await transport.receive()
            except trio.ClosedResourceError:
                return
            if not data:
                return
            try:
                transport.parser.feed(data)
            except WebSocketError:
                return


class _Client:
    """A client: who it is (id, user, peer, mailbox: kept when it resumes on a new connection), its
    phase (``PHASES``) and its current connection. Plain slots: it is on the hot path."""

    __slots__ = (  # noqa: RUF023 (grouped by meaning, not sorted)
        "id", "secret", "user_id", "peer", "session", "position", "connected_at", "joins", "mailbox",  # the client
        "phase", "transport", "remote", "address", "tokens", "stamp", "close_code", "close_reason", "floods",
        "flood_start", "seen", "quiet_since", "pinged_at", "away_since", "was_away",  # its connection
    )  # fmt: skip

    def __init__(
        self,
        transport: _Transport,
        remote: str,
        address: _Address,
        user_id: str | None,
        now: float,
        settings: Settings,
        new_mailbox: Callable[[str], Mailbox],
        client_id: str = "",
    ) -> None:
        self.id = client_id or secrets.token_urlsafe(9)
        #: 128 bits: the private half of the resume token; for a client rebuilt from a dead node's
        #: journal, ``"#"`` and its ``secret_digest`` (only the digest was written down).
        self.secret = secrets.token_urlsafe(16)
        self.user_id = user_id
        self.peer: _Client | RemotePeer | None = None  # the current session's other side
        self.session: Session | None = None  # the current session
        self.position = 0  # last position sent in "queued"
        self.connected_at = now
        self.joins: _Bucket | None = None  # joins and nexts, per minute (from the first one on)
        self.mailbox = new_mailbox(self.id)
        self.phase = NEW
        self.transport = transport
        self.remote = remote
        self.address = address  # its IP address's sockets and budgets
        self.tokens = float(settings.message_burst)  # message rate limit bucket
        self.stamp = now
        self.close_code = CLOSE_NORMAL  # the close decided (phase CLOSING)
        self.close_reason = ""
        self.floods = 0  # messages refused by the rate limit since flood_start
        self.flood_start = now
        self.seen = 0  # transport.received at the heartbeat's last look
        self.quiet_since = now
        self.pinged_at: float | None = None
        self.away_since = 0.0  # when its connection vanished (phase AWAY)
        self.was_away = False  # resuming (release_client): whether it was away, or still connected

    def move(self, phase: str) -> None:
        """Go on to ``phase``, if the current one leads there (``PHASES``); else IllegalTransition."""
        self.phase = next_phase(self.phase, phase)

    @property
    def token(self) -> str:
        """The resume token: the public client id, and the secret compared in constant time."""
        return f"{self.id}.{self.secret}"


class _Bucket:
    """A token bucket: refilled at ``rate`` tokens a second, up to ``size``."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, size: float, now: float) -> None:
        self.tokens = float(size)
        self.stamp = now

    def level(self, rate: float, size: float, now: float) -> float:
        """Refill for the time passed since the last look; the tokens there are now."""
        tokens = self.tokens + (now - self.stamp) * rate
        self.tokens = tokens = size if tokens > size else tokens
        self.stamp = now
        return tokens

    def take(self, n: float, rate: float, size: float, now: float) -> bool:
        """Spend ``n`` tokens if there are that many."""
        if self.level(rate, size, now) < n:
            return False
        self.tokens -= n
        return True


class _Address:
    """What the relay knows of one IP address: its open TCP connections and its budgets, which
    outlive its connections (a bot that reconnects keeps its spent budget)."""

    __slots__ = ("bytes", "connects", "count", "joins")

    def __init__(self, s: Settings, now: float) -> None:
        self.count = 0  # TCP connections open now (HTTP included), counted from accept
        self.connects = _Bucket(s.connect_burst_per_ip, now)  # new WebSockets
        self.joins = _Bucket(s.joins_per_minute_per_ip, now)  # joins and nexts, per minute
        self.bytes = _Bucket(s.bytes_burst_per_ip, now)  # bytes of messages received

    def idle(self, s: Settings, now: float) -> bool:
        """No connection and every budget full: it can be forgotten."""
        return (
            self.count == 0
            and self.connects.level(s.connect_rate_per_ip, s.connect_burst_per_ip, now) >= s.connect_burst_per_ip
            and self.joins.level(s.joins_per_minute_per_ip / 60, s.joins_per_minute_per_ip, now)
            >= s.joins_per_minute_per_ip
            and self.bytes.level(s.bytes_per_second_per_ip, s.bytes_burst_per_ip, now) >= s.bytes_burst_per_ip
        )


def _peer(addr: Any) -> tuple[str, int]:
    """(host, port) of the address ``accept`` gave."""
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:") and "." in host:  # an IPv4 client of a dual-stack listener
        host = host[7:]
    return host, port


async def _recv(fd: int) -> bytes:
    """What a non-blocking socket has (waiting until it has something); b"" at its end or on a reset."""
    while True:
        try:
            return os.read(fd, RECEIVE_BYTES)
        except BlockingIOError:
            pass
        except OSError:
            return b""
        await trio.lowlevel.wait_readable(fd)


async def _linger(fd: int) -> None:
    """After answering a request whose body will not be read (413): stop writing and read the body
    away (at most ``MAX_LINGER_BYTES``, for ``CLOSE_TIMEOUT``), as nginx's lingering close does, so
    that closing does not reset the connection before the client has read the answer."""
    with trio.move_on_after(CLOSE_TIMEOUT):
        sock = socket.socket(fileno=fd)  # borrowed: detached again below, never closed here
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        finally:
            sock.detach()
        read = 0
        while read < MAX_LINGER_BYTES and (chunk := await _recv(fd)):
            read += len(chunk)


async def _send_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to a non-blocking socket, waiting while it is full. OSError if it broke."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
            continue
        except BlockingIOError:
            pass
        await trio.lowlevel.wait_writable(fd)


def _close_socket(fd: int) -> None:
    """Close a socket some task may still wait on (that task gets ClosedResourceError)."""
    trio.lowlevel.notify_closing(fd)
    os.close(fd)


def _listen(host: str, port: int, reuse_port: bool = False) -> list[socket.socket]:
    """Non-blocking listening sockets on every address ``host`` names (IPv6 ones IPv6 only, as trio
    does); ``reuse_port``: shared with the other --workers processes (the kernel spreads connections)."""
    sockets: list[socket.socket] = []
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise StartupError(f"--host {host}: {exc.strerror or exc}") from None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            for other in sockets:
                other.close()
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


async def _accept_loop(
    listener: socket.socket, handle: Callable[[int, Any], Awaitable[None]], nursery: trio.Nursery
) -> None:
    """Accept connections as they come, every one waiting at each wake-up, and give each a task
    (``handle(fd, address)``, which closes it: a bare descriptor, no socket object kept per
    connection). Out of descriptors, it pauses instead of spinning."""
    while True:
        await trio.lowlevel.wait_readable(listener)
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed (%s): pausing for 0.1 s", exc.strerror)
                    await trio.sleep(0.1)
                    break
                continue  # the client gave up meanwhile (ECONNABORTED): the next one
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames go out whole, at once
            except OSError:
                pass
            nursery.start_soon(handle, sock.detach(), address)


def _forwarded_ip(headers: dict[str, str], header: str, hops: int) -> str | None:
    """The client's address as a trusted proxy wrote it: ``X-Forwarded-For``'s entry ``hops`` from the
    right (each proxy appends the address it got the connection from; entries further left are the
    client's to write), or a header the proxy sets itself (``Fly-Client-IP``). None if it is not an IP."""
    value = headers.get(header, "")
    if header == "x-forwarded-for":
        entries = value.split(",")
        value = entries[-hops] if len(entries) >= hops else ""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return None


def _response(
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
    headers: Iterable[tuple[str, str]] = (),
    cache: str = "no-store",
) -> bytes:
    """A whole HTTP/1.1 response; the connection closes after it."""
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        f"Cache-Control: {cache}",
        "X-Content-Type-Options: nosniff",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


async def _respond(fd: int, status: int, body: bytes, *args: Any, **kwargs: Any) -> None:
    """Send a whole response (``_response``'s arguments), waiting at most ``CLOSE_TIMEOUT``."""
    with trio.move_on_after(CLOSE_TIMEOUT):
        try:
            await _send_all(fd, _response(status, body, *args, **kwargs))
        except OSError:  # the client went away
            pass


def _refuse_now(fd: int, status: int, reason: str) -> None:
    """Answer a connection the relay will not serve without waiting for it: one non-blocking read of
    what it already sent (closing with unread bytes would reset the connection, and the answer with
    it), one non-blocking write of the answer; the caller closes it."""
    try:
        os.read(fd, MAX_REQUEST_HEAD)
    except OSError:
        pass
    try:
        os.write(fd, _response(status, f"{status} {reason}\n".encode(), headers=[("Retry-After", "5")]))
    except OSError:
        pass


_NO_AUTH: Final = Auth()  # no auth plugin answered: open
_AUTH_FAILED: Final = Auth(refuse=401, reason="authentication failed")  # an auth plugin raised: refused
_RETRY: Final = (("Retry-After", "5"),)  # sent with 429 and 503


def _socket_cap(setting: int) -> int:
    """The cap on open TCP connections: ``--max-sockets``, kept ``FD_RESERVE`` below the process's
    file-descriptor limit so that accepting never fails for want of one (0: as many as that allows)."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    ceiling = (setting or 1_000_000) if limit == resource.RLIM_INFINITY else max(limit - FD_RESERVE, 1)
    if setting and setting > ceiling:
        log.warning("--max-sockets %d is above the file-descriptor limit %d: using %d", setting, limit, ceiling)
    return min(setting, ceiling) if setting else ceiling


class _Upgrade(NamedTuple):
    """An accepted WebSocket upgrade: what the connection keeps of its request."""

    key: str  # Sec-WebSocket-Key
    subprotocol: str | None
    user_id: str | None
    remote: str
    early: bytes  # frames sent right behind the request
    stream: HttpStream | None = None  # not a WebSocket: a plugin's stream (key and early are empty)


class _Head(NamedTuple):
    """A request, and the bytes read behind its head (a WebSocket's first frames)."""

    request: HttpRequest
    upgrade: bool  # asks for a WebSocket (then no body is read)
    rest: bytes


_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_REQUEST_LINE: Final = re.compile(rb"(%b) ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])" % _TOKEN)
_HEADER_LINE: Final = re.compile(rb"(%b):[ \t]*((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*" % _TOKEN)
_CONTENT_LENGTH: Final = re.compile(rb"[0-9]{1,20}")


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str], int]:
    """An HTTP/1.x request head, up to and including its blank line, as (method, target, version,
    headers, content length). Header names are in lower case; a header sent several times is joined
    with ", ". What h11 refuses this refuses, with the same status (tests/test_http.py holds the two
    together), with one exception: a chunked body (411: send a Content-Length). Raises HttpError."""
    lines = [line[:-1] if line[-1:] == b"\r" else line for line in head.split(b"\n")][:-2]
    if not lines or (request := _REQUEST_LINE.fullmatch(lines[0])) is None:
        raise HttpError(400, "illegal request line")
    fields: list[bytes] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):  # obsolete line folding: part of the line before, as h11 reads it
            if not fields:
                raise HttpError(400, "continuation line at start of headers")
            fields[-1] += b" " + line.lstrip(b" \t")
        else:
            fields.append(line)
    matches = []
    for field in fields:  # every line's syntax, then what the headers mean (h11's order)
        match = _HEADER_LINE.fullmatch(field)
        if match is None:
            raise HttpError(400, f"illegal header line: {field[:40]!r}")
        matches.append(match)
    headers: dict[str, str] = {}
    length: bytes | None = None
    hosts = 0
    for match in matches:
        name, value = match.group(1).lower(), match.group(2)
        if name == b"content-length":
            lengths = {part.strip() for part in value.split(b",")}
            if len(lengths) != 1 or ((value := lengths.pop()) != length and length is not None):
                raise HttpError(400, "conflicting Content-Length headers")
            if not _CONTENT_LENGTH.fullmatch(value):
                raise HttpError(400, "bad Content-Length")
            if length is not None:
                continue
            length = value
        elif name == b"transfer-encoding":
            if "transfer-encoding" in headers:
                raise HttpError(501, "multiple Transfer-Encoding headers")
            if value.lower() != b"chunked":
                raise HttpError(501, "Only Transfer-Encoding: chunked is supported")
            value = value.lower()
        elif name == b"host":
            hosts += 1
        key, text = name.decode("latin-1"), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    version = request.group(3).decode()
    if hosts > 1 or (hosts == 0 and version == "1.1"):
        raise HttpError(400, "Found multiple Host: headers" if hosts else "Missing mandatory Host: header")
    if "transfer-encoding" in headers:
        raise HttpError(411, "chunked request bodies are not supported: send a Content-Length")
    return request.group(1).decode(), request.group(2).decode(), version, headers, int(length or 0)


async def _read_request(fd: int, remote: str, client_ip: Callable[[dict[str, str]], str]) -> _Head | None:
    """Read an HTTP request: the head, and the body (unless it is a WebSocket upgrade).
    ``client_ip`` tells the client's address from the headers.

    None if the client closed or sent garbage (it got a 400, 411, 413, 431 or 501).
    """
    data = b""
    searched = 0
    while (blank := _HEAD_END.search(data, searched)) is None:
        if data and data[0] < 0x21:  # not a request line (a TLS handshake, say): no need to wait for more
            await _respond(fd, 400, b"400 bad request: illegal request line\n")
            return None
        if len(data) > MAX_REQUEST_HEAD:
            await _respond(fd, 431, b"431 request head too large\n")
            return None
        searched = max(0, len(data) - 2)
        chunk = await _recv(fd)
        if not chunk:
            return None
        data += chunk
    if blank.end() > MAX_REQUEST_HEAD:
        await _respond(fd, 431, b"431 request head too large\n")
        return None
    try:
        method, target, _, headers, length = parse_head(data[: blank.end()])
    except HttpError as exc:
        await _respond(fd, exc.status, f"{exc.status} bad request: {exc}\n".encode())
        return None
    rest = data[blank.end() :]
    upgrade = headers.get("upgrade", "").strip().lower() == "websocket"
    if not upgrade:
        if length > MAX_REQUEST_BODY:
            await _respond(fd, 413, b"413 request body too large\n")
            await _linger(fd)
            return None
        while len(rest) < length:
            chunk = await _recv(fd)
            if not chunk:
                return None
            rest += chunk
    path, _, query = target.partition("?")
    body, rest = (b"", rest) if upgrade else (rest[:length], rest[length:])
    return _Head(HttpRequest(method, path, query, headers, body, remote, client_ip(headers)), upgrade, rest)


async def serve_http(
    listeners: list[socket.socket],
    answer: Callable[[HttpRequest], HttpResponse | None],
) -> None:
    """Serve plain HTTP on (non-blocking, listening) sockets of a plugin's own (``relay_plugins.metrics``'
    private port): each request is read with the relay's limits (400, 413, 431; ``CLOSE_TIMEOUT``
    for all of it) and answered by ``answer`` (``None``: 404), one request per connection. Runs
    until cancelled."""

    async def handle(fd: int, address: Any) -> None:
        host, port = _peer(address)
        try:
            with trio.move_on_after(CLOSE_TIMEOUT):
                head = await _read_request(fd, f"{host}:{port}", lambda headers: host)
                if head is not None:
                    r = answer(head.request) or HttpResponse(404, b"404 not found\n")
                    await _respond(
                        fd, r.status, r.body, r.content_type, head_only=head.request.method == "HEAD",
                        headers=r.headers, cache=r.cache,
                    )  # fmt: skip
        except Exception:
            log.exception("HTTP request from %s failed", host)
        finally:
            _close_socket(fd)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, handle, nursery)


_CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".ts": "text/plain; charset=utf-8",  # relay-client.d.ts, for reading
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
_HTML_HEADERS: Final = (
    (
        "Content-Security-Policy",
        "default-src 'self'; connect-src 'self' ws: wss:; media-src 'self' blob: mediastream:; img-src 'self' data:;"
        " object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    ),
    ("Referrer-Policy", "no-referrer"),
)


def _load_static(directory: str) -> dict[str, tuple[bytes, str, str]]:
    """Read the files under ``directory`` once: URL path -> (body, content type, ETag).

    Requests are matched against these paths exactly (nothing is decoded or joined to a filesystem
    path per request), so no request can reach a file outside the directory. Symlinks and dotfiles
    are skipped; ``/`` serves ``index.html``.
    """
    files: dict[str, tuple[bytes, str, str]] = {}
    root = Path(directory) if directory else None
    if root is None or not root.is_dir():
        if directory:
            log.warning("static directory %s not found: serving no files", directory)
        return files
    resolved_root = root.resolve()
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if (
            path.is_symlink()
            or not path.is_file()
            or any(part.startswith(".") for part in relative.parts)
            or not path.resolve().is_relative_to(resolved_root)  # under a symlinked directory
        ):
            continue
        body = path.read_bytes()
        content_type = _CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        files["/" + relative.as_posix()] = (body, content_type, f'"{hashlib.sha256(body).hexdigest()[:20]}"')
    if "/index.html" in files:
        files["/"] = files["/index.html"]
    return files


class _Port:
    """Every TCP connection on the relay's port, from accept to close: the I/O around the relay.

    Every connection counts from accept on: against ``max_sockets`` (so the relay never runs out
    of file descriptors) and against its address's ``--max-connections-per-ip`` (a proxy's
    connections count for the client it names, once the request head has said who that is). Its
    request gets ``--handshake-timeout``; a plain request is answered (health, plugins' routes,
    static files, 404), an upgrade checked (the handshake's headers, draining and capacity, the
    origin, the address's connection rate, then the auth hook) and accepted. A WebSocket is then
    served in the connection's own task: its frames are read, rate-limited and each text message
    handed to the relay (``Relay._message``), until it closes, vanishes or the relay closes it.
    """

    def __init__(self, relay: Relay) -> None:
        s = self.settings = relay.settings
        self.relay = relay
        self.proxies = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in s.trusted_proxies)
        self.addresses: dict[str, _Address] = {}  # per IP address: open connections, budgets
        self.sockets = 0  # TCP connections open now
        self.max_sockets = s.max_sockets  # the cap (serve() sets it from the descriptor limit)
        self.static = _load_static(s.static_dir)
        self.websockets = 0  # WebSocket tasks not finished yet (attached, or still sending their close)
        self.cork = _Cork()  # shared by every transport: writes wait while a read's messages are acted on
        self.nursery: trio.Nursery  # the server's root nursery (serve()): flushers run there

    async def serve(self, fd: int, address: Any) -> None:
        """Serve one TCP connection, then close it. Nothing raised here may reach the server's
        nursery. A WebSocket keeps nothing of its request and no cancel scope of its own
        (``_Transport.interrupt`` stops its read loop): an idle connection costs its memory all day."""
        peer = _peer(address)
        del address
        relay, counted, c = self.relay, None, None
        self.sockets += 1
        try:
            counted, upgrade = await self.enter(fd, peer)
            if upgrade is None:
                return
            c = self._open_client(fd, counted, upgrade)  # type: ignore[arg-type]  (an upgrade is counted)
            transport, stream, early, upgrade = c.transport, upgrade.stream, upgrade.early, None
            try:
                if stream is None:
                    await self._read_loop(c, transport, early)  # early: frames sent behind the request
                else:
                    await self._stream_loop(c, transport)  # type: ignore[arg-type]  (a stream's transport)
            except Exception:
                log.exception("client %s: handler failed", c.id)
                relay.close_client(c, CLOSE_INTERNAL, "internal error")
            finally:
                code, reason = c.close_code, c.close_reason
                relay._connection_lost(c, transport)
            if stream is None:
                await _close_handshake(transport, code, reason)
            elif not transport.ended:  # the relay ends it: say how (a stream that vanished is not written to)
                transport.send_raw(stream.framing.closing(code, reason))
        except Exception:
            log.exception("connection from %s failed", peer)
        finally:
            self.sockets -= 1
            if counted is not None:
                counted.count -= 1
            try:
                if c is not None:
                    self.websockets -= 1
                    relay._check_drained()
                    await c.transport.drain()  # what is pending gets CLOSE_TIMEOUT to go out
            finally:
                _close_socket(fd)

    async def enter(self, fd: int, peer: tuple[str, int]) -> tuple[_Address | None, _Upgrade | None]:
        """Answer the connection's request, or accept its upgrade. Returns the address it counts
        against (the caller takes the count off again) and the accepted upgrade, if any."""
        if self.sockets > self.max_sockets:
            _refuse_now(fd, 503, "relay at capacity, try again")
            return None, None
        counted = None
        if not self._trusted(peer[0]):
            counted = self._count(peer[0])
            if counted.count > self.settings.max_connections_per_ip:
                _refuse_now(fd, 429, "too many connections from your address")
                return counted, None
        try:
            with trio.move_on_after(self.settings.handshake_timeout):
                return await self._request(fd, peer, counted)
        except BaseException:
            if counted is not None:
                counted.count -= 1
            raise
        return counted, None

    def sweep(self, now: float) -> None:
        """Forget the addresses with nothing open and nothing spent."""
        for ip, a in list(self.addresses.items()):
            if a.idle(self.settings, now):
                del self.addresses[ip]

    # -- a client's connection: a WebSocket, or a plugin's HttpStream -------------------------------

    def _open_client(self, fd: int, address: _Address, upgrade: _Upgrade) -> _Client:
        """Accept a client: the handshake's answer (or a stream's head and opening) and the welcome
        go out in one write."""
        s, stream = self.settings, upgrade.stream
        if stream is None:
            transport = _Transport(fd, s.send_buffer_bytes, s.max_message_bytes, self.nursery, self.cork)
        else:
            transport = _StreamTransport(fd, s.send_buffer_bytes, 0, self.nursery, self.cork, stream.framing)
        c = _Client(transport, upgrade.remote, address, upgrade.user_id, trio.current_time(), s, self.relay.new_mailbox)
        self.websockets += 1
        self.cork.on = True
        try:
            if stream is None:
                transport.send_raw(_switching_protocols(upgrade.key, upgrade.subprotocol))
            else:
                transport.send_raw(_stream_head(stream) + stream.framing.opening(ClientLink(self, c)))
            self.relay._attach(c)
        finally:
            self.cork.release()
        return c

    async def _stream_loop(self, c: _Client, transport: _StreamTransport) -> None:
        """A stream's client sends by other requests: wait for the connection's end (or the relay's
        close); whatever arrives on it is read away."""
        try:
            while c.phase is not CLOSING:
                try:
                    await trio.lowlevel.wait_readable(transport.fd)
                except trio.ClosedResourceError:  # interrupted: the relay closes this client
                    return
                while (data := transport.read()) is not None:
                    if not data:
                        return  # the connection dropped: the client is away
        finally:
            transport.framing.closed()

    async def _read_loop(self, c: _Client, transport: _Transport, data: bytes) -> None:
        """Wait for a client's bytes and act on them: the relay's hot path. Returns when the client
        closed (close frame) or vanished, or when the relay closes it."""
        act, read, feed, fd = self._act, transport.read, transport.parser.feed, transport.fd
        while True:
            if not data:  # one read per wake-up (Transport.receive, inline: one coroutine less per read)
                if c.phase is CLOSING:  # decided while this task was busy: interrupt() woke nobody
                    return
                if transport.waiting:
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    except trio.ClosedResourceError:  # interrupted: the relay closes this client
                        return
                else:
                    await trio.lowlevel.checkpoint()
                data = read()
                if data is None:
                    continue
                if not data:
                    return  # the connection dropped: no close frame
            failed: tuple[int, str] | None = None  # (not the exception: its traceback would hold this frame)
            try:
                events = feed(data)
            except WebSocketError as exc:
                events, failed = exc.events, (exc.code, exc.reason)
            data = b""
            if not act(c, transport, events, failed):
                return

    def _act(
        self, c: _Client, transport: _Transport, events: list[tuple[int, bytes]], failed: tuple[int, str] | None
    ) -> bool:
        """Rate-limit one read's frames and act on each (then on ``failed``, the read's violation of
        the frame protocol, if any); False once the connection ends."""
        s, relay, cork, message = self.settings, self.relay, self.cork, self.relay._message
        # Every frame costs a message (pings and pongs included) and its bytes. The buckets are
        # refilled once per read (its frames arrived together) and written back at the end.
        now = trio.current_time()
        burst = s.message_burst
        tokens = c.tokens + (now - c.stamp) * s.message_rate
        if tokens > burst:
            tokens = burst
        c.stamp = now
        address_bytes = c.address.bytes
        budget = address_bytes.level(s.bytes_per_second_per_ip, s.bytes_burst_per_ip, now)
        cork.on = True
        try:
            for opcode, payload in events:
                if opcode == OP_CLOSE:  # the client closes: answer with the same code, then the end
                    transport.close_received = close_code(payload)
                    return False
                if c.phase is CLOSING:
                    return False
                if tokens < 1.0:
                    relay._refused(c, now, relay._too_many)
                elif budget < len(payload):
                    relay._refused(c, now, relay._too_much)
                else:
                    tokens -= 1.0
                    budget -= len(payload)
                    if opcode == OP_TEXT:
                        message(c, payload)
                    elif opcode == OP_PING:
                        if not transport.send_control(OP_PONG, payload):
                            relay._too_slow(c)
                    elif opcode == OP_BINARY:
                        relay.send_error(c, "bad_message", "binary frames are not supported: send JSON text")
                    if c.phase is NEW:
                        c.move(ACTIVE)
        finally:
            c.tokens = tokens
            address_bytes.tokens = budget
            cork.release()
        if failed is not None:
            relay.close_client(c, *failed)
            return False
        return True

    def _trusted(self, host: str) -> bool:
        """Whether ``host`` is a --trusted-proxy, whose headers say who the client is."""
        if not self.proxies:
            return False
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in network for network in self.proxies)

    def _count(self, ip: str) -> _Address:
        """One more open connection from ``ip``; the caller takes it off again."""
        address = self.addresses.get(ip)
        if address is None:
            address = self.addresses[ip] = _Address(self.settings, trio.current_time())
        address.count += 1
        return address

    async def _request(
        self, fd: int, peer: tuple[str, int], address: _Address | None
    ) -> tuple[_Address | None, _Upgrade | None]:
        """Read the request and answer it, or accept its upgrade. ``address`` is None for a trusted
        proxy's connection: the client the proxy names counts from the request on. Returns the
        address the connection counts against and the accepted upgrade, if any."""
        s = self.settings
        host = peer[0]
        if address is None:

            def client_ip(headers: dict[str, str]) -> str:
                forwarded = _forwarded_ip(headers, s.proxy_header, s.proxy_hops)
                return forwarded if forwarded is not None else host  # a proxy that did not say: itself

        else:

            def client_ip(headers: dict[str, str]) -> str:
                return host

        head = await _read_request(fd, f"{host}:{peer[1]}", client_ip)
        if head is None:
            return address, None
        if address is not None:
            return address, await self._dispatch(fd, head, address)
        address = self._count(head.request.ip)
        try:
            if address.count > s.max_connections_per_ip:
                await _respond(fd, 429, b"429 too many connections from your address\n", headers=_RETRY)
                return address, None
            return address, await self._dispatch(fd, head, address)
        except BaseException:
            address.count -= 1  # the caller never heard of it
            raise

    async def _dispatch(self, fd: int, head: _Head, address: _Address) -> _Upgrade | None:
        """Answer a plain request, or check an upgrade (handshake, admission, auth) and accept it."""
        request = head.request
        if request.path != WS_PATH or not head.upgrade:
            answer = self._answer_http(request)
            if type(answer) is HttpStream:
                answer = self._accept(request, address, answer)
        elif (bad := handshake_refusal(request.method, request.headers)) is not None:
            status, reason, headers = bad
            answer = HttpResponse(status, f"{status} {reason}\n".encode(), headers=headers)
        else:
            answer = await self._replayed(request) or self._accept(request, address, None, head.rest)
        if type(answer) is _Upgrade:
            return answer
        await _respond(
            fd, answer.status, answer.body, answer.content_type,
            head_only=request.method == "HEAD", headers=answer.headers, cache=answer.cache,
        )  # fmt: skip
        return None

    async def _replayed(self, request: HttpRequest) -> HttpResponse | None:
        """Fly.io's shortcut: a client reconnecting with ``/ws?resume=<client id>`` whose client a
        cluster node on another Fly machine holds is sent there by Fly's proxy (``fly-replay``), so
        its resume needs no handover; never a request the proxy replayed already. Else None."""
        replay_to = getattr(self.relay.backend, "replay_to", None)
        if replay_to is None or "fly-replay-src" in request.headers or "fly-replay-failed" in request.headers:
            return None
        client_id = next((v for k, _, v in (p.partition("=") for p in request.query.split("&")) if k == "resume"), "")
        if not 0 < len(client_id) <= 64 or client_id in self.relay._clients:
            return None
        machine = await replay_to(client_id)
        if machine is None:
            return None
        headers = (("fly-replay", f"instance={machine};fallback=prefer_self"),)
        return HttpResponse(409, b"409 this client is on another machine\n", headers=headers)

    def _accept(
        self, request: HttpRequest, address: _Address, stream: HttpStream | None, early: bytes = b""
    ) -> _Upgrade | HttpResponse:
        """Admit a new client (a WebSocket, or a plugin's stream), or the HTTP answer that refuses it."""
        refusal = self._admit(request, address)
        if refusal is not None:
            status, reason = refusal
            return HttpResponse(status, f"{status} {reason}\n".encode(), headers=_RETRY if status != 403 else ())
        auth = self._authenticate(request)
        if auth.refuse:
            log.info("refused a client from %s: %s", request.ip, auth.reason)
            return HttpResponse(auth.refuse, f"{auth.refuse} {auth.reason}\n".encode())
        remote = request.remote if request.ip == request.remote.rsplit(":", 1)[0] else request.ip
        if stream is not None:
            return _Upgrade("", None, auth.user_id, remote, b"", stream)
        return _Upgrade(request.headers["sec-websocket-key"], auth.subprotocol, auth.user_id, remote, early)

    def _admit(self, request: HttpRequest, address: _Address) -> tuple[int, str] | None:
        """Whether a WebSocket may open: (status, reason) to refuse it, or None. Cheap checks first."""
        s = self.settings
        relay = self.relay
        if relay.draining or len(relay._clients) >= s.max_connections:
            return 503, "relay draining, try again" if relay.draining else "relay at capacity, try again"
        if s.allowed_origins and request.headers.get("origin") not in s.allowed_origins:
            return 403, "origin not allowed"
        if not address.connects.take(1, s.connect_rate_per_ip, s.connect_burst_per_ip, trio.current_time()):
            return 429, "too many new connections from your address: slow down"
        return None

    def _authenticate(self, request: HttpRequest) -> Auth:
        """Ask the auth hooks. Fails closed: a hook that raises, or answers with something that is not
        an ``Auth``, refuses the connection (401, logged); no answer at all accepts it."""
        auth = call_hooks(self.relay.hook, "relay_authenticate", request=request, on_error=_AUTH_FAILED)
        if auth is None:
            return _NO_AUTH
        if not isinstance(auth, Auth):
            log.error("an auth plugin answered %r, not an Auth: refusing", type(auth).__name__)
            return _AUTH_FAILED
        return auth

    def _answer_http(self, request: HttpRequest) -> HttpResponse | HttpStream:
        """Everything on the port that is not a WebSocket: health, plugins, the static files, 404."""
        method, path = request.method, request.path
        if path == WS_PATH:
            return HttpResponse(426, b"426 this endpoint speaks WebSocket only\n", headers=(("Upgrade", "websocket"),))
        if path == HEALTH_PATH and method in ("GET", "HEAD"):
            stats = self.relay.statistics()
            body = {
                "status": "draining" if stats.draining else "ok",
                "connections": stats.connections,
                "queued": stats.queued,
                "sessions": stats.sessions,
                "uptime_s": stats.uptime_s,
            }
            cluster = getattr(self.relay.backend, "health", None)  # a cluster backend's: "ok" or "degraded"
            if cluster is not None:
                body["cluster"] = cluster
            return HttpResponse(503 if stats.draining else 200, _dumps(body), "application/json")
        answer = call_hooks(self.relay.hook, "relay_http_request", request=request)
        if answer is not None:
            return answer
        static = self.static.get(path)
        if static is None and path != HEALTH_PATH:
            return HttpResponse(404, b"404 not found\n")
        if method not in ("GET", "HEAD") or static is None:
            return HttpResponse(405, b"405 method not allowed\n", headers=(("Allow", "GET, HEAD"),))
        body, content_type, etag = static
        headers = (("ETag", etag), *(_HTML_HEADERS if content_type.startswith("text/html") else ()))
        if request.headers.get("if-none-match") == etag:
            return HttpResponse(304, b"", content_type, headers, cache="no-cache")
        return HttpResponse(200, body, content_type, headers, cache="no-cache")


class Relay:
    """The server: owns the listener, the matchmaker and every client. See the module docstring."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        plugin_manager: pluggy.PluginManager | None = None,
        rng: random.Random | None = None,
        options: argparse.Namespace | None = None,
    ) -> None:
        self.settings = settings = settings if settings is not None else Settings()
        #: The parsed command line (plugins read their flags here); empty when built without one.
        self.options = options if options is not None else argparse.Namespace()
        #: Plugins count their own events here (``relay.counters["sessions_dropped"] += 1``);
        #: ``statistics()`` and the metrics plugin report them.
        self.counters: collections.Counter[str] = collections.Counter()
        self.pm = plugin_manager if plugin_manager is not None else make_plugin_manager(settings.plugins)
        self.hook = self.pm.hook
        #: Where matchmaking moves are decided: this process's ``Matchmaker``, unless a plugin's
        #: ``relay_backend`` gives another (``configure()`` asks).
        self.backend: Backend = Matchmaker(
            clock=trio.current_time,
            rng=rng if rng is not None else random.Random(),
            interest_timeout=settings.interest_timeout,
            rematch_cooldown=settings.rematch_cooldown,
        )
        self.port: int | None = None  # the bound port, once listening
        self.draining = False  # refusing new clients (drain() or shutdown())
        self.stopping = False  # shutdown() was called: serve() returns once every client is gone
        self._configured = False
        self._clients: dict[str, _Client] = {}
        #: Peers of this node's clients that are clients of other nodes (a cluster backend keeps it).
        self.remote_peers: dict[str, RemotePeer] = {}
        #: A client's mailbox, made for its id (a cluster backend journals what its mailboxes keep).
        self.new_mailbox: Callable[[str], Mailbox] = lambda _client_id: Mailbox(
            settings.resume_buffer_messages, settings.resume_buffer_bytes
        )
        self._away: dict[str, _Client] = {}  # vanished clients that may resume, oldest first
        self._user_joins: dict[str, _Bucket] = {}  # per user id (under auth): joins and nexts per minute
        self._started = 0.0
        self._connections_total = self._matches = self._signals = self._closed_slow = self._resumed = 0  # statistics()
        self._ended: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._port = _Port(self)  # every connection's way in
        self._drain_requested = trio.Event()
        self._stopped = trio.Event()
        self._too_many = f"more than {settings.message_rate:g} messages a second: slow down"
        self._too_much = f"more than {settings.bytes_per_second_per_ip} bytes a second from your address: slow down"
        self._handlers: dict[str, Callable[[_Client, dict[str, Any]], None]] = {  # every type but "signal"
            kind: getattr(self, "_on_" + kind) for kind in CLIENT_TYPES - {"signal"}
        }

    # -- public API -------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until ``shutdown()`` has drained every client.

        Reports the bound port through ``task_status.started()`` once listening. Raises what a
        plugin's ``relay_configure`` raises (``PluginError``: it refuses to start).
        """
        s = self.settings
        self.configure()
        port = self._port
        port.max_sockets = _socket_cap(s.max_sockets)
        async with trio.open_nursery() as nursery:
            run_backend = getattr(self.backend, "run", None)
            if run_backend is not None:  # connects, checks (PluginError: no start), then serves
                await nursery.start(run_backend, self)
            listeners = _listen(s.host, s.port, reuse_port=s.workers > 1)
            self.port = listeners[0].getsockname()[1]
            self._started = trio.current_time()
            port.nursery = nursery
            call_hooks(self.hook, "relay_startup", relay=self, nursery=nursery)
            nursery.start_soon(self._tick_loop)
            nursery.start_soon(self._heartbeat_loop)
            nursery.start_soon(self._position_loop)
            nursery.start_soon(self._drain_deadline)
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, port.serve, nursery)
            log.info("relay listening on %s:%d (at most %d connections at once)", s.host, self.port, port.max_sockets)
            task_status.started(self.port)
            await self._stopped.wait()
            finishers = call_hooks(self.hook, "relay_shutdown", relay=self)
            with trio.move_on_after(SHUTDOWN_TIMEOUT):
                async with trio.open_nursery() as finishing:
                    for finish in finishers:
                        finishing.start_soon(_finish_plugin, finish)
            nursery.cancel_scope.cancel()
        log.info("relay stopped")

    def configure(self) -> None:
        """Let plugins configure themselves (``relay_configure``), once. ``serve()`` calls it if
        nobody did; raises ``PluginError`` if a plugin refuses to start."""
        if not self._configured:
            self._configured = True
            self.hook.relay_configure(relay=self)
            check_plugins(self.pm)  # again: plugins register objects of their own in relay_configure
            backend = self.hook.relay_backend(relay=self)
            if backend is not None:
                self.backend = backend
            if self.settings.workers > 1 and isinstance(self.backend, Matchmaker):
                raise StartupError(
                    "--workers needs a queue the workers share: --redis-url (pip install 'roulette-relay[cluster]')"
                )
            log.info("plugins: %s", "; ".join(describe_plugins(self.pm)) or "none")

    def drain(self, deadline_s: float | None = None) -> None:
        """Stop taking clients: ``/healthz`` answers 503, new WebSockets are refused, every client
        gets a ``draining`` note, idle and queued ones are closed (1012) so they reconnect elsewhere.
        Sessions go on; a client is closed when its session ends. ``undrain()`` takes clients again.
        With a backend that hands clients over to other nodes (``hands_over``: a cluster's), every
        client is closed at once and stays away, to resume on another node, sessions and all.
        """
        if self.draining:
            return
        self.draining = True
        log.info("draining %d clients", len(self._clients))
        note = _msg_draining(deadline_s)
        hands_over = getattr(self.backend, "hands_over", False)
        if not hands_over:
            for c in list(self._away.values()):  # cannot resume here any more
                self._detach(c)
        for c in list(self._clients.values()):
            self._send(c, note)
            if c.peer is None or hands_over:
                self.close_client(c, CLOSE_RESTART, "server restarting")

    def undrain(self) -> None:
        """Take clients again after ``drain()`` (not after ``shutdown()``)."""
        if not self.stopping:
            self.draining = False
            log.info("taking clients again")

    def shutdown(self) -> None:
        """Drain, give sessions ``--drain-seconds`` to end, close the rest (1012); then ``serve()``
        lets plugins finish and returns."""
        if self.stopping:
            return
        self.stopping = True
        self.draining = False  # so that drain() below sends the shutdown's deadline
        self.drain(self.settings.drain_seconds)
        self._drain_requested.set()
        self._check_drained()

    @property
    def clients(self) -> Mapping[str, _Client]:
        """This node's clients by id, away ones too (for a backend to read: the relay changes it)."""
        return self._clients

    @property
    def away(self) -> Mapping[str, _Client]:
        """Of those, the ones away (their connection vanished: they may resume), oldest first."""
        return self._away

    def kick(self, client_id: str, reason: str = "kicked by an operator") -> bool:
        """Close a client (1008); its peer gets ``peer_left``. False if no such client."""
        c = self._clients.get(client_id)
        if c is None:
            return False
        log.info("client %s: kicked", client_id)
        self.close_client(c, CLOSE_POLICY, reason)
        return True

    def statistics(self) -> RelayStatistics:
        mm = self.backend
        return RelayStatistics(
            connections=len(self._clients) - len(self._away),
            sockets=self._port.sockets,
            queued=mm.queue_size,
            queued_with_interests=mm.queued_with_interests,
            sessions=mm.session_count,
            uptime_s=round(trio.current_time() - self._started, 3),
            draining=self.draining,
            connections_total=self._connections_total,
            matches_total=self._matches,
            signals_relayed=self._signals,
            sessions_ended=dict(self._ended),
            errors=dict(self._errors),
            closed_slow=self._closed_slow,
            away=len(self._away),
            resumed=self._resumed,
            counters=dict(self.counters),
        )

    # -- clients: attached, away, gone -------------------------------------------------------------

    def _attach(self, c: _Client) -> None:
        self._clients[c.id] = c
        self._connections_total += 1
        self.backend.connect(c.id, identity=c.user_id)
        log.debug("client %s connected from %s%s", c.id, c.remote, f" as {c.user_id}" if c.user_id else "")
        call_hooks(self.hook, "relay_client_connected", client_id=c.id, remote=c.remote, user_id=c.user_id)
        self._send(c, _msg_welcome(c.id, c.token))

    def _connection_lost(self, c: _Client, transport: _Transport) -> None:
        """The connection ended. A client that vanished (no close frame, no pong) may come back:
        it keeps its place or session for ``--resume-grace``. Any other end is final."""
        if c.phase is GONE or self._clients.get(c.id) is not c:
            return  # already detached (kicked, expired), or its id went on (resumed)
        closing = c.phase is CLOSING
        vanished = transport.close_received is None and not closing
        hands_over = self.draining and getattr(self.backend, "hands_over", False)  # it resumes on another node
        resumable_close = c.close_code == CLOSE_HEARTBEAT or (hands_over and c.close_code == CLOSE_RESTART)
        if (
            (vanished or (closing and resumable_close))
            and self.settings.resume_grace > 0
            and (not self.draining or hands_over)
        ):
            self._suspend(c)
        else:
            self._detach(c, transport.close_received or (c.close_code if closing else None))

    def _suspend(self, c: _Client) -> None:
        s = self.settings
        c.move(AWAY)
        c.away_since = trio.current_time()
        c.mailbox.go_away()
        self._away[c.id] = c
        self.backend.hold(c.id)
        log.debug("client %s: connection lost; it may resume within %.0f s", c.id, s.resume_grace)
        if c.peer is not None and c.session is not None:
            self._send(c.peer, _msg_peer("peer_reconnecting", c.session.id))

    def _detach(self, c: _Client, code: int | None = None) -> None:
        """Forget the client: its session ends, plugins hear of it. ``code``: the close code (None if
        the connection just dropped)."""
        if self._clients.get(c.id) is not c:
            return
        c.move(GONE)
        del self._clients[c.id]
        self._away.pop(c.id, None)
        self.apply(self.backend.disconnect(c.id))
        duration = trio.current_time() - c.connected_at
        log.debug("client %s disconnected (code %s, %.1f s)", c.id, code, duration)
        call_hooks(self.hook, "relay_client_disconnected", client_id=c.id, code=code, duration=duration)
        self._check_drained()

    def _message(self, c: _Client, text: bytes) -> None:
        """One text message: parse it and act on it."""
        try:
            msg = parse_message(text)
            kind = msg["type"]
            if kind == "signal":
                peer = c.peer
                if peer is None:
                    raise ProtocolError("not_matched", "no peer to signal: wait for matched")
                mailbox = peer.mailbox
                if mailbox is None:  # a RemotePeer: its own node numbers and delivers it (as it is: no JSON there)
                    if len(msg) != 2 or text[0] != 0x7B:
                        text = _dumps({"type": "signal", "data": msg["data"]})
                    peer.forward(peer.id, SIGNAL, text)
                else:  # as deliver_signal does (inline: this is the hot path)
                    out = relayed_signal(text, msg, mailbox)
                    if not mailbox.keep(mailbox.count, out):
                        self._overflow(peer)
                    elif peer.phase is ACTIVE or peer.phase is NEW:  # away, the mailbox has it for the resume
                        if not peer.transport.send_text(out):
                            self._too_slow(peer)
                self._signals += 1
            else:
                self._handlers[kind](c, msg)
        except ProtocolError as exc:
            self.send_error(c, exc.code, exc.message)

    def deliver_signal(self, peer: _Client, text: bytes, msg: dict[str, Any] | None = None) -> None:
        """Relay a signal (``text``, parsed: ``msg``) to ``peer``: numbered, kept in its mailbox and
        written, or (away) kept for its resume. From this node's clients, or from another node's:
        without ``msg``, ``text`` is a JSON object of ``type`` and ``data`` only, as ``RemotePeer``
        gets it (the number goes in front, unparsed)."""
        if msg is None:
            out = b'{"n":%d,%b' % (peer.mailbox.number(), text[1:])
        else:
            out = relayed_signal(text, msg, peer.mailbox)
        if not peer.mailbox.keep(peer.mailbox.count, out):
            self._overflow(peer)
        elif peer.phase is ACTIVE or peer.phase is NEW:  # away, the mailbox has it for the resume
            if not peer.transport.send_text(out):
                self._too_slow(peer)

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """Hold writes while a batch of messages from another node is delivered, then send each
        connection's in one ``writev``, as the relay does for the messages of one read."""
        cork = self._port.cork
        cork.on = True
        try:
            yield
        finally:
            cork.release()

    def deliver_text(self, c: _Client, text: bytes) -> None:
        """Send ``c`` a message that another node has for it (as it is: JSON text)."""
        self._send(c, text)

    def _refused(self, c: _Client, now: float, why: str) -> None:
        """A message over a rate limit: an error, or, for a client that keeps flooding, the end."""
        s = self.settings
        if now - c.flood_start > FLOOD_WINDOW:
            c.flood_start, c.floods = now, 0
        c.floods += 1
        if c.floods >= s.flood_limit:
            log.info("client %s: flooding, closing", c.id)
            self.close_client(c, CLOSE_POLICY, "flooding: too many messages")
        else:
            self.send_error(c, "rate_limited", why)

    # -- message handlers (synchronous: they only decide and enqueue) -----------------------------

    def _take_join(self, c: _Client) -> None:
        """joins and nexts: at most so many a minute per connection, per IP address and per user (the
        last two across reconnects), so that nobody cycles through the whole queue. All or nothing."""
        s = self.settings
        if c.joins is None:
            c.joins = _Bucket(s.joins_per_minute, trio.current_time())
        budgets = [
            (c.joins, s.joins_per_minute, ""),
            (c.address.joins, s.joins_per_minute_per_ip, " from your address"),
        ]
        if c.user_id is not None:
            user = self._user_joins.get(c.user_id)
            if user is None:
                user = self._user_joins[c.user_id] = _Bucket(s.joins_per_minute_per_user, trio.current_time())
            budgets.append((user, s.joins_per_minute_per_user, " for your account"))
        now = trio.current_time()
        for bucket, per_minute, whose in budgets:
            if bucket.level(per_minute / 60, per_minute, now) < 1:
                raise ProtocolError("rate_limited", f"more than {per_minute} joins or nexts a minute{whose}: wait")
        for bucket, _, _ in budgets:
            bucket.tokens -= 1

    def _on_join(self, c: _Client, msg: dict[str, Any]) -> None:
        if self._refuse_while_draining(c):
            return
        self._take_join(c)
        mm = self.backend
        self.apply(mm.tick())
        self.apply(mm.join(c.id, msg["interests"]))

    def _on_next(self, c: _Client, msg: dict[str, Any]) -> None:
        if self._refuse_while_draining(c):
            return
        self._take_join(c)
        mm = self.backend
        self.apply(mm.tick())
        self.apply(mm.next(c.id))

    def _on_leave(self, c: _Client, msg: dict[str, Any]) -> None:
        self._send(c, _LEFT)
        self.apply(self.backend.leave(c.id))
        if self.draining:
            self.close_client(c, CLOSE_RESTART, "server restarting")

    def _on_ping(self, c: _Client, msg: dict[str, Any]) -> None:
        self._send(c, _PONG)

    def _on_report(self, c: _Client, msg: dict[str, Any]) -> None:
        session = c.session
        if session is None:
            raise IllegalMove("not_matched", "no session to report")
        decisions = self.backend.report(c.id)
        reported = session.peer_of(c.id)
        log.info("client %s reported %s", c.id, reported)
        self._send(c, _REPORTED)
        self.apply(decisions)
        users = self._users(session)
        call_hooks(
            self.hook,
            "relay_report",
            session=session,
            reporter=c.id,
            reported=reported,
            reason=msg["reason"],
            users=users,
        )

    def _on_resume(self, c: _Client, msg: dict[str, Any]) -> None:
        """Take back client ``x``: this connection's client takes its id, place or session and
        mailbox (what was sent meanwhile); its own, unused identity ends quietly. ``x`` is away, or
        still connected (a connection that died without the relay noticing yet, or a client moving
        to another transport): then that connection is closed (``CLOSE_RESUMED``)."""
        cid, _, secret = msg["token"].partition(".")
        if c.phase is not NEW:
            raise ProtocolError("resume_failed", "resume is the first message of a connection: join again")
        resume_elsewhere = getattr(self.backend, "resume_elsewhere", None)
        if cid not in self._clients and resume_elsewhere is not None and resume_elsewhere(c, cid, secret, msg["last"]):
            return  # held by another node: its backend asks for it, then calls take_back
        if not self.resume_here(c, cid, secret, msg["last"]):
            raise ProtocolError("resume_failed", "cannot resume (too late, or not yours): join again")

    def resume_here(self, c: _Client, client_id: str, secret: str, last: int) -> bool:
        """``c`` (a new connection) resumes client ``client_id``, which this node holds: True, or
        False if the token is not its."""
        x = self.release_client(client_id, secret, c.user_id) if client_id != c.id else None
        if x is None:
            return False
        self.take_back(c, x, last)
        return True

    def release_client(self, client_id: str, secret: str, user_id: str | None) -> _Client | None:
        """Client ``client_id`` if ``secret`` is its resume token's and ``user_id`` its user, no longer
        this node's: its connection, if any, is closed (``CLOSE_RESUMED``); it goes on where it resumes
        (``take_back``, here or, through a cluster backend, on another node). Else None."""
        x = self._clients.get(client_id)
        if (
            x is None
            or x.phase is CLOSING
            or not hmac.compare_digest(
                x.secret.encode(), ("#" + secret_digest(secret) if x.secret[0] == "#" else secret).encode()
            )
            or x.user_id != user_id
        ):
            return None
        if x.phase is not AWAY:
            x.was_away = False
            self.close_client(x, CLOSE_RESUMED, "resumed on another connection")
        else:
            x.was_away = True
        return x

    def hand_off(self, x: _Client) -> None:
        """Client ``x`` (from ``release_client``) goes on on another node: this one forgets it
        without a move or a hook (its new node's backend tells the cluster)."""
        del self._clients[x.id]
        self._away.pop(x.id, None)
        x.move(GONE)

    def rebuilt_client(self, c: _Client, client_id: str, user_id: str | None, connected_at: float) -> _Client:
        """Client ``client_id`` that another node held, rebuilt (away, with an empty mailbox: the
        backend fills it in) for ``c``, the new connection that resumes it, to ``take_back``."""
        x = _Client(c.transport, c.remote, c.address, user_id, connected_at, self.settings, self.new_mailbox, client_id)
        x.move(AWAY)
        return x

    def adopted_client(self, client_id: str, user_id: str | None, connected_at: float, digest: str) -> _Client:
        """Client ``client_id`` of a node that died, served by this one from now on (a cluster
        backend rebuilt it from that node's journal and fills its mailbox, session and peer in):
        away, for a resume within ``--resume-grace`` from now, by the token whose secret has
        ``secret_digest`` ``digest``."""
        now, port = trio.current_time(), self._port
        transport = _Transport(-1, 0, 0, port.nursery, port.cork)  # (no socket: nothing is written)
        s = self.settings
        x = _Client(transport, "", _Address(s, now), user_id, connected_at, s, self.new_mailbox, client_id)
        x.secret = "#" + digest
        x.move(AWAY)
        x.away_since = now
        x.mailbox.go_away()
        self._clients[x.id] = self._away[x.id] = x
        return x

    def take_back(self, c: _Client, x: _Client, last: int, secret: str = "") -> None:
        """The new connection's client ``c`` becomes ``x`` (from ``release_client``: here, or rebuilt
        from another node's) and gets what it missed after signal ``last``. If ``c``'s connection
        vanished meanwhile (a cluster fetched ``x`` from another node), ``x`` waits here, away, for
        a resume with the same token (``secret``: the client never saw a new one)."""
        was_away = x.was_away
        self._take_over(c, x)
        mm = self.backend
        if c.phase is AWAY:
            c.secret = secret or c.secret
            if c.peer is not None and c.session is not None and not was_away:
                self._send(c.peer, _msg_peer("peer_reconnecting", c.session.id))
            mm.hold(c.id)
            return
        missed, complete = c.mailbox.resume(last)
        session = c.session
        if not complete and session is not None:  # some fell out: rather than a silent gap, the session ends
            log.info("client %s: missed more than was kept, ending its session", c.id)
            missed.append(_msg_peer_left(session.id, "overflow"))
            self.end_session(c, "overflow")
            session = None
        if session is not None:
            details = {"session_id": session.id, "peer_id": session.peer_of(c.id)}
        elif mm.state(c.id) == "queued":
            details = {"position": mm.position_of(c.id), "queue_size": mm.queue_size}
        else:
            details = {}
        self._send(c, _msg_resumed(c.id, c.token, mm.state(c.id), **details))
        for out in missed:  # the signals it missed, in their order, then what else came meanwhile
            self._send(c, out)
        if c.peer is not None and session is not None and was_away:
            self._send(c.peer, _msg_peer("peer_resumed", session.id))
        self.apply(mm.release(c.id))

    def _take_over(self, c: _Client, x: _Client) -> None:
        """``c`` becomes client ``x`` (away, or being closed): its id, user, peer, place and mailbox.
        If ``c`` is away itself, ``x`` stays away, under its own id, for the rest of ``c``'s grace."""
        self._away.pop(x.id, None)
        away = self._away.pop(c.id, None) is not None
        del self._clients[c.id]
        self.backend.disconnect(c.id)  # the provisional client never did anything
        call_hooks(self.hook, "relay_client_disconnected", client_id=c.id, code=None, duration=0.0)
        x.move(GONE)
        c.id, c.user_id, c.peer, c.position, c.mailbox = x.id, x.user_id, x.peer, x.position, x.mailbox
        c.session = x.session
        c.connected_at, c.joins = x.connected_at, x.joins
        c.secret = secrets.token_urlsafe(16)  # a token is good once
        if c.peer is not None:
            c.peer.peer = c
        self._clients[c.id] = c
        if away:
            self._away[c.id] = c
            if not c.mailbox.away:
                c.mailbox.go_away()
        self._resumed += 1
        log.debug("client %s resumed from %s", c.id, c.remote)

    def _users(self, session: Session) -> dict[str, str | None]:
        users = {}
        for cid in (session.initiator, session.answerer):
            c = self._clients.get(cid) or self.remote_peers.get(cid)
            users[cid] = c.user_id if c is not None else None
        return users

    def _refuse_while_draining(self, c: _Client) -> bool:
        """While draining nobody is (re)queued: the client leaves and is closed (1012)."""
        if not self.draining:
            return False
        self.apply(self.backend.leave(c.id, "next"))
        self.close_client(c, CLOSE_RESTART, "server restarting")
        return True

    def apply(self, decisions: list[Decision], *, decided_here: bool = True) -> None:
        """Carry out the backend's decisions: tell this node's clients, update peers and, where they
        were decided (``decided_here``: once in a cluster), call the hooks. A side that is another
        node's client is a ``RemotePeer``: its node is told and tells it."""
        clients = self._clients
        for d in decisions:
            if type(d) is Queued:
                c = clients.get(d.client_id)
                if c is not None:
                    c.position = d.position
                    self._send(c, _msg_queued(d.position, d.queue_size))
            elif type(d) is Paired:
                s = d.session
                a = clients.get(s.initiator) or self.remote_peers[s.initiator]
                b = clients.get(s.answerer) or self.remote_peers[s.answerer]
                a.peer, b.peer = b, a
                a.session = b.session = s
                self._matches += decided_here
                # Both get matched before this returns, so the initiator's offer cannot overtake it.
                for c in (a, b):
                    if c.__class__ is _Client:
                        ice = call_hooks(self.hook, "relay_ice_servers", session=s, client_id=c.id)
                        self._send(c, _msg_matched(s, c.id, list(self.settings.ice_servers) if ice is None else ice))
                if decided_here:
                    users = {s.initiator: a.user_id, s.answerer: b.user_id}
                    call_hooks(self.hook, "relay_matched", session=s, users=users)
            elif type(d) is Ended:
                self._session_ended(d, decided_here)

    def _session_ended(self, d: Ended, decided_here: bool) -> None:
        """A session ended: its peers are free, the one left behind is told (and, draining, closed)."""
        s = d.session
        users = self._users(s)
        notify = self._clients.get(d.notify)
        told = notify is not None and notify.session is not None and notify.session.id == s.id
        for cid in (s.initiator, s.answerer):
            c = self._clients.get(cid) or self.remote_peers.get(cid)
            if c is not None and c.session is not None and c.session.id == s.id:
                c.peer = c.session = None
        if told:  # (not twice: a cluster node that ended it alone while Redis was away told it then)
            # The reported side is not told it was reported: for it, the peer left.
            self._send(notify, _msg_peer_left(s.id, "left" if d.reason == "reported" else d.reason))
            if self.draining:
                self.close_client(notify, CLOSE_RESTART, "server restarting")
        if decided_here:
            self._ended[d.reason] = self._ended.get(d.reason, 0) + 1
            duration = trio.current_time() - s.started_at
            call_hooks(
                self.hook, "relay_session_ended", session=s, reason=d.reason, ended_by=d.by, duration=duration,
                users=users,
            )  # fmt: skip

    # -- sending and closing ----------------------------------------------------------------------

    def _send(self, c: _Client, text: bytes) -> None:
        """Write a message to ``c`` now (never waits): into its socket, or, away, into its mailbox.
        A client that cannot keep up is closed; one away that cannot, loses its session."""
        phase = c.phase
        if phase is AWAY:
            if not c.mailbox.hold(text):
                self._overflow(c)
        elif phase is not CLOSING and phase is not GONE and not c.transport.send_text(text):
            self._too_slow(c)

    def _too_slow(self, c: _Client) -> None:
        self._closed_slow += 1
        log.info("client %s: send buffer full, closing", c.id)
        self.close_client(c, CLOSE_TOO_SLOW, "too slow: send buffer full")

    def _overflow(self, c: _Client) -> None:
        """More was sent to an away client than its mailbox keeps: rather than lose messages
        silently, its session ends ("overflow"); when it resumes, it learns just that."""
        session = c.session
        if session is None:
            return  # nothing but a finished session's messages could pile up: drop this one
        log.info("client %s: too much waiting while it is away, ending its session", c.id)
        c.mailbox.replace_held(_msg_peer_left(session.id, "overflow"))
        self.end_session(c, "overflow")

    def end_session(self, c: _Client, reason: str) -> None:
        """End ``c``'s session for the relay's own reasons. Over at once for ``c``, even where the
        backend decides later (a cluster's): one move, not one per message that still comes."""
        self.apply(self.backend.leave(c.id, reason))
        c.session = c.peer = None

    def send_error(self, c: _Client, code: str, message: str) -> None:
        self._errors[code] = self._errors.get(code, 0) + 1
        self._send(c, _msg_error(code, message))

    def close_client(self, c: _Client, code: int, reason: str) -> None:
        """Close ``c`` with ``code`` after what was sent to it so far; nothing more is sent.

        Its read loop stops at once; its own task then detaches it and closes the WebSocket.
        """
        if c.phase is AWAY:  # no connection to close: it ends now
            self._detach(c)
        elif c.phase is NEW or c.phase is ACTIVE:
            c.move(CLOSING)
            c.close_code, c.close_reason = code, reason
            c.transport.interrupt()

    # -- background tasks -------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        """Ping clients quiet for ``heartbeat_interval``; close (1001) those still quiet
        ``heartbeat_timeout`` after the ping. Any bytes received count as life."""
        s = self.settings
        while True:
            await trio.sleep(min(s.heartbeat_interval, s.heartbeat_timeout) / 2)
            now = trio.current_time()
            for c in list(self._clients.values()):
                if c.phase is AWAY:
                    continue
                received = c.transport.received
                if received != c.seen:
                    c.seen, c.quiet_since, c.pinged_at = received, now, None
                elif c.pinged_at is None:
                    if now - c.quiet_since >= s.heartbeat_interval:
                        c.pinged_at = now
                        if not c.transport.send_ping():
                            self._too_slow(c)
                elif now - c.pinged_at >= s.heartbeat_timeout:
                    log.info("client %s: no pong in %.0f s", c.id, now - c.pinged_at)
                    self.close_client(c, CLOSE_HEARTBEAT, "heartbeat timeout")

    async def _tick_loop(self) -> None:
        """Expire interest timeouts on time even when nobody joins; end vanished clients whose grace
        is over; now and then forget idle IP addresses."""
        swept = trio.current_time()
        while True:
            await trio.sleep(TICK_INTERVAL)
            now = trio.current_time()
            self.apply(self.backend.tick())
            while self._away:
                c = next(iter(self._away.values()))  # the oldest: the grace is the same for all
                if now - c.away_since < self.settings.resume_grace:
                    break
                log.debug("client %s: did not come back in time", c.id)
                self._detach(c)
            if now - swept >= SWEEP_INTERVAL:
                swept = now
                self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Forget the addresses and users with nothing open and nothing spent: the tables stay as
        small as the traffic of the last minute."""
        s = self.settings
        self._port.sweep(now)
        per_minute = s.joins_per_minute_per_user
        for user, bucket in list(self._user_joins.items()):
            if bucket.level(per_minute / 60, per_minute, now) >= per_minute:
                del self._user_joins[user]

    async def _position_loop(self) -> None:
        """Push changed queue positions, at most one message per client per interval."""
        mm = self.backend
        while True:
            await trio.sleep(POSITION_INTERVAL)
            if not mm.queue_changed:
                continue
            mm.queue_changed = False
            size = mm.queue_size
            clients = self._clients
            for cid, position in mm.positions():
                c = clients[cid]
                if c.position != position:
                    c.position = position
                    if c.phase is not AWAY:
                        self._send(c, _msg_queued(position, size))

    async def _drain_deadline(self) -> None:
        """Once ``shutdown()`` was called: close whoever is left after ``drain_seconds``."""
        await self._drain_requested.wait()
        await trio.sleep(self.settings.drain_seconds)
        for c in list(self._clients.values()):
            self.close_client(c, CLOSE_RESTART, "server restarting")
        await trio.sleep(CLOSE_TIMEOUT + 1.0)
        self._stopped.set()

    def _check_drained(self) -> None:
        if self.stopping and not self._port.websockets:
            self._stopped.set()


########################################################################################################
# Settings and the command line
########################################################################################################
def setting(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    parse: Callable[[str], Any] | None = None,
    check: Callable[[Any], str | None] | None = None,
    flag: str = "",
    env: str | None = "",
    many: bool = False,
    choices: tuple[str, ...] = (),
    fly: Any = None,
) -> Any:
    """A field of ``Settings`` and everything about it, in one place: its default and help, its
    flag (``--name-with-dashes`` unless ``flag`` says), its environment variable (``RELAY_NAME``
    unless ``env`` says; None for none), how a string becomes its value (``parse``, else the
    default's type), its bounds (``low``, ``high``, ``choices``, ``check``: an error message or
    None) and, for ``many``, that the flag repeats (and the variable is a comma-separated list);
    ``fly``: the default on Fly.io. The command line, its help and the README's table are made from
    these; the bounds are checked whenever a ``Settings`` is made."""
    return attrs.field(
        default=default,
        validator=_check_setting,
        metadata={
            "help": help, "low": low, "high": high, "parse": parse, "check": check, "flag": flag, "env": env,
            "many": many, "choices": choices, "fly": fly,
        },
    )  # fmt: skip


def flag_of(field: attrs.Attribute) -> str:
    return "--" + (field.metadata["flag"] or field.name.replace("_", "-"))


def _parse_of(field: attrs.Attribute) -> Callable[[str], Any]:
    """How a string (one, for a repeatable setting) becomes the setting's value."""
    return field.metadata["parse"] or (str if field.metadata["many"] else type(field.default))


def env_of(field: attrs.Attribute) -> str | None:
    env = field.metadata["env"]
    return None if env is None else env or "RELAY_" + field.name.upper()


def _check_setting(instance: Any, field: attrs.Attribute, value: Any) -> None:
    m = field.metadata
    for item in value if m["many"] else (value,):
        why = None
        if m["low"] is not None and item < m["low"]:
            why = f"at least {m['low']:g}"
        elif m["high"] is not None and item > m["high"]:
            why = f"at most {m['high']:g}"
        elif m["choices"] and item not in m["choices"]:
            why = "one of " + ", ".join(m["choices"])
        elif m["check"] is not None and (problem := m["check"](item)) is not None:
            raise SettingError(f"{flag_of(field)} {item!r}: {problem}")
        if why is not None:
            raise SettingError(f"{flag_of(field)} must be {why}, not {item!r}")


def _network(value: str) -> str:
    """One ``--trusted-proxy``: an IP network (``10.0.0.0/8``) or address."""
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(f"not an IP network or address: {value!r}") from None


def _ice_server(value: str) -> dict[str, Any]:
    """One ``--ice-server``: a URL (``stun:host:3478``) or a JSON RTCIceServer object."""
    if value.lstrip().startswith("{"):
        server = json.loads(value)
        if not isinstance(server, dict) or "urls" not in server:
            raise ValueError("an ICE server object needs 'urls'")
        return server
    if not value.startswith(("stun:", "stuns:", "turn:", "turns:")):
        raise ValueError("an ICE server URL starts with stun:, stuns:, turn: or turns:")
    return {"urls": value}


def _host_problem(host: str) -> str | None:
    if host in ("", "localhost") or re.fullmatch(r"[0-9a-fA-F:.]*:[0-9a-fA-F:.]*", host):  # IPv6 is checked below
        pass
    elif re.fullmatch(r"[0-9.]+", host) or not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return "not an IP address or a host name"
        return None
    if ":" in host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return "not an IP address"
    return None


def _origin_problem(origin: str) -> str | None:
    if origin == "null" or re.fullmatch(
        r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9a-fA-F:.]+\](:[0-9]{1,5})?", origin
    ):
        return None
    return "an origin is scheme://host[:port], e.g. https://chat.example.com (no path, no slash at the end)"


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _directory_problem(path: str) -> str | None:
    return None if not path or Path(path).is_dir() else "no such directory"


@attrs.frozen
class Settings:
    """Every tunable of the relay, each declared once (``setting``): ``main()`` makes the command
    line from these fields and fills them from it and the environment; a bound is checked whenever a
    ``Settings`` is made (``SettingError``)."""

    host: str = setting(DEFAULT_HOST, "listen address", check=_host_problem, env="HOST")
    port: int = setting(DEFAULT_PORT, "listen port (0: any free one)", low=0, high=65535, env="PORT")
    interest_timeout: float = setting(10.0, "seconds a client with interests waits for someone sharing one", low=0)
    rematch_cooldown: float = setting(30.0, "seconds before two former peers are paired again while others wait", low=0)
    max_message_bytes: int = setting(64 * 1024, "largest message accepted; larger closes with 1009", low=16)
    message_rate: float = setting(
        50.0, "messages (WebSocket pings too) per second a client may send, sustained", low=0.01
    )
    message_burst: int = setting(200, "messages a client may send in a burst", low=1)
    max_connections: int = setting(10_000, "WebSocket clients at once; more get 503", low=1)
    send_buffer_bytes: int = setting(
        256 * 1024, "bytes held for a client that reads slowly before it is closed (1013)", low=1
    )
    heartbeat_interval: float = setting(20.0, "seconds a client may be quiet before it is pinged", low=0.01)
    heartbeat_timeout: float = setting(20.0, "seconds to wait for the pong before closing (1001)", low=0.01)
    handshake_timeout: float = setting(5.0, "seconds allowed for the HTTP request and the WebSocket upgrade", low=0.01)
    drain_seconds: float = setting(30.0, "on SIGTERM, seconds sessions get to finish before the 1012 close", low=0)
    resume_grace: float = setting(
        20.0, "seconds a vanished client keeps its place or session to resume (0: never)", low=0
    )
    resume_buffer_messages: int = setting(64, "signals kept for a vanished client; more end its session", low=1)
    resume_buffer_bytes: int = setting(
        16 * 1024, "bytes of signals kept for a vanished client; more end its session", low=1
    )
    joins_per_minute: int = setting(30, "join and next messages a client may send per minute", low=1)
    joins_per_minute_per_ip: int = setting(
        300, "joins and nexts per minute from one IP address, across reconnects", low=1
    )
    joins_per_minute_per_user: int = setting(
        60, "joins and nexts per minute from one user (under auth), across reconnects", low=1
    )
    bytes_per_second_per_ip: int = setting(
        256 * 1024, "bytes of messages per second from one IP address, sustained", low=1
    )
    bytes_burst_per_ip: int = setting(1024 * 1024, "bytes of messages from one IP address in a burst", low=1)
    flood_limit: int = setting(
        50, f"refused messages within {FLOOD_WINDOW:g} s before a client is closed (1008)", low=1
    )
    max_sockets: int = setting(
        0, "TCP connections open at once, HTTP included (0: the descriptor limit less 64)", low=0
    )
    max_connections_per_ip: int = setting(20, "TCP connections open at once from one IP address; more get 429", low=1)
    connect_rate_per_ip: float = setting(2.0, "new WebSockets per second from one IP address, sustained", low=0.001)
    connect_burst_per_ip: int = setting(20, "new WebSockets from one IP address in a burst", low=1)
    allowed_origins: tuple[str, ...] = setting(
        (), "an Origin a WebSocket may come from, e.g. https://chat.example.com (default: any)",
        flag="allowed-origin", many=True, check=_origin_problem,
    )  # fmt: skip
    trusted_proxies: tuple[str, ...] = setting(
        (), "a proxy network (CIDR) whose --proxy-header is believed (default: none; on Fly.io its private ranges)",
        flag="trusted-proxy", many=True, parse=_network, fly=FLY_PROXIES,
    )  # fmt: skip
    proxy_header: str = setting(
        "x-forwarded-for", "the header a trusted proxy writes the client's address in (fly-client-ip on Fly.io)",
        parse=str.lower, choices=("x-forwarded-for", "fly-client-ip"), fly="fly-client-ip",
    )  # fmt: skip
    proxy_hops: int = setting(1, "with X-Forwarded-For: the entry this far from the right (proxies in a row)", low=1)
    ice_servers: tuple[dict[str, Any], ...] = setting(
        (), "an ICE server for matched: stun:host:port or a JSON RTCIceServer object (default: none)",
        flag="ice-server", many=True, parse=_ice_server, env=None,
    )  # fmt: skip
    static_dir: str = setting(str(STATIC_DIR), "directory served at / ('' for none)", check=_directory_problem)
    workers: int = setting(
        1, "processes serving the port together (SO_REUSEPORT), each a cluster node: needs --redis-url; "
        "auto: one per core", low=1, high=256, parse=lambda text: _cores() if text == "auto" else int(text),
    )  # fmt: skip
    plugins: tuple[str, ...] = setting(
        (), "a plugin to load: a module name, or a .py file (default: the installed ones only)",
        flag="plugin", many=True, env=None,
    )  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (main() prints it), not the whole usage."""

    def error(self, message: str) -> NoReturn:
        raise SettingError(message)


def _convert(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A setting's parser for argparse and the environment, its errors in plain words."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (ValueError, TypeError) as exc:
            if parse is int:
                raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
            if parse is float:
                raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def setting_defaults() -> dict[str, Any]:
    """Each setting's default: its environment variable, else (on Fly.io) its Fly.io default, else
    its declared one. ``SettingError`` for a variable that does not parse."""
    on_fly = os.environ.get("FLY_APP_NAME") is not None
    out = {}
    for field in attrs.fields(Settings):
        m = field.metadata
        value = m["fly"] if on_fly and m["fly"] is not None else field.default
        env = env_of(field)
        if env and os.environ.get(env, "").strip():
            convert = _convert(_parse_of(field))
            raw = os.environ[env]
            try:
                value = tuple(convert(x.strip()) for x in raw.split(",") if x.strip()) if m["many"] else convert(raw)
            except argparse.ArgumentTypeError as exc:
                raise SettingError(f"{env}: {exc}") from None
        out[field.name] = value
    return out


def _parser() -> argparse.ArgumentParser:
    """The command line, made from the declaration of ``Settings``."""
    p = _Parser(
        prog="relay", description="Matchmaking and WebRTC signaling server for random video chat.",
        epilog="Every setting also reads its environment variable (named in its help), e.g. RELAY_MESSAGE_RATE=20.",
    )  # fmt: skip
    p.add_argument("--version", action="version", version=f"relay {__version__}")
    defaults = setting_defaults()
    for field in attrs.fields(Settings):
        m = field.metadata
        env = env_of(field)
        default = defaults[field.name]
        shown = (", ".join(map(str, default)) or "none") if m["many"] else default
        help = m["help"] + (" (repeatable" if m["many"] else " (") + (f"; env {env}" if env else "")
        help = (help + f"; default {shown})").replace("(; ", "(")
        p.add_argument(
            flag_of(field), dest=field.name, type=_convert(_parse_of(field)),
            action="append" if m["many"] else "store", default=None, help=help.replace("%", "%%"),
            metavar=field.name.removesuffix("s").upper() if m["many"] else None,
        )  # fmt: skip
    p.add_argument(
        "--log-level", default=os.environ.get("RELAY_LOG_LEVEL", "INFO").upper(), type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="what the log shows (env RELAY_LOG_LEVEL; default INFO)",
    )  # fmt: skip
    return p


def parse_command_line(argv: list[str], pm: pluggy.PluginManager) -> argparse.Namespace:
    """The relay's flags and every plugin's (``relay_addoption``), parsed."""
    parser = _parser()
    subparsers = parser.add_subparsers(title="commands (from plugins)", metavar="COMMAND")
    pm.hook.relay_addoption(parser=parser, subparsers=subparsers)
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings a command line asked for; each flag not given, its default. ``SettingError``."""
    defaults = setting_defaults()
    values = {}
    for field in attrs.fields(Settings):
        value = getattr(args, field.name, None)
        values[field.name] = (
            defaults[field.name] if value is None else tuple(value) if field.metadata["many"] else value
        )
    return Settings(**values)


async def _run(relay: Relay) -> None:
    """Serve until a signal has drained the relay; a second signal stops it at once."""
    relay.configure()  # a plugin refusing to start raises here, before any task exists
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(task_status: trio.TaskStatus[int]) -> None:
                await relay.serve(task_status=task_status)
                nursery.cancel_scope.cancel()

            await nursery.start(serve_then_stop)
            ready = os.environ.pop(READY_ENV, None)
            if ready is not None:  # a --workers process: tell the supervisor it listens
                os.write(int(ready), b"1")
                os.close(int(ready))
            # Start-up objects never die: keep the cyclic collector off them. And as connections and
            # messages make no reference cycles (tests/test_gc.py), let it run rarely: with Python's
            # thresholds its full passes over every connection's objects took 9 % of the CPU at 500
            # pairs and made the latency's p99.
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                if relay.stopping:
                    nursery.cancel_scope.cancel()
                relay.shutdown()


def _stop_with_parent() -> None:
    """In a --workers process before it runs: SIGTERM (drain) when the supervisor dies, even SIGKILLed."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)


async def _supervise(argv: list[str], workers: int) -> None:
    """``--workers N``: run N relay processes (``python relay.py`` with the same arguments) on the
    port, started one after another, each once the one before listens (a mistake is said once, by
    the first, and stops all); pass SIGTERM and SIGINT on to them and return once all have exited.
    A worker that exits on its own is started again, as another cluster node."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    running: dict[int, subprocess.Popen[bytes]] = {}
    stopping = trio.Event()

    async def exited(proc: subprocess.Popen[bytes]) -> int:
        pidfd = os.pidfd_open(proc.pid)
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        return proc.wait()

    async def forward(signals: Any) -> None:
        async for signum in signals:
            log.info("received %s: passing it on to %d workers", signal.Signals(signum).name, len(running))
            stopping.set()
            for proc in running.values():
                if proc.returncode is None:
                    proc.send_signal(signum)

    async def worker(i: int, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        restarts = 0
        if stopping.is_set():  # stopped before this worker's turn to start came
            task_status.started()
            return
        while not stopping.is_set():
            r, w = os.pipe()
            env = {**os.environ, WORKER_ENV: f"{i}-{restarts}", READY_ENV: str(w)}
            try:  # from this (the main) thread: the worker's parent-death signal is tied to it
                proc = running[i] = subprocess.Popen(cmd, env=env, pass_fds=(w,), preexec_fn=_stop_with_parent)
            finally:
                os.close(w)
            try:
                async with trio.lowlevel.FdStream(r) as pipe:
                    listening = await pipe.receive_some(1)
                if restarts == 0:
                    if not listening and not stopping.is_set():  # (stopped while starting: no mistake)
                        raise StartupError(f"--workers: worker {i} did not start (exit code {await exited(proc)})")
                    task_status.started()
                code = await exited(proc)
            finally:
                with trio.CancelScope(shield=True):  # never leave a worker behind
                    if proc.poll() is None:
                        proc.terminate()
                        with trio.move_on_after(SHUTDOWN_TIMEOUT + CLOSE_TIMEOUT):
                            await exited(proc)
                        if proc.poll() is None:
                            proc.kill()
                            proc.wait()
            if not stopping.is_set():
                log.error("worker %d exited (code %s): starting it again", i, code)
                restarts += 1
                await trio.sleep(WORKER_RESTART_DELAY)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as outer:
            outer.start_soon(forward, signals)
            async with trio.open_nursery() as nursery:
                for i in range(workers):
                    await nursery.start(worker, i)
                log.info("%d workers listening", workers)
            outer.cancel_scope.cancel()


def _raise_fd_limit() -> None:
    """Each client is a file descriptor: raise the soft limit to the hard one, and say so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("file descriptors: could not raise the soft limit %d to the hard limit %d: %s", soft, hard, exc)
            return
    log.info("file descriptors: soft limit %d (was %d), hard limit %d", hard, soft, hard)


def main(argv: list[str] | None = None) -> int:
    """``python relay.py`` / ``relay``: run the server until SIGTERM or SIGINT has drained it, or
    run a plugin's command (``relay sessions``). A setting, plugin or start-up that is wrong is said
    in one line on stderr, and the exit code is 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        early = argparse.ArgumentParser(add_help=False)  # --plugin first: plugins add flags of their own
        early.add_argument("--plugin", action="append", default=[])
        pm = make_plugin_manager(early.parse_known_args(argv)[0].plugin)
        args = parse_command_line(argv, pm)
        logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if getattr(args, "command", None):
            return int(args.command(args))
        settings = settings_from_args(args)
        if settings.workers > 1 and WORKER_ENV not in os.environ:
            if settings.port == 0:
                raise SettingError("--workers needs a fixed --port (with 0 each worker would listen on another)")
            trio.run(_supervise, argv, settings.workers)
            return 0
        _raise_fd_limit()
        trio.run(_run, Relay(settings, plugin_manager=pm, options=args))
    except BaseException as exc:  # what is not a start-up problem goes on, below
        problem = _startup_problem(exc)
        if problem is None:
            raise
        print(f"relay: error: {problem}", file=sys.stderr)
        return 2
    return 0


def _startup_problem(exc: BaseException) -> BaseException | None:
    """The setting, plugin or start-up error in ``exc`` (which trio may have grouped), if any."""
    if isinstance(exc, SettingError | PluginError | StartupError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _startup_problem(inner)) is not None:
                return found
    return None


if __name__ == "__main__":
    # Run as a script this file is `__main__`; plugins `import relay`. Run the `relay` module's main so
    # that there is one copy of every class (a second copy's PluginError or Auth is another class).
    import relay

    sys.exit(relay.main())
