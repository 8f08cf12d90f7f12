"""A test-only plugin (``--plugin tests.gc_probe``): turns the relay's cyclic garbage collector off
and answers ``GET /_gc`` with what a full collection finds (the number of unreachable objects, and
their types), so that a test can count the reference cycles the relay leaves behind."""

from __future__ import annotations

import collections
import gc

import trio

import relay


@relay.hookimpl
def relay_startup(nursery: trio.Nursery) -> None:
    gc.disable()  # every cycle made from now on waits for /_gc


@relay.hookimpl
def relay_http_request(request: relay.HttpRequest) -> relay.HttpResponse | None:
    if request.path != "/_gc":
        return None
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        found = gc.collect()
        kinds = collections.Counter(type(o).__qualname__ for o in gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
    return relay.HttpResponse(200, relay._dumps({"found": found, "kinds": dict(kinds.most_common(20))}))
