"""A harness for testing relay plugins (and the relay): a relay in-process, on 127.0.0.1 and a free
port, in your test's trio nursery, and clients that speak the protocol: over a WebSocket
(``Client``, made by ``Harness``), or over the HTTP fallback (``FallbackClient.open(port)``).

    pip install 'roulette-relay[testing]'     # trio-websocket and pytest-trio

    from relay_testing import Harness, start_relay

    async def test_my_plugin(nursery):                 # pytest-trio, with trio_mode = true
        relay = await start_relay(nursery, plugins=[my_plugin], options={"my_flag": 3})
        h = Harness(nursery, relay)
        a, b, matched_a, matched_b = await h.pair()    # two clients, joined and matched
        await a.send(type="signal", data={"hello": 1})
        await b.expect("signal", data={"hello": 1})

``start_relay`` takes plugins (modules or objects; the installed entry points are not loaded, so a
test sees only what it asks for), their options as if parsed from the command line, and any
``relay.Settings`` field; per-address limits are lifted, since every test client comes from
127.0.0.1. ``http_get`` makes a plain HTTP request to the relay's port. Every wait is bounded by
``STEP`` seconds, so a test that waits for what never comes fails instead of hanging.
"""

from __future__ import annotations

import argparse
import json
import socket
from typing import Any

import trio
import trio_websocket
from relay_plugins import fallback

import relay

__all__ = ["LOOPBACK_LIMITS", "STEP", "Client", "FallbackClient", "Harness", "http_get", "start_relay"]

STEP = 5.0  # seconds any single expected event may take before the test fails (never asserted as a time)
# Every test client comes from 127.0.0.1: the relay gets per-address limits that fit that.
LOOPBACK_LIMITS: dict[str, Any] = {
    "max_connections_per_ip": 100_000,
    "connect_rate_per_ip": 1e6,
    "connect_burst_per_ip": 100_000,
    "joins_per_minute_per_ip": 1_000_000,
    "bytes_per_second_per_ip": 1 << 30,
    "bytes_burst_per_ip": 1 << 30,
}


class Client:
    """A test client speaking the relay protocol over a real WebSocket."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}

    @property
    def id(self) -> str:
        return self.welcome["client_id"]

    async def send(self, **msg: Any) -> None:
        """Send a message: ``await client.send(type="join", interests=["chess"])``."""
        await self.ws.send_message(json.dumps(msg))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send_message(data)

    async def recv(self) -> dict[str, Any]:
        """The next message (within ``STEP`` seconds)."""
        with trio.fail_after(STEP):
            return json.loads(await self.ws.get_message())

    async def expect(self, kind: str, **fields: Any) -> dict[str, Any]:
        """The next message, which must be of ``kind`` and have these fields."""
        msg = await self.recv()
        assert msg["type"] == kind, msg
        for key, value in fields.items():
            assert msg[key] == value, msg
        return msg

    async def closed(self) -> trio_websocket.CloseReason:
        """Read until the relay closes the connection; its close reason (``.code``, ``.reason``)."""
        with trio.fail_after(STEP + relay.CLOSE_TIMEOUT):
            while True:
                try:
                    await self.ws.get_message()
                except trio_websocket.ConnectionClosed as exc:
                    assert exc.reason is not None
                    return exc.reason

    async def quiet(self) -> None:
        """Prove nothing else was queued for us: a ping's pong is the very next message."""
        await self.send(type="ping")
        await self.expect("pong")


class FallbackClient(Client):
    """A client of the HTTP fallback as the browser client is: one stream read as it comes, and a
    post for each batch of messages it sends (``expect``, ``quiet`` as a WebSocket ``Client``'s)."""

    def __init__(self, port: int, stream: trio.SocketStream, head: dict[str, str], rest: bytes) -> None:
        super().__init__(None)  # type: ignore[arg-type]  (no WebSocket)
        self.port = port
        self.stream = stream
        self.head = head
        self.buffer = rest
        self.credential = ""
        self.closed: dict[str, Any] | None = None  # the "close" event, once it came
        self.keepalives = 0

    @classmethod
    async def open(cls, port: int, headers: str = "", *, rcvbuf: int = 0) -> FallbackClient:
        """Open a stream and read up to its welcome."""
        with trio.fail_after(STEP):
            sock = trio.socket.socket()
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            await sock.connect(("127.0.0.1", port))
            stream = trio.SocketStream(sock)
            request = (
                f"POST {fallback.OPEN_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Relay-Fallback: 1\r\n"
                f"Content-Length: 0\r\n{headers}\r\n"
            )
            await stream.send_all(request.encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some()
                assert chunk, data
                data += chunk
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        head = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        head[":status"] = lines[0].split()[1]
        client = cls(port, stream, head, rest)
        if head[":status"] == "200":
            name, data = await client.event()
            assert name == "stream", (name, data)
            client.credential = json.loads(data)["stream"]
            client.welcome = await client.expect("welcome", protocol=relay.PROTOCOL_VERSION)
        return client

    async def event(self, timeout: float = STEP) -> tuple[str, bytes]:
        """The next event (name, data; ("end", b"") when the stream ends); comments are counted as
        keepalives."""
        with trio.fail_after(timeout):
            while True:
                block, sep, rest = self.buffer.partition(b"\n\n")
                if sep:
                    self.buffer = rest
                    name, data = "message", []
                    for line in block.split(b"\n"):
                        if line.startswith(b":"):
                            self.keepalives += 1
                        elif line.startswith(b"event: "):
                            name = line[7:].decode()
                        elif line.startswith(b"data: "):
                            data.append(line[6:])
                    if data:
                        return name, b"\n".join(data)
                    continue
                chunk = await self.stream.receive_some()
                if not chunk:
                    return "end", b""
                self.buffer += chunk

    async def recv(self) -> dict[str, Any]:
        name, data = await self.event()
        if name == "close":
            self.closed = json.loads(data)
        assert name == "message", (name, data)
        return json.loads(data)

    async def until_closed(self) -> dict[str, Any]:
        """Read to the "close" event, then the stream's end."""
        while True:
            name, data = await self.event()
            if name == "close":
                self.closed = json.loads(data)
                assert (await self.event())[0] == "end"
                return self.closed
            assert name != "end", "the stream ended without a close event"

    async def post(self, body: bytes, credential: str | None = None) -> int:
        """POST a body (messages, one per line) with this stream's credential (or another); its status."""
        header = self.credential if credential is None else credential
        status, _, _ = await http_get(
            self.port, fallback.SEND_PATH, method="POST", body=body,
            headers=f"X-Relay-Stream: {header}\r\n" if header else "",
        )  # fmt: skip
        return status

    async def send(self, **msg: Any) -> None:
        """Send one message in a post of its own (which must be taken: 204)."""
        assert await self.post(json.dumps(msg).encode()) == 204


class Harness:
    """Clients of one relay, in one nursery."""

    def __init__(self, nursery: trio.Nursery, relay_: relay.Relay) -> None:
        self.nursery = nursery
        self.relay = relay_

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.relay.port}{relay.WS_PATH}"

    async def connect(self, *, queue: int = 4, headers: dict[str, str] | None = None) -> Client:
        """A new client, welcomed (with these HTTP headers on its upgrade request)."""
        extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        with trio.fail_after(STEP):
            ws = await trio_websocket.connect_websocket_url(
                self.nursery, self.url, message_queue_size=queue, extra_headers=extra
            )
        client = Client(ws)
        client.welcome = await client.expect("welcome", protocol=relay.PROTOCOL_VERSION)
        return client

    async def pair(self, **join: Any) -> tuple[Client, Client, dict[str, Any], dict[str, Any]]:
        """Two clients joined (with these join fields) and matched: (initiator, answerer, their matched)."""
        a, b = await self.connect(), await self.connect()
        await a.send(type="join", **join)
        await a.expect("queued")
        await b.send(type="join", **join)
        ma, mb = await a.expect("matched", initiator=True), await b.expect("matched", initiator=False)
        return a, b, ma, mb


async def start_relay(
    nursery: trio.Nursery, plugins: list[object] = (), options: dict[str, Any] | None = None, **settings: Any
) -> relay.Relay:
    """A relay serving on 127.0.0.1 and a free port, with just these plugins (no entry points) and
    these plugin options; ``settings`` are ``relay.Settings`` fields. It stops with the nursery."""
    pm = relay.make_plugin_manager(entry_points=False)
    for plugin in plugins:
        pm.register(plugin)
    r = relay.Relay(
        relay.Settings(host="127.0.0.1", port=0, **(LOOPBACK_LIMITS | settings)),
        plugin_manager=pm,
        options=argparse.Namespace(**(options or {})),
    )
    await nursery.start(r.serve)
    return r


async def http_get(
    port: int, path: str, *, method: str = "GET", headers: str = "", body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """A raw HTTP/1.1 request to 127.0.0.1:port: (status, headers with lower-case names, body).
    ``headers`` are lines, each ending in CRLF."""
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    with trio.fail_after(STEP):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            close = "" if "connection:" in headers.lower() else "Connection: close\r\n"  # it reads to the end
            head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{close}{headers}{length}\r\n"
            await stream.send_all(head.encode() + body)
            data = b""
            while chunk := await stream.receive_some():
                data += chunk
    head_bytes, _, response_body = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, fields, response_body
