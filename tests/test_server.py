"""The relay as a process: `python relay.py`, signals, exit codes, and its deployment files."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import relay_plugins.metrics
import trio

import relay as relay_mod
from tests.conftest import LOOPBACK_FLAGS, STEP, UPGRADE, Harness, http_get

ROOT = Path(__file__).resolve().parent.parent


class Process:
    """`python relay.py` on 127.0.0.1 and a free port, its log collected."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.log = b""
        self.port = 0

    async def read_until(self, pattern: bytes) -> re.Match[bytes]:
        assert self.proc.stderr is not None
        with trio.fail_after(STEP * 2):
            while not (match := re.search(pattern, self.log)):
                chunk = await self.proc.stderr.receive_some()
                assert chunk, f"relay exited early: {self.log.decode()}"
                self.log += chunk
        return match

    async def drain_log(self) -> None:
        assert self.proc.stderr is not None
        async for chunk in self.proc.stderr:
            self.log += chunk


async def start_process(nursery: trio.Nursery, *args: str, cwd: Path | None = None) -> Process:
    """`python relay.py` with the given flags; session records (on by default) go to `cwd`."""
    proc = await nursery.start(
        lambda task_status: trio.run_process(
            [sys.executable, str(ROOT / "relay.py"), "--host", "127.0.0.1", "--port", "0", *LOOPBACK_FLAGS, *args],
            stderr=subprocess.PIPE,
            check=False,
            cwd=cwd,
            task_status=task_status,
        )
    )
    p = Process(proc)
    p.port = int((await p.read_until(rb"relay listening on 127\.0\.0\.1:(\d+)")).group(1))
    return p


async def test_sigterm_drains_clients_with_1012_and_exits_0(nursery, tmp_path):
    p = await start_process(nursery, "--drain-seconds", "1", cwd=tmp_path)
    h = Harness(nursery, relay_mod.Relay())
    h.relay.port = p.port
    idle = await h.connect()
    finishing_a, finishing_b, _, _ = await h.pair()  # will end its session during the drain
    lingering_a, lingering_b, _, _ = await h.pair()  # will still be talking at the deadline
    p.proc.send_signal(signal.SIGTERM)

    await idle.expect("draining")
    assert (await idle.closed()).code == 1012  # idle: closed at once
    for c in (finishing_a, finishing_b, lingering_a, lingering_b):
        await c.expect("draining", deadline_s=1.0)
    status, _, body = await http_get(p.port, "/healthz")
    assert status == 503 and json.loads(body)["status"] == "draining"
    assert (await http_get(p.port, "/ws", headers=UPGRADE))[0] == 503  # no new clients

    await lingering_a.send(type="signal", data={"still": "relayed"})  # sessions keep working
    await lingering_b.expect("signal", data={"still": "relayed"})
    await finishing_a.send(type="leave")
    await finishing_a.expect("left")
    await finishing_b.expect("peer_left", reason="left")
    assert (await finishing_a.closed()).code == 1012
    assert (await finishing_b.closed()).code == 1012
    assert (await lingering_a.closed()).code == 1012  # at the drain deadline
    assert (await lingering_b.closed()).code == 1012
    with trio.fail_after(STEP):
        await p.proc.wait()
    await p.drain_log()
    assert p.proc.returncode == 0, p.log.decode()
    assert b"Traceback" not in p.log


async def test_sigint_with_no_clients_exits_at_once(nursery, tmp_path):
    p = await start_process(nursery, cwd=tmp_path)
    p.proc.send_signal(signal.SIGINT)
    with trio.fail_after(STEP):
        await p.proc.wait()
    assert p.proc.returncode == 0


async def test_port_from_environment(nursery, tmp_path):
    proc = await nursery.start(
        lambda task_status: trio.run_process(
            [sys.executable, str(ROOT / "relay.py"), "--host", "127.0.0.1"],
            env={"PORT": "0", "PATH": "/usr/bin:/bin"},
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            check=False,
            task_status=task_status,
        )
    )
    p = Process(proc)
    await p.read_until(rb"relay listening on 127\.0\.0\.1:\d+")
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(STEP):
        await proc.wait()


def test_cli_help_and_settings():
    out = subprocess.run([sys.executable, str(ROOT / "relay.py"), "--help"], capture_output=True, text=True, check=True)
    for flag in ("--interest-timeout", "--rematch-cooldown", "--max-message-bytes", "--max-connections",
                 "--ice-server", "--plugin", "--drain-seconds", "--send-buffer-bytes", "--message-rate",
                 "--sessions-db", "--database-url", "--metrics", "--admin", "sessions"):  # fmt: skip
        assert flag in out.stdout  # the last five come from the bundled plugins' entry points
    args = relay_mod.parse_command_line(
        ["--interest-timeout", "3", "--ice-server", "stun:127.0.0.1:3478", "--ice-server",
         '{"urls": ["turn:127.0.0.1:3478"], "username": "u", "credential": "c"}'],
        relay_mod.make_plugin_manager(entry_points=False),
    )  # fmt: skip
    settings = relay_mod.settings_from_args(args)
    assert settings.interest_timeout == 3
    assert settings.ice_servers == (
        {"urls": "stun:127.0.0.1:3478"},
        {"urls": ["turn:127.0.0.1:3478"], "username": "u", "credential": "c"},
    )
    bad = subprocess.run([sys.executable, str(ROOT / "relay.py"), "--ice-server", "http://x"], capture_output=True)
    assert bad.returncode == 2 and b"ice-server" in bad.stderr


def test_fly_toml_matches_the_server():
    fly = tomllib.loads((ROOT / "fly.toml").read_text())
    service = fly["http_service"]
    assert service["internal_port"] == relay_mod.DEFAULT_PORT == int(fly["env"]["PORT"])
    assert [check["path"] for check in service["checks"]] == [relay_mod.HEALTH_PATH]
    assert service["concurrency"]["type"] == "connections"
    assert service["concurrency"]["hard_limit"] <= relay_mod.Settings().max_connections
    assert service["auto_stop_machines"] == "off" and service["min_machines_running"] >= 1
    assert fly["kill_signal"] == "SIGTERM"
    assert fly["kill_timeout"] > relay_mod.Settings().drain_seconds + relay_mod.CLOSE_TIMEOUT
    assert (ROOT / fly["build"]["dockerfile"]).is_file()
    assert fly["metrics"] == {"port": relay_plugins.metrics.DEFAULT_PORT, "path": "/metrics"}
    assert fly["metrics"]["port"] != service["internal_port"]  # the private port: not routed from the internet
    assert fly["env"]["RELAY_METRICS"] == "1"  # so /metrics is served (relay_plugins.metrics)
    assert fly["env"]["RELAY_ALLOWED_ORIGINS"].startswith("https://")  # only these pages may connect
    args = relay_mod.parse_command_line([], relay_mod.make_plugin_manager(entry_points=False))
    assert relay_mod.settings_from_args(args).allowed_origins == ()  # locally: off by default
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["python", "relay.py"]' in dockerfile and "COPY static ./static" in dockerfile
