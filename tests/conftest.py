"""Shared fixtures: a relay served on 127.0.0.1 in the test's nursery, and a small JSON client.

Before any test runs, the test session moves itself into a new network namespace whose only
interface is loopback, so nothing a test starts (relays, Chromium, coturn, ...) can send a packet
beyond 127.0.0.1. As root that is ``unshare(CLONE_NEWNET)``; otherwise a user namespace is created
first. If neither is allowed, ``NETWORK_ISOLATION_ERROR`` says why and the browser tests fail.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import relay as relay_mod
from relay_testing import LOOPBACK_LIMITS, STEP, Client, Harness, http_get, start_relay

__all__ = ["LOOPBACK_LIMITS", "STEP", "Client", "Harness", "http_get", "start_relay"]  # for the tests

# Tests open a thousand clients (two sockets each, in one process).
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))


def _isolate_network() -> str | None:
    """Enter a fresh network namespace with only loopback, up. Returns None, or why it failed."""
    clone_newnet, clone_newuser = 0x40000000, 0x10000000
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(clone_newnet) != 0:
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(clone_newuser | clone_newnet) != 0:
            return f"unshare: {os.strerror(ctypes.get_errno())} (run as root or allow user namespaces)"
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")  # stay yourself (PostgreSQL refuses to run as root)
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # `ip link set lo up`, without iproute2
        siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, siocgifflags, struct.pack("16sH14s", b"lo", 0, b"")))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14s", b"lo", flags | iff_up, b""))
    interfaces = sorted(name for _, name in socket.if_nameindex())
    return None if interfaces == ["lo"] else f"unexpected interfaces {interfaces}"


NETWORK_ISOLATION_ERROR = _isolate_network()

UPGRADE = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n"
)
LOOPBACK_FLAGS = [f"--{name.replace('_', '-')}={value}" for name, value in LOOPBACK_LIMITS.items()]


@pytest.fixture
async def harness(nursery: trio.Nursery) -> AsyncIterator[Harness]:
    yield Harness(nursery, await start_relay(nursery))


@pytest.fixture
def make_harness(nursery: trio.Nursery):
    async def make(**settings: Any) -> Harness:
        return Harness(nursery, await start_relay(nursery, **settings))

    return make


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server (Debian's package) on 127.0.0.1 and a free port, for this session."""
    import glob
    import shutil
    import subprocess
    import tempfile

    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    assert versions, "PostgreSQL tests need Debian's postgresql package: apt-get install postgresql"
    bindir = versions[-1]
    datadir = tempfile.mkdtemp(prefix="relay-pg-")
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(datadir, "postgres", "postgres")
        os.chmod(datadir, 0o700)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, cwd="/")

    run(f"{bindir}/initdb", "-D", datadir, "-U", "postgres", "-A", "trust", "--no-sync")
    options = f"-h 127.0.0.1 -p {port} -k {datadir} -c fsync=off -c full_page_writes=off"
    run(f"{bindir}/pg_ctl", "-D", datadir, "-o", options, "-l", f"{datadir}/log", "-w", "-t", "30", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(f"{bindir}/pg_ctl", "-D", datadir, "-m", "immediate", "-w", "stop")
        shutil.rmtree(datadir, ignore_errors=True)


def stun_binding_answered(port: int, timeout: float = 0.2) -> bool:
    """Whether a STUN server on 127.0.0.1:port answers a Binding request (RFC 5389) over UDP."""
    transaction = os.urandom(12)
    request = struct.pack("!HHI", 0x0001, 0, 0x2112A442) + transaction
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(request, ("127.0.0.1", port))
        try:
            data = s.recv(2048)
        except OSError:
            return False
    return data[:2] == b"\x01\x01" and data[8:20] == transaction  # Binding success, our transaction


@pytest.fixture
def turnserver(tmp_path) -> Iterator[Callable[[str], int]]:
    """Start coturn (Debian's package) on 127.0.0.1 with `use-auth-secret`; returns its port.
    Loopback peers are allowed here only because everything in the tests is on 127.0.0.1: never
    in production (see deploy/turnserver.conf)."""
    import shutil
    import subprocess
    import time

    assert shutil.which("turnserver"), "TURN tests need Debian's coturn package: apt-get install coturn"
    processes: list[subprocess.Popen[bytes]] = []

    def start(secret: str) -> int:
        port = free_udp_and_tcp_port()
        log = (tmp_path / f"turnserver-{port}.log").open("wb")
        process = subprocess.Popen(
            ["turnserver", "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--listening-port={port}",
             "--min-port=49152", "--max-port=49252", "--use-auth-secret", f"--static-auth-secret={secret}",
             "--realm=relay-test", "--fingerprint", "--no-tls", "--no-dtls", "--no-cli", "--allow-loopback-peers",
             "--no-multicast-peers", f"--userdb={tmp_path}/turndb-{port}", "--log-file=stdout", "--simple-log"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        processes.append(process)
        deadline = time.monotonic() + 10
        while not stun_binding_answered(port):
            assert process.poll() is None and time.monotonic() < deadline, "coturn did not start"
        return port

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_udp_and_tcp_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP (coturn listens on both with one number)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class RelayProcess:
    """`python relay.py` on 127.0.0.1; can be killed and started again on the same port."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.log = tmp / f"relay-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(relay_mod.STATIC_DIR.parent / "relay.py"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    *LOOPBACK_FLAGS,
                    *self.args,
                ],
                stderr=log,
                env=self.env,
                cwd=self.log.parent,  # its session records (SQLite, on by default) stay in the test's tmp dir
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()
                time.sleep(0.05)
        raise AssertionError(f"relay did not start: {self.log.read_text()}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


NGINX_CONF = """
worker_processes 1;
daemon off;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};  # default buffering
            {websockets}
        }}
    }}
}}
"""
NGINX_WEBSOCKETS = (  # what a proxy needs to pass WebSockets
    "proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection upgrade;"
)


class Nginx:
    """Debian's nginx on 127.0.0.1 as a plain reverse proxy to ``upstream``: by default, like the
    proxies that block WebSockets, without the upgrade headers; ``reload(websockets=True)`` passes them."""

    def __init__(self, tmp: Path, upstream: int) -> None:
        self.tmp = tmp
        self.upstream = upstream
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def _configure(self, websockets: bool) -> None:
        (self.tmp / "nginx.conf").write_text(NGINX_CONF.format(
            tmp=self.tmp, port=self.port, upstream=self.upstream, user="user root;" if os.geteuid() == 0 else "",
            websockets=NGINX_WEBSOCKETS if websockets else "",
        ))  # fmt: skip

    def start(self, websockets: bool = False) -> Nginx:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        assert os.path.exists(binary), "nginx is not installed (.ci/run installs Debian's nginx)"
        self._configure(websockets)
        self.proc = subprocess.Popen([binary, "-p", str(self.tmp), "-c", str(self.tmp / "nginx.conf")])
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)

    def reload(self, websockets: bool) -> None:
        """New configuration, same port: nginx's graceful reload (SIGHUP)."""
        assert self.proc is not None
        self._configure(websockets)
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """``nginx(upstream_port, websockets=False)`` -> a started ``Nginx``; every one is stopped afterwards."""
    started: list[Nginx] = []

    def start(upstream: int, websockets: bool = False) -> Nginx:
        directory = tmp_path / f"nginx-{len(started)}"
        directory.mkdir()
        started.append(Nginx(directory, upstream).start(websockets))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


class RedisServer:
    """Debian's redis-server (or ``binary``) on 127.0.0.1 and a free port; killed (SIGKILL) and
    started again on the same port, empty, or with what its append-only file kept (``aof=True``)."""

    def __init__(
        self, tmp: Path, *, aof: bool = False, args: tuple[str, ...] = (), binary: str = "redis-server"
    ) -> None:
        self.binary = binary
        self.port = free_port()
        self.tmp = tmp
        self.aof = aof
        self.args = args  # redis-server's first arguments: flags (--replicaof 127.0.0.1 P), or a config file
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [self.binary, *self.args, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--daemonize", "no", "--dir", str(self.tmp), "--repl-diskless-sync-delay", "0", *persistence],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                assert self.proc.poll() is None, "redis-server exited"
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def command(self, *args: str) -> bytes:
        """One command, answered raw (for checks: DBSIZE, KEYS, CONFIG SET)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a.encode()) for a in args))
            return s.recv(1 << 20)

    def node_ids(self) -> set[str]:
        """The cluster's node list (``{mm}:nodes``)."""
        answer = self.command("SMEMBERS", "{mm}:nodes").decode()
        return {line for line in answer.split("\r\n") if line and line[0] not in "*$"}

    kill = RelayProcess.kill

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()
