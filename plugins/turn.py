"""Short-lived TURN credentials for every match, for coturn's ``use-auth-secret`` mode.

This is the "TURN REST API" scheme (draft-uberti-behave-turn-rest), which coturn implements: the
relay and coturn share a secret; for each side of a match the relay makes

    username   = "<unix time when it expires>:<client id>"
    credential = base64(HMAC-SHA1(secret, username))

and sends them in ``matched``'s ``ice_servers``. coturn recomputes the HMAC and refuses expired
usernames, so a credential copied out of a page is worth nothing after ``--turn-ttl`` seconds
(default one hour) and nobody ever sees the secret.

Turned on by the secret in ``RELAY_TURN_SECRET`` together with ``--turn-host`` (the usual STUN,
TURN-UDP, TURN-TCP and TURNS-on-443 URLs of one host) or ``--turn-url`` (repeatable). For rotation,
``RELAY_TURN_SECRET`` may hold several secrets separated by commas: the first signs; list the same
secrets as ``static-auth-secret`` lines in coturn, which accepts any of them. The secret is never
logged, put in a message or exported as a metric. See ``docs/turn.md`` for running coturn.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import relay
from relay import PluginError, Relay, Session

log = logging.getLogger(__name__)

SECRET_ENV = "RELAY_TURN_SECRET"
DEFAULT_TTL = 3600  # seconds a credential lasts
MAX_TTL = 86400  # credentials must be short-lived: refuse anything longer than a day
MIN_SECRET = 16  # characters


def credentials(secret: str, name: str, ttl: float, now: float) -> tuple[str, str]:
    """coturn's shared-secret credential: (username, credential) valid until ``now + ttl``."""
    username = f"{int(now + ttl)}:{name}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def urls_for_host(host: str) -> list[str]:
    """The usual URLs of one coturn host: STUN, TURN over UDP and TCP on 3478, TURNS on 443."""
    return [
        f"stun:{host}:3478",
        f"turn:{host}:3478?transport=udp",
        f"turn:{host}:3478?transport=tcp",
        f"turns:{host}:443?transport=tcp",
    ]


class TurnCredentials:
    """The plugin object: answers ``relay_ice_servers`` with fresh credentials for each side."""

    def __init__(
        self,
        secrets: Sequence[str],
        urls: Sequence[str],
        *,
        ttl: float = DEFAULT_TTL,
        extra: Sequence[dict[str, Any]] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secrets or any(len(s) < MIN_SECRET for s in secrets):
            raise PluginError(f"{SECRET_ENV}: each secret must have at least {MIN_SECRET} characters")
        if not 0 < ttl <= MAX_TTL:
            raise PluginError(f"--turn-ttl must be between 1 and {MAX_TTL} seconds")
        self._secret = secrets[0]  # signs; the others are for coturn, during a rotation
        self.stun = [u for u in urls if u.startswith(("stun:", "stuns:"))]
        self.turn = [u for u in urls if u.startswith(("turn:", "turns:"))]
        if not self.turn:
            raise PluginError("TURN credentials need at least one turn: or turns: URL")
        self.ttl = ttl
        self.extra = list(extra)  # the --ice-server flags, kept alongside
        self.clock = clock

    def __repr__(self) -> str:  # never the secret
        return f"TurnCredentials(turn={self.turn!r}, stun={self.stun!r}, ttl={self.ttl})"

    @relay.hookimpl
    def relay_ice_servers(self, session: Session, client_id: str) -> list[dict[str, Any]]:
        username, credential = credentials(self._secret, client_id, self.ttl, self.clock())
        servers: list[dict[str, Any]] = [{"urls": self.stun}] if self.stun else []
        servers.append({"urls": self.turn, "username": username, "credential": credential})
        return servers + self.extra


@relay.hookimpl
def relay_addoption(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(f"TURN credentials (relay_plugins.turn; the secret comes from {SECRET_ENV})")
    group.add_argument(
        "--turn-host", default=os.environ.get("RELAY_TURN_HOST") or None,
        help="a coturn host: STUN and TURN on 3478 (UDP, TCP), TURNS on 443 (env RELAY_TURN_HOST)",
    )  # fmt: skip
    group.add_argument(
        "--turn-url", action="append", default=[], metavar="URL",
        help="a STUN/TURN URL (repeatable), e.g. turn:turn.example.com:3478?transport=udp",
    )  # fmt: skip
    group.add_argument(
        "--turn-ttl",
        type=float,
        default=DEFAULT_TTL,
        help=f"seconds a credential lasts (default %(default)s, at most {MAX_TTL})",
    )


@relay.hookimpl
def relay_configure(relay: Relay) -> None:
    options = relay.options
    urls = (urls_for_host(options.turn_host) if getattr(options, "turn_host", None) else []) + list(
        getattr(options, "turn_url", [])
    )
    secrets = [s.strip() for s in os.environ.get(SECRET_ENV, "").split(",") if s.strip()]
    ttl = getattr(options, "turn_ttl", DEFAULT_TTL)
    if not 0 < ttl <= MAX_TTL:  # checked even with TURN off: a typo should not wait for the day it is on
        raise PluginError(f"--turn-ttl must be between 1 and {MAX_TTL} seconds, not {ttl:g}")
    for url in urls:
        if not url.startswith(("stun:", "stuns:", "turn:", "turns:")):
            raise PluginError(f"--turn-url {url!r}: a STUN/TURN URL starts with stun:, stuns:, turn: or turns:")
    if not urls and not secrets:
        return
    if not urls:
        raise PluginError(f"{SECRET_ENV} is set: give --turn-host or --turn-url too")
    if not secrets:
        raise PluginError(f"--turn-host/--turn-url need the shared secret in {SECRET_ENV}")
    plugin = TurnCredentials(secrets, urls, ttl=options.turn_ttl, extra=relay.settings.ice_servers)
    relay.pm.register(plugin, "turn-credentials")
    log.info("TURN credentials: %d URL(s), valid %d s, %d secret(s)", len(urls), plugin.ttl, len(secrets))
