"""The bundled plugins (metrics, admin, the example) and how plugins are found and loaded."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import relay_plugins.admin
import relay_plugins.example_interest_stats
import relay_plugins.metrics
import trio
from prometheus_client.parser import text_string_to_metric_families
from relay_plugins.sessions import SessionRecorder

import relay as relay_mod
from tests.conftest import UPGRADE, Harness, http_get, start_relay
from tests.test_sessions import GatedStore

TOKEN = "s3cret-admin-token-for-tests"


def samples(text: str) -> dict[tuple, float]:
    """Every sample of a Prometheus exposition: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_parse_and_match_what_happened(nursery):
    store = GatedStore()
    store.gate.clear()  # persistence hangs: its drops must show up in the metrics
    r = await start_relay(
        nursery, plugins=[relay_plugins.metrics, SessionRecorder(store, queue=1, batch=1)],
        options={"metrics": True, "metrics_port": 0},
        message_rate=1, message_burst=20,
    )  # fmt: skip
    h = Harness(nursery, r)
    a, b, _, _ = await h.pair()
    await a.send(type="next")
    await b.expect("peer_left")
    await a.expect("queued")
    await a.send(type="leave")
    await a.expect("left")
    c, d, _, _ = await h.pair(interests=["chess"])
    await c.send(type="leave")
    await c.expect("left")
    await d.expect("peer_left")
    e, f, _, _ = await h.pair()  # still going
    for i in range(7):
        await e.send(type="signal", data={"i": i})
        await f.expect("signal")
    waiting_plain, waiting_picky = await h.connect(), await h.connect()
    await waiting_picky.send(type="join", interests=["rare"])
    await waiting_picky.expect("queued")
    await waiting_plain.send(type="join")
    await waiting_plain.expect("queued")
    for text in ("{nope", "[1", '{"type": "dance"}'):
        await waiting_plain.send_raw(text)
        await waiting_plain.recv()
    for _ in range(25):  # a burst of 20, then 5 refused (the bucket refills slowly: 1 a second)
        await b.send(type="ping")
    replies = [(await b.recv())["type"] for _ in range(25)]

    status, headers, body = await http_get(r.pm.get_plugin("metrics-registry").port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=")
    m = samples(body.decode())
    rate_limited = replies.count("error")
    assert rate_limited >= 4
    assert m[("relay_connections", ())] == 8
    assert m[("relay_queued", (("interests", "no"),))] == 1
    assert m[("relay_queued", (("interests", "yes"),))] == 1
    assert m[("relay_sessions_active", ())] == 1
    assert m[("relay_matches_total", ())] == 3
    assert m[("relay_sessions_ended_total", (("reason", "next"),))] == 1
    assert m[("relay_sessions_ended_total", (("reason", "left"),))] == 1
    assert m[("relay_signals_relayed_total", ())] == 7
    assert m[("relay_errors_total", (("code", "bad_json"),))] == 2
    assert m[("relay_errors_total", (("code", "unknown_type"),))] == 1
    assert m[("relay_errors_total", (("code", "rate_limited"),))] == rate_limited
    assert m[("relay_rate_limited_total", ())] == rate_limited
    assert m[("relay_match_wait_seconds_count", ())] == 6  # both sides of 3 matches
    assert m[("relay_session_length_seconds_count", ())] == 2
    assert m[("relay_sessions_dropped_total", ())] == r.statistics().counters["sessions_dropped"] > 0
    assert m[("relay_connections_accepted_total", ())] == 8
    store.gate.set()


async def test_metrics_are_off_unless_asked(nursery):
    r = await start_relay(nursery, plugins=[relay_plugins.metrics], options={"metrics": False})
    assert (await http_get(r.port, "/metrics"))[0] == 404


@pytest.fixture
def admin_token(monkeypatch):
    monkeypatch.setenv("RELAY_ADMIN_TOKEN", TOKEN)
    return TOKEN


def auth(token: str = TOKEN) -> str:
    return f"Authorization: Bearer {token}\r\n"


async def test_admin_refuses_without_a_token(nursery, monkeypatch):
    monkeypatch.delenv("RELAY_ADMIN_TOKEN", raising=False)
    with pytest.raises(relay_mod.PluginError, match="RELAY_ADMIN_TOKEN"):
        await start_relay(nursery, plugins=[relay_plugins.admin], options={"admin": True})
    monkeypatch.setenv("RELAY_ADMIN_TOKEN", "short")
    with pytest.raises(relay_mod.PluginError):
        await start_relay(nursery, plugins=[relay_plugins.admin], options={"admin": True})


def test_main_exits_2_when_a_plugin_refuses_to_start(monkeypatch, tmp_path):
    monkeypatch.delenv("RELAY_ADMIN_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    assert relay_mod.main(["--admin", "--host", "127.0.0.1", "--port", "0"]) == 2


async def test_admin_api_needs_the_token(nursery, admin_token, monkeypatch):
    monkeypatch.setattr(relay_plugins.admin, "MAX_FAILURES", 100)  # 12 wrong tokens here (test_security: the throttle)
    r = await start_relay(nursery, plugins=[relay_plugins.admin], options={"admin": True})
    status, headers, body = await http_get(r.port, "/admin")
    assert status == 200 and b"relay admin" in body and TOKEN.encode() not in body  # the page holds no data
    assert (await http_get(r.port, "/admin/admin.js"))[0] == 200
    for path, method in [("/admin/api/status", "GET"), ("/admin/api/drain", "POST"), ("/admin/api/kick", "POST")]:
        for header in (
            "",
            auth("wrong-token-of-the-same-sort"),
            auth(TOKEN + "x"),
            "Authorization: Basic Zm9vOmJhcg==\r\n",
        ):
            status, headers, _ = await http_get(r.port, path, method=method, headers=header)
            assert status == 401 and headers["www-authenticate"] == "Bearer", (path, header)
    assert not r.draining
    status, _, body = await http_get(r.port, "/admin/api/status", headers=auth())
    assert status == 200 and json.loads(body)["connections"] == 0


async def test_admin_drain_undrain_and_kick(nursery, admin_token):
    r = await start_relay(nursery, plugins=[relay_plugins.admin], options={"admin": True})
    h = Harness(nursery, r)
    a, b, _, _ = await h.pair()
    waiting = await h.connect()
    await waiting.send(type="join")
    await waiting.expect("queued")

    status, _, body = await http_get(r.port, "/admin/api/drain", method="POST", headers=auth(), body=b"{}")
    assert status == 200 and json.loads(body)["ok"]
    assert (await http_get(r.port, "/healthz"))[0] == 503
    await waiting.expect("draining", deadline_s=None)
    assert (await waiting.closed()).code == 1012  # goes elsewhere: this node takes nobody new
    assert (await http_get(r.port, "/ws", headers=UPGRADE))[0] == 503
    await a.expect("draining")
    await a.send(type="signal", data={"still": "here"})  # the session goes on
    await b.expect("draining")
    await b.expect("signal", data={"still": "here"})

    status, _, body = await http_get(r.port, "/admin/api/undrain", method="POST", headers=auth(), body=b"{}")
    assert status == 200 and json.loads(body)["draining"] is False
    assert (await http_get(r.port, "/healthz"))[0] == 200
    c, d, _, _ = await h.pair()  # new clients are matched again

    kick = json.dumps({"client_id": c.id}).encode()
    status, _, _ = await http_get(r.port, "/admin/api/kick", method="POST", headers=auth(), body=kick)
    assert status == 200
    assert (await c.closed()).code == 1008
    await d.expect("peer_left", reason="disconnected")
    status, _, body = await http_get(
        r.port, "/admin/api/kick", method="POST", headers=auth(), body=b'{"client_id": "nobody"}'
    )
    assert status == 404
    assert (await http_get(r.port, "/admin/api/kick", method="POST", headers=auth(), body=b"[1]"))[0] == 400


async def test_example_plugin_counts_matches_by_interest(nursery):
    r = await start_relay(nursery, plugins=[relay_plugins.example_interest_stats])
    h = Harness(nursery, r)
    await h.pair(interests=["chess", "go"])
    await h.pair(interests=["chess"])
    await h.pair()
    status, _, body = await http_get(r.port, "/stats/interests")
    assert status == 200 and json.loads(body) == {"chess": 2, "go": 1, "(none)": 1}
    assert (await http_get(r.port, "/stats/other"))[0] == 404  # not its route
    other = await start_relay(nursery, plugins=[relay_plugins.example_interest_stats])  # its own counts
    assert json.loads((await http_get(other.port, "/stats/interests"))[2]) == {}


def test_bundled_plugins_are_found_through_entry_points():
    pm = relay_mod.make_plugin_manager()
    assert pm.get_plugin("sessions") is sys.modules["relay_plugins.sessions"]
    assert pm.get_plugin("metrics") is relay_plugins.metrics and pm.get_plugin("admin") is relay_plugins.admin
    # Named with --plugin as well: registered once, no error.
    pm = relay_mod.make_plugin_manager(["relay_plugins.metrics", "relay_plugins.example_interest_stats"])
    assert pm.is_registered(relay_plugins.example_interest_stats)
    assert [p for p in pm.get_plugins() if p is relay_plugins.metrics] == [relay_plugins.metrics]


async def test_a_third_party_plugin_is_discovered_through_its_entry_point(nursery, tmp_path, monkeypatch):
    """A package installed elsewhere declares `[project.entry-points.relay]`: importlib.metadata
    finds its dist-info on sys.path, and the relay loads it without being told."""
    (tmp_path / "relay_hello_plugin.py").write_text(
        textwrap.dedent(
            """
            import relay

            @relay.hookimpl
            def relay_http_request(request):
                if request.path == "/hello":
                    return relay.HttpResponse(200, b"hello from a plugin")
            """
        )
    )
    info = tmp_path / "relay_hello_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: relay-hello-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[relay]\nhello = relay_hello_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = relay_mod.make_plugin_manager()
    assert pm.get_plugin("hello").__name__ == "relay_hello_plugin"
    r = relay_mod.Relay(relay_mod.Settings(host="127.0.0.1", port=0, static_dir=""), plugin_manager=pm)
    await nursery.start(r.serve)
    assert (await http_get(r.port, "/hello"))[2] == b"hello from a plugin"
    with trio.fail_after(5):
        r.shutdown()
