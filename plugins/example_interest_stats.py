"""An example plugin: which interests bring people together?

It counts matches per shared interest, serves the counts as JSON at ``/stats/interests`` and logs
the top ten every ``--interest-stats-every`` seconds from a task of its own. Load it with::

    python relay.py --plugin relay_plugins.example_interest_stats

It has the shape of the bundled plugins: the module reads its flags (``relay_addoption``) and, in
``relay_configure``, registers an object for this relay; the object holds the state (nothing lives
in module globals, so two relays in one process, as in tests, never share counts) and implements
the hooks: a cheap synchronous one on the relay's events (``relay_matched``), a background task
(``relay_startup``) and an HTTP route (``relay_http_request``). ``tests/test_plugins.py`` tests it;
docs/plugins.md walks through it.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging

import trio

import relay

log = logging.getLogger(__name__)


class InterestStats:
    """Matches per shared interest, for one relay."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.matches: collections.Counter[str] = collections.Counter()

    @relay.hookimpl
    def relay_matched(self, session: relay.Session) -> None:
        # Called once per match, synchronously: keep it cheap (no I/O here).
        self.matches.update(session.interests or ["(none)"])

    @relay.hookimpl
    def relay_startup(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._report)

    async def _report(self) -> None:  # I/O (here: logging) belongs in a task like this one
        while True:
            await trio.sleep(self.every)
            log.info("matches by interest: %s", self.matches.most_common(10))

    @relay.hookimpl
    def relay_http_request(self, request: relay.HttpRequest) -> relay.HttpResponse | None:
        if request.path != "/stats/interests":
            return None  # not ours: let the relay (or another plugin) answer
        body = json.dumps(dict(self.matches.most_common())).encode()
        return relay.HttpResponse(200, body, "application/json")


@relay.hookimpl
def relay_addoption(parser: argparse.ArgumentParser) -> None:
    parser.add_argument_group("interest statistics (relay_plugins.example_interest_stats)").add_argument(
        "--interest-stats-every", type=float, default=60.0, help="seconds between log lines (default %(default)s)"
    )


@relay.hookimpl
def relay_configure(relay: relay.Relay) -> None:
    every = getattr(relay.options, "interest_stats_every", 60.0)
    if every <= 0:
        raise relay.PluginError("--interest-stats-every must be a positive number of seconds")
    relay.pm.register(InterestStats(every), "interest-stats")
