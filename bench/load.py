"""The relay against PeerJS 1.0.2 (the server most random-chat apps start from), measured in one run.

    python bench/load.py                      # the figures in the README (3 alternating repetitions)
    python bench/load.py --repeat 1 --seconds 3 --idle 2000
    python bench/load.py --compare relay+plugins relay --only throughput --repeat 10 --seconds 3
    python bench/load.py --compare baseline relay --baseline /tmp/before --only throughput memory
    python bench/load.py --only fallback       # the HTTP fallback's pairs, as ratios to WebSocket pairs
    python bench/load.py --compare relay relay-nofallback --only throughput   # WebSockets, fallback on / off
    python bench/load.py --nodes 2 --pairs 500  # scale-out: cluster mode and --workers 2 against the single node

Each server runs pinned to core 0 (`taskset`), a fresh process for each group of figures; the load
generator (`bench/loadgen.mjs`, Node, raw WebSocket frames) runs pinned to core 1; both get the same
traffic. The relay runs with its defaults but for the per-client and per-address limits, lifted
because the generator is one address that saturates the server on purpose; PeerJS (installed into
`bench/node_modules` from `bench/package.json` with `npm ci` on the first run) with its defaults
but its concurrent-connection limit (5,000), lifted for the memory figure. Figures:

* relayed messages per second with 50 and 500 pairs streaming signaling both ways (an SDP of
  ~2 KB, then ten ICE candidates of ~250 B, over and over, at most 22 in flight per side), with the
  server's CPU (near 100 %: the figure is per server core) and the generator's (well below: the
  figure is not the generator's);
* handshakes (connect, upgrade, the server's first message, a close frame, close) per second of
  server CPU, with 100 connections in flight;
* memory (RSS) per connection with 10,000 open: welcomed, and (relay) joined and matched;
* latency under the same load for both (500 pairs at half the slower server's capacity): the
  relay's join -> matched, PeerJS's first message between two fresh connections (it has no queue);
* with ``--only fallback``, for the relay alone: relayed messages per second of server CPU and the
  match latency (join -> matched, while the pairs stream), for pairs whose both sides use WebSockets,
  one side the HTTP fallback, or both, as ratios to the WebSocket pairs of the same repetition;
* with ``--nodes N`` (scale-out; needs Debian's redis-server): relayed messages per second of server
  CPU (every node's and Redis's, all on the server core) for the single-node relay, one node of a
  cluster (its pairs on it), ``--workers 2`` on one port (the kernel spreads the connections, so
  about half the pairs are split), and N nodes with each pair's sides on two nodes; Redis commands per
  relayed message, cross-node match latency idle, at half load and flat out, Redis commands per idle
  node per second, Redis memory per 1,000 clients waiting and paired.

Ratios are taken within a repetition (servers alternate, their order flipping), then the median.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PEERJS = BENCH / "node_modules" / "peer" / "dist" / "bin" / "peerjs.js"
LIFTED = [  # the relay's per-client and per-address limits, out of the generator's way
    "--message-rate", "1e9", "--message-burst", "1000000000", "--max-connections", "100000",
    "--max-connections-per-ip", "100000", "--connect-rate-per-ip", "1e9", "--connect-burst-per-ip", "100000",
    "--joins-per-minute", "100000", "--joins-per-minute-per-ip", "100000000",
    "--bytes-per-second-per-ip", "100000000000", "--bytes-burst-per-ip", "100000000000",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BASELINE = ROOT  # --baseline: another checkout (git worktree add /tmp/before <commit>), to measure a change


def server_command(kind: str, port: int, extra: tuple[str, ...] = ()) -> list[str]:
    script = (BASELINE if kind == "baseline" else ROOT) / "relay.py"
    relay = [sys.executable, str(script), "--host", "127.0.0.1", "--port", str(port), *LIFTED]
    if kind == "cluster":  # a node of a cluster: extra = (Redis URL, node id)
        return [*relay, "--sessions-db", "", "--redis-url", extra[0], "--node-id", extra[1]]
    if kind == "workers":  # --workers 2 on one Redis: extra = (Redis URL, node id)
        return [*relay, "--sessions-db", "", "--redis-url", extra[0], "--node-id", extra[1], "--workers", "2"]
    if kind in ("relay", "baseline"):
        return [*relay, "--sessions-db", ""]
    if kind == "relay-nofallback":  # the same, without the HTTP fallback plugin
        return [*relay, "--sessions-db", "", "--no-fallback"]
    if kind == "relay+plugins":  # session persistence (SQLite, a fresh file) and metrics, scraped
        return [*relay, "--sessions-db", "/tmp/bench-sessions.db", "--metrics", "--metrics-port", "0"]
    return ["node", str(PEERJS), "--host", "127.0.0.1", "--port", str(port), "--concurrent_limit", "100000"]


class Server:
    """A server process pinned to a core, its log in a file (a pipe could fill and stall it)."""

    def __init__(self, kind: str, core: int, *extra: str) -> None:
        self.kind = kind
        self.port = free_port()
        for leftover in Path("/tmp").glob("bench-sessions.db*"):
            leftover.unlink()
        self.log = Path(f"/tmp/bench-{kind}{'-' + extra[1] if extra else ''}.log")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                ["taskset", "-c", str(core), *server_command(kind, self.port, extra)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} did not start: {self.log.read_text()}") from None
                time.sleep(0.05)
        time.sleep(0.5)

    def cpu(self) -> float:
        """CPU seconds of the process and of its children that run (--workers' workers)."""
        children = [int(pid) for task in Path(f"/proc/{self.proc.pid}/task").glob("*/children")
                    for pid in task.read_text().split()]  # fmt: skip
        total = 0.0
        for pid in (self.proc.pid, *children):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def rss(self) -> int:
        return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{self.proc.pid}/status").read_text()).group(1)) * 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def generator(core: int, *args: object) -> dict:
    """Run bench/loadgen.mjs once and return its JSON line."""
    out = subprocess.run(
        ["taskset", "-c", str(core), "node", str(BENCH / "loadgen.mjs"), *map(str, args)],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def protocol(kind: str) -> str:
    return "peerjs" if kind == "peerjs" else "relay"


def with_cpu(server: Server, run: callable) -> dict:
    """``run()``'s figures, with the server's CPU use meanwhile (cores busy)."""
    cpu0, t0 = server.cpu(), time.monotonic()
    figures = run()
    figures["server_cpu"] = (server.cpu() - cpu0) / (time.monotonic() - t0)
    return figures


def throughput(kind: str, args: argparse.Namespace) -> dict:
    result = {}
    with Server(kind, args.server_core) as server:
        for n in args.pairs:
            result[f"pairs_{n}"] = with_cpu(
                server,
                lambda n=n: generator(args.generator_core, "throughput", protocol(kind), server.port, n, args.seconds),
            )
    return result


def handshakes(kind: str, args: argparse.Namespace) -> dict:
    with Server(kind, args.server_core) as server:
        figures = with_cpu(
            server, lambda: generator(args.generator_core, "handshakes", protocol(kind), server.port, args.seconds, 100)
        )
    figures["per_core"] = figures["handshakes_per_s"] / figures["server_cpu"]
    return figures


def memory(kind: str, args: argparse.Namespace, join: bool) -> float:
    """Bytes of server RSS per open connection (welcomed; or joined and matched)."""
    with Server(kind, args.server_core) as server:
        before = server.rss()
        cmd = ["taskset", "-c", str(args.generator_core), "node", str(BENCH / "loadgen.mjs"), "idle", protocol(kind),
               str(server.port), str(args.idle), *(["join"] if join else [])]  # fmt: skip
        gen = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert json.loads(gen.stdout.readline())["connections"] == args.idle
            time.sleep(2)
            return (server.rss() - before) / args.idle
        finally:
            gen.stdin.close()
            gen.wait(timeout=120)


def latency(kind: str, args: argparse.Namespace, rate: float) -> dict:
    n = max(args.pairs)
    with Server(kind, args.server_core) as server:
        return with_cpu(
            server,
            lambda: generator(
                args.generator_core,
                "throughput",
                protocol(kind),
                server.port,
                n,
                max(args.seconds, 5),
                rate,
                args.latency_probes,
            ),
        )


MIXES = ("ws-ws", "ws-fb", "fb-fb")  # which sides of each pair use the HTTP fallback (loadgen.mjs MIX)


def fallback(args: argparse.Namespace) -> dict:
    """The relay's pairs in each mix, on one server, flat out, with match-latency probes meanwhile."""
    n = min(args.pairs)
    figures = {}
    with Server("relay", args.server_core) as server:
        for mix in MIXES:
            run = with_cpu(
                server,
                lambda mix=mix: generator(
                    args.generator_core,
                    "throughput",
                    "relay",
                    server.port,
                    n,
                    args.seconds,
                    0,
                    args.latency_probes,
                    mix,
                ),
            )
            run["per_core"] = run["msgs_per_s"] / run["server_cpu"]
            figures[mix] = run
    return figures


def fallback_report(runs: list[dict], args: argparse.Namespace) -> str:
    def med(mix: str, key: str, relative: bool = False) -> float:
        return statistics.median(r[mix][key] / (r["ws-ws"][key] if relative else 1) for r in runs)

    names = {"ws-ws": "WebSocket - WebSocket", "ws-fb": "WebSocket - fallback", "fb-fb": "fallback - fallback"}
    lines = [
        f"| pairs ({min(args.pairs)}, flat out) | msgs/s per server core | ratio | match p50 / p99 | ratio p50 / p99 |",
        "|---|---:|---:|---:|---:|",
    ]
    for mix in MIXES:
        lines.append(
            f"| {names[mix]} | {med(mix, 'per_core'):,.0f} | **{med(mix, 'per_core', True):.2f}** | "
            f"{med(mix, 'latency_p50_ms'):.1f} / {med(mix, 'latency_p99_ms'):.1f} ms | "
            f"{med(mix, 'latency_p50_ms', True):.2f} / {med(mix, 'latency_p99_ms', True):.2f} |"
        )
    return "\n".join(lines)


class Redis:
    """A redis-server for cluster mode, pinned to the server core (its CPU counts against the relay)."""

    def __init__(self, core: int) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(core), "redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.command("PING").startswith(b"+PONG"):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def command(self, *args: str) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a.encode()) for a in args))
            return s.recv(1 << 20)

    def info(self, field: str) -> int:
        text = self.command("INFO", "all").decode()
        return int(re.search(rf"^{field}:(\d+)", text, re.M).group(1))

    def calls(self, *commands: str) -> int:
        """How many times Redis ran these commands (INFO commandstats), from clients or scripts."""
        text = self.command("INFO", "commandstats").decode()
        return sum(int(m.group(1)) for c in commands for m in re.finditer(rf"^cmdstat_{c}:calls=(\d+)", text, re.M))

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def cluster(args: argparse.Namespace) -> dict:
    """One repetition of the cluster figures: the single-node relay; one node of a cluster (every pair
    on it); --nodes nodes with every pair's sides on two different nodes. Servers and Redis share the
    server core, so messages per server CPU-second include every node's and Redis's CPU."""
    n = min(args.pairs)
    figures: dict[str, dict] = {}
    probes = args.latency_probes

    def run(servers: list[Server], redis: Redis | None, rate: float = 0, pairs: int = n) -> dict:
        cpu0 = [s.cpu() for s in servers]
        r0 = (redis.cpu(), redis.calls("xadd", "xread")) if redis else (0.0, 0)
        t0 = time.monotonic()
        ports = ",".join(str(s.port) for s in servers[:2])
        out = generator(args.generator_core, "throughput", "relay", ports, pairs, args.seconds, rate, probes)
        wall = time.monotonic() - t0
        out["relay_cpu"] = sum(s.cpu() - c for s, c in zip(servers, cpu0, strict=True)) / wall
        if redis:
            out["redis_cpu"] = (redis.cpu() - r0[0]) / wall
            out["stream_commands"] = redis.calls("xadd", "xread") - r0[1]  # the relaying ones
        out["per_core"] = out["msgs_per_s"] / (out["relay_cpu"] + out.get("redis_cpu", 0.0)) if pairs else 0
        return out

    with Server("relay", args.server_core) as single:
        figures["single"] = run([single], None)
    redis = Redis(args.server_core)

    def fresh(name: str) -> list[Server]:
        """New nodes on an empty Redis: what one measurement left (clients away for the resume grace,
        their moves) does not weigh on the next."""
        redis.command("FLUSHALL")
        return [Server("cluster", args.server_core, redis.url, f"{name}{i}") for i in range(args.nodes)]

    def stop(nodes: list[Server]) -> None:
        for node in nodes:
            node.stop()

    try:
        with Server("cluster", args.server_core, redis.url, "same") as node:
            figures["same"] = run([node], redis)
        redis.command("FLUSHALL")
        with Server("workers", args.server_core, redis.url, "w") as workers:
            time.sleep(1)  # the second worker starts once the first listens
            figures["workers"] = run([workers], redis)
        nodes = fresh("idle")
        try:
            time.sleep(2)
            c0, t0 = redis.info("total_commands_processed"), time.monotonic()
            time.sleep(5)
            figures["idle_commands_per_node_s"] = (
                (redis.info("total_commands_processed") - c0 - 1) / (time.monotonic() - t0) / args.nodes
            )
            figures["cross_idle"] = run(nodes, redis, pairs=0)
        finally:
            stop(nodes)
        for state, how in (("waiting", "wait"), ("paired", "join")):  # 1,000 clients of one node, on a fresh Redis
            nodes = fresh(state)
            try:
                before = redis.info("used_memory")
                cmd = ["taskset", "-c", str(args.generator_core), "node", str(BENCH / "loadgen.mjs"), "idle",
                       "relay", str(nodes[0].port), "1000", how]  # fmt: skip
                gen = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                try:
                    assert json.loads(gen.stdout.readline())["connections"] == 1000
                    time.sleep(1)
                    figures[f"redis_bytes_per_1000_{state}"] = redis.info("used_memory") - before
                finally:
                    gen.stdin.close()
                    gen.wait(timeout=120)
            finally:
                stop(nodes)
        nodes = fresh("flat")
        try:
            figures["cross"] = run(nodes, redis)
        finally:
            stop(nodes)
        nodes = fresh("half")
        try:
            figures["cross_half"] = run(nodes, redis, rate=figures["cross"]["msgs_per_s"] / 2)
        finally:
            stop(nodes)
        nodes = fresh("kill")
        try:
            figures["takeover"] = trio.run(takeover, nodes)
        finally:
            stop(nodes)
    finally:
        redis.stop()
    return figures


TAKEOVER_PAIRS = 100  # pairs across the node that dies and another, and as many on it alone


async def takeover(nodes: list[Server]) -> dict:
    """SIGKILL a node (the default --cluster-node-timeout, 5 s) whose 300 clients are in sessions,
    100 with peers on another node; each reconnects at once to another node and resumes (trio-
    websocket clients): seconds from the kill to each one's ``resumed``, in its session."""
    import trio_websocket

    async def connect(nursery: trio.Nursery, port: int) -> tuple[Any, dict]:
        ws = await trio_websocket.connect_websocket_url(nursery, f"ws://127.0.0.1:{port}/ws")
        return ws, json.loads(await ws.get_message())

    async def until(ws: Any, kind: str) -> dict:
        while (msg := json.loads(await ws.get_message()))["type"] != kind:
            assert msg["type"] != "error", msg
        return msg

    async def pair(nursery: trio.Nursery, first: int, second: int) -> list[dict]:
        a, wa = await connect(nursery, nodes[first].port)
        await a.send_message('{"type":"join"}')
        await until(a, "queued")
        b, wb = await connect(nursery, nodes[second].port)
        await b.send_message('{"type":"join"}')
        await until(b, "matched")
        await until(a, "matched")
        return [w for w, node in ((wa, first), (wb, second)) if node == 1]

    took: list[float] = []
    async with trio.open_nursery() as nursery:
        doomed = []
        for _ in range(TAKEOVER_PAIRS):
            doomed += await pair(nursery, 0, 1) + await pair(nursery, 1, 1)
        await trio.sleep(0.5)  # (journaled)
        nodes[1].proc.kill()
        killed = trio.current_time()

        async def resume(k: int, welcome: dict) -> None:
            others = [node for i, node in enumerate(nodes) if i != 1]
            ws, _ = await connect(nursery, others[k % len(others)].port)
            await ws.send_message(json.dumps({"type": "resume", "token": welcome["resume_token"], "last": 0}))
            assert (await until(ws, "resumed"))["state"] == "matched"
            took.append(trio.current_time() - killed)

        with trio.fail_after(60):
            async with trio.open_nursery() as resuming:
                for k, welcome in enumerate(doomed):
                    resuming.start_soon(resume, k, welcome)
        nursery.cancel_scope.cancel()
    took.sort()
    return {"clients": len(took), "p50_s": statistics.median(took), "p99_s": took[int(len(took) * 0.99) - 1]}


def cluster_report(runs: list[dict], args: argparse.Namespace) -> str:
    def med(key: str, field: str) -> float:
        return statistics.median(r[key][field] for r in runs)

    def med_ratio(key: str, base: str) -> float:
        return statistics.median(r[key]["per_core"] / r[base]["per_core"] for r in runs)

    n = min(args.pairs)
    lines = [
        f"| {n} pairs, flat out | msgs/s | per server CPU-second (relay + Redis) | ratio | relay / Redis CPU |"
        " XADD + XREAD per message |",
        "|---|---:|---:|---:|---:|---:|",
        f"| single node (no Redis) | {med('single', 'msgs_per_s'):,.0f} | {med('single', 'per_core'):,.0f} | 1 | "
        f"{med('single', 'relay_cpu'):.0%} / - | - |",
    ]
    rows = (
        ("same", "cluster mode, pairs on one node (= --workers 1)"),
        ("workers", "--workers 2, the kernel spreading connections"),
        ("cross", f"{args.nodes} nodes, every pair across"),
    )
    for key, name in rows:
        per_msg = statistics.median(r[key]["stream_commands"] / (r[key]["msgs_per_s"] * args.seconds) for r in runs)
        lines.append(
            f"| {name} | {med(key, 'msgs_per_s'):,.0f} | {med(key, 'per_core'):,.0f} | "
            f"**{med_ratio(key, 'single'):.2f}** | {med(key, 'relay_cpu'):.0%} / {med(key, 'redis_cpu'):.0%} | "
            f"{per_msg:.4f} |"
        )
    workers = statistics.median(r["workers"]["per_core"] / r["same"]["per_core"] for r in runs)
    lines.append(f"\n--workers 2 vs --workers 1, per server CPU-second: **{workers:.2f}**")
    if args.latency_probes:  # (--latency-probes 0: the throughput alone, no joins meanwhile)
        lines.append("")
        lines.append("| cross-node match latency (join -> matched) | p50 | p99 |")
        lines.append("|---|---:|---:|")
        probed = (("cross_idle", "idle"), ("cross_half", "at half the cross-node capacity"), ("cross", "flat out"))
        for key, name in probed:
            lines.append(f"| {name} | {med(key, 'latency_p50_ms'):.2f} ms | {med(key, 'latency_p99_ms'):.2f} ms |")
    lines.append("")
    lines.append(
        f"SIGKILL of a node with {runs[0]['takeover']['clients']} clients in sessions, to each one resumed on "
        f"another node (default --cluster-node-timeout, 5 s): p50 {med('takeover', 'p50_s'):.2f} s, "
        f"p99 {med('takeover', 'p99_s'):.2f} s."
    )
    idle = statistics.median(r["idle_commands_per_node_s"] for r in runs)
    memory = {s: statistics.median(r[f"redis_bytes_per_1000_{s}"] for r in runs) for s in ("waiting", "paired")}
    lines.append(
        f"Redis commands per idle node (a script's own calls included): {idle:.1f}/s. "
        f"Redis memory per 1,000 clients waiting (each with an interest of its own): "
        f"{memory['waiting'] / 1024:,.0f} KiB; paired: {memory['paired'] / 1024:,.0f} KiB."
    )
    return "\n".join(lines)


def ensure_peerjs() -> None:
    if not PEERJS.exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=BENCH, check=True)


def ratio(a: float, b: float) -> str:
    return f"**{a / b:.2f}**"


def report(runs: dict[str, list[dict]], first: str, second: str, args: argparse.Namespace) -> str:
    def med(path: tuple[str, ...], kind: str) -> float:
        values = []
        for run in runs[kind]:
            value = run
            for key in path:
                value = value[key]
            values.append(value)
        return statistics.median(values)

    def med_ratio(path: tuple[str, ...], invert: bool = False) -> float:
        ratios = []
        for a, b in zip(runs[first], runs[second], strict=True):
            x, y = a, b
            for key in path:
                x, y = x[key], y[key]
            ratios.append(y / x if invert else x / y)
        return statistics.median(ratios)

    lines = [f"| figure | {first} | {second} | {first} / {second} |", "|---|---:|---:|---:|"]
    for n in args.pairs:
        p = ("throughput", f"pairs_{n}")
        lines.append(
            f"| msgs/s relayed, {n} pairs | {med((*p, 'msgs_per_s'), first):,.0f} | "
            f"{med((*p, 'msgs_per_s'), second):,.0f} | **{med_ratio((*p, 'msgs_per_s')):.2f}** |"
        )
        lines.append(
            f"| server CPU / generator CPU, {n} pairs | {med((*p, 'server_cpu'), first):.0%} / "
            f"{med((*p, 'generator_cpu'), first):.0%} | {med((*p, 'server_cpu'), second):.0%} / "
            f"{med((*p, 'generator_cpu'), second):.0%} | |"
        )
    if "handshakes" in runs[first][0]:
        h = ("handshakes", "per_core")
        lines.append(
            f"| handshakes per server core-second | {med(h, first):,.0f} | {med(h, second):,.0f} "
            f"| **{med_ratio(h):.2f}** |"
        )
        lines.append(
            f"| (handshakes/s, server CPU, generator CPU) | {med(('handshakes', 'handshakes_per_s'), first):,.0f}, "
            f"{med(('handshakes', 'server_cpu'), first):.0%}, {med(('handshakes', 'generator_cpu'), first):.0%} | "
            f"{med(('handshakes', 'handshakes_per_s'), second):,.0f}, {med(('handshakes', 'server_cpu'), second):.0%}, "
            f"{med(('handshakes', 'generator_cpu'), second):.0%} | |"
        )
    if "idle_bytes" in runs[first][0]:
        lines.append(
            f"| KB per connection, {args.idle:,} welcomed | {med(('idle_bytes',), first) / 1024:.1f} | "
            f"{med(('idle_bytes',), second) / 1024:.1f} | **{med_ratio(('idle_bytes',)):.2f}** |"
        )
        joined = [
            f"{med(('joined_bytes',), k) / 1024:.1f}" if "joined_bytes" in runs[k][0] else "" for k in (first, second)
        ]
        if any(joined):  # PeerJS has no queue: one row, with a ratio when both servers have the figure
            ratio = f"**{med_ratio(('joined_bytes',)):.2f}**" if all(joined) else ""
            lines.append(
                f"| KB per connection, {args.idle:,} joined and matched | {joined[0]} | {joined[1]} | {ratio} |"
            )
    if "latency" in runs[first][0]:
        lat = ("latency",)
        lines.append(
            f"| latency p50 / p99 at {med((*lat, 'rate'), first):,.0f} msgs/s offered, {max(args.pairs)} pairs "
            f"| {med((*lat, 'latency_p50_ms'), first):.2f} / {med((*lat, 'latency_p99_ms'), first):.2f} ms "
            f"| {med((*lat, 'latency_p50_ms'), second):.2f} / {med((*lat, 'latency_p99_ms'), second):.2f} ms "
            f"| {med_ratio((*lat, 'latency_p99_ms')):.2f} (p99) |"
        )
        lines.append(
            f"| (server CPU at that load) | {med((*lat, 'server_cpu'), first):.0%} | "
            f"{med((*lat, 'server_cpu'), second):.0%} | |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--idle", type=int, default=10_000, help="connections for the memory figures")
    parser.add_argument("--latency-probes", type=int, default=100, help="latency samples per run")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--generator-core", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="alternating repetitions (medians reported)")
    parser.add_argument(
        "--compare", nargs=2, default=["relay", "peerjs"],
        choices=["relay", "relay+plugins", "relay-nofallback", "baseline", "peerjs"],
        metavar="SERVER", help="the two servers: relay, relay+plugins, relay-nofallback, baseline or peerjs",
    )  # fmt: skip
    parser.add_argument("--baseline", type=Path, help="the checkout the 'baseline' server runs relay.py from")
    parser.add_argument(
        "--only", nargs="+", choices=["throughput", "handshakes", "memory", "latency", "fallback"],
        default=["throughput", "handshakes", "memory", "latency"], help="which figures",
    )  # fmt: skip
    parser.add_argument(
        "--nodes", type=int, default=0,
        help="cluster figures instead (needs redis-server): single node, one cluster node, N nodes across",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print every run's figures as JSON too")
    args = parser.parse_args()
    if "baseline" in args.compare:
        if args.baseline is None or not (args.baseline / "relay.py").is_file():
            parser.error("--compare baseline needs --baseline DIR, a checkout with relay.py")
        global BASELINE
        BASELINE = args.baseline.resolve()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the generator holds --idle sockets
    if args.nodes:
        runs = [cluster(args) for _ in range(args.repeat)]
        if args.json:
            print(json.dumps(runs, indent=2))
        print(f"medians of {args.repeat} repetitions; relay nodes and Redis on core {args.server_core}, "
              f"generator on core {args.generator_core}")  # fmt: skip
        print(cluster_report(runs, args))
        return
    if args.only == ["fallback"]:
        runs = [fallback(args) for _ in range(args.repeat)]
        if args.json:
            print(json.dumps(runs, indent=2))
        print(
            f"medians of {args.repeat} repetitions; server on core {args.server_core}, "
            f"generator on core {args.generator_core}"
        )
        print(fallback_report(runs, args))
        return
    first, second = args.compare
    if "peerjs" in args.compare:
        ensure_peerjs()
    runs: dict[str, list[dict]] = {first: [], second: []}
    for i in range(args.repeat):
        order = (first, second) if i % 2 == 0 else (second, first)  # noise hits both alike
        this = {kind: {} for kind in order}
        for kind in order:
            if "throughput" in args.only or "latency" in args.only:
                this[kind]["throughput"] = throughput(kind, args)
            if "handshakes" in args.only:
                this[kind]["handshakes"] = handshakes(kind, args)
            if "memory" in args.only:
                this[kind]["idle_bytes"] = memory(kind, args, join=False)
                if kind != "peerjs":
                    this[kind]["joined_bytes"] = memory(kind, args, join=True)
        if "latency" in args.only:  # the same offered load for both: half the slower one's capacity
            n = max(args.pairs)
            rate = min(this[k]["throughput"][f"pairs_{n}"]["msgs_per_s"] for k in order) / 2
            for kind in order:
                this[kind]["latency"] = latency(kind, args, rate) | {"rate": rate}
        for kind in order:
            runs[kind].append(this[kind])
    if args.json:
        print(json.dumps(runs, indent=2))
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    print(
        f"medians of {args.repeat} alternating repetitions; python {sys.version.split()[0]}, node {node}, "
        f"{os.cpu_count()} cores; server on core {args.server_core}, generator on core {args.generator_core}"
    )
    print(report(runs, first, second, args))


if __name__ == "__main__":
    main()
