"""A harness for testing relay plugins (and the relay): a relay in-process, on 127.0.0.1 and a free
port, in your test's trio nursery, and a WebSocket client that speaks the protocol.

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
from typing import Any

import trio
import trio_websocket

import relay

__all__ = ["LOOPBACK_LIMITS", "STEP", "Client", "Harness", "http_get", "start_relay"]

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
