"""Real headless Chromium (Debian's chromium, driven by Playwright) against a real relay process.

Everything runs inside the test session's loopback-only network namespace (see conftest.py). Each
test has a hard timeout and closes what it opened. Success means media flows: the peer connection is
``connected`` and ``getStats()`` reports decoded remote video frames.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright import sync_api as playwright_api

from tests.conftest import NETWORK_ISOLATION_ERROR, RelayProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"  # Debian's package; `playwright install` is never used
CHROMIUM_ARGS = [
    "--use-fake-device-for-media-stream",  # a synthetic camera and microphone
    "--use-fake-ui-for-media-stream",  # no permission prompt
    "--allow-loopback-in-peer-connection",  # ICE candidates on 127.0.0.1
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 20_000  # for any single browser wait

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module", autouse=True)
def _isolated() -> None:
    if NETWORK_ISOLATION_ERROR:
        pytest.fail(f"browser tests need a loopback-only network namespace: {NETWORK_ISOLATION_ERROR}")
    assert os.path.exists(CHROMIUM), "browser tests need Debian's chromium: apt-get install chromium"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    process = RelayProcess(tmp_path).start()
    yield process
    process.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS)
        yield b
        b.close()


@pytest.fixture
def open_page(browser) -> Iterator[Callable[..., object]]:
    """Open the demo in a fresh browser context (one per person); all are closed afterwards."""
    contexts = []

    def open_page(url: str) -> object:
        context = browser.new_context(permissions=["camera", "microphone"])
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on(  # a file the page asks for and the relay does not have (a favicon, say)
            "console", lambda m: "Failed to load resource" in m.text and errors.append(f"console: {m.text}")
        )
        page.errors = errors  # type: ignore[attr-defined]
        page.goto(url)
        return page

    yield open_page
    for context in contexts:
        context.close()


# -- helpers --------------------------------------------------------------------------------------------


def start(page, interests: str = "") -> None:
    page.fill("#interests", interests)
    page.click("#start")


def wait_connected(page) -> None:
    """The RTCPeerConnection is connected and remote video frames are being decoded."""
    page.wait_for_function("() => document.body.dataset.peerState === 'connected'")
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while frames_decoded(page) == 0:
        assert time.monotonic() < deadline, "connected, but no remote video frame was decoded"
        time.sleep(0.1)
    assert page.errors == [], page.errors


def frames_decoded(page) -> int:
    return page.evaluate(
        """async () => {
            const pc = window.demo?.peer?.pc;
            if (!pc) return 0;
            let frames = 0;
            (await pc.getStats()).forEach((s) => {
                if (s.type === 'inbound-rtp' && s.kind === 'video') frames += s.framesDecoded || 0;
            });
            return frames;
        }"""
    )


def wait_for_new_frames(page, frames: int) -> None:
    """Until the page has decoded more than ``frames`` video frames: the call's video flows."""
    deadline = time.monotonic() + 10
    while frames_decoded(page) <= frames:
        assert time.monotonic() < deadline, "video stopped"
        time.sleep(0.1)


def session_id(page) -> str | None:
    return page.evaluate("() => window.demo?.client?.session?.session_id ?? null")


def chat(sender, receiver, text: str) -> None:
    sender.wait_for_selector("#chat-input:not([disabled])")
    sender.fill("#chat-input", text)
    sender.click("#chat-send")
    receiver.wait_for_function(
        "(text) => [...document.querySelectorAll('#chat-log li.stranger')].some((li) => li.textContent.includes(text))",
        arg=text,
    )


# -- the tests ------------------------------------------------------------------------------------------


def test_two_pages_match_connect_see_video_and_chat(relay, open_page):
    alice, bob = open_page(relay.url), open_page(relay.url)
    start(alice, "music, films")
    alice.wait_for_selector("#position:has-text('#1 in line')")
    start(bob, "films")
    for page in (alice, bob):
        wait_connected(page)
    assert session_id(alice) == session_id(bob) is not None
    assert alice.evaluate("() => window.demo.client.session.interests") == ["films"]
    chat(alice, bob, "hello from alice")
    chat(bob, alice, "hi alice, bob here")


def test_next_pairs_the_presser_with_the_waiting_third(relay, open_page):
    a, b, c = open_page(relay.url), open_page(relay.url), open_page(relay.url)
    start(a)
    start(b)
    wait_connected(a)
    wait_connected(b)
    first = session_id(a)
    start(c)
    c.wait_for_selector("#position:has-text('#1 in line')")
    a.click("#next")
    wait_connected(a)
    wait_connected(c)
    assert session_id(a) == session_id(c) != first
    chat(c, a, "new friend")
    b.wait_for_selector("#chat-log li.system:has-text('stranger left')")
    b.wait_for_selector("#position:has-text('#1 in line')")  # back in the queue on its own


def test_a_call_survives_a_relay_restart_and_next_still_works(relay, open_page):
    a, b = open_page(relay.url), open_page(relay.url)
    start(a)
    start(b)
    wait_connected(a)
    wait_connected(b)
    first = session_id(a)
    relay.kill()  # the relay loses every session...
    for page in (a, b):
        page.wait_for_selector("#connection:has-text('Reconnecting')")
    relay.start()  # ...and comes back empty, on the same port
    for page in (a, b):
        page.wait_for_function("() => window.demo.client.connection === 'open' && window.demo.client.detached")
        # Refused while the relay was down: after a few failed WebSockets the client asks /healthz
        # whether a proxy blocks them (a fetch), and the console says that was refused, rightly.
        page.errors[:] = [e for e in page.errors if "net::ERR_CONNECTION_REFUSED" not in e]
    before = [frames_decoded(page) for page in (a, b)]
    for page, frames in zip((a, b), before, strict=True):  # ...while the call goes on, browser to browser
        wait_for_new_frames(page, frames)
        assert session_id(page) == first and page.evaluate("() => document.body.dataset.peerState") == "connected"
    chat(a, b, "still here after the restart")
    b.evaluate(
        "() => { window.endedBy = [];"
        " window.demo.client.addEventListener('ended', (e) => window.endedBy.push(e.detail.by)); }"
    )
    a.click("#next")  # the relay cannot tell b: a's browser does, over the data channel
    b.wait_for_function("() => window.endedBy.includes('peer')")
    for page in (a, b):  # both look for someone again, and (alone on the relay) find each other
        page.wait_for_function("(first) => window.demo.client.session?.session_id !== undefined"
                               " && window.demo.client.session.session_id !== first && !window.demo.client.detached",
                               arg=first)  # fmt: skip
        wait_connected(page)
    assert session_id(a) == session_id(b)
    assert a.evaluate("() => performance.getEntriesByType('navigation').length") == 1  # no reload happened


def test_stop_releases_the_camera_and_start_takes_it_again(relay, open_page):
    page = open_page(relay.url)
    start(page)
    page.wait_for_function(
        "() => document.getElementById('local').srcObject?.getVideoTracks()[0]?.readyState === 'live'"
    )
    page.evaluate("() => { window.firstStream = document.getElementById('local').srcObject; }")
    page.click("#stop")
    assert page.evaluate("() => window.firstStream.getTracks().every((t) => t.readyState === 'ended')")
    assert page.evaluate("() => document.getElementById('local').srcObject === null")
    start(page)
    page.wait_for_function(
        "() => document.getElementById('local').srcObject?.getVideoTracks()[0]?.readyState === 'live'"
    )


def test_what_people_must_read_stays_on_screen(relay, open_page, browser):
    context = browser.new_context()
    try:
        denied = context.new_page()
        denied.add_init_script(
            "navigator.mediaDevices.getUserMedia = () => Promise.reject(new DOMException('denied', 'NotAllowedError'));"
        )
        denied.errors = []  # type: ignore[attr-defined]
        denied.goto(relay.url)
        start(denied, "chess")
        denied.wait_for_selector("#position:has-text('in line')")
        assert "No camera or microphone (NotAllowedError)" in denied.inner_text("#notice")  # not written over
        other = open_page(relay.url)
        start(other, "chess")
        wait_connected(denied)  # it sees the other's video (the other sees none: there is no camera to send)
        other.wait_for_function("() => document.body.dataset.peerState === 'connected'")
        for page in (denied, other):  # the shared interest outlives "Connecting…" and "Connected"
            assert page.inner_text("#shared") == "You both like chess."
        assert "No camera or microphone" in denied.inner_text("#notice")
        other.click("#report")
        other.wait_for_selector("#chat-log li.system:has-text('Reported')")
        denied.wait_for_selector("#chat-log li.system:has-text('stranger left')")
    finally:
        context.close()


def test_failover_to_the_second_url_when_the_first_is_dead(relay, open_page):
    dead = f"ws://127.0.0.1:{free_port()}/ws"
    url = f"{relay.url}/?relay={dead},{relay.ws_url}"
    a, b = open_page(url), open_page(relay.url)
    start(a)
    a.wait_for_function("() => window.demo?.client?.connection === 'open'")
    assert a.evaluate("() => window.demo.client.url") == relay.ws_url
    attempts = a.evaluate("() => window.demo.client.rotation.urls")
    assert attempts == [dead, relay.ws_url]
    start(b)
    wait_connected(a)
    wait_connected(b)


def test_client_library_unit_tests_in_chromium(browser, relay):
    # The test module is loaded from a blob: URL, which the demo page's CSP forbids (as it should);
    # these tests are about the library, so this one context bypasses the CSP.
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    page.goto(relay.url)
    source = (ROOT / "tests" / "js" / "relay_client_test.js").read_text()
    results = page.evaluate(
        """async (source) => {
            const url = URL.createObjectURL(new Blob([source], {type: 'text/javascript'}));
            const module = await import(url);
            return await module.run();
        }""",
        source,
    )
    failures = [f"{r['name']}: {r['error']}" for r in results if not r["ok"]]
    assert not failures, "\n".join(failures)
    names = {r["name"] for r in results}
    assert {
        "backoff_is_full_jitter_doubling_up_to_the_cap",
        "candidate_queue_keeps_early_candidates_in_order",
        "client_falls_back_to_http_when_websockets_fail_where_http_answers",
        "client_on_the_fallback_moves_back_to_a_websocket_without_losing_a_signal",
        "fallback_posts_keep_order_and_stay_under_the_body_limit",
    } <= names
    assert len(results) >= 10
    context.close()


def test_demo_page_is_accessible_and_fits_a_phone(browser, relay):
    context = browser.new_context(viewport={"width": 375, "height": 740}, permissions=["camera", "microphone"])
    try:
        page = context.new_page()
        page.goto(relay.url)
        for control in ("#interests", "#chat-input"):
            label = page.evaluate("(id) => document.querySelector(`label[for='${id}']`)?.textContent", control[1:])
            assert label, f"{control} has a label"
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth"), "no sideways scrolling"
        page.keyboard.press("Tab")
        assert page.evaluate("() => document.activeElement.id") == "interests"
        page.keyboard.type("chess")
        page.keyboard.press("Enter")  # the form submits: Start from the keyboard
        page.wait_for_selector("#position:has-text('in line')")
        assert re.search(r"#1 in line", page.inner_text("#position"))
    finally:
        context.close()


def test_admin_dashboard_shows_live_figures_and_drains(browser, open_page, tmp_path):
    token = "a-long-admin-token-for-the-browser-test"
    relay = RelayProcess(tmp_path, "--admin", env={"RELAY_ADMIN_TOKEN": token}).start()
    try:
        context = browser.new_context()
        admin = context.new_page()
        admin.set_default_timeout(TIMEOUT_MS)
        admin.goto(f"{relay.url}/admin")
        admin.fill("#token", "wrong")
        admin.click("#login button")
        admin.wait_for_selector("#message:has-text('wrong or missing token')")
        admin.fill("#token", token)
        admin.click("#login button")
        admin.wait_for_selector("#figures th:has-text('connections')")
        connections = "() => document.querySelector('#figures tr:first-child td')?.textContent"
        assert admin.evaluate(connections) == "0"
        visitor = open_page(relay.url)
        start(visitor)
        admin.wait_for_function(f"() => ({connections})() === '1'")  # refreshed without a reload
        admin.click("#drain")
        admin.wait_for_selector("#message:has-text('drain: done')")
        visitor.wait_for_selector("#connection:has-text('Reconnecting')")  # closed with 1012, tries again
        admin.wait_for_function(f"() => ({connections})() === '0'")
        assert admin.evaluate("() => performance.getEntriesByType('navigation').length") == 1
        context.close()
    finally:
        relay.kill()


SELECTED_PAIR_TYPES = """async () => {
    const pc = window.demo?.peer?.pc;
    if (!pc) return null;
    const stats = await pc.getStats();
    let pair = null;
    stats.forEach((s) => {
        if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
    });
    if (!pair) return null;
    return [stats.get(pair.localCandidateId)?.candidateType, stats.get(pair.remoteCandidateId)?.candidateType];
}"""


def test_turn_only_connection_relays_through_coturn(open_page, tmp_path, turnserver):
    secret = "a-turn-secret-for-the-browser-test"
    turn_port = turnserver(secret)
    relay = RelayProcess(
        tmp_path, "--turn-url", f"turn:127.0.0.1:{turn_port}?transport=udp", env={"RELAY_TURN_SECRET": secret}
    ).start()
    try:
        pages = [open_page(f"{relay.url}/?policy=relay") for _ in range(2)]  # iceTransportPolicy: "relay"
        for page in pages:
            start(page)
        for page in pages:
            wait_connected(page)  # connected, remote video frames decoded
            client_id = page.evaluate("() => window.demo.client.clientId")
            turn = page.evaluate("() => window.demo.client.session.ice_servers")[0]
            assert turn["urls"] == [f"turn:127.0.0.1:{turn_port}?transport=udp"]
            assert turn["username"].endswith(f":{client_id}") and turn["credential"]
            assert page.evaluate(SELECTED_PAIR_TYPES)[0] == "relay"  # the selected pair goes through coturn
    finally:
        relay.kill()


def test_turn_with_a_wrong_secret_cannot_connect(open_page, tmp_path, turnserver):
    """The control run: same setup, but the relay signs with a secret coturn does not know."""
    turn_port = turnserver("the-secret-coturn-knows-0123")
    relay = RelayProcess(
        tmp_path, "--turn-url", f"turn:127.0.0.1:{turn_port}?transport=udp",
        env={"RELAY_TURN_SECRET": "a-secret-coturn-does-not-know"},
    ).start()  # fmt: skip
    try:
        pages = [open_page(f"{relay.url}/?policy=relay") for _ in range(2)]
        for page in pages:
            start(page)
        for page in pages:
            page.wait_for_function("() => window.demo?.peer?.pc?.iceGatheringState === 'complete'")
            errors = page.evaluate("() => window.demo.peer.candidateErrors.map((e) => e.errorCode)")
            assert 401 in errors  # coturn refused the credential
            candidates = page.evaluate(
                "async () => { let n = 0; (await window.demo.peer.pc.getStats()).forEach((s) => {"
                " if (s.type === 'local-candidate') n += 1; }); return n; }"
            )
            assert candidates == 0  # so no path can exist
            assert page.evaluate("() => window.demo.peer.pc.connectionState") != "connected"
    finally:
        relay.kill()


class CuttableProxy:
    """A TCP proxy to the relay (threads and sockets) whose connections can all vanish at once:
    no WebSocket close frame, just the TCP connection gone — like a phone switching networks."""

    def __init__(self, target_port: int) -> None:
        import threading

        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.sockets.clear()

    def close(self) -> None:
        self.cut()
        self.server.close()


def test_a_vanished_connection_resumes_and_the_call_goes_on(relay, open_page):
    proxy = CuttableProxy(relay.port)
    try:
        a = open_page(f"{relay.url}/?relay=ws://127.0.0.1:{proxy.port}/ws")  # a's signaling goes through the proxy
        b = open_page(relay.url)
        start(a)
        start(b)
        wait_connected(a)
        wait_connected(b)
        session = session_id(a)
        a.evaluate("() => { window.firstPc = window.demo.peer.pc; }")
        proxy.cut()  # a's WebSocket vanishes
        a.wait_for_function("() => window.demo.resumed === 1")  # it came back and took its session back
        b.wait_for_function("() => window.demo.peerReconnected === 1")  # b was told, and waited
        b.wait_for_selector("#peer-state:has-text('is back')")
        assert session_id(a) == session_id(b) == session  # the same match
        assert a.evaluate("() => window.demo.peer.pc === window.firstPc")  # the call itself never stopped
        wait_for_new_frames(b, frames_decoded(b))  # video still flows
        chat(a, b, "still here")
        assert a.evaluate("() => performance.getEntriesByType('navigation').length") == 1
    finally:
        proxy.close()


@pytest.mark.timeout(180)
def test_behind_a_proxy_that_blocks_websockets_the_page_falls_back_and_calls(relay, open_page, nginx):
    """Through a real nginx that does not pass WebSocket upgrades (default buffering), the demo falls
    back to HTTP on its own and calls a page that uses WebSockets directly; after a relay restart it
    comes back (over HTTP again); when the proxy passes WebSockets, it moves back to one mid-call."""
    proxy = nginx(relay.port)
    transport = "() => window.demo?.client?.connection === 'open' ? window.demo.client.transport : null"
    a = open_page(f"http://127.0.0.1:{proxy.port}/?upgrade-interval=2000")
    b, c = open_page(relay.url), open_page(relay.url)
    start(a)
    a.wait_for_selector("#connection:has-text('over HTTP')")  # three WebSockets failed where HTTP answers
    assert a.evaluate(transport) == "fallback"
    start(b)
    wait_connected(a)
    wait_connected(b)
    assert b.evaluate(transport) == "websocket"
    chat(a, b, "hello over http")
    chat(b, a, "hello over a websocket")
    start(c)
    c.wait_for_selector("#position:has-text('#1 in line')")
    a.click("#next")
    wait_connected(a)
    wait_connected(c)
    chat(c, a, "next works over http too")
    b.close()  # (b waits in the queue: gone, so that a and c meet again below)

    relay.kill()  # the relay restarts: the page comes back, over HTTP again, and the call goes on
    a.wait_for_selector("#connection:has-text('Reconnecting')")
    relay.start()
    a.wait_for_function(f"() => ({transport})() === 'fallback'", timeout=60_000)
    a.errors.clear()  # nginx answered 502 while the relay was down: the page's console says so, rightly
    wait_for_new_frames(a, frames_decoded(a))

    old = session_id(a)
    c.click("#next")  # a fresh session on the restarted relay, while a is still on the fallback
    a.wait_for_function(
        "(old) => { const c = window.demo.client; return !!c.session && !c.detached && c.session.session_id !== old; }",
        arg=old,
    )
    wait_connected(a)
    session = session_id(a)
    a.evaluate("() => { window.ended = 0; window.demo.client.addEventListener('ended', () => window.ended++); }")
    proxy.reload(websockets=True)  # the proxy passes WebSockets now: the page moves back, mid-call
    a.wait_for_function(f"() => ({transport})() === 'websocket'", timeout=30_000)
    assert session_id(a) == session and a.evaluate("() => window.ended") == 0  # the session never noticed
    a.wait_for_selector("#connection:not(:has-text('over HTTP'))")
    chat(a, c, "back on a websocket")
    chat(c, a, "welcome back")


def test_a_native_peer_written_from_the_docs_calls_a_browser(relay, open_page, tmp_path):
    """examples/native_peer.py (aiortc) knows only docs/protocol.md: it sends video one way, and the
    two chat both ways. It joins first, so it offers; the browser answers and re-offers its tracks."""
    import subprocess
    import sys

    out = (tmp_path / "native.txt").open("w")
    native = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "native_peer.py"), "--relay", relay.ws_url, "--loopback",
         "--chat", "hello from python", "--seconds", "25"],
        stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while True:  # the native peer waits in the queue
            with socket.create_connection(("127.0.0.1", relay.port)) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                if b'"queued":1' in s.recv(4096):
                    break
            assert time.monotonic() < deadline, (tmp_path / "native.txt").read_text()
            time.sleep(0.1)
        page = open_page(relay.url)
        start(page)
        wait_connected(page)  # the native peer's video, decoded in Chromium
        assert page.evaluate("() => window.demo.client.session.initiator") is False
        page.wait_for_selector("#chat-log li.stranger:has-text('hello from python')")
        chat_text = "hello from chromium"
        page.fill("#chat-input", chat_text)
        page.click("#chat-send")
        deadline = time.monotonic() + 10
        while f"chat: {chat_text}" not in (tmp_path / "native.txt").read_text():
            assert time.monotonic() < deadline, (tmp_path / "native.txt").read_text()
            time.sleep(0.1)
        assert "connection: connected" in (tmp_path / "native.txt").read_text()
    finally:
        native.kill()
        native.wait(timeout=10)
        out.close()
