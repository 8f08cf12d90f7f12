"""An example plugin: which interests bring people together?

It counts matches per shared interest, serves the counts as JSON at ``/stats/interests`` and logs
the top ten every ``--interest-stats-every`` seconds from a task of its own. Load it with::

    python relay.py --plugin relay_plugins.example_interest_stats

It shows the shape of most plugins: a flag (``relay_addoption``), a cheap synchronous hook on the
relay's events (``relay_matched``), a background task (``relay_startup``) and an HTTP route
(``relay_http_request``). ``tests/test_plugins.py`` tests it; docs/plugins.md walks through it.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging

import trio

import relay

log = logging.getLogger(__name__)
matches_by_interest: collections.Counter[str] = collections.Counter()


@relay.hookimpl
def relay_addoption(parser: argparse.ArgumentParser) -> None:
    parser.add_argument_group("interest statistics (relay_plugins.example_interest_stats)").add_argument(
        "--interest-stats-every", type=float, default=60.0, help="seconds between log lines (default %(default)s)"
    )


@relay.hookimpl
def relay_matched(session: relay.Session) -> None:
    # Called once per match, synchronously: keep it cheap (no I/O here).
    matches_by_interest.update(session.interests or ["(none)"])


@relay.hookimpl
def relay_startup(relay: relay.Relay, nursery: trio.Nursery) -> None:
    every = getattr(relay.options, "interest_stats_every", 60.0)

    async def report() -> None:  # I/O (here: logging) belongs in a task like this one
        while True:
            await trio.sleep(every)
            log.info("matches by interest: %s", matches_by_interest.most_common(10))

    nursery.start_soon(report)


@relay.hookimpl
def relay_http_request(request: relay.HttpRequest) -> relay.HttpResponse | None:
    if request.path != "/stats/interests":
        return None  # not ours: let the relay (or another plugin) answer
    body = json.dumps(dict(matches_by_interest.most_common())).encode()
    return relay.HttpResponse(200, body, "application/json")
