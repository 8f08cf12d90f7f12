"""``python relay.py --workers N``: N relay processes on one port (SO_REUSEPORT), each a cluster node
on the same Redis, under one supervisor that passes signals on and starts a dead worker again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from conftest import LOOPBACK_FLAGS, STEP, Harness, RedisServer, free_port

import relay as relay_mod

RELAY = str(relay_mod.STATIC_DIR.parent / "relay.py")


class Supervisor:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.log = tmp / "workers.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, RELAY, "--host", "127.0.0.1", "--port", str(self.port), *LOOPBACK_FLAGS, *args],
                stderr=log, cwd=tmp, start_new_session=True,
            )  # fmt: skip

    def workers(self) -> list[int]:
        tasks = Path(f"/proc/{self.proc.pid}/task").glob("*/children")  # (trio starts them from a thread)
        return sorted(int(pid) for task in tasks for pid in task.read_text().split())

    async def until_listening(self) -> None:
        """Until the supervisor says every worker listens (a worker that dies before that is a
        failed start: the supervisor exits)."""
        with trio.fail_after(3 * STEP):
            while " workers listening" not in self.log.read_text():
                await trio.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the supervisor and its workers
            self.proc.wait(timeout=10)


@pytest.fixture
def supervisor(tmp_path: Path, redis_server: RedisServer) -> Iterator[Supervisor]:
    s = Supervisor(tmp_path, "--redis-url", redis_server.url, "--node-id", "w", "--workers", "2")
    yield s
    s.stop()


async def until_nodes(redis: RedisServer, expected: set[str]) -> None:
    with trio.fail_after(3 * STEP):
        while redis.node_ids() != expected:
            await trio.sleep(0.05)


async def test_workers_share_the_port_and_the_queue(
    supervisor: Supervisor, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    await until_nodes(redis_server, {"w-0-0", "w-1-0"})
    harness = Harness(nursery, SimpleNamespace(port=supervisor.port))  # type: ignore[arg-type]
    with trio.fail_after(4 * STEP):
        clients = [await harness.connect() for _ in range(16)]  # the kernel spreads them over both
        for c in clients:
            await c.send(type="join")
        peers = {}
        for c in clients:
            while (msg := await c.recv())["type"] != "matched":
                assert msg["type"] == "queued", msg
            peers[c.id] = msg["peer_id"]
        assert all(peers[peers[cid]] == cid for cid in peers)  # 8 pairs, each pair of two
        for c in clients:
            await c.send(type="signal", data={"from": c.id})
        for c in clients:
            assert (await c.expect("signal", n=1))["data"] == {"from": peers[c.id]}
    owners = redis_server.command("ZRANGE", "{mm}:owners", "0", "-1").decode()
    assert "w-0-0\x1f" in owners and "w-1-0\x1f" in owners  # both workers serve clients
    supervisor.proc.send_signal(signal.SIGTERM)  # passed on: both drain and exit, then the supervisor
    assert await trio.to_thread.run_sync(lambda: supervisor.proc.wait(timeout=4 * STEP)) == 0
    # Nobody resumed the clients they closed (1012) and kept away: no node is left to take them, so
    # each worker gave its lease up, for the next node to start to reap them.
    assert redis_server.command("KEYS", "{mm}:node:*") == b"*0\r\n"


async def test_a_worker_that_dies_is_started_again_as_another_node(
    supervisor: Supervisor, redis_server: RedisServer
) -> None:
    await until_nodes(redis_server, {"w-0-0", "w-1-0"})
    await supervisor.until_listening()  # (registered in Redis, a worker may not listen yet)
    first, second = supervisor.workers()
    os.kill(second, signal.SIGKILL)
    with trio.fail_after(3 * STEP):  # the new one runs under a new id; the dead one is reaped
        while "w-1-1" not in redis_server.node_ids():
            await trio.sleep(0.05)
    assert first in supervisor.workers() and second not in supervisor.workers()


def test_workers_need_a_shared_queue_and_say_so_once(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, RELAY, "--host", "127.0.0.1", "--port", str(free_port()), "--workers", "2"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("--workers needs a queue the workers share: --redis-url") == 1, done.stderr


def test_workers_auto_is_one_per_core(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, RELAY, "--port", "0", "--workers", "auto"], capture_output=True, text=True, timeout=30
    )
    expected = "needs a fixed --port" if len(os.sched_getaffinity(0)) > 1 else "needs a queue the workers share"
    assert done.returncode == 2 and expected in done.stderr, done.stderr


async def test_workers_stop_when_their_supervisor_is_killed(supervisor: Supervisor, redis_server: RedisServer) -> None:
    await until_nodes(redis_server, {"w-0-0", "w-1-0"})
    workers = supervisor.workers()
    supervisor.proc.kill()  # SIGKILL: nothing passes signals on; the kernel tells each worker (SIGTERM)
    supervisor.proc.wait(timeout=10)
    with trio.fail_after(3 * STEP):
        while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in workers):
            await trio.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "Z"


def test_workers_stopped_while_starting_exit_0(tmp_path: Path, redis_server: RedisServer) -> None:
    s = Supervisor(tmp_path, "--redis-url", redis_server.url, "--node-id", "w", "--workers", "2")
    try:
        deadline = time.monotonic() + 15
        while True:  # the first worker listens; the second is (most likely) still starting
            try:
                socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and s.proc.poll() is None, s.log.read_text()
                time.sleep(0.01)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=30) == 0, s.log.read_text()
        assert "relay: error" not in s.log.read_text() and " ERROR " not in s.log.read_text()
    finally:
        s.stop()
