"""The relay over real sockets on 127.0.0.1: protocol, matchmaking, errors, robustness, HTTP."""

from __future__ import annotations

import json

import pytest
import trio
import trio_websocket

import relay as relay_mod
from tests.conftest import STEP, UPGRADE, Client, Harness, http_get


async def test_welcome(harness: Harness):
    c = await harness.connect()
    assert set(c.welcome) == {"type", "protocol", "client_id", "resume_token"}
    assert len(c.welcome["resume_token"]) >= 22  # 128 bits, base64
    other = await harness.connect()
    assert other.id != c.id and other.welcome["resume_token"] != c.welcome["resume_token"]


async def test_two_clients_pair_and_relay_signals_both_ways_unchanged(harness: Harness):
    a, b, ma, mb = await harness.pair()
    assert ma["peer_id"] == b.id and mb["peer_id"] == a.id
    assert ma["session_id"] == mb["session_id"]
    assert ma["interests"] == [] and ma["ice_servers"] == []
    offer = {
        "sdp": {"type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n" + "a=x\r\n" * 300},
        "n": [1, 2.5, None],
    }
    await a.send(type="signal", data=offer)
    assert await b.expect("signal") == {"type": "signal", "data": offer, "n": 1}  # numbered per recipient
    candidate = {"candidate": {"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 5000 typ host", "sdpMid": "0"}}
    await b.send(type="signal", data=candidate, extra="dropped")
    assert await a.expect("signal") == {"type": "signal", "data": candidate, "n": 1}  # unknown fields not passed on
    for i in range(20):  # order is kept
        await a.send(type="signal", data={"i": i})
    for i in range(20):
        await b.expect("signal", data={"i": i}, n=i + 2)


async def test_interests_pair_on_shared_interest(harness: Harness):
    music, sport = await harness.connect(), await harness.connect()
    await music.send(type="join", interests=["Music", "film"])
    await music.expect("queued", position=1, queue_size=1)
    await sport.send(type="join", interests=["sport"])
    await sport.expect("queued", position=2, queue_size=2)
    fan = await harness.connect()
    await fan.send(type="join", interests=["FILM", "sport", "music"])
    matched = await fan.expect("matched", peer_id=music.id, initiator=False)
    assert matched["interests"] == ["film", "music"]
    await music.expect("matched", peer_id=fan.id, initiator=True, interests=["film", "music"])


async def test_interest_timeout_falls_back_to_anyone(make_harness):
    h = await make_harness(interest_timeout=0.3)
    picky, plain = await h.connect(), await h.connect()
    await picky.send(type="join", interests=["chess"])
    await picky.expect("queued")
    await plain.send(type="join")
    await plain.expect("queued")  # picky does not accept plain yet
    await plain.expect("matched", peer_id=picky.id, interests=[])  # after the timeout, without a new join
    await picky.expect("matched", peer_id=plain.id)


async def test_join_while_queued_updates_interests(harness: Harness):
    a, b = await harness.connect(), await harness.connect()
    await a.send(type="join", interests=["x"])
    await a.expect("queued")
    await a.send(type="join", interests=["y"])
    await a.expect("queued", position=1)
    await b.send(type="join", interests=["y"])
    await b.expect("matched", peer_id=a.id, interests=["y"])


async def test_next_rematches_both_sides(harness: Harness):
    a, b, ma, _ = await harness.pair()
    c = await harness.connect()
    await c.send(type="join")
    await c.expect("queued", position=1)
    await b.send(type="next")
    await a.expect("peer_left", session_id=ma["session_id"], reason="next")
    await b.expect("matched", peer_id=c.id, initiator=False)
    await c.expect("matched", peer_id=b.id, initiator=True)
    await a.quiet()  # a is idle, not re-queued on its own
    await a.send(type="signal", data={})
    await a.expect("error", code="not_matched")
    await a.send(type="next")  # next while idle acts as join
    await a.expect("queued", position=1)


async def test_leave(harness: Harness):
    a, b, ma, _ = await harness.pair()
    await a.send(type="leave")
    await a.expect("left")
    await b.expect("peer_left", session_id=ma["session_id"], reason="left")
    await b.send(type="leave")  # idle: still answered
    await b.expect("left")
    await b.send(type="join")
    await b.expect("queued")
    await b.send(type="leave")
    await b.expect("left")
    assert harness.relay.statistics().queued == 0


async def test_disconnect_mid_session_notifies_peer_once(harness: Harness):
    a, b, ma, _ = await harness.pair()
    await a.ws.aclose()
    await b.expect("peer_left", session_id=ma["session_id"], reason="disconnected")
    await b.quiet()
    with trio.fail_after(STEP):
        while harness.relay.statistics().connections != 1:
            await trio.sleep(0.01)
    stats = harness.relay.statistics()
    assert (stats.sessions, stats.queued, stats.sessions_ended) == (0, 0, {"disconnected": 1})


async def test_abrupt_tcp_drop_mid_session_notifies_peer(make_harness):
    h = await make_harness(resume_grace=0.3)
    a, b, ma, _ = await h.pair()
    await a.ws._stream.aclose()  # no close frame: the TCP connection just goes away
    await b.expect("peer_reconnecting", session_id=ma["session_id"])  # it may come back...
    await b.expect("peer_left", session_id=ma["session_id"], reason="disconnected")  # ...but did not
    await b.quiet()


async def test_thousand_clients_joining_at_once_all_pair(make_harness):
    h = await make_harness(max_connections=2000)
    clients: list[Client] = []

    async def connect() -> None:
        clients.append(await h.connect())

    async with trio.open_nursery() as n:
        for _ in range(1001):
            n.start_soon(connect)
    async with trio.open_nursery() as n:
        for c in clients:
            n.start_soon(c.send_raw, '{"type":"join"}')
    results: dict[str, dict] = {}

    async def outcome(c: Client) -> None:
        """matched, or queued (possibly with position updates) and then nothing more."""
        while True:
            with trio.move_on_after(1.5) as idle:
                msg = await c.recv()
            if idle.cancelled_caught or msg["type"] == "matched":
                break
        results[c.id] = msg

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            for c in clients:
                n.start_soon(outcome, c)
    matched = [m for m in results.values() if m["type"] == "matched"]
    waiting = [cid for cid, m in results.items() if m["type"] == "queued"]
    assert len(matched) == 1000 and len(waiting) == 1
    peers = {cid: m["peer_id"] for cid, m in results.items() if m["type"] == "matched"}
    assert all(peers[peers[cid]] == cid for cid in peers)  # symmetric, nobody twice
    stats = h.relay.statistics()
    assert (stats.sessions, stats.queued, stats.connections) == (500, 1, 1001)


async def test_every_error_code(make_harness):
    h = await make_harness(message_rate=1, message_burst=30)
    c = await h.connect()
    cases = [
        ("{not json", "bad_json"),
        ("[1, 2]", "bad_message"),
        (json.dumps({"no": "type"}), "bad_message"),
        (json.dumps({"type": 7}), "bad_message"),
        (json.dumps({"type": "dance"}), "unknown_type"),
        (json.dumps({"type": "join", "interests": "music"}), "bad_message"),
        (json.dumps({"type": "join", "interests": ["x" * 33]}), "bad_message"),
        (json.dumps({"type": "join", "interests": [str(i) for i in range(11)]}), "bad_message"),
        (json.dumps({"type": "signal", "data": {"sdp": "x"}}), "not_matched"),
        ("[" * 100_00 + "]" * 100_00, "bad_json"),  # too deep for the parser: refused, not a crash
        ("1" * 5000, "bad_json"),  # an integer too long to convert
    ]
    for text, code in cases:
        await c.send_raw(text)
        msg = await c.expect("error", code=code)
        assert msg["message"]
    await c.send_raw(b"\x00\x01binary")
    assert "binary" in (await c.expect("error", code="bad_message"))["message"]
    a, _, _, _ = await h.pair()
    await a.send(type="join")
    await a.expect("error", code="already_matched")
    await a.send(type="signal", data="not an object")
    await a.expect("error", code="bad_message")
    await a.quiet()  # still usable after every error
    for _ in range(40):  # burst of 30, then refused
        await c.send(type="ping")
    replies = [(await c.recv()).get("code") for _ in range(40)]
    assert replies.count("rate_limited") >= 9 and replies[0] is None
    stats = h.relay.statistics()
    assert {"bad_json", "bad_message", "unknown_type", "not_matched", "already_matched", "rate_limited"} <= set(
        stats.errors
    )


async def test_oversize_frame_closes_1009(make_harness):
    h = await make_harness(max_message_bytes=1000)
    a, b, _, _ = await h.pair()
    await a.send(type="signal", data={"sdp": "x" * 900})
    await b.expect("signal")
    await a.send(type="signal", data={"sdp": "x" * 1100})
    assert (await a.closed()).code == 1009
    await b.expect("peer_left", reason="disconnected")


async def test_slow_reader_does_not_delay_busy_pair_and_is_closed(make_harness):
    """A client that never reads: the pair next to it keeps relaying; it is closed with 1013."""
    h = await make_harness(message_rate=1e6, message_burst=10**6, send_buffer_bytes=64 * 1024)
    flooder, sleeper, _, _ = await h.pair()  # sleeper stops reading from now on
    a, b, _, _ = await h.pair()
    blob = {"sdp": "x" * 32_000}
    relayed = 0

    async def flood() -> None:
        nonlocal relayed
        while True:
            try:
                await flooder.send(type="signal", data=blob)
            except trio_websocket.ConnectionClosed:
                return
            relayed += 1

    async with trio.open_nursery() as n:
        n.start_soon(flood)
        with trio.fail_after(STEP * 2):
            for i in range(200):  # the busy pair, meanwhile
                await a.send(type="signal", data={"i": i})
                await b.expect("signal", data={"i": i})
                await b.send(type="signal", data={"i": i})
                await a.expect("signal", data={"i": i})
            msg = await flooder.recv()  # the sleeper is closed, so its peer is told
            while msg["type"] != "peer_left":
                msg = await flooder.recv()
        n.cancel_scope.cancel()
    assert msg["reason"] == "disconnected"
    assert h.relay.statistics().closed_slow == 1
    assert relayed > 16
    # The sleeper wakes up: it finds what fitted in the socket, then the 1013 close (or a dropped TCP
    # connection if even the close frame could not be written in time).
    reason = await sleeper.closed()
    assert reason.code in (1013, 1006)


async def test_handshake_that_never_finishes_is_dropped(make_harness):
    h = await make_harness(handshake_timeout=0.2)
    stream = await trio.open_tcp_stream("127.0.0.1", h.relay.port)
    await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and never the end of the head
    with trio.fail_after(STEP):
        assert await stream.receive_some() == b""  # closed by the server


async def test_heartbeat_closes_silent_client(make_harness):
    h = await make_harness(heartbeat_interval=0.1, heartbeat_timeout=0.2)
    # A hand-made WebSocket client that completes the handshake and then never answers a ping.
    stream = await trio.open_tcp_stream("127.0.0.1", h.relay.port)
    await stream.send_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with trio.fail_after(STEP + relay_mod.CLOSE_TIMEOUT):
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    assert data.startswith(b"HTTP/1.1 101")
    assert b"heartbeat timeout" in data  # the close frame's reason
    assert h.relay.statistics().connections == 0


async def test_healthz_and_404_and_426(harness: Harness):
    port = harness.relay.port
    await harness.pair()
    status, headers, body = await http_get(port, "/healthz")
    assert status == 200 and headers["content-type"] == "application/json"
    health = json.loads(body)
    assert health["status"] == "ok" and health["connections"] == 2 and health["sessions"] == 1
    assert health["queued"] == 0 and health["uptime_s"] >= 0
    status, _, body = await http_get(port, "/healthz", method="HEAD")
    assert status == 200 and body == b""
    assert (await http_get(port, "/nope"))[0] == 404
    assert (await http_get(port, "/../relay.py"))[0] == 404
    status, headers, _ = await http_get(port, "/ws")
    assert status == 426 and headers["upgrade"] == "websocket"
    with trio.fail_after(STEP):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"\x16\x03\x01 not http at all\r\n\r\n")
        assert (await stream.receive_some()).startswith(b"HTTP/1.1 400")


async def test_queue_positions_are_pushed_when_they_change(make_harness):
    h = await make_harness(interest_timeout=60)
    waiting = [await h.connect() for _ in range(4)]
    for i, c in enumerate(waiting):
        await c.send(type="join", interests=[f"t{i}"])
        await c.expect("queued", position=i + 1)
    late = await h.connect()
    await late.send(type="join", interests=["t0"])  # takes the head of the queue
    await late.expect("matched")
    for i, c in enumerate(waiting[1:]):  # everyone behind it moves up, told once
        await c.expect("queued", position=i + 1, queue_size=3)
        await c.quiet()


async def test_hooks_are_called_and_a_failing_plugin_does_not_hurt(nursery):
    events: list[tuple] = []

    class Recorder:
        @relay_mod.hookimpl
        def relay_startup(self, relay, nursery):
            events.append(("startup", relay.port is not None))

        @relay_mod.hookimpl
        def relay_client_connected(self, client_id, remote):
            events.append(("connected", client_id, remote.startswith("127.0.0.1:")))

        @relay_mod.hookimpl
        def relay_matched(self, session):
            events.append(("matched", session.id))

        @relay_mod.hookimpl
        def relay_session_ended(self, session, reason, ended_by, duration):
            events.append(("ended", session.id, reason, ended_by, duration >= 0))

        @relay_mod.hookimpl
        def relay_client_disconnected(self, client_id, code, duration):
            events.append(("disconnected", client_id, code))

        @relay_mod.hookimpl
        def relay_ice_servers(self, session, client_id):
            return [{"urls": "turn:127.0.0.1:3478", "username": client_id, "credential": "x"}]

    class Broken:
        @relay_mod.hookimpl
        def relay_matched(self, session):
            raise RuntimeError("plugin bug")

        @relay_mod.hookimpl
        def relay_client_connected(self, client_id, remote):
            raise RuntimeError("plugin bug")

    from tests.conftest import start_relay

    r = await start_relay(nursery, plugins=[Recorder(), Broken()])
    h = Harness(nursery, r)
    a, b, ma, mb = await h.pair()
    assert ma["ice_servers"] == [{"urls": "turn:127.0.0.1:3478", "username": a.id, "credential": "x"}]
    assert mb["ice_servers"][0]["username"] == b.id
    await a.send(type="leave")
    await a.expect("left")
    await b.ws.aclose()
    with trio.fail_after(STEP):
        while ("disconnected", b.id, 1000) not in events:
            await trio.sleep(0.01)
    sid = ma["session_id"]
    assert events[0] == ("startup", True)
    assert ("connected", a.id, True) in events and ("connected", b.id, True) in events
    assert ("matched", sid) in events and ("ended", sid, "left", a.id, True) in events


async def test_ice_servers_flag_is_the_default(make_harness):
    h = await make_harness(ice_servers=({"urls": "stun:127.0.0.1:3478"},))
    _, _, ma, mb = await h.pair()
    assert ma["ice_servers"] == mb["ice_servers"] == [{"urls": "stun:127.0.0.1:3478"}]


async def test_max_connections(make_harness):
    h = await make_harness(max_connections=2)
    await h.connect()
    await h.connect()
    status, headers, body = await http_get(h.relay.port, "/ws", headers=UPGRADE)
    assert status == 503 and b"capacity" in body and headers["retry-after"]


async def test_handler_bug_closes_only_that_client_with_1011(harness: Harness, caplog):
    a, b, _, _ = await harness.pair()
    bystander = await harness.connect()

    def broken(c, msg):
        raise RuntimeError("a bug")

    harness.relay._handlers["ping"] = broken
    await a.send(type="ping")
    assert (await a.closed()).code == 1011
    await b.expect("peer_left", reason="disconnected")
    await bystander.send(type="join")  # the server is unharmed
    await bystander.expect("queued")
    assert any("handler failed" in r.message and r.exc_info for r in caplog.records)


@pytest.mark.parametrize("writes", ["one", "two"])
async def test_frames_sent_right_behind_the_upgrade_request_are_answered(harness: Harness, writes: str):
    """A client may send frames before the 101 arrives (RFC 6455 lets it). They must be read at once,
    whether they came in the same segment as the request head or just after it."""
    request = f"GET /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n".encode()
    payload = b'{"type":"ping"}'
    frame = bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload  # masked with key 0
    stream = await trio.open_tcp_stream("127.0.0.1", harness.relay.port)
    if writes == "one":
        await stream.send_all(request + frame)
    else:
        await stream.send_all(request)
        await stream.send_all(frame)
    data = b""
    with trio.fail_after(STEP):  # (before the fix, the pong waited for the next heartbeat: 20 s)
        while b"pong" not in data:
            chunk = await stream.receive_some()
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 101") and data.index(b"welcome") < data.index(b"pong")
    await stream.aclose()


async def test_invalid_utf8_closes_1007(harness: Harness):
    stream = await trio.open_tcp_stream("127.0.0.1", harness.relay.port)
    await stream.send_all(f"GET /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n".encode())
    data = b""
    with trio.fail_after(STEP):
        while b"welcome" not in data:  # a client waits for the 101 before sending frames
            data += await stream.receive_some()
        payload = b'{"type":"\xff"}'  # not UTF-8
        await stream.send_all(bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)  # masked with key 0
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    assert data[:1] == b"\x88" and int.from_bytes(data[2:4], "big") == 1007  # a close frame, code 1007
    with trio.fail_after(STEP):
        while harness.relay.statistics().connections:
            await trio.sleep(0.01)
