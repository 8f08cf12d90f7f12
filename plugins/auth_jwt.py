"""Only clients with a valid JWT may connect (PyJWT): HS256 with a shared secret, or RS256/ES256
with the keys of a JWKS URL, as Supabase, Auth0, Clerk and Firebase issue them.

Turned on by ``RELAY_JWT_SECRET`` (or ``--jwt-secret``) or ``--jwks-url``. A browser presents the
token in one of three ways (the first found wins):

- ``Authorization: Bearer <token>`` (servers and native apps);
- ``Sec-WebSocket-Protocol: relay-jwt, <token>``, i.e. ``new WebSocket(url, ["relay-jwt", token])``
  (the relay accepts with ``relay-jwt``; the token stays out of URLs and logs);
- ``?token=<token>`` in the WebSocket URL (simplest; URLs end up in proxy logs, so prefer the above).

The signature, ``exp`` (required), ``nbf``, ``aud`` (with ``--jwt-audience``) and ``iss`` (with
``--jwt-issuer``) are checked, with ``--jwt-leeway`` seconds of clock skew. The ``sub`` claim becomes
the client's user id: session records carry it and reports block per user. A missing or bad token is
refused with 401 and the reason, before any WebSocket exists. JWKS keys are fetched in a worker
thread at start-up and refreshed by a task every ``--jwks-refresh`` seconds (sooner when a token
names an unknown key), never on the connection path.

A token is checked with exactly one key and one algorithm: its ``alg`` must be allowed, and the key
is the JWKS key of that algorithm's family (RSA for RS*/PS*, EC of the matching curve for ES*, OKP for
EdDSA) with the token's ``kid`` (without a ``kid``: the only key of that family), whose own ``alg``,
if it declares one, is the token's. Every failure, whatever raised it, is a 401: this plugin never
lets an error through as "no answer" (and the relay refuses when an auth hook raises anyway).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import urllib.request
from typing import Any
from urllib.parse import parse_qs

import attrs
import trio

import relay
from relay import Auth, HttpRequest, PluginError, Relay

log = logging.getLogger(__name__)

SUBPROTOCOL = "relay-jwt"  # offered with the token as the second value of Sec-WebSocket-Protocol
JWKS_TIMEOUT = 10.0  # seconds for one JWKS fetch
UNKNOWN_KEY_REFETCH = 30.0  # seconds at least between fetches caused by unknown key ids
MAX_TOKEN_CHARS = 8192  # longer "tokens" are refused before any parsing
# JWKS key type (kty) each algorithm needs, and for EC the curve
FAMILIES = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"), "EdDSA": ("OKP", None),
}  # fmt: skip


@attrs.frozen
class _Key:
    """One JWKS key, with what decides which tokens it may check."""

    kid: str
    kty: str
    crv: str | None
    alg: str | None  # the algorithm the key declares, if any
    key: Any  # the key object PyJWT verifies with


def _token_of(request: HttpRequest) -> tuple[str | None, str | None]:
    """(token, subprotocol to accept with) from the header, the subprotocol pair or the query."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), None
    offered = [p.strip() for p in request.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    if SUBPROTOCOL in offered:
        others = [p for p in offered if p != SUBPROTOCOL]
        return (others[0] if others else None), SUBPROTOCOL
    query = parse_qs(request.query).get("token")
    return (query[0] if query else None), None


class JwtAuth:
    """The plugin object: checks every upgrade's token against a secret or a JWKS key set."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        jwks_url: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        algorithms: list[str] | None = None,
        leeway: float = 30.0,
        refresh: float = 300.0,
    ) -> None:
        if bool(secret) == bool(jwks_url):
            raise PluginError("auth: give either a shared secret (RELAY_JWT_SECRET) or --jwks-url")
        if secret is not None and len(secret) < 32:
            raise PluginError("auth: the HS256 secret must have at least 32 characters")
        self._secret = secret
        self.jwks_url = jwks_url
        self.audience = audience
        self.issuer = issuer
        self.algorithms = algorithms or (["HS256"] if secret else ["RS256", "ES256"])
        if "none" in [a.lower() for a in self.algorithms]:
            raise PluginError("auth: the 'none' algorithm is never accepted")
        self.leeway = leeway
        self.refresh = refresh
        self._keys: list[_Key] = []  # from the JWKS
        self._fetched_at = -1e9
        self._refetch = trio.Event()

    def __repr__(self) -> str:  # never the secret
        return f"JwtAuth(jwks_url={self.jwks_url!r}, algorithms={self.algorithms!r}, audience={self.audience!r})"

    # -- keys -----------------------------------------------------------------------------------

    def load_keys(self) -> None:
        """Fetch the JWKS (blocking: call it from a thread, or before the relay serves)."""
        import jwt

        assert self.jwks_url is not None
        with urllib.request.urlopen(self.jwks_url, timeout=JWKS_TIMEOUT) as response:  # an operator-given URL
            data = json.load(response)
        keys = []
        for jwk in data.get("keys", []) if isinstance(data, dict) else []:
            try:
                key = jwt.PyJWK.from_dict(jwk).key
            except Exception as exc:  # a key of a type PyJWT does not know, or broken: skip it
                log.warning("auth: skipping JWKS key %r: %s", jwk.get("kid") if isinstance(jwk, dict) else jwk, exc)
                continue
            keys.append(_Key(str(jwk.get("kid") or ""), jwk.get("kty"), jwk.get("crv"), jwk.get("alg"), key))
        self._keys = keys
        log.info("auth: %d key(s) from %s", len(keys), self.jwks_url)

    async def _refresher(self) -> None:
        while True:
            with trio.move_on_after(self.refresh):
                await self._refetch.wait()
            self._refetch = trio.Event()
            self._fetched_at = trio.current_time()
            try:
                await trio.to_thread.run_sync(self.load_keys, abandon_on_cancel=True)
            except Exception as exc:  # keep the keys we have; try again later
                log.error("auth: fetching %s failed: %s", self.jwks_url, exc)

    @relay.hookimpl
    def relay_startup(self, nursery: trio.Nursery) -> None:
        if self.jwks_url:
            self._fetched_at = trio.current_time()
            nursery.start_soon(self._refresher)

    # -- the check ------------------------------------------------------------------------------

    @relay.hookimpl
    def relay_authenticate(self, request: HttpRequest) -> Auth:
        import jwt

        token, subprotocol = _token_of(request)
        if not token:
            return Auth(refuse=401, reason="missing token")
        if len(token) > MAX_TOKEN_CHARS:
            return Auth(refuse=401, reason="token too long")
        try:
            alg = jwt.get_unverified_header(token).get("alg")
            if alg not in self.algorithms:
                raise jwt.InvalidAlgorithmError(alg)
            key = self._secret if self._secret else self._jwks_key(token, alg)
            claims = jwt.decode(
                token, key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                leeway=self.leeway, options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            )  # fmt: skip
            user_id = claims["sub"]
            if not isinstance(user_id, str) or not user_id:
                raise jwt.MissingRequiredClaimError("sub")
        except jwt.ExpiredSignatureError:
            return Auth(refuse=401, reason="token expired")
        except jwt.ImmatureSignatureError:
            return Auth(refuse=401, reason="token not valid yet")
        except jwt.InvalidAudienceError:
            return Auth(refuse=401, reason="token for another audience")
        except jwt.InvalidIssuerError:
            return Auth(refuse=401, reason="token from another issuer")
        except jwt.InvalidAlgorithmError:
            return Auth(refuse=401, reason="token signed with an algorithm not allowed")
        except jwt.MissingRequiredClaimError as exc:
            return Auth(refuse=401, reason=f"token without '{exc.claim}'")
        except (jwt.InvalidSignatureError, LookupError):
            return Auth(refuse=401, reason="token not signed by a known key")
        except jwt.InvalidTokenError:
            return Auth(refuse=401, reason="malformed token")
        except Exception as exc:  # anything else (a key of the wrong type, a library bug): refused all the same
            log.info("auth: token refused: %s: %s", type(exc).__name__, exc)
            return Auth(refuse=401, reason="malformed token")
        return Auth(user_id=user_id, subprotocol=subprotocol)

    def _jwks_key(self, token: str, alg: str) -> Any:
        """The one JWKS key that may check a token signed with ``alg``, or LookupError."""
        import jwt

        kid = jwt.get_unverified_header(token).get("kid")
        kty, crv = FAMILIES.get(alg, (None, None))
        keys = [
            k for k in self._keys
            if k.kty == kty and (crv is None or k.crv == crv) and k.alg in (None, alg) and (kid is None or k.kid == kid)
        ]  # fmt: skip
        if len(keys) == 1:
            return keys[0].key
        if not keys and kid is not None and trio.current_time() - self._fetched_at > UNKNOWN_KEY_REFETCH:
            self._refetch.set()  # maybe the issuer rotated its keys: look again soon
        raise LookupError(kid)  # none, or several and no kid to choose


@relay.hookimpl
def relay_addoption(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("JWT auth (relay_plugins.auth_jwt; off unless a secret or a JWKS URL is given)")
    group.add_argument(
        "--jwt-secret", default=os.environ.get("RELAY_JWT_SECRET"), help="HS256 secret (env RELAY_JWT_SECRET)"
    )
    group.add_argument(
        "--jwks-url", default=os.environ.get("RELAY_JWKS_URL"), help="JWKS URL for RS256/ES256 (env RELAY_JWKS_URL)"
    )
    group.add_argument("--jwt-audience", default=os.environ.get("RELAY_JWT_AUDIENCE"), help="required 'aud'")
    group.add_argument("--jwt-issuer", default=os.environ.get("RELAY_JWT_ISSUER"), help="required 'iss'")
    group.add_argument(
        "--jwt-algorithm", action="append", default=[], help="allowed algorithms (default: HS256, or RS256 and ES256)"
    )
    group.add_argument(
        "--jwt-leeway", type=float, default=30.0, help="seconds of clock skew allowed (default %(default)s)"
    )
    group.add_argument(
        "--jwks-refresh", type=float, default=300.0, help="seconds between JWKS fetches (default %(default)s)"
    )


@relay.hookimpl
def relay_configure(relay: Relay) -> None:
    o = relay.options
    secret, jwks_url = getattr(o, "jwt_secret", None), getattr(o, "jwks_url", None)
    if not secret and not jwks_url:
        return
    try:
        import jwt  # noqa: F401
    except ImportError as exc:
        raise PluginError("auth needs PyJWT: pip install 'roulette-relay[auth]'") from exc
    if jwks_url and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", jwks_url):
        raise PluginError(f"--jwks-url {jwks_url!r} is not an http(s) URL")
    plugin = JwtAuth(
        secret=secret, jwks_url=jwks_url, audience=o.jwt_audience, issuer=o.jwt_issuer,
        algorithms=o.jwt_algorithm or None, leeway=o.jwt_leeway, refresh=o.jwks_refresh,
    )  # fmt: skip
    if jwks_url:
        try:
            plugin.load_keys()  # before serving; if it fails, the refresher keeps trying
        except Exception as exc:
            log.error("auth: fetching %s failed: %s (will retry)", jwks_url, exc)
    relay.pm.register(plugin, "jwt-auth")
    log.info("auth: clients need a JWT (%s)", ", ".join(plugin.algorithms))
