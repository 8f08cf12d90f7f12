"""Abuse limits: per-address caps and rates, origins, flooding, joins per minute, reports."""

from __future__ import annotations

import trio

import relay as relay_mod
from tests.conftest import UPGRADE, Harness, http_get, start_relay


async def upgrade_status(port: int, headers: str = "") -> int:
    return (await http_get(port, "/ws", headers=UPGRADE + headers))[0]


async def test_connections_per_address_are_capped(make_harness):
    h = await make_harness(max_connections_per_ip=3)
    clients = [await h.connect() for _ in range(3)]
    status, headers, body = await http_get(h.relay.port, "/ws", headers=UPGRADE)
    assert status == 429 and b"too many connections" in body and headers["retry-after"]
    await clients[0].ws.aclose()
    with trio.fail_after(5):
        while h.relay.statistics().sockets != 2:
            await trio.sleep(0.01)
    await h.connect()  # room again


async def test_new_connections_per_address_are_rate_limited(make_harness):
    h = await make_harness(connect_rate_per_ip=0.001, connect_burst_per_ip=4)
    for _ in range(4):
        c = await h.connect()
        await c.ws.aclose()
    status, _, body = await http_get(h.relay.port, "/ws", headers=UPGRADE)
    assert status == 429 and b"slow down" in body


async def test_behind_a_proxy_each_client_address_counts(make_harness):
    h = await make_harness(max_connections_per_ip=1, trusted_proxies=("127.0.0.1/32",))
    await h.connect(headers={"X-Forwarded-For": "198.51.100.1"})
    await h.connect(headers={"X-Forwarded-For": "198.51.100.2"})  # another person behind the same proxy
    await h.connect(headers={"X-Forwarded-For": "203.0.113.9, 198.51.100.3"})  # the proxy appended the last
    assert await upgrade_status(h.relay.port, "X-Forwarded-For: 198.51.100.1\r\n") == 429
    untrusting = await make_harness(max_connections_per_ip=1)
    await untrusting.connect(headers={"X-Forwarded-For": "198.51.100.1"})
    # without --trusted-proxy the header is anyone's to write: the socket's address counts
    assert await upgrade_status(untrusting.relay.port, "X-Forwarded-For: 198.51.100.9\r\n") == 429


async def test_only_allowed_origins_may_connect(make_harness):
    h = await make_harness(allowed_origins=("https://chat.example.com",))
    await h.connect(headers={"Origin": "https://chat.example.com"})
    assert await upgrade_status(h.relay.port, "Origin: https://evil.example.net\r\n") == 403
    assert await upgrade_status(h.relay.port) == 403  # no Origin at all
    assert (await http_get(h.relay.port, "/healthz"))[0] == 200  # plain HTTP is not affected


async def test_flooding_escalates_from_errors_to_a_close(make_harness):
    h = await make_harness(message_rate=1, message_burst=5, flood_limit=10)
    flooder = await h.connect()
    bystander_a, bystander_b, _, _ = await h.pair()
    started = trio.current_time()
    for _ in range(40):
        try:
            await flooder.send(type="ping")
        except Exception:
            break
    refills = int(trio.current_time() - started) + 1  # tokens the bucket regained meanwhile, at most (rate 1/s)
    answers = []
    while True:
        try:
            answers.append((await flooder.recv())["type"])
        except Exception:
            break
    assert 5 <= answers.count("pong") <= 5 + refills, answers  # the burst (and what a slow machine refilled)...
    assert answers.count("error") == 9  # ...then refusals...
    reason = flooder.ws.closed
    assert reason is not None and reason.code == 1008  # ...then the door
    await bystander_a.send(type="signal", data={"ok": 1})  # nobody else noticed
    await bystander_b.expect("signal", data={"ok": 1})


async def test_joins_and_nexts_per_minute(make_harness):
    h = await make_harness(joins_per_minute=3)
    c = await h.connect()
    for kind in ("join", "next", "leave", "join"):
        await c.send(type=kind)
        await c.expect("left" if kind == "leave" else "queued")
    await c.send(type="next")
    error = await c.expect("error", code="rate_limited")
    assert "joins" in error["message"]


async def test_report_ends_the_session_and_the_two_never_meet_again(nursery):
    reports = []

    class Record:
        @relay_mod.hookimpl
        def relay_report(self, session, reporter, reported, reason, users):
            reports.append((session.id, reporter, reported, reason))

    r = await start_relay(nursery, plugins=[Record()])
    h = Harness(nursery, r)
    a, b, ma, _ = await h.pair()
    await a.send(type="report", reason="spam")
    await a.expect("reported")
    await b.expect("peer_left", session_id=ma["session_id"], reason="left")  # not told it was reported
    assert reports == [(ma["session_id"], a.id, b.id, "spam")]
    await a.send(type="join")
    await a.expect("queued")
    await b.send(type="join")
    await b.expect("queued")  # the only other waiting client, and still not a match: decided at the join
    await a.quiet()
    c = await h.connect()
    await c.send(type="join")
    assert (await c.expect("matched"))["peer_id"] == a.id  # a waited longest
    await a.expect("matched", peer_id=c.id)
    await a.send(type="report", reason="x" * 201)
    await a.expect("error", code="bad_message")
    solo = await h.connect()
    await solo.send(type="report")
    await solo.expect("error", code="not_matched")
    assert r.statistics().sessions_ended == {"reported": 1}
