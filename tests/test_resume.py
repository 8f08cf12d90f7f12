"""Resume: a client whose connection vanishes keeps its place or session for --resume-grace, and
gets back every signal it missed, once and in order — including those written into the dead socket."""

from __future__ import annotations

import trio
import trio.testing

import relay as relay_mod
from tests.conftest import Client, Harness, start_relay


async def cut(c: Client) -> None:
    """The connection vanishes: no close frame, whatever was in flight to it is gone."""
    await c.ws._stream.aclose()


async def resume(h: Harness, token: str, last: int = 0) -> tuple[Client, dict]:
    c = await h.connect()
    await c.send(type="resume", token=token, last=last)
    return c, await c.recv()


async def test_cut_mid_negotiation_every_signal_arrives_once_in_order(make_harness):
    h = await make_harness(resume_grace=10)
    a, b, ma, _ = await h.pair()
    session = ma["session_id"]
    await a.send(type="signal", data={"description": "offer"})
    last = (await b.expect("signal", data={"description": "offer"}))["n"]
    for i in range(10):  # b stops reading: these reach its socket, then die with it
        await a.send(type="signal", data={"i": i})
    await trio.testing.wait_all_tasks_blocked()  # the relay has read and written all ten
    await cut(b)
    await a.expect("peer_reconnecting", session_id=session)
    for i in range(10, 20):  # a keeps negotiating while b is away
        await a.send(type="signal", data={"i": i})

    b2, resumed = await resume(h, b.welcome["resume_token"], last)
    assert resumed["type"] == "resumed", resumed
    assert (resumed["client_id"], resumed["state"], resumed["session_id"], resumed["peer_id"]) == (
        b.id, "matched", session, a.id,
    )  # fmt: skip
    for i in range(20):
        await b2.expect("signal", data={"i": i}, n=last + 1 + i)
    await b2.quiet()  # nothing twice
    await a.expect("peer_resumed", session_id=session)
    await b2.send(type="signal", data={"answer": True})  # the session goes on, both ways
    await a.expect("signal", data={"answer": True})
    await a.send(type="signal", data={"i": 20})
    await b2.expect("signal", data={"i": 20}, n=last + 21)
    stats = h.relay.statistics()
    assert (stats.resumed, stats.away, stats.sessions) == (1, 0, 1)


async def test_a_queued_client_keeps_its_place_and_wait(nursery):
    waits = []

    class Record:
        @relay_mod.hookimpl
        def relay_matched(self, session):
            waits.append((session.initiator, session.waits))

    r = await start_relay(nursery, plugins=[Record()], resume_grace=10, interest_timeout=60)
    h = Harness(nursery, r)
    first, second, third = await h.connect(), await h.connect(), await h.connect()
    for c, topic in ((first, "x"), (second, "y"), (third, "z")):
        await c.send(type="join", interests=[topic])
        await c.expect("queued")
    await trio.sleep(0.3)
    await cut(second)
    with trio.fail_after(5):
        while r.statistics().away != 1:
            await trio.sleep(0.01)
    newcomer = await h.connect()
    await newcomer.send(type="join", interests=["y"])  # second shares y, but is away: not matched
    await newcomer.expect("queued", position=4)

    back, resumed = await resume(h, second.welcome["resume_token"])
    assert (resumed["state"], resumed["position"], resumed["client_id"]) == ("queued", 2, second.id)
    matched = await back.expect("matched", peer_id=newcomer.id, initiator=True)  # it waited longer
    await newcomer.expect("matched", session_id=matched["session_id"])
    initiator, (waited, _) = waits[-1]
    assert initiator == second.id and waited >= 0.3  # its wait counts from its own join


async def test_refusals_look_alike_and_leave_the_connection_usable(make_harness):
    h = await make_harness(resume_grace=0.3)
    a, b, _, _ = await h.pair()
    await h.connect()  # a bystander
    refusals = []

    async def refused(token: str, **extra) -> Client:
        c, answer = await resume(h, token, **extra)
        assert answer["type"] == "error" and answer["code"] == "resume_failed", answer
        refusals.append(answer["message"])
        return c

    await refused(f"{b.id}.{'A' * 22}")  # the right id, a wrong secret: the connected client is unaffected
    await b.send(type="signal", data={"still": "here"})
    await a.expect("signal", data={"still": "here"})
    await refused(f"{b.id}.{'A' * 22}")  # the right id, a wrong secret
    await refused("no-such-client.whatever")
    token = b.welcome["resume_token"]
    await cut(b)
    await a.expect("peer_reconnecting")
    c, answer = await resume(h, token)
    assert answer["type"] == "resumed"
    await a.expect("peer_resumed")
    await refused(token)  # a token is good once
    new_token = answer["resume_token"]
    await c.ws.aclose()  # a clean close is final: no resume
    await a.expect("peer_left", reason="disconnected")
    await refused(new_token)
    x, y, _, _ = await h.pair()
    expired = y.welcome["resume_token"]
    await cut(y)
    await x.expect("peer_reconnecting")
    await x.expect("peer_left", reason="disconnected")  # the grace is over
    late = await refused(expired)
    assert len(set(refusals)) == 1  # the same answer whatever the reason: nothing to learn from it
    await late.send(type="join")  # the refused connection is an ordinary new client
    await late.expect("queued")

    second = await h.connect()
    await second.send(type="ping")
    await second.expect("pong")
    await second.send(type="resume", token=expired)  # only as the first message
    assert (await second.expect("error"))["code"] == "resume_failed"


async def test_too_much_while_away_ends_the_session_as_overflow(make_harness):
    h = await make_harness(resume_grace=10, resume_buffer_messages=5)
    a, b, ma, _ = await h.pair()
    token = b.welcome["resume_token"]
    await cut(b)
    await a.expect("peer_reconnecting")
    for i in range(6):
        await a.send(type="signal", data={"i": i})
    await a.expect("peer_left", session_id=ma["session_id"], reason="overflow")  # not silently lost
    b2, resumed = await resume(h, token)
    assert resumed["type"] == "resumed" and resumed["state"] == "idle"
    await b2.expect("peer_left", session_id=ma["session_id"], reason="overflow")
    await b2.quiet()
    assert h.relay.statistics().sessions_ended == {"overflow": 1}


async def test_a_clean_close_is_final(make_harness):
    h = await make_harness(resume_grace=10)
    a, b, ma, _ = await h.pair()
    await b.ws.aclose()  # the user closed the tab: the peer should not wait
    await a.expect("peer_left", session_id=ma["session_id"], reason="disconnected")
    assert h.relay.statistics().away == 0


async def test_resume_takes_over_a_client_whose_old_connection_still_looks_alive(make_harness):
    """A phone that switched networks reconnects before the relay can tell its old connection died:
    the token takes the client over at once (the old connection gets 4000), and nothing is missed."""
    h = await make_harness(resume_grace=10)
    a, b, _, _ = await h.pair()
    await a.send(type="signal", data={"i": 0})
    last = (await b.expect("signal", data={"i": 0}))["n"]
    for i in range(1, 4):  # written into b's old connection, never read there
        await a.send(type="signal", data={"i": i})
    b2, resumed = await resume(h, b.welcome["resume_token"], last)
    assert (resumed["type"], resumed["client_id"], resumed["state"]) == ("resumed", b.id, "matched"), resumed
    for i in range(1, 4):
        await b2.expect("signal", data={"i": i}, n=last + i)
    await b2.quiet()
    closed = await b.closed()
    assert closed.code == relay_mod.CLOSE_RESUMED, closed
    await a.quiet()  # the peer never saw b away: no peer_reconnecting, no peer_resumed
    await b2.send(type="signal", data={"answer": True})
    await a.expect("signal", data={"answer": True})
    assert h.relay.statistics().resumed == 1 and h.relay.statistics().connections == 2
