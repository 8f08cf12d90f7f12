"""TURN credentials (relay_plugins.turn): coturn's algorithm, expiry, rotation, and a secret that never
leaves the relay. The end-to-end proof through a real coturn is in tests/test_browser.py."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import socket
import struct
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import relay_plugins.admin
import relay_plugins.metrics
import relay_plugins.turn
from relay_plugins.turn import MAX_TTL, TurnCredentials, credentials, urls_for_host

import relay as relay_mod
from tests.conftest import Harness, free_udp_and_tcp_port, http_get, start_relay, stun_binding_answered

SECRET = "north-shared-secret-123"


@pytest.mark.parametrize(
    ("secret", "username", "expected"),
    [
        # Computed with: printf '%s' USERNAME | openssl dgst -sha1 -hmac SECRET -binary | base64
        ("north-shared-secret-123", "1700000000:alice", "dHyWDh3wYGedWE6VXi3kkb93JOU="),
        ("another rather long secret!", "1800003600:q3N8xw0Kc2Vb", "52SvH19Wgv0k1CJVtmSmoA5t/8o="),
    ],
)
def test_credentials_match_coturns_algorithm(secret, username, expected):
    expiry, name = username.split(":", 1)
    assert credentials(secret, name, ttl=10, now=int(expiry) - 10) == (username, expected)


def test_credentials_expire_after_the_ttl_and_name_the_client():
    plugin = TurnCredentials([SECRET], urls_for_host("turn.example.org"), ttl=600, clock=lambda: 1_000_000.5)
    servers = plugin.relay_ice_servers(session=None, client_id="client-7")
    assert servers[0] == {"urls": ["stun:turn.example.org:3478"]}
    turn = servers[1]
    assert turn["urls"] == [
        "turn:turn.example.org:3478?transport=udp",
        "turn:turn.example.org:3478?transport=tcp",
        "turns:turn.example.org:443?transport=tcp",
    ]
    assert turn["username"] == "1000600:client-7"  # expires 600 s from now
    assert turn["credential"] == credentials(SECRET, "client-7", 600, 1_000_000.5)[1]
    assert SECRET not in repr(plugin) and SECRET not in json.dumps(servers)


def test_rotation_signs_with_the_first_secret_and_keeps_extra_servers():
    new, old = "the-new-secret-0123456", SECRET
    extra = ({"urls": "stun:stun.example.org:3478"},)
    plugin = TurnCredentials([new, old], ["turn:t.example.org:3478"], ttl=60, extra=extra, clock=lambda: 0)
    servers = plugin.relay_ice_servers(session=None, client_id="c")
    assert servers[0]["credential"] == credentials(new, "c", 60, 0)[1] != credentials(old, "c", 60, 0)[1]
    assert servers[-1] == extra[0]


@pytest.mark.parametrize(
    ("secrets", "urls", "ttl"),
    [
        ([], ["turn:t:3478"], 60),
        (["short"], ["turn:t:3478"], 60),
        ([SECRET], ["stun:t:3478"], 60),  # no TURN URL
        ([SECRET], ["turn:t:3478"], MAX_TTL + 1),  # longer than a day
        ([SECRET], ["turn:t:3478"], 0),
    ],
)
def test_bad_configuration_refuses_to_start(secrets, urls, ttl):
    with pytest.raises(relay_mod.PluginError):
        TurnCredentials(secrets, urls, ttl=ttl)


@pytest.mark.parametrize(
    ("env", "options", "error"),
    [
        (SECRET, {"turn_host": None, "turn_url": []}, "--turn-host"),
        ("", {"turn_host": "t.example.org", "turn_url": []}, "RELAY_TURN_SECRET"),
    ],
)
def test_configure_needs_both_secret_and_urls(monkeypatch, env, options, error):
    monkeypatch.setenv("RELAY_TURN_SECRET", env)
    r = relay_mod.Relay(options=argparse.Namespace(turn_ttl=3600, **options))
    with pytest.raises(relay_mod.PluginError, match=error):
        relay_plugins.turn.relay_configure(relay=r)


async def test_the_secret_never_appears_in_messages_logs_or_metrics(nursery, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    admin_token = "admin-token-long-enough-0123"
    monkeypatch.setenv("RELAY_TURN_SECRET", f"{SECRET},an-older-secret-456789")
    monkeypatch.setenv("RELAY_ADMIN_TOKEN", admin_token)
    options = {"turn_host": "127.0.0.1", "turn_url": [], "turn_ttl": 3600.0, "metrics": True, "metrics_port": 0}
    options["admin"] = True
    r = await start_relay(
        nursery, plugins=[relay_plugins.turn, relay_plugins.metrics, relay_plugins.admin], options=options
    )
    h = Harness(nursery, r)
    seen: list[str] = []
    a, b, ma, mb = await h.pair()
    seen += [json.dumps(ma), json.dumps(mb)]
    assert ma["ice_servers"][1]["username"].endswith(f":{a.id}")
    assert mb["ice_servers"][1]["username"].endswith(f":{b.id}")
    await a.send(type="signal", data={"x": 1})
    seen.append(json.dumps(await b.recv()))
    await a.send(type="next")
    seen.append(json.dumps(await b.recv()))
    for port, path, headers in [
        (r.pm.get_plugin("metrics-registry").port, "/metrics", ""),
        (r.port, "/healthz", ""),
        (r.port, "/admin/api/status", f"Authorization: Bearer {admin_token}\r\n"),
    ]:
        status, _, body = await http_get(port, path, headers=headers)
        assert status == 200
        seen.append(body.decode())
    seen.append(caplog.text)
    seen.append(repr(r.options))
    assert "TURN credentials: 4 URL(s)" in caplog.text  # it did log about TURN, without the secret
    for text in seen:
        assert SECRET not in text and "an-older-secret-456789" not in text


# -- the production coturn configuration, exercised with a minimal TURN client ------------------------

DEPLOY_CONF = Path(__file__).resolve().parent.parent / "deploy" / "turnserver.conf"
MAGIC = 0x2112A442


class TurnClient:
    """Just enough of TURN (RFC 5766) over UDP: Allocate with a long-term credential, then
    CreatePermission; returns the STUN error code of each answer (0 for success)."""

    def __init__(self, port: int, username: str, password: str) -> None:
        self.addr = ("127.0.0.1", port)
        self.username, self.password = username, password
        self.realm = self.nonce = b""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(2)

    @staticmethod
    def _attr(kind: int, value: bytes) -> bytes:
        return struct.pack("!HH", kind, len(value)) + value + b"\0" * (-len(value) % 4)

    def _request(self, method: int, attrs: bytes) -> tuple[int, dict[int, bytes]]:
        txid = os.urandom(12)
        if self.nonce:
            attrs += b"".join(
                self._attr(k, v)
                for k, v in ((0x0006, self.username.encode()), (0x0014, self.realm), (0x0015, self.nonce))
            )
            key = hashlib.md5(f"{self.username}:{self.realm.decode()}:{self.password}".encode()).digest()
            head = struct.pack("!HHI", method, len(attrs) + 24, MAGIC) + txid
            attrs += self._attr(0x0008, hmac.new(key, head + attrs, hashlib.sha1).digest())  # MESSAGE-INTEGRITY
        self.sock.sendto(struct.pack("!HHI", method, len(attrs), MAGIC) + txid + attrs, self.addr)
        data = self.sock.recv(4096)
        kind, length = struct.unpack("!HH", data[:4])
        assert data[8:20] == txid
        parsed, pos = {}, 20
        while pos < 20 + length:
            t, n = struct.unpack("!HH", data[pos : pos + 4])
            parsed[t] = data[pos + 4 : pos + 4 + n]
            pos += 4 + n + (-n % 4)
        code = 0 if kind & 0x0110 == 0x0100 else parsed[0x0009][2] % 8 * 100 + parsed[0x0009][3]
        return code, parsed

    def allocate(self) -> int:
        transport = self._attr(0x0019, b"\x11\0\0\0")  # REQUESTED-TRANSPORT: UDP
        code, attrs = self._request(0x0003, transport)
        if code == 401:  # the first answer gives the realm and a nonce
            self.realm, self.nonce = attrs[0x0014], attrs[0x0015]
            code, attrs = self._request(0x0003, transport)
        return code

    def permit(self, ip: str) -> int:
        packed = bytes(a ^ b for a, b in zip(socket.inet_aton(ip), struct.pack("!I", MAGIC), strict=True))
        xor_peer = struct.pack("!BBH", 0, 1, 9 ^ (MAGIC >> 16)) + packed  # XOR-PEER-ADDRESS, IPv4, port 9
        return self._request(0x0008, self._attr(0x0012, xor_peer))[0]


@pytest.fixture
def production_coturn(tmp_path) -> Iterator[tuple[int, str]]:
    """coturn with deploy/turnserver.conf, moved onto 127.0.0.1 and free ports, with a throwaway
    certificate; everything else (auth, denied peers, quotas) as in production."""
    secret = "secret-for-the-production-config-test"
    port = tls_port = free_udp_and_tcp_port()  # coturn takes each for UDP and TCP (TLS and DTLS)
    while tls_port == port:
        tls_port = free_udp_and_tcp_port()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    process = subprocess.Popen(
        ["turnserver", "-c", str(DEPLOY_CONF), "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1",
         f"--listening-port={port}", f"--tls-listening-port={tls_port}", f"--static-auth-secret={secret}",
         f"--cert={tmp_path / 'cert.pem'}", f"--pkey={tmp_path / 'key.pem'}", f"--userdb={tmp_path / 'db'}"],
        stdout=(tmp_path / "coturn.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not stun_binding_answered(port):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "coturn.log").read_text()
        yield port, secret
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_production_config_refuses_relaying_into_private_networks(production_coturn):
    port, secret = production_coturn
    username, password = credentials(secret, "tester", 600, time.time())
    client = TurnClient(port, username, password)
    assert client.allocate() == 0  # a credential the relay signed works
    for internal in ("127.0.0.1", "10.1.2.3", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.1"):
        assert client.permit(internal) == 403, internal  # Forbidden IP
    assert client.permit("93.184.216.34") == 0  # a public address is fine (nothing is sent to it)


def test_production_config_refuses_bad_and_expired_credentials(production_coturn):
    port, secret = production_coturn
    username, _ = credentials(secret, "tester", 600, time.time())
    assert TurnClient(port, username, "not-the-credential").allocate() == 401
    expired, password = credentials(secret, "tester", 600, time.time() - 3600)  # expired 50 minutes ago
    assert TurnClient(port, expired, password).allocate() == 401


def test_production_config_has_the_settings_that_matter():
    lines = [line.strip() for line in DEPLOY_CONF.read_text().splitlines() if line.strip()]
    settings = [line for line in lines if not line.startswith("#")]
    assert all("#" not in line for line in settings), "coturn reads an inline comment as part of the value"
    names = {line.split("=", 1)[0] for line in settings}
    assert {"use-auth-secret", "static-auth-secret", "realm", "no-multicast-peers", "no-cli"} <= names
    assert "allow-loopback-peers" not in names and "lt-cred-mech" not in names
    assert "tls-listening-port=443" in settings


def test_fly_coturn_app_config():
    deploy = Path(__file__).resolve().parent.parent / "deploy" / "coturn"
    fly = tomllib.loads((deploy / "fly.toml").read_text())
    udp = [s for s in fly["services"] if s["protocol"] == "udp"]
    tcp = [s for s in fly["services"] if s["protocol"] == "tcp"]
    assert [p["port"] for s in udp for p in s["ports"] if "port" in p] == [3478]
    ranges = [(p["start_port"], p["end_port"]) for s in udp for p in s["ports"] if "start_port" in p]
    assert ranges == [(50000, 50199)]  # both coturn processes' relay ports (entrypoint.sh)
    script = (deploy / "entrypoint.sh").read_text()
    assert "--min-port=50000 --max-port=50099" in script and "--min-port=50100 --max-port=50199" in script
    ports = {p["port"]: p.get("handlers", []) for s in tcp for p in s["ports"]}
    assert ports == {3478: [], 443: ["tls"]}  # TURN over TCP, and over TLS terminated by Fly's proxy


def test_fly_coturn_entrypoint_runs_both_servers_without_the_example_secret(tmp_path):
    """deploy/coturn/entrypoint.sh with real coturn on loopback; `getent` answers fly-global-services."""
    deploy = Path(__file__).resolve().parent.parent / "deploy"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "getent").write_text("#!/bin/sh\necho '127.0.0.1 STREAM fly-global-services'\n")
    (bin_dir / "getent").chmod(0o755)
    secret = "the-secret-set-with-fly-secrets-0123"
    conf = tmp_path / "turnserver.conf"
    env = {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TURN_SECRET": secret, "TURN_REALM": "turn.test",
        "TURN_PUBLIC_IP": "203.0.113.7", "TURN_CONF_IN": str(deploy / "turnserver.conf"), "TURN_CONF": str(conf),
    }  # fmt: skip
    script = subprocess.Popen(
        ["bash", str(deploy / "coturn" / "entrypoint.sh")], env=env, start_new_session=True,
        stdout=(tmp_path / "log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not stun_binding_answered(3478):
            assert script.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
        socket.create_connection(("127.0.0.1", 3478), timeout=5).close()  # the TCP one is up too
        generated = [line for line in conf.read_text().splitlines() if not line.startswith("#")]
        assert not [line for line in generated if "CHANGE-ME" in line]
        assert f"static-auth-secret={secret}" in generated
        assert "external-ip=203.0.113.7/127.0.0.1" in generated
        username, password = credentials(secret, "tester", 600, time.time())
        client = TurnClient(3478, username, password)
        assert client.allocate() == 0
        assert client.permit("10.0.0.1") == 403  # the production denials still apply
        example = credentials("CHANGE-ME-a-long-random-secret", "x", 600, time.time())
        assert TurnClient(3478, *example).allocate() == 401  # the repository's example secret is not valid
        subprocess.run(["pkill", "-f", "--", "--listening-ip=0.0.0.0 --listening-port=3478"], check=False)
        assert script.wait(timeout=10) == 1  # one server stopped: the machine stops, Fly restarts it
    finally:
        os.killpg(script.pid, 15)
        script.wait(timeout=10)
