"""The HTTP fallback (relay_plugins.fallback): the protocol over a stream and posts, over real sockets,
mixed with WebSocket clients; its limits; moving between the two transports; and a real nginx that
does not pass WebSocket upgrades in front.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from relay_plugins import fallback

import relay as relay_mod
from relay_testing import FallbackClient
from tests.conftest import STEP, Harness, RelayProcess, http_get, start_relay


@pytest.fixture
async def make_relay(nursery):
    async def make(**settings: Any) -> relay_mod.Relay:
        return await start_relay(nursery, plugins=[fallback], **settings)

    return make


async def test_a_fallback_client_is_matched_with_a_websocket_client_and_signals_flow(make_relay, nursery):
    r = await make_relay()
    h = Harness(nursery, r)
    f = await FallbackClient.open(r.port)
    assert f.head[":status"] == "200" and f.head["content-type"] == "text/event-stream"
    assert f.head["cache-control"] == "no-store" and f.head["x-accel-buffering"] == "no", f.head
    assert "content-length" not in f.head
    await f.send(type="join")
    await f.expect("queued", position=1)
    w = await h.connect()
    await w.send(type="join")
    mf, mw = await f.expect("matched", initiator=True), await w.expect("matched", initiator=False)
    assert mf["session_id"] == mw["session_id"] and mf["peer_id"] == w.id and mw["peer_id"] == f.id
    await f.send(type="signal", data={"description": {"type": "offer", "sdp": "v=0\r\n..."}})
    got = await w.expect("signal", data={"description": {"type": "offer", "sdp": "v=0\r\n..."}}, n=1)
    assert "n" in got
    batch = b"\n".join(json.dumps({"type": "signal", "data": {"i": i}}).encode() for i in range(5))
    assert await f.post(batch) == 204  # several messages in one post, in order
    for i in range(5):
        await w.expect("signal", data={"i": i}, n=2 + i)
    await w.send_raw('{"type":"signal",\n"data":{"candidate":"candidate:1 1 udp 1 127.0.0.1 9 typ host"}}')
    relayed = await f.expect("signal", n=1)  # a line break inside the JSON survives the event framing
    assert relayed["data"] == {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host"}
    await f.send(type="next")
    await f.expect("queued")
    await w.expect("peer_left", reason="next")
    stats = r.statistics()
    assert (stats.connections, stats.sessions, stats.counters["fallback_streams"]) == (2, 0, 1)


async def test_posts_need_the_stream_credential_and_stay_in_bounds(make_relay):
    r = await make_relay()
    f = await FallbackClient.open(r.port)
    ping = b'{"type":"ping"}'
    assert await f.post(ping, credential="") == 403
    stream_id = f.credential.split(".")[0]
    assert await f.post(ping, credential=f"{stream_id}.{'A' * 22}") == 403  # somebody else's stream
    assert await f.post(ping, credential="nosuchstream.secret") == 410
    assert await f.post(b"x" * (relay_mod.MAX_REQUEST_BODY + 1)) == 413
    assert await f.post(b"not json\n" + ping) == 204  # each line on its own: an error, then a pong
    assert (await f.expect("error"))["code"] == "bad_json"
    await f.expect("pong")
    status, _, _ = await http_get(r.port, fallback.OPEN_PATH, method="POST")  # no X-Relay-Fallback
    assert status == 403
    status, headers, _ = await http_get(r.port, fallback.OPEN_PATH)
    assert status == 405 and headers["allow"] == "POST"
    status, _, _ = await http_get(r.port, fallback.SEND_PATH)
    assert status == 405
    await f.quiet()  # none of that hurt the stream
    await f.stream.aclose()  # the stream vanishes: its posts are refused from then on
    with trio.fail_after(STEP):
        while r.statistics().away != 1:
            await trio.sleep(0.01)
    assert await f.post(ping) == 410


async def test_the_auth_hook_and_the_origin_check_see_the_stream(make_relay, nursery):
    class Bearer:
        @relay_mod.hookimpl
        def relay_authenticate(self, request):
            if request.headers.get("authorization") != "Bearer good":
                return relay_mod.Auth(refuse=401, reason="who are you")
            return relay_mod.Auth(user_id="alice")

    r = await start_relay(nursery, plugins=[fallback, Bearer()], allowed_origins=("https://chat.example.com",))
    origin = "Origin: https://chat.example.com\r\n"
    refused = await FallbackClient.open(r.port, origin)
    assert refused.head[":status"] == "401"
    refused = await FallbackClient.open(r.port, "Authorization: Bearer good\r\nOrigin: https://evil.example\r\n")
    assert refused.head[":status"] == "403"
    f = await FallbackClient.open(r.port, "Authorization: Bearer good\r\n" + origin)
    await f.quiet()
    assert r.statistics().connections == 1


async def test_a_stream_nobody_reads_is_closed_when_its_buffer_fills(make_relay, nursery):
    r = await make_relay(send_buffer_bytes=64 * 1024, message_rate=1e6, message_burst=10**6)
    h = Harness(nursery, r)
    f = await FallbackClient.open(r.port, rcvbuf=4096)
    await f.send(type="join")
    await f.expect("queued")
    w = await h.connect()
    await w.send(type="join")
    await w.expect("matched")
    big = {"sdp": "x" * 32_000}
    with trio.fail_after(STEP * 2):
        while r.statistics().closed_slow == 0:  # f reads nothing more: its socket, then its buffer, fill
            await w.send(type="signal", data=big)
            await trio.sleep(0)
    await w.expect("peer_left", reason="disconnected")
    assert r.statistics().connections == 1


async def test_flood_limits_and_joins_per_minute_apply(make_relay):
    r = await make_relay(message_rate=1, message_burst=5, flood_limit=10, joins_per_minute=2)
    f = await FallbackClient.open(r.port)
    for _ in range(2):
        await f.send(type="join")
        await f.expect("queued")
        await f.send(type="leave")
        await f.expect("left")
    await f.send(type="join")
    assert (await f.expect("error"))["code"] == "rate_limited"  # the third join or next within a minute
    assert await f.post(b"\n".join([b'{"type":"ping"}'] * 30)) == 204
    closed = await f.until_closed()
    assert closed["code"] == relay_mod.CLOSE_POLICY, closed
    assert await f.post(b'{"type":"ping"}') == 410


async def test_draining_ends_the_stream_after_draining(make_relay):
    r = await make_relay()
    f = await FallbackClient.open(r.port)
    r.drain()
    await f.expect("draining")
    assert (await f.until_closed())["code"] == relay_mod.CLOSE_RESTART
    refused = await FallbackClient.open(r.port)
    assert refused.head[":status"] == "503"


async def test_the_keepalive_asks_for_a_sign_of_life(make_relay):
    r = await make_relay(heartbeat_interval=0.2, heartbeat_timeout=0.5, resume_grace=0)
    f = await FallbackClient.open(r.port)
    live = await FallbackClient.open(r.port)
    for _ in range(3):  # live answers every keepalive with a ping: it stays
        await _keepalive(live)
        await live.send(type="ping")
    closed = await f.until_closed()  # f never answers: closed as a WebSocket that never pongs
    assert closed["code"] == relay_mod.CLOSE_HEARTBEAT and f.keepalives >= 1
    await live.quiet()


async def _keepalive(client: FallbackClient) -> None:
    """Read until the next keepalive comment (pongs and the like are skipped)."""
    seen = client.keepalives
    with trio.fail_after(STEP):
        while client.keepalives == seen:
            block, sep, rest = client.buffer.partition(b"\n\n")
            if sep:
                client.buffer = rest
                if block.startswith(b":"):
                    client.keepalives += 1
                continue
            client.buffer += await client.stream.receive_some()


async def test_a_client_moves_between_websocket_and_fallback_without_losing_a_signal(make_relay, nursery):
    r = await make_relay(resume_grace=10)
    h = Harness(nursery, r)
    a, b, ma, _ = await h.pair()
    await a.send(type="signal", data={"i": 0})
    last = (await b.expect("signal", data={"i": 0}))["n"]
    await b.ws._stream.aclose()  # b's WebSocket vanishes (a proxy that cuts it)...
    await a.expect("peer_reconnecting")
    for i in range(1, 4):
        await a.send(type="signal", data={"i": i})
    f = await FallbackClient.open(r.port)  # ...and it comes back on the fallback
    await f.send(type="resume", token=b.welcome["resume_token"], last=last)
    resumed = await f.expect("resumed", client_id=b.id, state="matched", session_id=ma["session_id"])
    for i in range(1, 4):
        await f.expect("signal", data={"i": i}, n=last + i)
    await a.expect("peer_resumed")
    await f.send(type="signal", data={"from": "fallback"})
    await a.expect("signal", data={"from": "fallback"})
    last = last + 3
    await a.send(type="signal", data={"i": 4})  # written to the stream, not read there yet
    back = await h.connect()  # WebSockets work again: it moves back, its stream still open
    await back.send(type="resume", token=resumed["resume_token"], last=last)
    await back.expect("resumed", client_id=b.id, state="matched")
    await back.expect("signal", data={"i": 4}, n=last + 1)  # replayed: nothing lost in the move
    await f.expect("signal", data={"i": 4}, n=last + 1)  # (the stream had it too: the client drops repeats)
    assert (await f.until_closed())["code"] == relay_mod.CLOSE_RESUMED
    await back.send(type="signal", data={"from": "websocket"})
    await a.expect("signal", data={"from": "websocket"})
    await a.quiet()  # a never saw the second move
    assert r.statistics().connections == 2 and r.statistics().resumed == 2


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(bodies=st.lists(st.binary(max_size=300) | st.text(max_size=200).map(str.encode), min_size=1, max_size=8))
def test_malformed_posts_hurt_nobody(bodies: list[bytes]):
    """Random bodies from several fallback clients, while a WebSocket client and a fallback client
    relay to each other: every signal arrives once, in order, and the relay answers every post."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            r = await start_relay(nursery, plugins=[fallback])
            h = Harness(nursery, r)
            f = await FallbackClient.open(r.port)
            await f.send(type="join", interests=["pair-only"])
            await f.expect("queued")
            w = await h.connect()
            await w.send(type="join", interests=["pair-only"])
            await w.expect("matched")
            await f.expect("matched")
            noisy = [await FallbackClient.open(r.port) for _ in range(3)]
            for i, body in enumerate(bodies):
                assert await noisy[i % 3].post(body) in (204, 410)
                await f.send(type="signal", data={"i": i})
                await w.send(type="signal", data={"j": i})
            for i in range(len(bodies)):
                await w.expect("signal", data={"i": i})
                await f.expect("signal", data={"j": i})
            await w.quiet()
            await f.quiet()
            nursery.cancel_scope.cancel()

    trio.run(main)


# -- behind a real nginx that does not pass WebSocket upgrades ----------------------------------------


async def test_behind_nginx_that_blocks_websockets_the_fallback_streams_as_it_comes(make_relay, nursery, nginx):
    r = await make_relay()
    port = nginx(r.port).port
    status, _, _ = await http_get(port, "/ws", headers="Upgrade: websocket\r\nConnection: Upgrade, close\r\n")
    assert status == 426  # nginx dropped the upgrade: the relay saw a plain GET
    f = await FallbackClient.open(port)  # the welcome came through at once: nginx did not hold the stream
    w = await Harness(nursery, r).connect()  # (a WebSocket user, directly)
    await f.send(type="join")
    await f.expect("queued")
    await w.send(type="join")
    await w.expect("matched")
    await f.expect("matched")
    for i in range(3):  # each signal arrives on its own, not when a proxy buffer fills
        await w.send(type="signal", data={"i": i})
        await f.expect("signal", data={"i": i})
        await f.send(type="signal", data={"j": i})
        await w.expect("signal", data={"j": i})


async def test_a_page_of_an_allowed_origin_may_use_the_fallback_across_origins(nursery):
    r = await start_relay(nursery, plugins=[fallback], allowed_origins=("https://chat.example.com",))
    preflight = "Origin: https://chat.example.com\r\nAccess-Control-Request-Method: POST\r\n"
    status, headers, _ = await http_get(r.port, fallback.OPEN_PATH, method="OPTIONS", headers=preflight)
    assert status == 204 and headers["access-control-allow-origin"] == "https://chat.example.com", headers
    assert (
        "X-Relay-Stream" in headers["access-control-allow-headers"]
        and headers["access-control-allow-methods"] == "POST"
    )
    status, _, _ = await http_get(
        r.port, fallback.SEND_PATH, method="OPTIONS", headers="Origin: https://evil.example\r\n"
    )
    assert status == 403
    f = await FallbackClient.open(r.port, "Origin: https://chat.example.com\r\n")
    assert f.head["access-control-allow-origin"] == "https://chat.example.com"
    status, headers, _ = await http_get(
        r.port, fallback.SEND_PATH, method="POST", body=b'{"type":"ping"}',
        headers=f"X-Relay-Stream: {f.credential}\r\nOrigin: https://chat.example.com\r\n",
    )  # fmt: skip
    assert status == 204 and headers["access-control-allow-origin"] == "https://chat.example.com"
    await f.expect("pong")


async def test_streams_count_against_the_address_caps(make_relay, nursery):
    """A stream is a connection of its address, and so is each post while it lasts: a fallback
    client holds two of --max-connections-per-ip while it sends."""
    r = await make_relay(max_connections_per_ip=3, connect_rate_per_ip=1000)
    first = await FallbackClient.open(r.port)
    await Harness(nursery, r).connect()  # a WebSocket from the same address
    await first.quiet()  # stream, WebSocket and the post: three
    second = await FallbackClient.open(r.port)  # three open
    refused = await FallbackClient.open(r.port)
    assert refused.head[":status"] == "429"
    assert await first.post(b'{"type":"ping"}') == 429  # a post over the cap is refused like any connection
    await second.stream.aclose()
    with trio.fail_after(STEP):
        while r.statistics().sockets > 2:
            await trio.sleep(0.01)
    await first.quiet()


def test_the_command_line_turns_the_fallback_on_by_default_and_off_with_no_fallback(tmp_path):
    """What people type: `python relay.py` serves the fallback; `--no-fallback` does not."""
    for args, expected in (((), b"HTTP/1.1 200"), (("--no-fallback",), b"HTTP/1.1 404")):
        relay = RelayProcess(tmp_path, *args).start()
        try:
            with socket.create_connection(("127.0.0.1", relay.port), timeout=STEP) as s:
                s.sendall(
                    b"POST /fallback/open HTTP/1.1\r\nHost: x\r\nX-Relay-Fallback: 1\r\nContent-Length: 0\r\n\r\n"
                )
                assert s.recv(100).startswith(expected), args
        finally:
            relay.kill()
