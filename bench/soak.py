"""Soak: many people join, signal, press next, leave, vanish and come back, at random, for a while;
afterwards the relay must hold nobody (connections, queue, sessions, vanished clients all zero) and
its memory must not have grown from one round to the next. A quarter of the people use the HTTP
fallback instead of a WebSocket (and may come back on the other transport).

    python bench/soak.py                       # 2,000 people, 5 rounds of 60 s
    python bench/soak.py --people 500 --rounds 3 --seconds 10
    python bench/soak.py --nodes 3             # a cluster: 3 nodes, one redis-server, each connection
                                               # (and each resume) to a node picked at random

It starts `relay.py` (per-address limits lifted: every simulated person comes from 127.0.0.1),
runs the rounds, and after each waits for the relay to empty, then reads its memory (RSS). The first
round is the warm-up: the relay's memory after it is the baseline. tests/test_soak.py runs a short
version and asserts what this reports.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import trio
import trio_websocket

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # relay_testing, from a checkout
from relay_testing import FallbackClient  # noqa: E402

FALLBACK_SHARE = 0.25  # of the connections: the HTTP fallback instead of a WebSocket


class FallbackWs:
    """The HTTP fallback behind the part of trio-websocket's interface a person uses."""

    def __init__(self, client: FallbackClient) -> None:
        self.client = client
        self._stream = client.stream  # closing it is vanishing, as for a WebSocket's

    @classmethod
    async def connect(cls, port: int) -> FallbackWs:
        client = await FallbackClient.open(port)
        if client.head[":status"] != "200":
            raise OSError(f"fallback refused: {client.head[':status']}")
        return cls(client)

    async def get_message(self) -> str:
        try:
            name, data = await self.client.event(timeout=math.inf)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            name, data = "end", b""
        if name != "message":  # "close" or the end
            raise trio_websocket.ConnectionClosed(trio_websocket.CloseReason(1006, name))
        return data.decode()

    async def send_message(self, text: str) -> None:
        try:
            status = await self.client.post(text.encode())
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            status = 0
        if status != 204:
            raise trio_websocket.ConnectionClosed(trio_websocket.CloseReason(1006, f"post answered {status}"))

    async def aclose(self) -> None:  # a stream has no close handshake: it ends (and the client expires)
        await self._stream.aclose()


INTERESTS = [[], [], ["music"], ["film"], ["music", "film"], ["chess"], ["go", "chess"]]


async def read(ws: trio_websocket.WebSocketConnection, state: dict, tally: dict[str, int]) -> None:
    """Take everything the relay sends (a person who stopped reading would be closed as too slow)."""
    try:
        while True:
            msg = json.loads(await ws.get_message())
            kind = msg["type"]
            tally[kind] = tally.get(kind, 0) + 1
            if kind == "welcome" and not state["resuming"]:
                state["token"] = msg["resume_token"]
            elif kind in ("matched", "resumed"):
                state["matched"] = kind == "matched" or msg["state"] == "matched"
                state["token"] = msg.get("resume_token", state["token"])
            elif kind == "peer_left":
                state["matched"] = False
    except trio_websocket.ConnectionClosed:
        pass


async def person(ports: list[int], rng: random.Random, until: float, tally: dict[str, int]) -> None:
    """One simulated person: sessions of random actions, each ended in one of three ways; each
    connection to one of the ports (a cluster's nodes), picked at random."""
    token = None
    while trio.current_time() < until:
        port = rng.choice(ports)
        try:
            async with trio.open_nursery() as nursery:
                state = {"matched": False, "token": None, "resuming": token is not None}
                if rng.random() < FALLBACK_SHARE:
                    ws = await FallbackWs.connect(port)
                    tally["fallback"] = tally.get("fallback", 0) + 1
                    if token is None:
                        state["token"] = ws.client.welcome["resume_token"]
                else:
                    ws = await trio_websocket.connect_websocket_url(nursery, f"ws://127.0.0.1:{port}/ws")
                nursery.start_soon(read, ws, state, tally)
                if token is not None:  # come back after vanishing
                    await ws.send_message(json.dumps({"type": "resume", "token": token, "last": 0}))
                    token = None
                await ws.send_message(json.dumps({"type": "join", "interests": rng.choice(INTERESTS)}))
                for _ in range(rng.randint(1, 15)):
                    await trio.sleep(rng.uniform(0.01, 0.3))
                    action = rng.choices(["signal", "next", "leave", "join"], [10, 2, 1, 1])[0]
                    if action == "signal":
                        if state["matched"]:
                            data = (
                                {"candidate": "x" * rng.randint(50, 400)} if rng.random() < 0.8 else {"sdp": "v" * 2000}
                            )
                            await ws.send_message(json.dumps({"type": "signal", "data": data}))
                    elif action == "join":
                        await ws.send_message(json.dumps({"type": "join", "interests": rng.choice(INTERESTS)}))
                    else:
                        await ws.send_message(json.dumps({"type": action}))
                ending = rng.choices(["close", "vanish", "vanish and resume"], [6, 2, 2])[0]
                tally[ending] = tally.get(ending, 0) + 1
                if ending == "close":
                    await ws.aclose()
                else:
                    await ws._stream.aclose()  # no close frame: the relay keeps the client a while
                    if ending == "vanish and resume":
                        token = state["token"]
                nursery.cancel_scope.cancel()
        except (trio_websocket.ConnectionClosed, trio_websocket.HandshakeError, OSError):
            tally["refused or dropped"] = tally.get("refused or dropped", 0) + 1
            await trio.sleep(0.2)


async def health(port: int) -> dict:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


async def round_of(ports: list[int], people: int, seconds: float, seed: int) -> dict[str, int]:
    tally: dict[str, int] = {}
    until = trio.current_time() + seconds
    async with trio.open_nursery() as nursery:
        for i in range(people):
            nursery.start_soon(person, ports, random.Random(seed * 100_003 + i), until, tally)
            if i % 50 == 49:
                await trio.sleep(0.05)  # arrive over a moment, not in one instant
    return tally


async def until_empty(ports: list[int], timeout: float, redis_port: int | None) -> dict:
    """Wait for the relays (and the cluster's Redis) to hold nobody; return the health figures, summed."""

    async def figures() -> dict:
        total = {"connections": 0, "queued": 0, "sessions": 0}
        for port in ports:
            h = await health(port)
            for key in total:
                total[key] += h[key]
        if redis_port is not None:  # the clients and sessions Redis still holds
            total["redis_clients"] = _redis_int(redis_port, "HLEN", "{mm}:members")
            total["redis_sessions"] = _redis_int(redis_port, "HLEN", "{mm}:sessions")
        return total

    with trio.move_on_after(timeout):
        while True:
            h = await figures()
            if not any(h.values()):
                return h
            await trio.sleep(0.2)
    return await figures()


def _redis_int(port: int, *args: str) -> int:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a.encode()) for a in args))
        return int(s.recv(64)[1:].split(b"\r\n")[0])


def rss(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) * 1024


def start_relay(log: Path, grace: float, *extra: str) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, str(ROOT / "relay.py"), "--host", "127.0.0.1", "--port", "0", "--sessions-db", "", *extra,
           "--resume-grace", str(grace), "--max-connections-per-ip", "100000", "--connect-rate-per-ip", "1e6",
           "--connect-burst-per-ip", "100000", "--joins-per-minute-per-ip", "100000000",
           "--bytes-per-second-per-ip", "100000000000", "--bytes-burst-per-ip", "100000000000"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stderr=out)
    deadline = time.monotonic() + 30
    while True:
        text = log.read_text()
        if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", text):
            return proc, int(match.group(1))
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"relay did not start: {text}")
        time.sleep(0.05)


async def soak(
    ports: list[int], pids: list[int], people: int, rounds: int, seconds: float, grace: float, redis: int | None
) -> list[dict]:
    results = []
    for r in range(rounds):
        tally = await round_of(ports, people, seconds, seed=r)
        after = await until_empty(ports, grace + 30, redis)
        results.append({"round": r + 1, "rss": sum(map(rss, pids)), "health": after, "tally": tally})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds per round")
    parser.add_argument("--grace", type=float, default=2.0, help="the relay's --resume-grace")
    parser.add_argument("--nodes", type=int, default=0, help="a cluster of this many nodes (needs redis-server)")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    redis, redis_port, extra = None, None, []
    if args.nodes:
        with __import__("socket").socket() as probe:
            probe.bind(("127.0.0.1", 0))
            redis_port = probe.getsockname()[1]
        redis = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        extra = ["--redis-url", f"redis://127.0.0.1:{redis_port}/0"]
    relays = [
        start_relay(Path(f"/tmp/soak-relay{i}.log"), args.grace, *extra, *(["--node-id", f"s{i}"] if extra else []))
        for i in range(max(args.nodes, 1))
    ]
    try:
        results = trio.run(
            soak, [port for _, port in relays], [p.pid for p, _ in relays], args.people, args.rounds, args.seconds,
            args.grace, redis_port,
        )  # fmt: skip
    finally:
        for proc, _ in relays:
            proc.terminate()
            proc.wait(timeout=60)
        if redis is not None:
            redis.kill()
    baseline = results[0]["rss"]
    print(f"{args.people} people, {args.rounds} rounds of {args.seconds:g} s; python {sys.version.split()[0]}")
    print("| round | messages received by the people | endings (close / vanish / vanish and resume) "
          "| left in the relay afterwards | relay RSS | vs. after round 1 |")  # fmt: skip
    print("|---:|---:|---|---|---:|---:|")
    for r in results:
        t, h = r["tally"], r["health"]
        received = sum(
            v
            for k, v in t.items()
            if k not in ("close", "vanish", "vanish and resume", "refused or dropped", "fallback")
        )
        endings = f"{t.get('close', 0)} / {t.get('vanish', 0)} / {t.get('vanish and resume', 0)}"
        left = f"{h['connections']} connections, {h['queued']} queued, {h['sessions']} sessions"
        if "redis_clients" in h:
            left += f"; Redis: {h['redis_clients']} clients, {h['redis_sessions']} sessions"
        print(f"| {r['round']} | {received:,} | {endings} | {left} | {r['rss'] / 2**20:.1f} MiB "
              f"| {(r['rss'] - baseline) / 2**20:+.1f} MiB |")  # fmt: skip


if __name__ == "__main__":
    main()
