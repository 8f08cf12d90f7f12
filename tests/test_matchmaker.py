"""The matchmaking core, without sockets: unit tests and a hypothesis state machine.

The state machine drives the real ``Matchmaker`` and a naive reference (``NaiveMatchmaker``: plain
lists, scans everything) with the same random moves and clock, requires identical decisions, and
checks the invariants of the issue after every step.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from relay import Ended, IllegalMove, Matchmaker, Paired, ProtocolError, Queued, Session, parse_interests


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(timeout: float = 10.0, cooldown: float = 30.0, seed: int = 0) -> tuple[Matchmaker, Clock]:
    clock = Clock()
    return Matchmaker(clock=clock, rng=random.Random(seed), interest_timeout=timeout, rematch_cooldown=cooldown), clock


def connected(mm: Matchmaker, *ids: str) -> None:
    for cid in ids:
        mm.connect(cid)


# -- unit tests: one rule each -----------------------------------------------------------------------


def test_first_waits_second_pairs_and_waiter_initiates():
    mm, _ = make()
    connected(mm, "a", "b")
    assert mm.join("a") == [Queued("a", 1, 1)]
    [paired] = mm.join("b")
    assert isinstance(paired, Paired)
    assert (paired.session.initiator, paired.session.answerer) == ("a", "b")
    assert mm.state("a") == mm.state("b") == "matched"
    assert mm.queue_size == 0 and mm.session_count == 1


def test_fifo_longest_waiting_first():
    mm, clock = make()
    connected(mm, "a", "b", "c")
    mm.join("a", ["x"])
    clock.now += 1
    mm.join("b", ["y"])
    clock.now += 20  # both interest timeouts pass: both accept anyone (not each other: tick not run)
    [paired] = mm.tick()  # a expires first and takes b
    assert paired.session.initiator == "a"


def test_interests_pair_only_on_shared_interest_until_timeout():
    mm, _ = make(timeout=10)
    connected(mm, "music", "sport", "other")
    mm.join("music", ["music", "film"])
    assert mm.join("sport", ["sport"])[0] == Queued("sport", 2, 2)
    [paired] = mm.join("other", ["film", "music"])
    assert paired.session.initiator == "music" and paired.session.interests == ("film", "music")


def test_interest_timeout_falls_back_to_anyone():
    mm, clock = make(timeout=10)
    connected(mm, "x", "plain")
    mm.join("x", ["chess"])
    assert isinstance(mm.join("plain")[0], Queued)  # x does not accept plain yet
    clock.now += 9.9
    assert mm.tick() == []
    clock.now += 0.1
    [paired] = mm.tick()
    assert {paired.session.initiator, paired.session.answerer} == {"x", "plain"}
    assert paired.session.interests == ()


def test_timeout_counts_from_next_not_from_connect():
    mm, clock = make(timeout=10)
    connected(mm, "a", "b", "c")
    mm.join("a", ["go"])
    mm.join("b", ["go"])  # paired
    clock.now += 60
    decisions = mm.next("a")  # a waits again with ["go"], timer restarts now
    assert isinstance(decisions[0], Ended) and isinstance(decisions[1], Queued)
    mm.join("c")
    assert mm.state("c") == "queued"
    clock.now += 10
    assert isinstance(mm.tick()[0], Paired)


def test_join_while_queued_updates_interests_keeps_place():
    mm, clock = make()
    connected(mm, "a", "b", "c")
    mm.join("a", ["x"])
    mm.join("b", ["y"])
    clock.now += 3
    assert mm.join("a", ["z"]) == [Queued("a", 1, 2)]  # same place, new interests
    [paired] = mm.join("c", ["z"])
    assert paired.session.initiator == "a" and paired.session.waits[0] == 3


def test_join_while_matched_is_illegal_and_changes_nothing():
    mm, _ = make()
    connected(mm, "a", "b")
    mm.join("a")
    mm.join("b")
    with pytest.raises(IllegalMove) as err:
        mm.join("a", ["new"])
    assert err.value.code == "already_matched"
    assert mm.interests_of("a") == frozenset() and mm.state("a") == "matched"


def test_next_ends_session_and_requeues_with_last_interests():
    mm, _ = make()
    connected(mm, "a", "b", "c")
    mm.join("a", ["cats"])
    mm.join("b", ["cats"])
    mm.join("c", ["cats"])
    ended, paired = mm.next("b")
    assert isinstance(ended, Ended) and ended.reason == "next" and ended.by == "b" and ended.notify == "a"
    assert isinstance(paired, Paired) and paired.session.initiator == "c" and paired.session.answerer == "b"
    assert mm.state("a") == "idle"  # not re-queued unless it asks


def test_next_while_idle_or_queued_acts_as_join():
    mm, _ = make()
    connected(mm, "a")
    assert mm.next("a") == [Queued("a", 1, 1)]
    assert mm.next("a") == [Queued("a", 1, 1)]


def test_leave_and_disconnect():
    mm, _ = make()
    connected(mm, "a", "b", "c")
    mm.join("a")
    assert mm.leave("a") == [] and mm.state("a") == "idle" and mm.queue_size == 0
    assert mm.leave("a") == []  # idle: nothing to do
    mm.join("a")
    mm.join("b")
    [ended] = mm.leave("a")
    assert ended.reason == "left" and ended.notify == "b"
    mm.join("a")
    mm.join("c")
    [ended] = mm.disconnect("c")
    assert ended.reason == "disconnected" and ended.notify == "a" and "c" not in mm
    with pytest.raises(KeyError):
        mm.join("c")


def recent_pair(mm: Matchmaker) -> None:
    """x and y just ended a session; afterwards x waits with interest "a"."""
    connected(mm, "x", "y", "z")
    mm.join("x", ["a"])
    mm.join("y", ["a"])
    mm.leave("y")
    mm.join("x", ["a"])


def test_rematch_cooldown_passes_over_a_recent_peer_while_another_candidate_waits():
    mm, clock = make(cooldown=30)
    recent_pair(mm)
    mm.join("z", ["b"])  # z waits too, after x; x and z do not accept each other
    clock.now += 1
    [paired] = mm.join("y", ["a", "b"])  # both accept y; x waited longer but is a recent peer
    assert paired.session.peer_of("y") == "z"


def test_rematch_cooldown_expires():
    mm, clock = make(timeout=100, cooldown=30)
    recent_pair(mm)
    mm.join("z", ["b"])
    clock.now += 30
    mm.tick()
    [paired] = mm.join("y", ["a", "b"])
    assert paired.session.peer_of("y") == "x"  # the longest-waiting again


def test_rematch_cooldown_never_leaves_the_only_pair_waiting():
    mm, _ = make(cooldown=30)
    recent_pair(mm)
    [paired] = mm.join("y", ["a"])  # nobody else waits: pair them again
    assert paired.session.peer_of("y") == "x"


def test_positions_are_one_to_n_in_queue_order():
    mm, _ = make()
    connected(mm, *"abcdef")
    for cid, interest in zip("abcde", ["1", "2", "3", "4", "5"], strict=True):
        mm.join(cid, [interest])
    assert list(mm.positions()) == [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5)]
    mm.queue_changed = False
    mm.join("f", ["2"])  # takes b
    assert mm.queue_changed
    assert list(mm.positions()) == [("a", 1), ("c", 2), ("d", 3), ("e", 4)]


def test_join_cost_does_not_scan_the_queue():
    """100,000 waiting clients that nobody is compatible with: a join still finds its partner
    without touching them (counted: the heaps looked at stay tiny)."""
    mm, _ = make()
    for i in range(100_000):
        mm.connect(f"w{i}")
        mm.join(f"w{i}", [f"topic{i}"])
    mm.connect("new")
    mm.connect("late")
    mm.join("late", ["rare"])
    calls = Counter()
    original = mm._scan

    def counting_scan(heap, *args):
        calls["entries"] += len(heap)
        return original(heap, *args)

    mm._scan = counting_scan  # type: ignore[method-assign]
    [paired] = mm.join("new", ["rare"])
    assert paired.session.initiator == "late"
    assert calls["entries"] == 1


def test_heaps_are_compacted_after_churn():
    mm, _ = make()
    connected(mm, "old")
    mm.join("old", ["keep"])
    for i in range(5000):
        cid = f"c{i}"
        mm.connect(cid)
        mm.join(cid, [f"t{i % 7}", "common"])
        mm.leave(cid)
        mm.disconnect(cid)
    assert mm._entries < 3000  # stale entries do not pile up without bound


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, frozenset()),
        ([], frozenset()),
        (["Music", " music ", "MUSIC"], frozenset({"music"})),
        (["Straße"], frozenset({"strasse"})),
        (["a" * 32], frozenset({"a" * 32})),
    ],
)
def test_parse_interests_accepts(value, expected):
    assert parse_interests(value) == expected


@pytest.mark.parametrize(
    "value",
    ["music", [1], [""], ["   "], ["a" * 33], ["x"] * 11, [["nested"]], ["tab\there"], {"a": 1}],
)
def test_parse_interests_refuses(value):
    with pytest.raises(ProtocolError) as err:
        parse_interests(value)
    assert err.value.code == "bad_message"


# -- the reference model -----------------------------------------------------------------------------


class NaiveMatchmaker:
    """What the rules say, written the obvious way: lists and full scans. Same decisions expected."""

    def __init__(
        self, clock: Clock, timeout: float, cooldown: float, seed: int, max_blocks: int, max_identities: int
    ) -> None:
        self.clock, self.timeout, self.cooldown = clock, timeout, cooldown
        self.max_blocks, self.max_identities = max_blocks, max_identities
        self.rng = random.Random(seed)
        self.interests: dict[str, frozenset[str]] = {}
        self.waiting: list[dict] = []  # {"id", "seq", "since", "open"} in ticket order
        self.session: dict[str, Session] = {}
        self.ended_at: dict[frozenset[str], float] = {}
        self.tickets = 0
        self.session_ids: set[str] = set()
        self.identity: dict[str, str] = {}  # client id -> whom a report blocks (a user id, or itself)
        self.blocked: dict[str, list[str]] = {}  # identity -> identities it blocked, oldest first

    def connect(self, cid: str, identity: str | None = None) -> None:
        self.identity[cid] = identity or cid

    def is_blocked(self, a: str, b: str) -> bool:
        ia, ib = self.identity[a], self.identity[b]
        return ib in self.blocked.get(ia, ()) or ia in self.blocked.get(ib, ())

    def accepts(self, w: dict, other: str) -> bool:
        return w["open"] or bool(self.interests[w["id"]] & self.interests[other])

    def cooling(self, a: str, b: str) -> bool:
        t = self.ended_at.get(frozenset((a, b)))
        return t is not None and self.clock.now - t < self.cooldown

    def best(self, me: dict) -> dict | None:
        cands = [
            w
            for w in self.waiting
            if w["id"] != me["id"]
            and not w.get("held")
            and not self.is_blocked(w["id"], me["id"])
            and self.accepts(me, w["id"])
            and self.accepts(w, me["id"])
        ]
        fresh = [w for w in cands if not self.cooling(me["id"], w["id"])]
        pool = fresh or cands
        return min(pool, key=lambda w: w["seq"]) if pool else None

    def pair(self, a: dict, b: dict) -> Paired:
        if b.get("seq") is not None and (a.get("seq") is None or b["seq"] < a["seq"]):
            a, b = b, a
        self.waiting = [w for w in self.waiting if w["id"] not in (a["id"], b["id"])]
        sid = f"{self.rng.getrandbits(64):016x}"
        while sid in self.session_ids:
            sid = f"{self.rng.getrandbits(64):016x}"
        self.session_ids.add(sid)
        now = self.clock.now
        shared = tuple(sorted(self.interests[a["id"]] & self.interests[b["id"]]))
        s = Session(sid, a["id"], b["id"], shared, now, (now - a["since"], now - b["since"]))
        self.session[a["id"]] = self.session[b["id"]] = s
        return Paired(s)

    def is_open(self, cid: str, since: float) -> bool:
        return not self.interests[cid] or self.clock.now - since >= self.timeout

    def join(self, cid: str, interests) -> list:
        if cid in self.session:
            raise IllegalMove("already_matched", "")
        interests = frozenset(interests)
        mine = next((w for w in self.waiting if w["id"] == cid), None)
        if mine is not None and mine.get("held"):
            raise IllegalMove("bad_message", "")
        if mine is not None:
            self.interests[cid] = interests
            mine["open"] = self.is_open(cid, mine["since"])
            partner = self.best(mine)
            if partner:
                return [self.pair(partner, mine)]
            return [Queued(cid, self.waiting.index(mine) + 1, len(self.waiting))]
        self.interests[cid] = interests
        me = {"id": cid, "seq": None, "since": self.clock.now, "open": self.is_open(cid, self.clock.now)}
        partner = self.best(me)
        if partner:
            return [self.pair(partner, me)]
        me["seq"] = self.tickets
        self.tickets += 1
        self.waiting.append(me)
        return [Queued(cid, len(self.waiting), len(self.waiting))]

    def end(self, cid: str, reason: str) -> Ended:
        s = self.session.pop(cid)
        del self.session[s.peer_of(cid)]
        self.ended_at[frozenset((s.initiator, s.answerer))] = self.clock.now
        return Ended(s, reason, cid)

    def next(self, cid: str) -> list:
        out = [self.end(cid, "next")] if cid in self.session else []
        return out + self.join(cid, self.interests.get(cid, frozenset()))

    def leave(self, cid: str, reason: str = "left") -> list:
        if cid in self.session:
            return [self.end(cid, reason)]
        self.waiting = [w for w in self.waiting if w["id"] != cid]
        return []

    def disconnect(self, cid: str) -> list:
        out = self.leave(cid, "disconnected")
        self.interests.pop(cid, None)
        if self.identity.pop(cid) == cid:  # a client's own blocks end with it; a user's outlive it
            self.blocked.pop(cid, None)
        return out

    def report(self, cid: str) -> list:
        if cid not in self.session:
            raise IllegalMove("not_matched", "")
        me, other = self.identity[cid], self.identity[self.session[cid].peer_of(cid)]
        forgotten: list[str] = []
        for a, b in ((me, other), (other, me)):
            blocked = self.blocked.pop(a, [])  # back at the end: the most recent reporters are kept
            if b not in blocked:
                blocked.append(b)
            if len(blocked) > self.max_blocks:
                forgotten += (a, blocked.pop(0))
            self.blocked[a] = blocked
            if len(self.blocked) > self.max_identities:
                oldest = next(iter(self.blocked))
                forgotten += (oldest, *self.blocked.pop(oldest))
        out = [self.end(cid, "reported")]
        for identity in forgotten:  # forgotten blocks: whoever now accepts a waiting client is paired
            for other_id in [c for c, i in self.identity.items() if i == identity]:
                w = next((w for w in self.waiting if w["id"] == other_id and not w.get("held")), None)
                if w is not None and (partner := self.best(w)) is not None:
                    out.append(self.pair(partner, w))
        return out

    def hold(self, cid: str) -> None:
        for w in self.waiting:
            if w["id"] == cid:
                w["held"] = True

    def release(self, cid: str) -> list:
        me = next((w for w in self.waiting if w["id"] == cid and w.get("held")), None)
        if me is None:
            return []
        me["held"] = False
        me["open"] = self.is_open(cid, me["since"])
        partner = self.best(me)
        return [self.pair(partner, me)] if partner else []

    def tick(self) -> list:
        out = []
        due = sorted(
            (w["since"] + self.timeout, w["seq"], w["id"])
            for w in self.waiting
            if not w["open"] and not w.get("held") and w["since"] + self.timeout <= self.clock.now
        )
        for _, seq, cid in due:
            me = next((w for w in self.waiting if w["id"] == cid and w["seq"] == seq), None)
            if me is None or me["open"]:
                continue
            me["open"] = True
            partner = self.best(me)
            if partner:
                out.append(self.pair(partner, me))
        return out


def compare(real: list, naive: list) -> None:
    """The same decisions, to the letter: positions too (what the relay tells the clients)."""
    assert real == naive


IDS = [f"c{i}" for i in range(8)]
INTERESTS = st.lists(st.sampled_from(["art", "books", "chess"]), max_size=2)


class QueueMachine(RuleBasedStateMachine):
    """Random joins, leaves, nexts, disconnects and clock advances against both implementations."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        # Small bounds, so that the runs reach them: heap compaction, and forgetting the oldest blocks.
        self.mm = Matchmaker(
            clock=self.clock, rng=random.Random(7), interest_timeout=10, rematch_cooldown=30, compact_after=4,
            max_blocks=2, max_blocking_identities=3,
        )  # fmt: skip
        self.ref = NaiveMatchmaker(self.clock, 10, 30, 7, max_blocks=2, max_identities=3)
        self.connected: list[str] = []
        self.next_id = 0
        self.started: set[str] = set()
        self.ended: Counter[str] = Counter()

    def both(self, name: str, *args) -> list:
        note(f"{name}{args} at t={self.clock.now - 1000:g}")
        try:
            naive = getattr(self.ref, name)(*args) or []
        except IllegalMove as exc:
            before = self.snapshot()
            with pytest.raises(IllegalMove) as err:
                getattr(self.mm, name)(*args)
            assert err.value.code == exc.code
            assert self.snapshot() == before  # an illegal move changes nothing
            return []
        real = getattr(self.mm, name)(*args) or []
        note(f"  -> {real}")
        compare(real, naive)
        self.record(real)
        return real

    def record(self, decisions: list) -> None:
        for d in decisions:
            if isinstance(d, Paired):
                assert d.session.id not in self.started
                # Reported pairs are never paired again (a session of two other tabs of the same two
                # users that began before the report may go on).
                assert not self.mm.blocked(d.session.initiator, d.session.answerer)
                self.started.add(d.session.id)
            elif isinstance(d, Ended):
                self.ended[d.session.id] += 1
                assert d.notify == d.session.peer_of(d.by) != d.by

    def snapshot(self) -> tuple:
        return (
            list(self.mm.waiting()),
            sorted((s.id, s.initiator, s.answerer) for s in self.mm.sessions()),
            {cid: (self.mm.state(cid), self.mm.interests_of(cid)) for cid in self.connected},
        )

    def pick(self, data) -> str:
        return data.draw(st.sampled_from(self.connected))

    @precondition(lambda self: len(self.connected) < len(IDS))
    @rule(user=st.sampled_from([None, None, "u0", "u1", "u2", "u3"]))
    def connect(self, user) -> None:
        cid = f"c{self.next_id}"
        self.next_id += 1
        self.mm.connect(cid, identity=user)
        self.ref.connect(cid, identity=user)
        self.connected.append(cid)
        note(f"connect {cid} as {user or cid}")

    @precondition(lambda self: self.connected)
    @rule(data=st.data(), interests=INTERESTS)
    def join(self, data, interests) -> None:
        self.both("join", self.pick(data), interests)

    @precondition(lambda self: self.connected)
    @rule(data=st.data())
    def next(self, data) -> None:
        self.both("next", self.pick(data))

    @precondition(lambda self: self.connected)
    @rule(data=st.data())
    def leave(self, data) -> None:
        self.both("leave", self.pick(data))

    @precondition(lambda self: self.connected)
    @rule(data=st.data())
    def disconnect(self, data) -> None:
        cid = self.pick(data)
        self.both("disconnect", cid)
        self.connected.remove(cid)

    @precondition(lambda self: self.connected)
    @rule(data=st.data())
    def report(self, data) -> None:
        self.both("report", self.pick(data))

    @precondition(lambda self: self.connected)
    @rule(data=st.data())
    def hold(self, data) -> None:
        self.both("hold", self.pick(data))

    @precondition(lambda self: self.connected)
    @rule(data=st.data())
    def release(self, data) -> None:
        self.both("release", self.pick(data))

    @rule(seconds=st.sampled_from([0.5, 1, 3, 9.5, 10, 31]))
    def advance(self, seconds) -> None:
        self.clock.now += seconds
        self.both("tick")

    @invariant()
    def one_place_per_client(self) -> None:
        waiting = [cid for cid, *_ in self.mm.waiting()]
        in_sessions = [cid for s in self.mm.sessions() for cid in (s.initiator, s.answerer)]
        assert len(set(waiting)) == len(waiting)
        assert len(set(in_sessions)) == len(in_sessions)  # in at most one session
        assert not set(waiting) & set(in_sessions)

    @invariant()
    def sessions_are_symmetric_and_never_self(self) -> None:
        for s in self.mm.sessions():
            assert s.initiator != s.answerer
            assert self.mm.session_of(s.initiator) is s is self.mm.session_of(s.answerer)

    @invariant()
    def matching_is_maximal(self) -> None:
        now, timeout = self.clock.now, self.mm.interest_timeout
        waiting = [w for w in self.mm.waiting() if not w[4]]  # held clients are away: not matchable

        def accepts(a, b) -> bool:
            return not a[3] or now - a[2] >= timeout or bool(a[3] & b[3])

        for i, a in enumerate(waiting):
            for b in waiting[i + 1 :]:
                if self.mm.blocked(a[0], b[0]):
                    continue  # reported: never compatible
                assert not (accepts(a, b) and accepts(b, a)), f"{a[0]} and {b[0]} both wait but are compatible"

    @invariant()
    def positions_are_one_to_n(self) -> None:
        positions = list(self.mm.positions())
        assert [p for _, p in positions] == list(range(1, self.mm.queue_size + 1))
        assert [cid for cid, _ in positions] == [cid for cid, *_ in self.mm.waiting()]

    @invariant()
    def every_session_ends_exactly_once(self) -> None:
        active = {s.id for s in self.mm.sessions()}
        assert all(count == 1 for count in self.ended.values())
        assert set(self.ended) == self.started - active

    @invariant()
    def agrees_with_reference(self) -> None:
        assert [(cid, held) for cid, *_, held in self.mm.waiting()] == [
            (w["id"], bool(w.get("held"))) for w in self.ref.waiting
        ]

    @invariant()
    def blocks_agree_with_reference(self) -> None:
        for a in self.connected:
            for b in self.connected:
                assert self.mm.blocked(a, b) == self.ref.is_blocked(a, b), (a, b)

    @invariant()
    def heaps_hold_every_waiting_client(self) -> None:
        for cid, _, _, interests, held in self.mm.waiting():
            if not held:
                for interest in interests:
                    assert any(entry[1] == cid for entry in self.mm._by_interest.get(interest, ()))

    def teardown(self) -> None:
        QueueMachine.compactions += self.mm.compactions
        QueueMachine.evictions += self.mm.evictions


QueueMachine.compactions = 0  # over all the runs: the bounds are reached, the paths behind them run
QueueMachine.evictions = 0


QueueMachine.TestCase.settings = settings(max_examples=1000, stateful_step_count=80, deadline=None)
TestQueue = QueueMachine.TestCase


def test_the_machine_reaches_compaction_and_forgets_old_blocks():
    before = QueueMachine.compactions, QueueMachine.evictions
    runs = settings(max_examples=200, stateful_step_count=80, deadline=None, derandomize=True, database=None)
    run_state_machine_as_test(QueueMachine, settings=runs)  # the same runs every time
    assert QueueMachine.compactions > before[0] and QueueMachine.evictions > before[1]
