"""What a client missed, without sockets: the ``Mailbox`` under a hypothesis state machine, and the
client phases.

The machine plays the relay's part exactly as ``Relay`` does (number and keep each signal, write it
when connected, hold other messages while away, end the session as ``overflow`` when the mailbox
says something would be lost) and the client's part as a real network allows: what was written to
a connection that then vanished arrives only in part (a prefix), and the client resumes with the
number of the last signal it actually got. Bounds change at random between steps. It checks the
promise of the resume: a session that goes on has had every one of its signals, once and in order;
one that cannot, ends as ``overflow``; the client never sees a signal after a gap.
"""

from __future__ import annotations

import pytest
from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from relay import PHASES, IllegalTransition, Mailbox, next_phase


def _signal(n: int, session: int, size: int) -> bytes:
    return b"s %d %d " % (session, n) + b"x" * size


def _notice(session: int, why: str) -> bytes:
    return b"peer_left %d %s" % (session, why.encode())


class MailboxMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mailbox = Mailbox(max_messages=4, max_bytes=120)
        self.connected = True
        self.wire: list[bytes] = []  # written to the current connection, not read yet
        self.got: list[tuple[int, int]] = []  # (session, n) of every signal the client read, in order
        self.told_overflow: set[int] = set()  # sessions the client read an overflow notice for
        self.session: int | None = None  # the live session (the client has a peer)
        self.sessions = 0
        self.sent: dict[int, list[int]] = {}  # session -> numbers of its signals, in order
        self.overflowed: set[int] = set()
        self.held_cap = 4  # the largest max_messages since the client went away

    # -- the relay's part ---------------------------------------------------------------------------

    def _overflow(self) -> None:
        """Relay._overflow: the held messages give way to the end of the session."""
        if self.session is not None:
            note(f"overflow ends session {self.session}")
            self.mailbox.replace_held(_notice(self.session, "overflow"))
            self.overflowed.add(self.session)
            self.session = None

    def _send(self, message: bytes) -> None:
        """Relay._send: into the socket, or, away, into the mailbox."""
        if self.connected:
            self.wire.append(message)
        elif not self.mailbox.hold(message):
            self._overflow()

    @precondition(lambda self: self.session is None and self.connected)  # the queue holds an away client
    @rule()
    def match(self) -> None:
        self.sessions += 1
        self.session = self.sessions
        self.sent[self.session] = []

    @precondition(lambda self: self.session is not None)
    @rule(size=st.integers(0, 60))
    def signal(self, size: int) -> None:
        """The peer signals (the read loop's signal branch)."""
        assert self.session is not None
        n = self.mailbox.number()
        out = _signal(n, self.session, size)
        self.sent[self.session].append(n)
        if not self.mailbox.keep(n, out):
            assert not self.connected, "a connected client's mailbox never refuses a signal"
            self._overflow()
        elif self.connected:
            self.wire.append(out)

    @rule(size=st.integers(0, 60))
    def other_message(self, size: int) -> None:
        """A queue position, a chat line's echo...: anything but a signal."""
        self._send(b"m " + b"y" * size)

    @precondition(lambda self: self.session is not None)
    @rule()
    def peer_leaves(self) -> None:
        assert self.session is not None
        self._send(_notice(self.session, "left"))
        self.session = None

    @rule(max_messages=st.integers(1, 8), max_bytes=st.integers(20, 300))
    def change_bounds(self, max_messages: int, max_bytes: int) -> None:
        self.mailbox.max_messages, self.mailbox.max_bytes = max_messages, max_bytes
        self.held_cap = max(self.held_cap, max_messages)

    # -- the client's part ---------------------------------------------------------------------------

    def _read(self, count: int) -> None:
        for message in self.wire[:count]:
            kind, session, *rest = message.split(b" ")
            if kind == b"s":
                self.got.append((int(session), int(rest[0])))
            elif kind == b"peer_left" and rest[0] == b"overflow":
                self.told_overflow.add(int(session))
        del self.wire[:count]

    @precondition(lambda self: self.connected and self.wire)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        self._read(data.draw(st.integers(1, len(self.wire))))

    @precondition(lambda self: self.connected)
    @rule(data=st.data())
    def connection_vanishes(self, data: st.DataObject) -> None:
        """Some of what was written arrives; the rest dies with the connection."""
        arrived = data.draw(st.integers(0, len(self.wire)))
        note(f"vanishes; {arrived} of {len(self.wire)} written arrive")
        self._read(arrived)
        self.wire.clear()
        self.connected = False
        self.mailbox.go_away()
        self.held_cap = self.mailbox.max_messages

    @precondition(lambda self: not self.connected)
    @rule()
    def resume(self) -> None:
        """Relay._on_resume: the client says the last signal it got."""
        last = max((n for _, n in self.got), default=0)
        missed, complete = self.mailbox.resume(last)
        note(f"resume after {last}: {len(missed)} messages, complete={complete}")
        if not complete:
            assert not any(m.startswith(b"s ") for m in missed), "a partial replay: a silent gap"
            if self.session is not None:
                missed.append(_notice(self.session, "overflow"))
                self.overflowed.add(self.session)
                self.session = None
        self.connected = True
        self.wire.extend(missed)
        if self.session is not None:  # it goes on: after reading, it has every signal of it
            self._read(len(self.wire))
            assert [n for s, n in self.got if s == self.session] == self.sent[self.session]

    # -- what must hold after every step -----------------------------------------------------------

    @invariant()
    def no_signal_twice_nor_after_a_gap(self) -> None:
        """Per session, the signals read are the first ones sent, in order: a prefix."""
        for session, numbers in self.sent.items():
            read = [n for s, n in self.got if s == session]
            assert read == numbers[: len(read)], (session, read, numbers)

    @invariant()
    def bounded(self) -> None:
        m = self.mailbox
        assert m.ring_bytes == sum(len(text) for _, text in m.ring)
        assert [n for n, _ in m.ring] == list(range(m.count - len(m.ring) + 1, m.count + 1))
        if m.held is not None:
            assert m.held_bytes == sum(map(len, m.held))
            assert len(m.held) <= self.held_cap  # replace_held leaves exactly one

    @invariant()
    def overflow_is_told_and_only_then(self) -> None:
        """A session the client did not get whole ended as overflow (told on resume, when it read)."""
        for session in self.told_overflow:
            assert session in self.overflowed

    def teardown(self) -> None:
        """Come back and read everything: every session that ended other than by overflow was whole
        for as long as it lasted, and every overflow the client can still learn of, it learns."""
        if not self.connected:
            self.resume()
        self._read(len(self.wire))
        live = self.session
        if live is not None:
            assert [n for s, n in self.got if s == live] == self.sent[live]


TestMailbox = MailboxMachine.TestCase
TestMailbox.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


# -- unit tests ---------------------------------------------------------------------------------------


def test_resume_hands_over_missed_signals_then_held_messages():
    m = Mailbox(max_messages=8, max_bytes=1000)
    for _ in range(3):
        m.keep(m.number(), b"sig%d" % m.count)
    m.go_away()
    m.keep(m.number(), b"sig4")
    assert m.hold(b"queued")
    assert m.resume(1) == ([b"sig2", b"sig3", b"sig4", b"queued"], True)
    assert not m.away


def test_resume_refuses_a_partial_replay():
    m = Mailbox(max_messages=2, max_bytes=1000)
    for _ in range(3):
        m.keep(m.number(), b"sig%d" % m.count)  # connected: the first falls out, delivered
    m.go_away()
    assert m.hold(b"chat")
    assert m.resume(0) == ([b"chat"], False)  # sig1 is gone: none of the three, rather than a gap
    assert m.resume(3) == ([], True)


def test_away_mailbox_refuses_what_would_be_lost():
    m = Mailbox(max_messages=2, max_bytes=10)
    m.go_away()
    assert m.hold(b"12345") and m.hold(b"12345")
    assert not m.hold(b"1")  # full: the relay ends the session rather than drop it
    assert m.keep(m.number(), b"a") and m.keep(m.number(), b"b")
    assert not m.keep(m.number(), b"c")  # signal 1 fell out before the client got it
    m.replace_held(b"peer_left overflow")
    assert m.resume(0) == ([b"peer_left overflow"], False)


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_phases_move_only_where_their_table_says(phase: str):
    for to in PHASES:
        if to in PHASES[phase]:
            assert next_phase(phase, to) == to
        else:
            with pytest.raises(IllegalTransition, match=f"{phase} -> {to}"):
                next_phase(phase, to)


def test_every_phase_can_end_and_gone_is_final():
    assert all(phase == "gone" or "gone" in PHASES[phase] for phase in PHASES)
    assert PHASES["gone"] == frozenset()
    for phase, targets in PHASES.items():
        assert targets <= PHASES.keys(), phase
