"""JWT auth (relay_plugins.auth_jwt): tokens checked before any WebSocket exists; HS256 with a secret,
RS256 and ES256 with keys from a JWKS served by the test."""

from __future__ import annotations

import functools
import json
import time
from urllib.parse import quote

import jwt
import pytest
import trio
import trio_websocket
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from relay_plugins.auth_jwt import JwtAuth

import relay as relay_mod
from tests.conftest import UPGRADE, Harness, http_get, start_relay

SECRET = "an-hs256-secret-that-is-long-enough-0123"
AUDIENCE, ISSUER = "relay", "https://auth.example.test/"


def claims(**overrides) -> dict:
    now = int(time.time())
    return {"sub": "user-1", "aud": AUDIENCE, "iss": ISSUER, "iat": now, "exp": now + 300} | overrides


def hs256(**overrides) -> str:
    return jwt.encode(claims(**overrides), SECRET, algorithm="HS256")


async def upgrade(port: int, headers: str = "", path: str = "/ws") -> tuple[int, bytes]:
    status, _, body = await http_get(port, path, headers=UPGRADE + headers)
    return status, body


@pytest.fixture
async def hs_relay(nursery):
    connected = []

    class Record:
        @relay_mod.hookimpl
        def relay_client_connected(self, client_id, user_id):
            connected.append(user_id)

    r = await start_relay(nursery, plugins=[JwtAuth(secret=SECRET, audience=AUDIENCE, issuer=ISSUER), Record()])
    r.connected_users = connected  # type: ignore[attr-defined]
    return r


async def test_valid_hs256_token_in_each_place_it_may_come(hs_relay, nursery):
    port = hs_relay.port
    h = Harness(nursery, hs_relay)
    await h.connect(headers={"Authorization": f"Bearer {hs256(sub='alice')}"})
    ws = await trio_websocket.connect_websocket_url(
        nursery, f"ws://127.0.0.1:{port}/ws", subprotocols=["relay-jwt", hs256(sub="bob")]
    )
    assert ws.subprotocol == "relay-jwt"  # the browser requires the server to pick one it offered
    await ws.get_message()
    ws = await trio_websocket.connect_websocket_url(
        nursery, f"ws://127.0.0.1:{port}/ws?token={quote(hs256(sub='carol'))}"
    )
    await ws.get_message()
    assert hs_relay.connected_users == ["alice", "bob", "carol"]


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, b"missing token"),
        (hs256(exp=int(time.time()) - 3600), b"expired"),
        (hs256(nbf=int(time.time()) + 3600), b"not valid yet"),
        (hs256(aud="another-app"), b"audience"),
        (hs256(iss="https://evil.example.test/"), b"issuer"),
        (jwt.encode(claims(), "another-secret-of-the-same-length-012345", algorithm="HS256"), b"known key"),
        (jwt.encode(claims(), None, algorithm="none"), b"algorithm"),  # alg: none
        (jwt.encode({k: v for k, v in claims().items() if k != "sub"}, SECRET, algorithm="HS256"), b"'sub'"),
        ("not.a.jwt", b"malformed"),
    ],
)
async def test_bad_tokens_are_refused_before_any_websocket(hs_relay, token, reason):
    headers = f"Authorization: Bearer {token}\r\n" if token else ""
    status, body = await upgrade(hs_relay.port, headers)
    assert status == 401 and reason in body, body
    assert hs_relay.statistics().connections_total == 0


async def test_rs256_and_es256_through_a_jwks(nursery):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks = {
        "keys": [
            json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key())) | {"kid": "rsa-1", "alg": "RS256", "use": "sig"},
            json.loads(ECAlgorithm.to_jwk(ec_key.public_key())) | {"kid": "ec-1", "alg": "ES256", "use": "sig"},
        ]
    }
    body = json.dumps(jwks).encode()

    async def serve_jwks(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                % len(body)
                + body
            )

    listeners = await nursery.start(functools.partial(trio.serve_tcp, serve_jwks, 0, host="127.0.0.1"))
    url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/.well-known/jwks.json"
    auth = JwtAuth(jwks_url=url, audience=AUDIENCE)
    await trio.to_thread.run_sync(auth.load_keys)  # as relay_configure does, before serving
    r = await start_relay(nursery, plugins=[auth])
    h = Harness(nursery, r)
    for key, alg, kid in ((rsa_key, "RS256", "rsa-1"), (ec_key, "ES256", "ec-1")):
        token = jwt.encode(claims(sub=f"via-{alg}"), key, algorithm=alg, headers={"kid": kid})
        client = await h.connect(headers={"Authorization": f"Bearer {token}"})
        assert client.id
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims(), stranger, algorithm="RS256", headers={"kid": "rsa-1"})
    assert (await upgrade(r.port, f"Authorization: Bearer {forged}\r\n"))[0] == 401  # right kid, wrong key
    unknown = jwt.encode(claims(), stranger, algorithm="RS256", headers={"kid": "rsa-2"})
    assert (await upgrade(r.port, f"Authorization: Bearer {unknown}\r\n"))[0] == 401
    hs = jwt.encode(claims(), "x" * 40, algorithm="HS256", headers={"kid": "rsa-1"})
    assert (await upgrade(r.port, f"Authorization: Bearer {hs}\r\n"))[0] == 401  # no algorithm confusion


async def test_reports_block_the_user_not_just_the_connection(hs_relay, nursery):
    h = Harness(nursery, hs_relay)

    async def as_user(name: str):
        return await h.connect(headers={"Authorization": f"Bearer {hs256(sub=name)}"})

    alice, bob = await as_user("alice"), await as_user("bob")
    await alice.send(type="join")
    await alice.expect("queued")
    await bob.send(type="join")
    await bob.expect("matched")
    await alice.expect("matched")
    await alice.send(type="report", reason="rude")
    await alice.expect("reported")
    await bob.expect("peer_left")
    await bob.ws.aclose()
    bob_again = await as_user("bob")  # a new connection, the same user
    await bob_again.send(type="join")
    await bob_again.expect("queued")
    await alice.send(type="join")
    await alice.expect("queued")  # still never paired with bob
    carol = await as_user("carol")
    await carol.send(type="join")
    assert (await carol.expect("matched"))["peer_id"] == bob_again.id


def test_configuration_is_checked():
    with pytest.raises(relay_mod.PluginError):
        JwtAuth(secret="too-short")
    with pytest.raises(relay_mod.PluginError):
        JwtAuth(secret=SECRET, jwks_url="http://127.0.0.1/jwks")  # one or the other
    with pytest.raises(relay_mod.PluginError):
        JwtAuth(secret=SECRET, algorithms=["HS256", "none"])
    assert SECRET not in repr(JwtAuth(secret=SECRET))
