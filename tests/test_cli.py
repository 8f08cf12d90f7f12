"""What people type: `python relay.py ...` as a subprocess, its mistakes and its plugins.

Every mistake on the command line (or in the environment, or in a plugin) is one line on stderr and
exit code 2, never a traceback; plugins given as a module next to you or as a file load; hooks see
the same classes the plugins import (the script is not a second copy of the module)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

import relay as relay_mod
from tests.conftest import STEP, Harness, RelayProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
RELAY = [sys.executable, str(ROOT / "relay.py")]


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RELAY, "--host", "127.0.0.1", *args], capture_output=True, text=True, timeout=30,
        env={**os.environ, **(env or {})}, cwd=cwd,
    )  # fmt: skip


MISTAKES = [
    (["--port", "-1"], {}, "--port must be at least 0"),
    (["--port", "70000"], {}, "--port must be at most 65535"),
    (["--port", "abc"], {}, "'abc' is not a whole number"),
    (["--host", "999.1.1.1"], {}, "--host '999.1.1.1': not an IP address"),
    (["--log-level", "bogus"], {}, "--log-level: invalid choice"),
    (["--message-rate", "-5"], {}, "--message-rate must be at least"),
    (["--heartbeat-timeout", "-1"], {}, "--heartbeat-timeout must be at least"),
    (["--max-message-bytes", "-3"], {}, "--max-message-bytes must be at least"),
    (["--max-connections", "0"], {}, "--max-connections must be at least 1"),
    (["--allowed-origin", "not an origin"], {}, "--allowed-origin 'not an origin': an origin is"),
    (["--trusted-proxy", "10.0.0.0/33"], {}, "not an IP network"),
    (["--ice-server", "http://x"], {}, "starts with stun:"),
    (["--static-dir", "/no/such/dir"], {}, "--static-dir '/no/such/dir': no such directory"),
    (["--plugin", "does.not.exist"], {}, "--plugin does.not.exist: no module named 'does'"),
    (["--plugin", "./missing_plugin.py"], {}, "--plugin ./missing_plugin.py: no such file"),
    (["--turn-ttl", "100000"], {}, "--turn-ttl must be between 1 and 86400"),
    (["--admin"], {"RELAY_ADMIN_TOKEN": ""}, "--admin needs RELAY_ADMIN_TOKEN"),
    (["--database-url", "mysql://x"], {}, "--database-url must be a postgresql://"),
    (["--sessions-db", "/no/such/dir/s.db"], {}, "the directory /no/such/dir does not exist"),
    (["--jwks-url", "not a url"], {}, "--jwks-url 'not a url' is not an http(s) URL"),
    (["--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
    ([], {"PORT": "abc"}, "PORT: 'abc' is not a whole number"),
    ([], {"RELAY_MESSAGE_RATE": "fast"}, "RELAY_MESSAGE_RATE: 'fast' is not a number"),
    ([], {"RELAY_TURN_SECRET": "a-secret-that-is-long-enough"}, "give --turn-host or --turn-url too"),
]


@pytest.mark.parametrize(("args", "env", "message"), MISTAKES, ids=[" ".join(m[0]) or str(m[1]) for m in MISTAKES])
def test_each_mistake_is_one_line_and_exit_2(args, env, message, tmp_path):
    result = run("--port", "0", *args, env=env, cwd=tmp_path)
    assert result.returncode == 2, result
    errors = [line for line in result.stderr.splitlines() if " INFO " not in line]  # start-up log lines aside
    assert len(errors) == 1 and errors[0].startswith("relay: error: "), result.stderr
    assert message in errors[0], errors[0]
    assert "Traceback" not in result.stderr


def test_a_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("--port", str(port), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr


def test_a_broken_plugin_is_one_line(tmp_path):
    (tmp_path / "broken_syntax.py").write_text("def oops(:\n")
    (tmp_path / "broken_import.py").write_text("import a_module_nobody_has\n")
    for name, message in [
        ("broken_syntax", "--plugin broken_syntax: importing it failed: SyntaxError"),
        ("broken_import", "--plugin broken_import: it imports a module that is missing"),
    ]:
        result = run("--port", "0", "--plugin", name, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert message in result.stderr.strip().splitlines()[-1]


def test_version():
    result = subprocess.run([*RELAY, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == f"relay {relay_mod.__version__}"
    assert relay_mod.__version__[0].isdigit() and relay_mod.__version__ != "0+unknown"  # installed: its version


PLUGIN = textwrap.dedent(
    """
    import logging

    import relay

    @relay.hookimpl
    def relay_matched(session, users):
        # The script form must not be a second copy of relay.py: hooks get the classes plugins import.
        assert isinstance(session, relay.Session), type(session)
        logging.getLogger("match_counter").warning("MATCHED-AS-RELAY-SESSION")
    """
)


@pytest.mark.parametrize("how", ["module in the current directory", "path to the file"])
async def test_plugins_load_as_people_give_them_and_see_one_relay_module(tmp_path, how, nursery):
    (tmp_path / "match_counter.py").write_text(PLUGIN)
    spec = "match_counter" if how.startswith("module") else str(tmp_path / "match_counter.py")
    relay = RelayProcess(tmp_path, "--plugin", spec).start()
    try:
        h = Harness(nursery, relay_mod.Relay())
        h.relay.port = relay.port
        await h.pair()
        with trio.fail_after(STEP):
            while "MATCHED-AS-RELAY-SESSION" not in relay.log.read_text():
                await trio.sleep(0.05)
    finally:
        relay.kill()
    log = relay.log.read_text()
    assert "Traceback" not in log and "failed in relay_matched" not in log, log
    assert "plugins: " in log and "match_counter" in log  # what loaded, and from where, is logged


def test_a_hook_wrapper_is_refused(tmp_path):
    (tmp_path / "wrapper_plugin.py").write_text(
        textwrap.dedent(
            """
            import relay

            @relay.hookimpl(wrapper=True)
            def relay_http_request(request):
                return (yield)
            """
        )
    )
    result = run("--port", "0", "--plugin", "wrapper_plugin", cwd=tmp_path)
    assert result.returncode == 2 and "relay_http_request is a hook wrapper" in result.stderr, result.stderr


def test_an_unreachable_database_is_not_a_mistake(tmp_path):
    port = free_port()  # nothing listens there: the relay starts, relays, and retries the database
    relay = RelayProcess(tmp_path, "--database-url", f"postgresql://nobody@127.0.0.1:{port}/none").start()
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=STEP) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        relay.kill()
