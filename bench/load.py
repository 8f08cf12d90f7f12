"""Load generator: the relay against a bare trio-websocket forwarder, measured in one run.

    python bench/load.py                       # the figures in the README
    python bench/load.py --pairs 50 500 --seconds 5 --idle 2000

For each server (relay.py with its defaults except the per-client and per-address limits, lifted so
the generator, from one address, can saturate it; bench/forwarder.py, the ceiling) it starts the
server pinned to core 0, drives it from this process pinned to core 1, and reports:

* relayed messages per second with N pairs streaming signaling traffic: per pair and direction, an
  SDP of ~2 KB then ten ICE candidates of ~250 B, over and over, at most WINDOW messages in flight;
* match latency p50/p99 (relay only): ``join`` sent -> ``matched`` received by the second client of
  a pair, on an idle server and while the largest throughput run goes on;
* handshakes per second and server memory (RSS) per idle connection;
* the server's and this generator's own CPU use during each run: a generator near 100 % would
  mean the figure measures the generator, not the server.

The generator speaks raw WebSocket over sockets: frames are built once (masked with a zero key, which
RFC 6455 allows) and only frame headers are parsed, so it costs far less per message than the server.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 22  # messages in flight per pair and direction (two cycles)
HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + base64.b64encode(b"0123456789abcdef") + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client frame (FIN, masked with the key 0, so the payload is sent as is)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def signal_text(data: dict) -> bytes:
    return json.dumps({"type": "signal", "data": data}, separators=(",", ":")).encode()


_SDP_HEAD = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
SDP = signal_text({"sdp": {"type": "offer", "sdp": _SDP_HEAD + "a=x:" + "x" * (2048 - 80 - len(_SDP_HEAD))}})
CANDIDATE = signal_text(
    {
        "candidate": {
            "candidate": "candidate:842163049 1 udp 1677729535 203.0.113.7 46154 typ srflx raddr 10.0.0.2 "
            "rport 46154 generation 0 ufrag EEtu network-cost 999",
            "sdpMid": "0",
            "sdpMLineIndex": 0,
            "usernameFragment": "EEtu",
        }
    }
)
CYCLE = [frame(SDP)] + [frame(CANDIDATE)] * 10  # what each side sends, over and over


class Conn:
    """One raw WebSocket client connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.received = 0  # data frames received

    @classmethod
    async def open(cls, port: int) -> Conn:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = cls(stream)
        await stream.send_all(HANDSHAKE)
        while b"\r\n\r\n" not in conn.buf:
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionError("closed during handshake")
            conn.buf += data
        head, _, rest = bytes(conn.buf).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.decode(errors="replace"))
        conn.buf = bytearray(rest)
        return conn

    async def next_frame(self, *, payload: bool = True) -> bytes:
        """The next data frame's payload (answers pings on the way)."""
        buf = self.buf
        while True:
            size = len(buf)
            if size >= 2:
                n, offset = buf[1] & 0x7F, 2
                if n == 126:
                    n, offset = (int.from_bytes(buf[2:4], "big"), 4) if size >= 4 else (1 << 62, 4)
                elif n == 127:
                    n, offset = (int.from_bytes(buf[2:10], "big"), 10) if size >= 10 else (1 << 62, 10)
                if size >= offset + n:
                    opcode = buf[0] & 0x0F
                    data = bytes(buf[offset : offset + n]) if payload or opcode != 0x1 else b""
                    del buf[: offset + n]
                    if opcode == 0x9:  # ping
                        await self.stream.send_all(frame(data, 0xA))
                        continue
                    if opcode == 0x8:
                        raise ConnectionError(f"closed by server: {data[:2].hex()} {data[2:]!r}")
                    self.received += 1
                    return data
            data = await self.stream.receive_some(65536)
            if not data:
                raise ConnectionError("connection closed")
            buf += data

    async def json(self) -> dict:
        return json.loads(await self.next_frame())

    async def expect(self, kind: str) -> dict:
        msg = await self.json()
        while msg["type"] != kind:
            if msg["type"] not in ("queued",):
                raise AssertionError(f"expected {kind}, got {msg}")
            msg = await self.json()
        return msg

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)


JOIN = frame(b'{"type":"join"}')


async def open_pair(port: int, relay: bool) -> tuple[Conn, Conn]:
    a = await Conn.open(port)
    if relay:
        await a.expect("welcome")
        await a.send(JOIN)
        await a.expect("queued")
    b = await Conn.open(port)
    if relay:
        await b.expect("welcome")
        await b.send(JOIN)
        await b.expect("matched")
        await a.expect("matched")
    return a, b


async def stream_pairs(
    pairs: list[tuple[Conn, Conn]], seconds: float, server_pid: int, rate: float | None = None
) -> dict:
    """Both sides of every pair send CYCLE over and over; count what arrives in `seconds`.
    With `rate` (messages per second, all pairs together) the senders are paced instead of flat out.

    A side sends a whole cycle in one write once its peer has received all but WINDOW - len(CYCLE)
    of what it sent; the receiver counts frames per read. So the generator's cost per message stays
    far below the server's.
    """
    blob = b"".join(CYCLE)
    conns = [c for pair in pairs for c in pair]
    peer = {id(a): b for a, b in pairs} | {id(b): a for a, b in pairs}
    in_flight = {id(c): 0 for c in conns}  # sent by c, not yet received by its peer
    credit = {id(c): trio.Event() for c in conns}

    pause = len(CYCLE) * len(conns) / rate if rate else 0.0

    async def sender(c: Conn) -> None:
        key = id(c)
        if pause:
            await trio.sleep(pause * (hash(key) % 1000) / 1000)  # spread the senders out
        while True:
            if pause:
                await trio.sleep(pause)
            while in_flight[key] > WINDOW - len(CYCLE):
                credit[key] = trio.Event()
                await credit[key].wait()
            in_flight[key] += len(CYCLE)
            await c.stream.send_all(blob)

    async def receiver(c: Conn) -> None:
        sender_key = id(peer[id(c)])
        buf = c.buf
        while True:
            data = await c.stream.receive_some(262144)
            if not data:
                raise ConnectionError("connection closed")
            buf += data
            frames, pos, size = 0, 0, len(buf)
            while size - pos >= 2:
                n, offset = buf[pos + 1] & 0x7F, 2
                if n == 126:
                    if size - pos < 4:
                        break
                    n, offset = (buf[pos + 2] << 8) | buf[pos + 3], 4
                elif n == 127:
                    raise AssertionError("no frame this large is sent")
                if size - pos < offset + n:
                    break
                if buf[pos] & 0x0F != 0x1:
                    raise AssertionError(f"unexpected frame opcode {buf[pos] & 0x0F}")
                pos += offset + n
                frames += 1
            del buf[:pos]
            c.received += frames
            in_flight[sender_key] -= frames
            credit[sender_key].set()

    async with trio.open_nursery() as nursery:
        for c in conns:
            nursery.start_soon(sender, c)
            nursery.start_soon(receiver, c)
        await trio.sleep(1.0)  # warm-up
        before = sum(c.received for c in conns), cpu_self(), cpu_of(server_pid), time.perf_counter()
        await trio.sleep(seconds)
        after = sum(c.received for c in conns), cpu_self(), cpu_of(server_pid), time.perf_counter()
        nursery.cancel_scope.cancel()
    wall = after[3] - before[3]
    return {
        "msgs_per_s": (after[0] - before[0]) / wall,
        "server_cpu": (after[2] - before[2]) / wall,
        "generator_cpu": (after[1] - before[1]) / wall,
    }


async def match_latency(port: int, rounds: int) -> dict:
    """join sent -> matched received, for the client that completes a pair."""
    samples = []
    for _ in range(rounds):
        a, b = await Conn.open(port), await Conn.open(port)
        await a.expect("welcome")
        await b.expect("welcome")
        await a.send(JOIN)
        await a.expect("queued")
        start = time.perf_counter()
        await b.send(JOIN)
        await b.expect("matched")
        samples.append(time.perf_counter() - start)
        await a.expect("matched")
        await a.stream.aclose()
        await b.stream.aclose()
    samples.sort()
    return {
        "p50_ms": 1000 * statistics.median(samples),
        "p99_ms": 1000 * samples[min(len(samples) - 1, int(len(samples) * 0.99))],
    }


async def handshakes(port: int, count: int, relay: bool) -> tuple[float, list[Conn]]:
    """Open `count` connections, 50 at a time; return handshakes per second and the connections."""
    conns: list[Conn] = []
    limit = trio.CapacityLimiter(50)

    async def one() -> None:
        async with limit:
            c = await Conn.open(port)
            if relay:
                await c.expect("welcome")
            conns.append(c)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return count / (time.perf_counter() - start), conns


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_of(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) * 1024


RELAY = [str(ROOT / "relay.py"), "--host", "127.0.0.1", "--port", "0", "--message-rate", "1e9",
         "--message-burst", "1000000000", "--max-connections", "100000", "--max-connections-per-ip", "100000",
         "--connect-rate-per-ip", "1e9", "--connect-burst-per-ip", "100000",
         "--joins-per-minute", "100000", "--joins-per-minute-per-ip", "100000000",
         "--bytes-per-second-per-ip", "100000000000", "--bytes-burst-per-ip", "100000000000"]  # fmt: skip
SERVERS = {
    # The relay's defaults but for the per-client and per-address limits (all the load comes from one
    # address and saturates the relay on purpose), and without its plugins.
    "relay": [*RELAY, "--sessions-db", ""],
    # The same with session persistence (SQLite, in a fresh file) and metrics (scraped every 5 s).
    "relay+plugins": [*RELAY, "--metrics", "--sessions-db", "/tmp/bench-sessions.db"],
    "forwarder": [str(ROOT / "bench" / "forwarder.py"), "--port", "0"],
}


def start_server(kind: str, core: int, logfile: Path) -> tuple[subprocess.Popen, int]:
    """Start a server pinned to `core`, its log in `logfile` (a pipe could fill and stall it)."""
    cmd = SERVERS[kind]
    for leftover in Path("/tmp").glob("bench-sessions.db*"):
        leftover.unlink()
    with logfile.open("wb") as log:
        proc = subprocess.Popen(["taskset", "-c", str(core), sys.executable, *cmd], stderr=log)
    deadline = time.monotonic() + 30
    while not (match := re.search(rb"listening on 127\.0\.0\.1:(\d+)", logfile.read_bytes())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{kind} did not start: {logfile.read_text()}")
        time.sleep(0.05)
    return proc, int(match.group(1))


async def scrape_metrics(port: int, every: float) -> None:
    """GET /metrics now and then, as Prometheus would."""
    while True:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := await stream.receive_some():
                data += chunk
        assert data.startswith(b"HTTP/1.1 200") and b"relay_matches_total" in data, data[:200]
        await trio.sleep(every)


async def measure(kind: str, args: argparse.Namespace) -> dict:
    proc, port = start_server(kind, args.server_core, Path(f"/tmp/bench-{kind}.log"))
    relay = kind != "forwarder"
    result: dict = {"server": kind}
    try:
        async with trio.open_nursery() as nursery:
            if kind == "relay+plugins":
                nursery.start_soon(scrape_metrics, port, 5.0)
            await run_figures(result, proc, port, relay, args)
            nursery.cancel_scope.cancel()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return result


async def run_figures(result: dict, proc: subprocess.Popen, port: int, relay: bool, args: argparse.Namespace) -> None:
    if args.throughput_only:
        for n in args.pairs:
            pairs = [await open_pair(port, relay) for _ in range(n)]
            result[f"pairs_{n}"] = await stream_pairs(pairs, args.seconds, proc.pid)
        return
    rss0 = rss_of(proc.pid)
    rate, idle = await handshakes(port, args.idle, relay)
    result["handshakes_per_s"] = rate
    await trio.sleep(0.5)
    result["bytes_per_idle_conn"] = (rss_of(proc.pid) - rss0) / args.idle
    for c in idle:
        await c.stream.aclose()
    await trio.sleep(0.5)
    if relay:
        result["latency_idle"] = await match_latency(port, args.latency_rounds)
    for n in args.pairs:
        pairs = [await open_pair(port, relay) for _ in range(n)]
        result[f"pairs_{n}"] = await stream_pairs(pairs, args.seconds, proc.pid)
        if relay and n == max(args.pairs):  # match latency at full load and at half of it
            for label, rate in (
                ("latency_saturated", None),
                ("latency_half", result[f"pairs_{n}"]["msgs_per_s"] / 2),
            ):
                async with trio.open_nursery() as nursery:
                    probe: dict = {}

                    async def measure_latency(probe: dict = probe) -> None:
                        await trio.sleep(1.5)
                        probe.update(await match_latency(port, args.latency_rounds // 2))

                    nursery.start_soon(measure_latency)
                    load = await stream_pairs(pairs, max(args.seconds, 3.0), proc.pid, rate)
                result[label] = probe | {"msgs_per_s": load["msgs_per_s"], "server_cpu": load["server_cpu"]}
        for a, b in pairs:
            await a.stream.aclose()
            await b.stream.aclose()
        await trio.sleep(0.5)


def report(relay: dict, fwd: dict, pairs: list[int], names: tuple[str, str]) -> str:
    first, second = names
    lines = [f"| figure | {first} | {second} | {first} / {second} |", "|---|---:|---:|---:|"]
    for n in pairs:
        r, f = relay[f"pairs_{n}"], fwd[f"pairs_{n}"]
        lines.append(
            f"| msgs/s relayed, {n} pairs | {r['msgs_per_s']:,.0f} | {f['msgs_per_s']:,.0f} "
            f"| **{r['msgs_per_s'] / f['msgs_per_s']:.2f}** |"
        )
        lines.append(
            f"| server CPU / generator CPU, {n} pairs | {r['server_cpu']:.0%} / {r['generator_cpu']:.0%} "
            f"| {f['server_cpu']:.0%} / {f['generator_cpu']:.0%} | |"
        )
    lines.append(
        f"| handshakes/s | {relay['handshakes_per_s']:,.0f} | {fwd['handshakes_per_s']:,.0f} "
        f"| {relay['handshakes_per_s'] / fwd['handshakes_per_s']:.2f} |"
    )
    r_idle, f_idle = relay["bytes_per_idle_conn"], fwd["bytes_per_idle_conn"]
    lines.append(f"| KB per idle connection | {r_idle / 1024:.1f} | {f_idle / 1024:.1f} | {r_idle / f_idle:.2f} |")
    n = max(pairs)
    for key, label in (("latency_idle", "idle"), ("latency_half", f"{n} pairs at half capacity"),
                       ("latency_saturated", f"{n} pairs at full capacity")):  # fmt: skip
        cells = []
        for figures in (relay.get(key), fwd.get(key)):
            if figures is None:
                cells.append("")
                continue
            load = f" at {figures['msgs_per_s']:,.0f} msgs/s" if "msgs_per_s" in figures else ""
            cells.append(f"{figures['p50_ms']:.2f} / {figures['p99_ms']:.2f} ms{load}")
        lines.append(f"| match latency p50 / p99, {label} | {cells[0]} | {cells[1]} | |")
    return "\n".join(lines)


def median_of(runs: list[dict]) -> dict:
    """Figure by figure, the median over runs (nested dicts alike)."""
    out: dict = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            out[key] = median_of([run[key] for run in runs])
        elif isinstance(value, (int, float)):
            out[key] = statistics.median(run[key] for run in runs)
        else:
            out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per throughput run")
    parser.add_argument("--idle", type=int, default=2000, help="idle connections for the memory figure")
    parser.add_argument("--latency-rounds", type=int, default=200)
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--generator-core", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each server (median reported)")
    parser.add_argument(
        "--compare", nargs=2, default=["relay", "forwarder"], choices=sorted(SERVERS), metavar="SERVER",
        help="the two servers to compare: relay, relay+plugins or forwarder (default: relay forwarder)",
    )  # fmt: skip
    parser.add_argument(
        "--throughput-only", action="store_true",
        help="only relayed msgs/s, with the per-round ratios (for comparing small differences)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print every run's figures as JSON too")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.generator_core})
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    first, second = args.compare
    runs: dict[str, list[dict]] = {first: [], second: []}
    for i in range(args.repeat):  # alternate (and flip the order), so noise hits both alike
        for kind in (first, second) if i % 2 == 0 else (second, first):
            runs[kind].append(trio.run(measure, kind, args))
    if args.json:
        print(json.dumps(runs, indent=2))
    print(f"median of {args.repeat} alternating runs; python {sys.version.split()[0]}, {os.cpu_count()} cores")
    if args.throughput_only:
        print(f"| relayed msgs/s | {first} | {second} | {first} / {second}: median of the rounds' ratios (range) |")
        print("|---|---:|---:|---|")
        for n in args.pairs:
            a = [run[f"pairs_{n}"]["msgs_per_s"] for run in runs[first]]
            b = [run[f"pairs_{n}"]["msgs_per_s"] for run in runs[second]]
            ratios = sorted(x / y for x, y in zip(a, b, strict=True))
            print(
                f"| {n} pairs | {statistics.median(a):,.0f} | {statistics.median(b):,.0f} "
                f"| **{statistics.median(ratios):.3f}** ({ratios[0]:.2f}-{ratios[-1]:.2f}) |"
            )
        return
    print(report(median_of(runs[first]), median_of(runs[second]), args.pairs, (first, second)))


if __name__ == "__main__":
    main()
