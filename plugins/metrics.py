"""Prometheus metrics at ``GET /metrics`` (``--metrics`` or ``RELAY_METRICS=1``), for the scraper only.

User counts are nobody else's business, so the metrics are not on the relay's public port: they are
served on a port of their own, ``--metrics-port`` (9091), which Fly.io's ``[metrics]`` scraper
reaches over the machine's private network and which ``fly.toml`` does not route to the internet.
(Every public path stays on the one port.) With ``RELAY_METRICS_TOKEN`` set, ``/metrics`` is also
answered on the relay's port, to requests bearing ``Authorization: Bearer <token>`` only; others get
404, as if there were no metrics. ``--metrics-port none`` turns the private port off.

Everything the core already counts (connections, queue, sessions, matches, relayed signals, errors,
plugins' counters such as dropped persistence events) is read from ``relay.statistics()`` when
Prometheus scrapes, so metrics cost nothing per relayed message. Only the two histograms are fed by
hooks: match wait (join -> matched, per side) and session length, once per match and per session.

``fly.toml``'s ``[metrics]`` section points Fly.io's scraper here.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import trio

import relay
from relay import HttpRequest, HttpResponse, PluginError, Relay, Session

log = logging.getLogger(__name__)

PATH = "/metrics"
DEFAULT_PORT = 9091  # the private port (Prometheus exporters' usual one); fly.toml's [metrics] port
MIN_TOKEN_LENGTH = 16  # characters of RELAY_METRICS_TOKEN
WAIT_BUCKETS = (0.01, 0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)  # seconds from join to matched
LENGTH_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)  # seconds a session lasts


class Metrics:
    """The plugin object (one per relay): a private registry, histograms, a scrape-time collector."""

    def __init__(self, relay_: Relay, *, port: int | None = DEFAULT_PORT, host: str = "", token: str = "") -> None:
        from prometheus_client import CollectorRegistry, Histogram

        self.relay = relay_
        self._token = token.encode()
        self._socket: socket.socket | None = None
        self.port: int | None = None  # the private port, once bound
        if port is not None:
            self._socket = _bind(host or relay_.settings.host, port)
            self.port = self._socket.getsockname()[1]
        self.registry = CollectorRegistry(auto_describe=True)
        self.match_wait = Histogram(
            "relay_match_wait_seconds", "Time from join (or next) to matched, per client.",
            buckets=WAIT_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.session_length = Histogram(
            "relay_session_length_seconds", "How long sessions last.", buckets=LENGTH_BUCKETS, registry=self.registry
        )
        self.registry.register(_StatisticsCollector(relay_))

    @relay.hookimpl
    def relay_matched(self, session: Session) -> None:
        for wait in session.waits:
            self.match_wait.observe(wait)

    @relay.hookimpl
    def relay_session_ended(self, duration: float) -> None:
        self.session_length.observe(duration)

    @relay.hookimpl
    def relay_startup(self, nursery: trio.Nursery) -> None:
        if self._socket is not None:
            nursery.start_soon(relay.serve_http, [self._socket], self.scrape)
            log.info("metrics: %s on port %d", PATH, self.port)

    @relay.hookimpl
    def relay_http_request(self, request: HttpRequest) -> HttpResponse | None:
        """The relay's public port: only with the token (and none set means never)."""
        if request.path != PATH or not self._token:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            return None  # as if there were no metrics here
        return self.scrape(request)

    def scrape(self, request: HttpRequest) -> HttpResponse | None:
        if request.path != PATH:
            return None
        if request.method not in ("GET", "HEAD"):
            return HttpResponse(405, b"405 method not allowed\n", headers=(("Allow", "GET, HEAD"),))
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return HttpResponse(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)


def _bind(host: str, port: int) -> socket.socket:
    """The private port's socket, bound now so that a port in use stops the start."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        raise PluginError(f"--metrics-port {port}: cannot listen on {host}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


class _StatisticsCollector:
    """Reads the relay's own counters at scrape time."""

    def __init__(self, relay_: Relay) -> None:
        self.relay = relay_

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.relay.statistics()
        yield GaugeMetricFamily("relay_connections", "WebSocket clients connected.", value=s.connections)
        queued = GaugeMetricFamily("relay_queued", "Clients waiting for a match.", labels=["interests"])
        queued.add_metric(["yes"], s.queued_with_interests)
        queued.add_metric(["no"], s.queued - s.queued_with_interests)
        yield queued
        yield GaugeMetricFamily("relay_sessions_active", "Sessions in progress.", value=s.sessions)
        yield GaugeMetricFamily("relay_draining", "1 while the relay refuses new clients.", value=int(s.draining))
        yield GaugeMetricFamily("relay_uptime_seconds", "Seconds since the relay started.", value=s.uptime_s)
        yield CounterMetricFamily("relay_connections_accepted", "Clients accepted.", value=s.connections_total)
        yield CounterMetricFamily("relay_matches", "Sessions started.", value=s.matches_total)
        yield CounterMetricFamily("relay_signals_relayed", "Signal messages relayed.", value=s.signals_relayed)
        ended = CounterMetricFamily("relay_sessions_ended", "Sessions ended, by reason.", labels=["reason"])
        for reason, count in sorted(s.sessions_ended.items()):
            ended.add_metric([reason], count)
        yield ended
        errors = CounterMetricFamily("relay_errors", "Error messages sent to clients, by code.", labels=["code"])
        for code, count in sorted(s.errors.items()):
            errors.add_metric([code], count)
        yield errors
        yield CounterMetricFamily(
            "relay_rate_limited", "Messages refused by the rate limit.", value=s.errors.get("rate_limited", 0)
        )
        yield CounterMetricFamily(
            "relay_closed_slow", "Clients closed (1013) for reading too slowly.", value=s.closed_slow
        )
        for name, count in sorted(s.counters.items()):  # what plugins count, e.g. sessions_dropped
            yield CounterMetricFamily(f"relay_{name}", f"Counted by a plugin: {name}.", value=count)


def _port_or_none(value: str) -> int | None:
    if value.strip().lower() in ("", "none", "off"):
        return None
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port number or 'none', not {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, not {port}")
    return port


@relay.hookimpl
def relay_addoption(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metrics (relay_plugins.metrics)")
    group.add_argument(
        "--metrics", action="store_true", default=os.environ.get("RELAY_METRICS", "") not in ("", "0"),
        help=f"serve Prometheus metrics at {PATH} on --metrics-port (env RELAY_METRICS=1)",
    )  # fmt: skip
    group.add_argument(
        "--metrics-port", type=_port_or_none, default=_port_or_none(os.environ.get("RELAY_METRICS_PORT", "9091")),
        help="the private port for the scraper ('none': only on the relay's port, with RELAY_METRICS_TOKEN; "
        "env RELAY_METRICS_PORT; default %(default)s)",
    )  # fmt: skip


@relay.hookimpl
def relay_configure(relay: Relay) -> None:
    options = relay.options
    if not getattr(options, "metrics", False):
        return
    token = os.environ.get("RELAY_METRICS_TOKEN", "")
    port = getattr(options, "metrics_port", DEFAULT_PORT)
    if token and len(token) < MIN_TOKEN_LENGTH:
        raise PluginError(f"RELAY_METRICS_TOKEN must have at least {MIN_TOKEN_LENGTH} characters")
    if port is None and not token:
        raise PluginError("--metrics with --metrics-port none needs RELAY_METRICS_TOKEN: metrics are never public")
    relay.pm.register(Metrics(relay, port=port, token=token), "metrics-registry")
