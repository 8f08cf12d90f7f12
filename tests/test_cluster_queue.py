"""The cluster's queue script on a real redis-server, held against the naive reference model.

``RedisQueueMachine`` is ``tests/test_matchmaker.py``'s state machine with ``Matchmaker`` replaced by
the Lua script (``plugins/cluster_queue.lua``) on Redis, each move made through one of three node
facades (as three relay nodes would): the same random moves and clock, the same decisions to the
letter (session ids aside: Redis makes its own; they are renamed in order of creation), the same
invariants read back from Redis. The state machine cannot await: the facades run their coroutines
on a Trio loop in a thread.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import coredis
import pytest
import trio
from conftest import RedisServer
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule, run_state_machine_as_test
from relay_plugins.cluster import KEYS, SCRIPT, QueueScript
from test_matchmaker import Clock, NaiveMatchmaker, QueueMachine

from relay import Ended, Matchmaker, Paired, Queued, Session


class TrioThread:
    """A Trio loop in a thread, holding one Redis client: ``call(fn)`` runs ``await fn(redis)`` there."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ready = threading.Event()
        self.token: trio.lowlevel.TrioToken | None = None
        self.thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self.thread.start()
        self.ready.wait(10)

    async def _main(self) -> None:
        self.redis = coredis.Redis.from_url(self.url)
        self.stop = trio.Event()
        async with self.redis:
            self.token = trio.lowlevel.current_trio_token()
            self.ready.set()
            await self.stop.wait()

    def call(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        return trio.from_thread.run(fn, self.redis, trio_token=self.token)

    def close(self) -> None:
        trio.from_thread.run_sync(self.stop.set, trio_token=self.token)
        self.thread.join(10)


class RedisMatchmaker:
    """Matchmaker's interface, synchronously, over the script: moves go through ``node``'s facade
    (``self.node`` is picked by the state machine), queries read Redis."""

    def __init__(self, loop: TrioThread, clock: Clock, nodes: int) -> None:
        self.loop, self.clock = loop, clock
        self.scripts = [
            loop.call(lambda r: _script(r)) for _ in range(nodes)
        ]  # one per node, as each node registers its own
        self.node = 0
        self.interest_timeout = 10
        self.rng = random.Random(7)  # the reference's seed: the same ids, in the same order
        self.ids: dict[str, str] = {}  # Redis session id -> the id the reference gave it
        self.known: dict[str, Session] = {}  # by (renamed) id: one object per session, as Matchmaker has
        self.state_cache: tuple | None = None
        self.home: dict[str, str] = {}  # client id -> the node it connected through (its moves come from there)

    def _move(self, move: str, cid: str = "", *args: str) -> list:
        script = self.scripts[self.node]
        self.state_cache = None

        async def run(redis: Any) -> list:
            return await script.move(move, cid, *args, node=self.home.get(cid, ""), now=self.clock.now)

        return [self._rename(d) for d, _ in self.loop.call(run)]

    def _rename(self, d: Any) -> Any:
        if isinstance(d, Queued):
            return d
        s = d.session
        if s.id not in self.ids:
            sid = f"{self.rng.getrandbits(64):016x}"
            while sid in self.ids.values():
                sid = f"{self.rng.getrandbits(64):016x}"
            self.ids[s.id] = sid
        renamed = Session(self.ids[s.id], s.initiator, s.answerer, s.interests, s.started_at, s.waits)
        return Paired(renamed) if isinstance(d, Paired) else Ended(renamed, d.reason, d.by)

    # -- moves -------------------------------------------------------------------------------------

    def connect(self, cid: str, identity: str | None = None) -> None:
        self.home[cid] = f"node{self.node}"
        self._move("connect", cid, identity or cid, f"node{self.node}")

    def join(self, cid: str, interests: Any = ()) -> list:
        import orjson

        return self._move("join", cid, orjson.dumps(sorted(set(interests))).decode())

    def next(self, cid: str) -> list:
        return self._move("next", cid)

    def leave(self, cid: str, reason: str = "left") -> list:
        return self._move("leave", cid, reason)

    def disconnect(self, cid: str, reason: str = "disconnected") -> list:
        return self._move("disconnect", cid, reason)

    def report(self, cid: str) -> list:
        return self._move("report", cid)

    def hold(self, cid: str) -> None:
        self._move("hold", cid)

    def release(self, cid: str) -> list:
        return self._move("release", cid)

    def tick(self) -> list:
        return self._move("tick")

    # -- queries (read back from Redis) -------------------------------------------------------------

    def _state(self) -> tuple:
        if self.state_cache is None:

            async def read(redis: Any) -> tuple:
                import orjson

                members = {k.decode(): orjson.loads(v) for k, v in (await redis.hgetall(KEYS[0])).items()}
                queue = [m.decode() for m in await redis.zrange(KEYS[1], 0, -1)]
                sessions = [orjson.loads(v) for v in (await redis.hvals(KEYS[4]))]
                blocks = {k.decode() for k in await redis.hkeys(KEYS[5])}
                index = {m.decode() for m in await redis.zrange(KEYS[2], 0, -1)}
                return members, queue, sessions, blocks, index

            self.state_cache = self.loop.call(read)
        return self.state_cache

    def waiting(self):
        members, queue, *_ = self._state()
        for cid in queue:
            m = members[cid]
            ints = m["ints"] if isinstance(m["ints"], list) else []
            yield cid, m["seq"], m["since"] / 1000, frozenset(ints), m["held"]

    def sessions(self):
        for s in self._state()[2]:
            sid = self.ids[s["id"]]
            if sid not in self.known:
                ints = tuple(s["ints"]) if isinstance(s["ints"], list) else ()
                w = (s["w"][0] / 1000, s["w"][1] / 1000)
                self.known[sid] = Session(sid, s["a"], s["b"], ints, s["t"] / 1000, w)
            yield self.known[sid]

    def session_of(self, cid: str) -> Session | None:
        sid = self._state()[0][cid]["sid"]
        if not sid:
            return None
        return next(s for s in self.sessions() if s.id == self.ids[sid])

    def state(self, cid: str) -> str:
        m = self._state()[0][cid]
        return "matched" if m["sid"] else "queued" if m["seq"] >= 0 else "idle"

    def interests_of(self, cid: str) -> frozenset[str]:
        ints = self._state()[0][cid]["ints"]
        return frozenset(ints if isinstance(ints, list) else [])

    def positions(self):
        for position, (cid, *_) in enumerate(self.waiting(), 1):
            yield cid, position

    @property
    def queue_size(self) -> int:
        return len(self._state()[1])

    def blocked(self, a: str, b: str) -> bool:
        members, _, _, blocks, _ = self._state()
        ia, ib = members[a]["ident"], members[b]["ident"]
        return f"{ia}\x1f{ib}" in blocks or f"{ib}\x1f{ia}" in blocks


async def _script(redis: Any) -> QueueScript:
    return QueueScript(redis, interest_timeout=10, rematch_cooldown=30, max_blocks=2, max_blocking_identities=3)


@pytest.fixture(scope="module")
def redis_loop(tmp_path_factory) -> Any:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    loop = TrioThread(server.url)
    yield loop
    loop.close()
    server.kill()


class RedisQueueMachine(QueueMachine):
    """QueueMachine with the script on Redis in place of Matchmaker, through three node facades."""

    loop: TrioThread

    def __init__(self) -> None:
        super().__init__()

        async def flush(redis: Any) -> None:
            await redis.flushall()

        self.loop.call(flush)
        self.mm = RedisMatchmaker(self.loop, self.clock, nodes=3)  # type: ignore[assignment]
        self.ref = NaiveMatchmaker(self.clock, 10, 30, 7, max_blocks=2, max_identities=3)

    @rule(node=st.integers(0, 2))
    def switch_node(self, node: int) -> None:
        self.mm.node = node

    @invariant()
    def heaps_hold_every_waiting_client(self) -> None:  # the index, exactly: no stale entries in Redis
        members, queue, _, _, index = self.mm._state()
        expected = set()
        for cid in queue:
            m = members[cid]
            if m["held"]:
                continue
            tail = f"{m['seq']:016d}\x1f{cid}"
            ints = m["ints"] if isinstance(m["ints"], list) else []
            expected |= {f"{i}\x1f{tail}" for i in ints}
            if m["open"]:
                expected.add(f"\x1f{tail}")
        assert index == expected

    def teardown(self) -> None:
        pass


def test_queue_script_decides_as_the_reference(redis_loop: TrioThread) -> None:
    RedisQueueMachine.loop = redis_loop

    runs = settings(max_examples=150, stateful_step_count=50, deadline=None)
    run_state_machine_as_test(RedisQueueMachine, settings=runs)


def test_every_key_of_the_script_is_declared_and_in_one_slot() -> None:
    """Redis Cluster runs a script only if every key it touches is passed in KEYS and all of them
    hash to one slot: the script names no key of its own, and every key has the tag {mm}."""
    assert all(key.startswith("{mm}:") for key in KEYS)
    code = "\n".join(line.split("--", 1)[0] for line in SCRIPT.splitlines())
    used = set(re.findall(r"redis\.call\('\w+', (\w+)", code))
    assert used <= {"M", "Q", "IX", "DL", "S", "B", "BL", "BO", "U", "C", "D", "O", "E"}, used
    assert "KEYS[" + str(len(KEYS)) + "]" in code and "KEYS[" + str(len(KEYS) + 1) + "]" not in code


# -- rules the random runs reach rarely, one scenario each (as tests/test_matchmaker.py's unit tests) ---


@pytest.fixture(params=["redis", "matchmaker"])
def facade(request: pytest.FixtureRequest, redis_loop: TrioThread) -> Any:
    """The script through two node facades, and Matchmaker itself: the expectations hold for both."""
    if request.param == "matchmaker":
        clock = Clock()
        mm = Matchmaker(
            clock=clock, rng=random.Random(1), interest_timeout=10, rematch_cooldown=30, max_blocks=2,
            max_blocking_identities=3,
        )  # fmt: skip
        mm.clock, mm.node = clock, 0  # type: ignore[attr-defined]
        return mm
    return _fresh_facade(redis_loop)


def _fresh_facade(redis_loop: TrioThread) -> RedisMatchmaker:
    """The script through two node facades, on an empty Redis."""

    async def flush(redis: Any) -> None:
        await redis.flushall()

    redis_loop.call(flush)
    return RedisMatchmaker(redis_loop, Clock(), nodes=2)


def test_the_cooldown_passes_over_a_recent_peer_while_another_waits(facade: RedisMatchmaker) -> None:
    mm = facade
    for cid in ("a", "b", "c"):
        mm.connect(cid)
    mm.join("a", ["x", "y"])
    [paired] = mm.join("b", ["x"])
    mm.node = 1
    mm.leave("b")
    mm.join("b", ["x"])  # b waits (for x), c waits (for y): they do not accept each other
    mm.join("c", ["y"])
    [again] = mm.next("a")  # b waited longer, but a just met it
    assert again.session.peer_of("a") == "c"
    mm.clock.now += 31
    mm.leave("a")
    [paired] = mm.join("a", ["x"])  # the cooldown is over, and b is the only one
    assert paired.session.peer_of("a") == "b"


def test_the_cooldown_never_leaves_the_only_pair_waiting(facade: RedisMatchmaker) -> None:
    mm = facade
    mm.connect("a")
    mm.connect("b")
    mm.join("a")
    mm.join("b")
    [_, queued] = mm.next("a")
    assert isinstance(queued, Queued)
    [paired] = mm.join("b")
    assert {paired.session.initiator, paired.session.answerer} == {"a", "b"}


def test_the_oldest_blocks_are_forgotten_at_the_bounds(facade: RedisMatchmaker) -> None:
    mm = facade  # max_blocks=2, max_blocking_identities=3 (see _script)
    mm.connect("r")
    for i in range(3):
        mm.connect(f"p{i}")
        mm.join("r")
        mm.join(f"p{i}")
        mm.report("r")
        mm.clock.now += 31
    # r's list keeps its 2 newest (p0 went when p2 came), and p0's own list went with the oldest
    # of the 4 identities with lists (3 are kept): nothing blocks r and p0 any more.
    assert not mm.blocked("r", "p0") and not mm.blocked("p0", "r")
    assert mm.blocked("r", "p1") and mm.blocked("r", "p2")
    mm.join("r")
    [paired] = mm.join("p0")
    assert paired.session.peer_of("r") == "p0"


# -- the restore: a node tells Redis its clients after it was alone, or after Redis lost its data ----


def _restore(loop: TrioThread, node: str, clients: list[dict], *, lost: bool, ended: list | None = None) -> dict:
    import orjson

    async def run(redis: Any) -> dict:
        script = await _script(redis)
        batch = {"first": True, "lost": lost, "ended": ended or [], "blocks": [], "c": clients}
        return await script.call("restore", "", orjson.dumps(batch).decode(), node=node, now=1000.0)

    return loop.call(run)


def _member(loop: TrioThread, cid: str) -> dict | None:
    import orjson

    async def run(redis: Any) -> Any:
        return await redis.hget(KEYS[0], cid)

    record = loop.call(run)
    return None if record is None else orjson.loads(record)


def test_a_session_redis_lost_is_made_again_or_ended_by_what_its_other_side_says(redis_loop: TrioThread) -> None:
    async def flush(redis: Any) -> None:
        await redis.flushall()

    redis_loop.call(flush)
    s1 = {"id": "s1", "a": "c", "b": "p", "ints": [], "t": 0, "w": [0, 0]}
    s2 = {"id": "s2", "a": "d", "b": "q", "ints": [], "t": 0, "w": [0, 0]}
    # n0 comes first: its sides of s1 and s2 are in; their peers (n1's) wait there for n1's word
    _restore(redis_loop, "n0", [
        {"id": "c", "ident": "c", "ints": [], "r": "x", "s": s1, "p": ["p", "p", "n1"]},
        {"id": "d", "ident": "d", "ints": [], "r": "x", "s": s2, "p": ["q", "q", "n1"]},
    ], lost=True)  # fmt: skip
    assert _member(redis_loop, "p")["sid"] == "s1" and _member(redis_loop, "p")["node"] == "n1"
    # n1 still has p in s1, but q went on alone meanwhile (it is waiting): s2 ends, its peer is told
    answer = _restore(redis_loop, "n1", [
        {"id": "p", "ident": "p", "ints": [], "r": "y", "s": s1, "p": ["c", "c", "n0"]},
        {"id": "q", "ident": "q", "ints": [], "r": "y", "q": {"waited": 3000, "held": False}, "last": "s2"},
    ], lost=True)  # fmt: skip
    ends = [d for d in answer["d"] if d[0] == "e"]
    assert [(d[1]["id"], d[2], d[3], d[4]) for d in ends] == [("s2", "disconnected", "q", "n0")]  # by q: d is told
    assert _member(redis_loop, "c")["sid"] == "s1" and _member(redis_loop, "d")["sid"] == ""
    assert _member(redis_loop, "q")["seq"] >= 0 and _member(redis_loop, "q")["since"] == 1_000_000 - 3000


def test_a_session_redis_made_that_the_waiting_sides_node_never_heard_of_stays(redis_loop: TrioThread) -> None:
    mm = _fresh_facade(redis_loop)
    mm.connect("a")
    mm.join("a")
    mm.node = 1
    mm.connect("b")
    [paired] = mm.join("b")  # on node1, while node0 (a's node) was cut off, or had not seen the primary move
    sid = next(k for k, v in mm.ids.items() if v == paired.session.id)
    waiting = {"id": "a", "ident": "a", "ints": [], "r": "x", "q": {"waited": 3000, "held": False}, "last": ""}
    answer = _restore(redis_loop, "node0", [waiting], lost=False)
    [kept] = answer["kept"]  # node0 tells a: matched (a waited first: the initiator)
    assert (kept[0], kept[1]["id"], kept[2:]) == ("p", sid, ["node0", "node1", "a", "b"])
    assert answer["d"] == [["r"]]  # nothing for node1: b has been told
    assert _member(redis_loop, "a")["sid"] == sid and _member(redis_loop, "a")["seq"] == -1
    # The same, had node0 seen that session (its end never reached this primary): it ends, a waits
    answer = _restore(redis_loop, "node0", [dict(waiting, last=sid)], lost=False)
    assert not answer["kept"]
    assert [(d[0], d[1]["id"], d[2], d[3]) for d in answer["d"] if d[0] == "e"] == [("e", sid, "disconnected", "a")]
    assert _member(redis_loop, "a")["sid"] == "" and _member(redis_loop, "a")["seq"] >= 0


def test_a_session_that_ended_while_its_node_was_alone_is_gone_with_its_reason(redis_loop: TrioThread) -> None:
    mm = _fresh_facade(redis_loop)
    mm.connect("a")
    mm.node = 1
    mm.connect("b")
    mm.join("a")
    [paired] = mm.join("b")
    sid = next(k for k, v in mm.ids.items() if v == paired.session.id)  # Redis's id for it
    mm.next("b")  # on n1, while n0 (a's node) was cut off from Redis
    session = {"id": sid, "a": "a", "b": "b", "ints": [], "t": 0, "w": [0, 0]}
    answer = _restore(redis_loop, "node0", [
        {"id": "a", "ident": "a", "ints": [], "r": "x", "s": session, "p": ["b", "b", "node1"]},
    ], lost=False)  # fmt: skip
    assert answer["gone"] == [[sid, "next", "b"]]  # a's node tells a how it ended
    assert _member(redis_loop, "a")["sid"] == ""
