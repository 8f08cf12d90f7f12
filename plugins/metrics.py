"""Prometheus metrics at ``GET /metrics`` on the relay's port (``--metrics`` or ``RELAY_METRICS=1``).

Everything the core already counts (connections, queue, sessions, matches, relayed signals, errors,
plugins' counters such as dropped persistence events) is read from ``relay.statistics()`` when
Prometheus scrapes, so metrics cost nothing per relayed message. Only the two histograms are fed by
hooks: match wait (join -> matched, per side) and session length, once per match and per session.

``fly.toml``'s ``[metrics]`` section points Fly.io's scraper here.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from typing import Any

import relay
from relay import HttpRequest, HttpResponse, Relay, Session

PATH = "/metrics"
WAIT_BUCKETS = (0.01, 0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)  # seconds from join to matched
LENGTH_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)  # seconds a session lasts


class Metrics:
    """The plugin object (one per relay): a private registry, histograms, a scrape-time collector."""

    def __init__(self, relay_: Relay) -> None:
        from prometheus_client import CollectorRegistry, Histogram

        self.relay = relay_
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
    def relay_http_request(self, request: HttpRequest) -> HttpResponse | None:
        if request.path != PATH:
            return None
        if request.method not in ("GET", "HEAD"):
            return HttpResponse(405, b"405 method not allowed\n", headers=(("Allow", "GET, HEAD"),))
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return HttpResponse(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)


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


@relay.hookimpl
def relay_addoption(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metrics (plugins.metrics)")
    group.add_argument(
        "--metrics", action="store_true", default=os.environ.get("RELAY_METRICS", "") not in ("", "0"),
        help=f"serve Prometheus metrics at {PATH} (env RELAY_METRICS=1)",
    )  # fmt: skip


@relay.hookimpl
def relay_configure(relay: Relay) -> None:
    if getattr(relay.options, "metrics", False):
        relay.pm.register(Metrics(relay), "metrics-registry")
