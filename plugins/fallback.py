"""The HTTP fallback: the relay's protocol without WebSockets, for networks whose proxies block them
(on by default; ``--no-fallback`` turns it off).

A client that cannot open a WebSocket opens a *stream* instead and sends by *posts*, both on the
relay's one port:

- ``POST /fallback/open`` (header ``X-Relay-Fallback: 1``, empty body) answers ``200`` with a
  ``text/event-stream`` that stays open. Its first event, ``stream``, carries the credential of
  this stream (``{"stream": "<id>.<secret>"}``); then every protocol message comes as one event
  (``data: <the JSON text>``), exactly those a WebSocket gets, starting with ``welcome``. A comment
  line (``: keepalive``) comes when the client has been quiet for ``--heartbeat-interval``: send
  anything (a ``ping``) within ``--heartbeat-timeout``, or the relay takes the client for gone, as
  it does a WebSocket that does not answer its pings. When the relay ends the client, the last
  event is ``close`` (``{"code": 1013, "reason": "..."}``, the WebSocket close codes).
- ``POST /fallback/send`` (header ``X-Relay-Stream: <id>.<secret>``, body: protocol messages, one
  JSON text per line, in order) answers ``204``. Each message counts, is rate-limited and is acted
  on exactly as a WebSocket text frame; errors come back on the stream. ``403`` for a missing or
  wrong credential, ``410`` once the stream has ended (open a new one and ``resume``), ``413`` for
  a body over 64 KiB.

A page served from another origin than the relay's may use the fallback too: the preflight
(``OPTIONS``) and every answer allow exactly the page's ``Origin`` when it is one of
``--allowed-origin`` (or any origin when that is not set: the same rule as for WebSockets, which
carry no ambient authority either: no cookies, only the token the page itself sends).

Why this shape: Server-Sent Events framing is what proxies know to pass through as it comes (with
``X-Accel-Buffering: no`` for nginx), but the browser client reads it with ``fetch()``, not
``EventSource``: a POST carries ``Origin`` (so ``--allowed-origin`` applies as it does to WebSocket
upgrades), custom headers (``Authorization: Bearer`` for ``relay_authenticate``; the
``X-Relay-*`` headers, which a cross-site form cannot send and which make a cross-site ``fetch``
need a CORS preflight the relay never grants) and no automatic reconnection that would fight the
client's own resume. Upstream posts, not a second stream, because every proxy passes short POSTs.

A stream is a client of the relay like any other: it counts against ``--max-connections`` and the
address's connection caps and rates, goes through ``relay_authenticate``, is queued, matched,
numbered, resumed (on a stream or a WebSocket, either way), drained and reported like one, and a
stream nobody reads is closed (1013) when ``--send-buffer-bytes`` fill up. Its posts are ordinary
HTTP requests on the port.
"""

from __future__ import annotations

import argparse
import hmac
import secrets

import attrs
import orjson

import relay
from relay import ClientLink, HttpRequest, HttpResponse, HttpStream, Relay

OPEN_PATH = "/fallback/open"
SEND_PATH = "/fallback/send"
STREAM_HEADER = "x-relay-stream"  # the stream's credential, on every post
OPEN_HEADER = "x-relay-fallback"  # on the request that opens a stream: a cross-site form cannot send it

_NO_CONTENT = HttpResponse(204)
_PREFLIGHT = (
    ("Access-Control-Allow-Methods", "POST"),
    ("Access-Control-Allow-Headers", "X-Relay-Fallback, X-Relay-Stream, Authorization, Content-Type"),
    ("Access-Control-Max-Age", "600"),  # seconds a browser may keep this answer
)
_REFUSED = HttpResponse(403, b"403 missing or wrong X-Relay-Stream\n")
_GONE = HttpResponse(410, b"410 this stream has ended: open another and resume\n")
_KEEPALIVE = b": keepalive\n\n"


def _event(data: bytes, event: bytes = b"") -> bytes:
    """One Server-Sent Event. A line break inside the JSON text (whitespace between its tokens)
    starts another ``data:`` line, which the reader joins back with ``\\n``."""
    if b"\n" in data or b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\ndata: ")
    return (b"event: " + event + b"\n" if event else b"") + b"data: " + data + b"\n\n"


class _Stream:
    """One stream's framing (``relay.StreamFraming``) and credential."""

    __slots__ = ("fallback", "id", "link", "secret")

    def __init__(self, fallback: Fallback) -> None:
        self.fallback = fallback
        self.id = secrets.token_urlsafe(12)
        self.secret = secrets.token_urlsafe(16)  # 128 bits
        self.link: ClientLink | None = None

    def opening(self, link: ClientLink) -> bytes:
        self.link = link
        self.fallback.streams[self.id] = self
        return _event(b'{"stream":"%s.%s"}' % (self.id.encode(), self.secret.encode()), b"stream")

    def message(self, text: bytes) -> bytes:
        return _event(text)

    def keepalive(self) -> bytes:
        return _KEEPALIVE

    def closing(self, code: int, reason: str) -> bytes:
        return _event(orjson.dumps({"code": code, "reason": reason}), b"close")

    def closed(self) -> None:
        self.fallback.streams.pop(self.id, None)
        self.link = None  # the link holds the client, whose transport holds this: no cycle for the GC to find


class Fallback:
    """The fallback's routes, for one relay: its open streams by id."""

    def __init__(self, relay_: Relay) -> None:
        self.relay = relay_
        self.streams: dict[str, _Stream] = {}  # at most --max-connections: each is a client

    @relay.hookimpl
    def relay_http_request(self, request: HttpRequest) -> HttpResponse | HttpStream | None:
        if request.path != OPEN_PATH and request.path != SEND_PATH:
            return None
        cors = self._cors(request)
        if request.method == "OPTIONS":  # a cross-origin page's preflight
            if cors is None:
                return HttpResponse(403, b"403 origin not allowed\n")
            return HttpResponse(204, headers=(*cors, *_PREFLIGHT))
        if request.method != "POST":
            return HttpResponse(405, b"405 use POST\n", headers=(("Allow", "POST"),))
        if request.path == SEND_PATH:
            answer = self._send(request)
            return attrs.evolve(answer, headers=(*answer.headers, *cors)) if cors else answer
        if request.headers.get(OPEN_HEADER) != "1":
            return HttpResponse(403, b"403 a stream is opened with X-Relay-Fallback: 1\n")
        self.relay.counters["fallback_streams"] += 1
        return HttpStream(_Stream(self), headers=cors or ())

    def _cors(self, request: HttpRequest) -> tuple[tuple[str, str], ...] | None:
        """The CORS headers that let the request's page read the answer, if its origin may."""
        origin = request.headers.get("origin")
        allowed = self.relay.settings.allowed_origins
        if origin is None or (allowed and origin not in allowed):
            return None
        return (("Access-Control-Allow-Origin", origin), ("Vary", "Origin"))

    def _send(self, request: HttpRequest) -> HttpResponse:
        stream_id, _, secret = request.headers.get(STREAM_HEADER, "").partition(".")
        stream = self.streams.get(stream_id)
        if stream is None:
            return _GONE if stream_id and secret else _REFUSED
        if not hmac.compare_digest(stream.secret.encode(), secret.encode()):
            return _REFUSED
        lines = [line for line in request.body.split(b"\n") if line.strip()]
        if stream.link is None or not stream.link.receive(lines):
            return _GONE
        return _NO_CONTENT


@relay.hookimpl
def relay_addoption(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fallback (relay_plugins.fallback)")
    group.add_argument(
        "--fallback", action=argparse.BooleanOptionalAction, default=True,
        help=f"serve the HTTP fallback for clients whose WebSockets are blocked ({OPEN_PATH}, {SEND_PATH})",
    )  # fmt: skip


@relay.hookimpl
def relay_configure(relay: Relay) -> None:
    if getattr(relay.options, "fallback", True):
        relay.pm.register(Fallback(relay), "fallback-routes")
