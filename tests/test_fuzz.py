"""A hypothesis-driven fuzzer against a real relay process, while a well-behaved pair keeps relaying.

Thousands of frames: random JSON, protocol messages with wrong field types, huge numbers, deep
nesting, strings with lone surrogates, NaN and Infinity, random text, binary frames, pings and
pongs, messages in fragments, invalid UTF-8, endless continuations and raw frames with random
opcodes and flag bits, from many connections. After every batch the relay is alive and its memory
is within bounds; at the end the pair has lost nothing, the relay is healthy, and its log holds no
traceback (a handler that raised would have logged one).
"""

from __future__ import annotations

import json
import socket
import struct
import threading

import trio
import trio_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import STEP, UPGRADE, RelayProcess

TYPES = ["join", "next", "leave", "signal", "ping", "report", "resume", "welcome", "", "JOIN", "signal\x00"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=30,
)
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(TYPES) | st.text(max_size=12) | json_values},
    optional={
        "interests": json_values | st.lists(st.text(max_size=40), max_size=14),
        "data": json_values,
        "token": json_values | st.text(max_size=200),
        "last": json_values | st.integers(),
        "reason": json_values | st.text(max_size=300),
    },
)


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    """A client frame, masked with the key 0."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + b"\0\0\0\0" + payload


def text(payload: str | bytes) -> bytes:
    return frame(0x1, payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload)


# Frames the relay answers (with errors, mostly) and the connection goes on...
answered = st.one_of(
    messages.map(lambda m: text(json.dumps(m))),  # protocol-shaped, wrong in every way
    json_values.map(lambda v: text(json.dumps(v))),  # any JSON at all
    st.text(max_size=200).map(text),  # not JSON
    st.integers(1, 20_000).map(lambda depth: text("[" * depth + "]" * depth)),  # deep nesting
    st.integers(1, 60_000).map(lambda digits: text("9" * digits)),  # a huge number
    st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", '{"type": 1e999}']).map(text),
    st.text(max_size=20).map(  # lone surrogates, escaped (JSON allows the escape; the relay does not)
        lambda t: text(json.dumps({"type": "signal", "data": {"x": t + "\ud800"}, "extra": 1}))
    ),
    st.binary(max_size=300).map(lambda b: frame(0x2, b)),  # binary frames
    st.binary(max_size=125).map(lambda b: frame(0x9, b)),  # pings
    st.binary(max_size=125).map(lambda b: frame(0xA, b)),  # pongs
    messages.map(lambda m: json.dumps(m).encode()).map(  # a message in fragments, a ping between them
        lambda b: frame(0x1, b[:3], fin=False) + frame(0x9, b"") + frame(0x0, b[3:7], fin=False) + frame(0x0, b[7:])
    ),
)
# ...and frames after which it closes the connection (1002, 1007, 1009): one at most, at the end.
fatal = st.one_of(
    st.binary(min_size=1, max_size=50).map(lambda b: text(b"\xff" + b)),  # invalid UTF-8
    st.builds(frame, st.integers(0, 15), st.binary(max_size=40), fin=st.booleans(), rsv=st.integers(0, 7)),  # raw
    st.just(text(json.dumps({"type": "signal", "data": {"x": "y" * 70_000}}))),  # over the size limit
    st.integers(60, 200).map(lambda n: frame(0x1, b"", fin=False) + frame(0x0, b"", fin=False) * n),  # endless
)
batches = st.tuples(st.lists(answered, min_size=1, max_size=25), st.lists(fatal, max_size=1)).map(
    lambda parts: parts[0] + parts[1]
)


class GoodPair:
    """Two well-behaved clients (in their own thread and trio loop) relaying numbered signals both
    ways at a steady pace, checking that each arrives once and in order."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.sent = [0, 0]
        self.received = [0, 0]
        self.problems: list[str] = []
        self.thread = threading.Thread(target=trio.run, args=(self.main,), daemon=True)
        self.thread.start()

    async def main(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                url = f"ws://127.0.0.1:{self.port}/ws"
                a = await trio_websocket.connect_websocket_url(nursery, url)
                b = await trio_websocket.connect_websocket_url(nursery, url)
                for ws in (a, b):
                    await ws.get_message()  # welcome
                await a.send_message('{"type":"join","interests":["fuzz-pair-only"]}')
                await a.get_message()  # queued
                await b.send_message('{"type":"join","interests":["fuzz-pair-only"]}')
                for ws in (a, b):
                    while json.loads(await ws.get_message())["type"] != "matched":
                        pass
                nursery.start_soon(self.receive, b, 0)
                nursery.start_soon(self.receive, a, 1)
                while not self.stop.is_set():
                    for side, ws in ((0, a), (1, b)):
                        self.sent[side] += 1
                        await ws.send_message(json.dumps({"type": "signal", "data": {"i": self.sent[side]}}))
                    await trio.sleep(0.05)  # 20 a second each way: well within the rate limit
                with trio.move_on_after(STEP):  # the last ones arrive (or the check below says what is missing)
                    while self.received != self.sent:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        except Exception as exc:
            self.problems.append(repr(exc))

    async def receive(self, ws: trio_websocket.WebSocketConnection, side: int) -> None:
        while True:
            msg = json.loads(await ws.get_message())
            if msg["type"] != "signal":
                self.problems.append(f"unexpected {msg}")
                continue
            self.received[side] += 1
            if msg["data"] != {"i": self.received[side]}:
                self.problems.append(f"out of order: {msg['data']} as #{self.received[side]}")


def fuzz_connection(port: int, batch: list[bytes]) -> None:
    """One connection sends a batch of frames, reading whatever comes back, until it is closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n".encode())
        head = b""
        while b"welcome" not in head:
            chunk = s.recv(65536)
            assert chunk, "closed during the handshake"
            head += chunk
        s.settimeout(0.2)
        for data in batch:
            try:
                s.sendall(data)
            except OSError:
                return  # the relay closed it (1002, 1007, 1008, 1009): fair
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) * 1024


MAX_GROWTH = 16 * 2**20  # RSS the relay may gain during the run (measured: 0.13 MiB over 300 batches)


def test_fuzzing_hurts_nobody(tmp_path):
    relay = RelayProcess(tmp_path, "--resume-grace", "1").start()
    pair = GoodPair(relay.port)
    try:
        baseline = rss(relay.proc.pid)

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(batch=batches)
        def one_connection(batch: list[bytes]) -> None:
            fuzz_connection(relay.port, batch)
            assert relay.proc is not None and relay.proc.poll() is None, relay.log.read_text()[-3000:]
            assert rss(relay.proc.pid) - baseline < MAX_GROWTH

        one_connection()
        pair.stop.set()
        pair.thread.join(timeout=15)
        assert not pair.problems, pair.problems[:5]
        assert pair.sent[0] > 50 and pair.received == pair.sent  # every signal, once, in order, both ways
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            health = s.recv(65536)
        assert health.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in health
    finally:
        pair.stop.set()
        relay.kill()
    log = relay.log.read_text()
    assert "Traceback" not in log and "handler failed" not in log and " ERROR " not in log, log[-3000:]
