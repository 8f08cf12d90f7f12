"""The relay leaves no reference cycles behind: connections come and go (clean closes, vanishing,
resuming, expiring, protocol errors, refused messages; WebSockets and HTTP fallback streams), signals
are relayed, and a full collection afterwards finds nothing that grows with their number. (Cycles are
what the cyclic collector must find: under load its passes cost a third of the CPU; a relay without
them can keep it lazy.)"""

from __future__ import annotations

import json
import socket
import time

from tests.conftest import STEP, UPGRADE, RelayProcess

HEAD = b"GET /ws HTTP/1.1\r\nHost: x\r\n" + UPGRADE.encode() + b"\r\n"


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


class Raw:
    """A blocking WebSocket client over a plain socket (it makes no garbage of the relay's)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=STEP)
        self.sock.sendall(HEAD)
        self.data = b""
        self.welcome = json.loads(self.until(b"welcome").split(b"\x81", 1)[1][1:].decode())

    def until(self, word: bytes) -> bytes:
        while word not in self.data:
            chunk = self.sock.recv(65536)
            assert chunk, f"closed waiting for {word!r}: {self.data[-200:]!r}"
            self.data += chunk
        seen, self.data = self.data, b""
        return seen

    def send(self, text: str) -> None:
        self.sock.sendall(frame(text.encode()))


class RawFallback:
    """A blocking client of the HTTP fallback: its stream on one socket, a socket per post."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=STEP)
        self.sock.sendall(
            b"POST /fallback/open HTTP/1.1\r\nHost: x\r\nX-Relay-Fallback: 1\r\nContent-Length: 0\r\n\r\n"
        )
        self.data = b""
        self.credential = json.loads(self.until(b"welcome").split(b"event: stream\ndata: ", 1)[1].split(b"\n", 1)[0])[
            "stream"
        ]

    until = Raw.until

    def send(self, text: str) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=STEP) as s:
            body = text.encode()
            head = f"POST /fallback/send HTTP/1.1\r\nHost: x\r\nX-Relay-Stream: {self.credential}\r\n"
            s.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert s.recv(100).startswith(b"HTTP/1.1 204"), "a post refused"


def matched(a: Raw | RawFallback, b: Raw | RawFallback) -> None:
    """a joins and waits, b joins: both are matched."""
    a.send('{"type":"join"}')
    a.until(b"queued")
    b.send('{"type":"join"}')
    b.until(b"matched")
    a.until(b"matched")


def fallback_round(port: int, i: int) -> None:
    """A fallback client paired with a WebSocket one; its stream vanishes, or it leaves and ends it."""
    f, w = RawFallback(port), Raw(port)
    matched(f, w)
    f.send('{"type":"signal","data":{"x":1}}\n{"type":"signal","data":{"x":2}}')
    w.until(b'"x":2')
    w.send('{"type":"signal","data":{"y":1}}')
    f.until(b'"y":1')
    if i % 2:
        f.sock.close()  # vanishes (and expires)
        w.until(b"peer_reconnecting")
    else:
        f.send('not json\n{"type":"leave"}')
        f.until(b"left")
        f.sock.close()
    w.sock.sendall(b"\x88\x82\0\0\0\0\x03\xe8")  # a clean close
    w.until(b"\x88")
    w.sock.close()


def one_round(port: int, i: int) -> None:
    a, b = Raw(port), Raw(port)
    matched(a, b)
    for _ in range(3):
        a.send('{"type":"signal","data":{"x":1}}')
        b.until(b'"signal"')
    b.send("not json")  # refused: an error message
    b.until(b"bad_json")
    token = b.welcome["resume_token"]
    b.sock.close()  # vanishes...
    a.until(b"peer_reconnecting")
    if i % 2:  # ...and comes back, or does not (and expires)
        back = Raw(port)
        back.send(json.dumps({"type": "resume", "token": token, "last": 3}))
        back.until(b"resumed")
        a.until(b"peer_resumed")
        back.sock.sendall(b"\x81\x00")  # unmasked: a protocol error, 1002
        back.until(b"\x88")
        back.sock.close()
    a.sock.sendall(b"\x88\x82\0\0\0\0\x03\xe8")  # a clean close
    a.until(b"\x88")
    a.sock.close()


def wait_until_empty(port: int) -> None:
    """Until /healthz counts no client (the vanished ones' resume grace ran out)."""
    deadline = time.monotonic() + STEP
    while True:
        with socket.create_connection(("127.0.0.1", port), timeout=STEP) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            if b'"connections":0,' in s.recv(65536):
                return
        assert time.monotonic() < deadline, "clients left behind"
        time.sleep(0.05)


def collect(port: int) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=STEP) as s:
        s.sendall(b"GET /_gc HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def test_connections_and_messages_leave_no_reference_cycles(tmp_path):
    relay = RelayProcess(tmp_path, "--plugin", "tests.gc_probe", "--resume-grace", "0.3", "--sessions-db", "").start()
    try:
        collect(relay.port)  # what start-up left
        found = []
        for rounds in (200, 400):  # 200 rounds (500 connections), then 400 more
            for i in range(rounds):
                one_round(relay.port, i)
                fallback_round(relay.port, i)
            wait_until_empty(relay.port)  # the vanished ones expire
            found.append(collect(relay.port))
    finally:
        relay.kill()
    log = relay.log.read_text()
    assert "Traceback" not in log, log[-2000:]
    # Nothing per connection or per message: a handful at most (what a collection itself touches).
    assert found[0]["found"] < 50 and found[1]["found"] < 50, found
