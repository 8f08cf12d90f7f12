"""Attacks that used to work, over real sockets: each test here failed before its fix.

Auth that fails closed, text no peer can be hurt by, per-address caps that count every socket,
proxy headers believed only from the proxy and only where the proxy writes, join and byte budgets
that outlive a connection, and the small ones (a reset during the upgrade, an oversized head sent
whole, guessing the admin token, metrics on the public port).
"""

from __future__ import annotations

import functools
import json
import socket
import struct
import time

import jwt
import pytest
import relay_plugins.admin
import relay_plugins.metrics
import trio
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from relay_plugins.auth_jwt import JwtAuth

import relay as relay_mod
from tests.conftest import STEP, UPGRADE, Harness, RelayProcess, http_get, start_relay

PROXY = {"trusted_proxies": ("127.0.0.1/32",)}  # the tests' own connections play the proxy


async def upgrade_status(port: int, headers: str = "") -> int:
    return (await http_get(port, "/ws", headers=UPGRADE + headers))[0]


def unsigned(header: dict, payload: dict) -> str:
    """A token with any header and a signature that is not one."""

    def part(value: dict) -> str:
        return jwt.utils.base64url_encode(json.dumps(value).encode()).decode()

    return f"{part(header)}.{part(payload)}.{jwt.utils.base64url_encode(b'not a signature').decode()}"


# -- 1. auth fails closed ---------------------------------------------------------------------------


@pytest.fixture
async def rsa_jwks_relay(nursery):
    """A relay whose JWT plugin trusts a JWKS with one RSA key, served by the test."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    body = json.dumps({"keys": [json.loads(RSAAlgorithm.to_jwk(key.public_key())) | {"kid": "k1"}]}).encode()

    async def serve_jwks(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some()
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            await stream.send_all(head + body)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, serve_jwks, 0, host="127.0.0.1"))
    auth = JwtAuth(jwks_url=f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/jwks")
    await trio.to_thread.run_sync(auth.load_keys)
    r = await start_relay(nursery, plugins=[auth])
    r.rsa_key = key  # type: ignore[attr-defined]
    return r


@pytest.mark.parametrize(
    "header",
    [{"alg": "ES256", "typ": "JWT"}, {"alg": "ES256", "kid": "k1"}, {"alg": "PS256", "kid": "k1"}, {"alg": "RS256"}],
)
async def test_a_token_the_key_cannot_check_is_refused(rsa_jwks_relay, header, nursery):
    payload = {"sub": "mallory", "exp": int(time.time()) + 600}
    status, _, body = await http_get(
        rsa_jwks_relay.port, "/ws", headers=UPGRADE + f"Authorization: Bearer {unsigned(header, payload)}\r\n"
    )
    assert status == 401, body
    assert rsa_jwks_relay.statistics().connections_total == 0
    good = jwt.encode(payload, rsa_jwks_relay.rsa_key, algorithm="RS256", headers={"kid": "k1"})
    await Harness(nursery, rsa_jwks_relay).connect(headers={"Authorization": f"Bearer {good}"})  # the key still works


async def test_an_auth_hook_that_raises_or_answers_nonsense_refuses(nursery, caplog):
    class Broken:
        def __init__(self, answer):
            self.answer = answer

        @relay_mod.hookimpl
        def relay_authenticate(self, request):
            if self.answer is None:
                raise TypeError("a bug in the auth plugin")
            return self.answer

    for plugin in (Broken(None), Broken("yes, let them in")):
        r = await start_relay(nursery, plugins=[plugin])
        status, _, body = await http_get(r.port, "/ws", headers=UPGRADE)
        assert status == 401 and b"authentication failed" in body
        assert r.statistics().connections_total == 0
    assert "a bug in the auth plugin" in caplog.text


# -- 2. every write is bounded, control frames included --------------------------------------------


def ws_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A client frame masked with the key 0 (so the payload goes as is)."""
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


def raw_websocket(port: int) -> socket.socket:
    """A blocking socket past the handshake and the welcome."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=STEP)
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n" + UPGRADE.encode() + b"\r\n")
    data = b""
    while b"welcome" not in data:
        data += sock.recv(65536)
    return sock


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) * 1024


def flood_without_reading(sock: socket.socket, frame: bytes, seconds: float, pid: int) -> tuple[bool, int]:
    """Send ``frame`` over and over for at most ``seconds``, reading nothing: (whether the relay
    closed the connection, the relay's peak RSS meanwhile)."""
    sock.setblocking(False)
    deadline = time.monotonic() + seconds
    batch = frame * 64
    unsent = b""  # a partial write's rest goes first: frames stay whole
    peak, sampled = rss(pid), time.monotonic()
    while time.monotonic() < deadline:
        if time.monotonic() - sampled > 0.1:
            peak, sampled = max(peak, rss(pid)), time.monotonic()
        try:
            data = unsent or batch
            unsent = data[sock.send(data) :]
        except BlockingIOError:
            time.sleep(0.001)
        except OSError:
            return True, max(peak, rss(pid))  # reset or broken pipe: closed by the relay
    return False, peak


@pytest.mark.parametrize("rate_limited", [True, False])
def test_a_ping_flood_that_never_reads_is_closed_with_memory_bounded(tmp_path, rate_limited):
    flags = [] if rate_limited else ["--message-rate", "1e9", "--message-burst", "1000000000"]
    relay = RelayProcess(tmp_path, "--send-buffer-bytes", str(256 * 1024), *flags).start()
    try:
        sock = raw_websocket(relay.port)
        before = rss(relay.proc.pid)
        closed, peak = flood_without_reading(sock, ws_frame(0x9, b"p" * 125), 20, relay.proc.pid)
        assert closed, "the relay kept a client that never reads its pongs"
        # Pongs waited in the bounded send buffer (256 KiB) at most: a few MiB of slack for the rest.
        assert peak - before < 256 * 1024 + 8 * 2**20, (before, peak)
        sock.close()
        probe = raw_websocket(relay.port)  # and the relay serves others as before
        probe.close()
    finally:
        relay.kill()
    log = relay.log.read_text()
    reason = "flooding" if rate_limited else "send buffer full"
    assert reason in log and "Traceback" not in log, log[-2000:]


async def test_pings_count_against_the_message_rate(make_harness):
    h = await make_harness(message_rate=1, message_burst=5, flood_limit=10)
    with trio.fail_after(STEP + relay_mod.CLOSE_TIMEOUT):  # this client never answers the close frame
        stream = await trio.open_tcp_stream("127.0.0.1", h.relay.port)
        await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n" + UPGRADE.encode() + b"\r\n")
        data = b""
        while b"welcome" not in data:
            data += await stream.receive_some()
        await stream.send_all(ws_frame(0x9, b"hi") * 30)
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    assert data.count(b"\x8a\x02hi") == 5  # five pongs: the burst
    assert data.count(b"rate_limited") == 9  # then refusals, then the door
    assert b"\x88" in data and b"flooding" in data  # a close frame, 1008
    assert data[data.index(b"\x88") + 2 : data.index(b"\x88") + 4] == (1008).to_bytes(2, "big")


async def test_an_endless_run_of_empty_continuation_frames_is_closed(harness):
    with trio.fail_after(STEP):
        stream = await trio.open_tcp_stream("127.0.0.1", harness.relay.port)
        await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n" + UPGRADE.encode() + b"\r\n")
        data = b""
        while b"welcome" not in data:
            data += await stream.receive_some()
        frames = ws_frame(0x1, b"", fin=False) + ws_frame(0x0, b"", fin=False) * (relay_mod.MAX_FRAGMENTS + 10)
        await stream.send_all(frames)
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    assert data[:1] == b"\x88" and int.from_bytes(data[2:4], "big") == 1009, data  # a close frame: 1009
    with trio.fail_after(STEP):
        while harness.relay.statistics().connections:
            await trio.sleep(0.01)


# -- 3. no client text can break the relay or a peer --------------------------------------------------


async def test_lone_surrogates_nan_and_infinity_are_refused_and_hurt_nobody(make_harness):
    h = await make_harness(resume_grace=5)
    a, b, _, _ = await h.pair()
    for text in (
        '{"type":"signal","data":{"x":"\\ud800"},"extra":1}',  # re-encoded: used to close the sender with 1011
        '{"type":"signal","data":{"x":"\\udfff"}}',  # spliced as is: the peer's JSON.parse got a lone surrogate
        '{"type":"signal","data":{"x":NaN}}',
        '{"type":"signal","data":{"x":Infinity},"extra":1}',  # re-encoded: used to reach the peer as Infinity
        '{"type":"signal","data":{"x":1e999}}',
    ):
        await a.send_raw(text)
        await a.expect("error", code="bad_json")
    await a.send(type="signal", data={"x": "\ud83d\ude00 fine"}, extra=1)  # a real surrogate pair is text
    assert (await b.expect("signal"))["data"] == {"x": "\U0001f600 fine"}
    # b vanishes and resumes: its replay ring holds only what can be sent
    token = b.welcome["resume_token"]
    await a.send(type="signal", data={"after": 1})
    await b.expect("signal", data={"after": 1})
    b.ws._stream.socket.close()  # type: ignore[attr-defined]  (a dropped connection, no close frame)
    await a.expect("peer_reconnecting")
    back = await h.connect()
    await back.send(type="resume", token=token, last=0)
    await back.expect("resumed", state="matched")
    assert [(await back.expect("signal"))["data"] for _ in range(2)] == [{"x": "\U0001f600 fine"}, {"after": 1}]
    await back.quiet()
    await a.expect("peer_resumed")
    await a.quiet()


# -- 4. every socket counts, per address and in all ---------------------------------------------------


async def idle_sockets(port: int, count: int) -> list[trio.SocketStream]:
    return [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(count)]


async def refused(port: int) -> bytes:
    """Open a connection, send an upgrade request, and read until the relay closes it."""
    with trio.fail_after(STEP):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n" + UPGRADE.encode() + b"\r\n")
            data = b""
            while chunk := await stream.receive_some():
                data += chunk
            return data
        except trio.BrokenResourceError:  # reset: closed before our bytes arrived
            return b""
        finally:
            await stream.aclose()


async def test_sockets_that_never_upgrade_count_against_the_address(make_harness):
    h = await make_harness(max_connections_per_ip=5, handshake_timeout=30)
    held = await idle_sockets(h.relay.port, 5)  # slow-loris: connect, say nothing
    with trio.fail_after(STEP):
        while h.relay.statistics().sockets < 5:
            await trio.sleep(0.01)
    answer = await refused(h.relay.port)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 429"), answer
    for stream in held:
        await stream.aclose()
    with trio.fail_after(STEP):
        while h.relay.statistics().sockets:
            await trio.sleep(0.01)
    await h.connect()  # room again


async def test_a_global_socket_cap_keeps_file_descriptors_for_everyone(make_harness):
    h = await make_harness(max_sockets=8, handshake_timeout=0.5)
    held = await idle_sockets(h.relay.port, 8)
    with trio.fail_after(STEP):
        while h.relay.statistics().sockets < 8:
            await trio.sleep(0.01)
    answer = await refused(h.relay.port)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 503"), answer
    with trio.fail_after(STEP):  # the idle ones run out of handshake time; then anyone gets in
        while h.relay.statistics().sockets:
            await trio.sleep(0.05)
    client = await h.connect()
    await client.quiet()
    for stream in held:
        await stream.aclose()


def test_the_relay_raises_its_descriptor_limit_and_caps_sockets_below_it(tmp_path):
    relay = RelayProcess(tmp_path).start()
    try:
        deadline = time.monotonic() + STEP
        while "relay listening" not in relay.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = relay.log.read_text()
    finally:
        relay.kill()
    assert "file descriptors: soft limit" in log and "hard limit" in log, log
    assert "at most" in log and "connections at once" in log, log


# -- 5. behind a proxy, only what the proxy wrote -----------------------------------------------------


async def test_forged_x_forwarded_for_entries_do_not_make_new_addresses(make_harness):
    h = await make_harness(max_connections_per_ip=2, **PROXY)
    for i in range(2):
        await h.connect(headers={"X-Forwarded-For": f"10.9.9.{i}, 198.51.100.7"})
    for i in range(2, 12):  # one address gets two, whatever the client writes on the left
        assert await upgrade_status(h.relay.port, f"X-Forwarded-For: 10.9.9.{i}, 198.51.100.7\r\n") == 429
    await h.connect(headers={"X-Forwarded-For": "198.51.100.7, 198.51.100.8"})  # somebody else entirely


async def test_proxy_headers_count_only_from_trusted_proxies_and_where_they_write(make_harness):
    untrusted = await make_harness(max_connections_per_ip=1, trusted_proxies=("10.0.0.0/8",))
    await untrusted.connect(headers={"X-Forwarded-For": "198.51.100.1"})
    assert await upgrade_status(untrusted.relay.port, "X-Forwarded-For: 198.51.100.2\r\n") == 429  # ignored
    two_hops = await make_harness(max_connections_per_ip=1, proxy_hops=2, **PROXY)
    await two_hops.connect(headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.1, 10.0.0.2"})
    assert await upgrade_status(two_hops.relay.port, "X-Forwarded-For: 7.7.7.7, 198.51.100.1, 10.0.0.3\r\n") == 429
    fly = await make_harness(max_connections_per_ip=1, proxy_header="fly-client-ip", **PROXY)
    await fly.connect(headers={"Fly-Client-IP": "198.51.100.1", "X-Forwarded-For": "1.1.1.1"})
    assert await upgrade_status(fly.relay.port, "Fly-Client-IP: 198.51.100.1\r\nX-Forwarded-For: 2.2.2.2\r\n") == 429
    await fly.connect(headers={"Fly-Client-IP": "198.51.100.2"})


def test_on_fly_the_proxy_and_its_header_are_trusted(monkeypatch):
    monkeypatch.setenv("FLY_APP_NAME", "relay")
    s = relay_mod.settings_from_args(
        relay_mod.parse_command_line([], relay_mod.make_plugin_manager(entry_points=False))
    )
    assert s.proxy_header == "fly-client-ip" and set(s.trusted_proxies) == set(relay_mod.FLY_PROXIES)
    monkeypatch.delenv("FLY_APP_NAME")
    s = relay_mod.settings_from_args(
        relay_mod.parse_command_line([], relay_mod.make_plugin_manager(entry_points=False))
    )
    assert s.trusted_proxies == ()


# -- 6. budgets that outlive a connection -------------------------------------------------------------


async def test_joins_are_budgeted_per_address_across_reconnects(make_harness):
    h = await make_harness(joins_per_minute_per_ip=4, **PROXY)
    bot = {"X-Forwarded-For": "198.51.100.66"}
    for _ in range(2):  # two connections, two joins each: the address's budget is spent...
        c = await h.connect(headers=bot)
        for kind in ("join", "leave", "join"):
            await c.send(type=kind)
            await c.expect("left" if kind == "leave" else "queued")
        await c.ws.aclose()
    again = await h.connect(headers=bot)  # ...and a new connection does not refill it
    await again.send(type="join")
    error = await again.expect("error", code="rate_limited")
    assert "from your address" in error["message"]
    neighbour = await h.connect(headers={"X-Forwarded-For": "198.51.100.67"})
    await neighbour.send(type="join")
    await neighbour.expect("queued")


async def test_joins_are_budgeted_per_user_across_reconnects(nursery):
    class Users:
        @relay_mod.hookimpl
        def relay_authenticate(self, request):
            return relay_mod.Auth(user_id=request.headers.get("x-user"))

    r = await start_relay(nursery, plugins=[Users()], joins_per_minute_per_user=3)
    h = Harness(nursery, r)
    for _ in range(3):
        c = await h.connect(headers={"X-User": "bot"})
        await c.send(type="join")
        await c.expect("queued")
        await c.ws.aclose()
    c = await h.connect(headers={"X-User": "bot"})
    await c.send(type="join")
    assert "for your account" in (await c.expect("error", code="rate_limited"))["message"]
    other = await h.connect(headers={"X-User": "alice"})
    await other.send(type="join")
    await other.expect("queued")


async def test_bytes_per_second_are_budgeted_per_address(make_harness):
    h = await make_harness(bytes_per_second_per_ip=100, bytes_burst_per_ip=40_000, **PROXY)
    heavy = {"X-Forwarded-For": "198.51.100.9"}
    a, b = await h.connect(headers=heavy), await h.connect(headers=heavy)
    await a.send(type="join")
    await a.expect("queued")
    await b.send(type="join")
    await b.expect("matched")
    await a.expect("matched")
    big = {"blob": "x" * 15_000}
    await a.send(type="signal", data=big)
    await b.expect("signal", data=big)
    await b.send(type="signal", data=big)  # the other connection shares the address's budget
    await a.expect("signal", data=big)
    await a.send(type="signal", data=big)  # 45 KB in a burst of 40 KB
    assert "bytes a second" in (await a.expect("error", code="rate_limited"))["message"]
    await a.send(type="signal", data={"small": 1})  # small messages still fit
    await b.expect("signal", data={"small": 1})
    bystander, partner, _, _ = await h.pair()  # another address (the test's own, 127.0.0.1) is untouched
    await bystander.send(type="signal", data=big)
    await partner.expect("signal", data=big)


# -- 8. small ones ------------------------------------------------------------------------------------


async def test_a_reset_right_after_the_upgrade_request_logs_no_traceback(make_harness, caplog):
    h = await make_harness(**PROXY)
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", h.relay.port))
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.1\r\n" + UPGRADE.encode() + b"\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
    await h.connect()
    with trio.fail_after(STEP):
        while h.relay.statistics().sockets > 1:
            await trio.sleep(0.01)
    assert "Traceback" not in caplog.text and "failed" not in caplog.text, caplog.text


@pytest.mark.parametrize("kib", [17, 24, 31, 40])
async def test_an_oversized_head_is_refused_however_it_arrives(harness, kib):
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"p" * (kib * 1024) + b"\r\n\r\n"
    for pieces in (1, 8):  # in one write (whole in h11's buffer by the second read) or in several
        with trio.fail_after(STEP):
            stream = await trio.open_tcp_stream("127.0.0.1", harness.relay.port)
            size = -(-len(head) // pieces)
            try:
                for i in range(0, len(head), size):
                    await stream.send_all(head[i : i + size])
            except trio.BrokenResourceError:
                pass
            data = b""
            try:
                while chunk := await stream.receive_some():
                    data += chunk
            except trio.BrokenResourceError:
                pass
            await stream.aclose()
        assert data.startswith(b"HTTP/1.1 431"), data[:80]


async def test_guessing_the_admin_token_is_throttled_per_address(nursery, monkeypatch):
    token = "the-real-admin-token-0123456789"
    monkeypatch.setenv("RELAY_ADMIN_TOKEN", token)
    r = await start_relay(nursery, plugins=[relay_plugins.admin], options={"admin": True}, **PROXY)

    async def status(guess: str, ip: str) -> int:
        headers = f"Authorization: Bearer {guess}\r\nX-Forwarded-For: {ip}\r\n"
        return (await http_get(r.port, "/admin/api/status", headers=headers))[0]

    guesses = [
        await status(f"guess-{i:04d}-xxxxxxxxxxxxxxxx", "198.51.100.5") for i in range(relay_plugins.admin.MAX_FAILURES)
    ]
    assert guesses == [401] * relay_plugins.admin.MAX_FAILURES
    assert await status("guess-more-xxxxxxxxxxxxxxxxxxxx", "198.51.100.5") == 429
    assert await status(token, "198.51.100.5") == 429  # not even the right one, for now
    assert await status(token, "198.51.100.6") == 200  # the operator, elsewhere


async def test_metrics_are_not_on_the_public_port(nursery, monkeypatch):
    monkeypatch.delenv("RELAY_METRICS_TOKEN", raising=False)
    r = await start_relay(nursery, plugins=[relay_plugins.metrics], options={"metrics": True, "metrics_port": 0})
    private = r.pm.get_plugin("metrics-registry").port
    assert (await http_get(r.port, "/metrics"))[0] == 404
    status, _, body = await http_get(private, "/metrics")
    assert status == 200 and b"relay_connections" in body
    assert (await http_get(private, "/"))[0] == 404
    token = "a-metrics-token-for-a-scraper-0123"
    monkeypatch.setenv("RELAY_METRICS_TOKEN", token)
    r = await start_relay(nursery, plugins=[relay_plugins.metrics], options={"metrics": True, "metrics_port": None})
    assert (await http_get(r.port, "/metrics"))[0] == 404
    assert (await http_get(r.port, "/metrics", headers="Authorization: Bearer wrong-token-xxxxxxxxx\r\n"))[0] == 404
    status, _, body = await http_get(r.port, "/metrics", headers=f"Authorization: Bearer {token}\r\n")
    assert status == 200 and b"relay_connections" in body
    monkeypatch.delenv("RELAY_METRICS_TOKEN")
    with pytest.raises(relay_mod.PluginError, match="never public"):
        await start_relay(nursery, plugins=[relay_plugins.metrics], options={"metrics": True, "metrics_port": None})
