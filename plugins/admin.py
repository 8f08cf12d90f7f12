"""Admin dashboard and actions on the relay's port (``--admin``; the token from ``RELAY_ADMIN_TOKEN``).

- ``GET /admin``: a small page (no data in it) that asks for the token, then shows the relay's live
  figures, refreshed every second, and the actions below.
- ``GET /admin/api/status``: the figures, as JSON.
- ``POST /admin/api/drain`` / ``/admin/api/undrain``: stop taking clients (``/healthz`` answers 503
  so the load balancer sends new users elsewhere; sessions go on) / take them again.
- ``POST /admin/api/kick`` with ``{"client_id": "..."}``: close that client (1008).

Every ``/admin/api/`` request needs ``Authorization: Bearer <RELAY_ADMIN_TOKEN>``, compared in
constant time; without it or with a wrong one: 401. An address that gets ``MAX_FAILURES`` 401s within
``FAILURE_WINDOW`` seconds gets 429 for every ``/admin/api/`` request until the window has passed,
right token or not, so the token cannot be guessed at speed. ``--admin`` without a token refuses
to start.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
from typing import Any

import attrs
import trio

import relay
from relay import HttpRequest, HttpResponse, PluginError, Relay

PREFIX = "/admin"
MIN_TOKEN_LENGTH = 16  # characters; shorter tokens are refused at start-up
MAX_FAILURES = 10  # 401s one address may get within FAILURE_WINDOW before it is refused with 429
FAILURE_WINDOW = 60.0  # seconds
MAX_TRACKED = 10_000  # addresses whose failures are remembered (the oldest are forgotten)

_PAGE = b"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>relay admin</title>
  <style>
    body { font-family: system-ui, sans-serif; margin: 1.5rem; max-width: 48rem; }
    table { border-collapse: collapse; margin: 1rem 0; }
    th, td { text-align: left; padding: 0.25rem 1.5rem 0.25rem 0; border-bottom: 1px solid #ccc; }
    td { font-variant-numeric: tabular-nums; }
    form { margin: 0.75rem 0; display: flex; gap: 0.5rem; flex-wrap: wrap; align-items: center; }
    input, button { font: inherit; padding: 0.4rem 0.6rem; }
    #message { min-height: 1.5em; }
  </style>
  <script type="module" src="/admin/admin.js"></script>
</head>
<body>
  <h1>relay admin</h1>
  <form id="login">
    <label for="token">Admin token</label>
    <input id="token" type="password" autocomplete="current-password" required>
    <button type="submit">Use</button>
  </form>
  <p id="message" role="status" aria-live="polite"></p>
  <table aria-label="Live figures"><tbody id="figures"></tbody></table>
  <form id="actions">
    <button type="button" id="drain">Drain this node</button>
    <button type="button" id="undrain">Undrain</button>
  </form>
  <form id="kick">
    <label for="client">Client id</label>
    <input id="client" required>
    <button type="submit">Kick</button>
  </form>
</body>
</html>
"""

_SCRIPT = b"""// relay admin: poll /admin/api/status every second with the bearer token.
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("relay-admin-token") || "";

async function api(path, body) {
  const response = await fetch(`/admin/api/${path}`, {
    method: body === undefined ? "GET" : "POST",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) throw new Error("wrong or missing token");
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function show(stats) {
  const rows = Object.entries(stats).map(([key, value]) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    const td = document.createElement("td");
    th.textContent = key;
    td.textContent = typeof value === "object" ? JSON.stringify(value) : String(value);
    tr.append(th, td);
    return tr;
  });
  $("figures").replaceChildren(...rows);
}

async function refresh() {
  if (!token) return;
  try {
    show(await api("status"));
  } catch (err) {
    $("message").textContent = String(err.message);
  }
}

async function act(path, body) {
  try {
    const result = await api(path, body);
    $("message").textContent = result.ok ? `${path}: done` : `${path}: ${result.error}`;
    refresh();
  } catch (err) {
    $("message").textContent = String(err.message);
  }
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token").value;
  sessionStorage.setItem("relay-admin-token", token);
  $("message").textContent = "";
  refresh();
});
$("drain").addEventListener("click", () => act("drain", {}));
$("undrain").addEventListener("click", () => act("undrain", {}));
$("kick").addEventListener("submit", (event) => {
  event.preventDefault();
  act("kick", { client_id: $("client").value });
});
setInterval(refresh, 1000);
refresh();
"""


def _json(status: int, data: Any) -> HttpResponse:
    return HttpResponse(status, json.dumps(data).encode(), "application/json")


class Admin:
    """The plugin object: answers /admin requests for one relay."""

    def __init__(self, relay_: Relay, token: str) -> None:
        self.relay = relay_
        self._token = token.encode()
        self._failures: dict[str, tuple[float, int]] = {}  # address -> (window start, 401s in it)

    def _authorized(self, request: HttpRequest) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes time independent of where the values differ (not of their lengths)
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token)

    @relay.hookimpl
    def relay_http_request(self, request: HttpRequest) -> HttpResponse | None:
        path = request.path
        if path == PREFIX or path == PREFIX + "/":
            return HttpResponse(200, _PAGE, "text/html; charset=utf-8", headers=_PAGE_HEADERS)
        if path == PREFIX + "/admin.js":
            return HttpResponse(200, _SCRIPT, "text/javascript; charset=utf-8")
        if not path.startswith(PREFIX + "/api/"):
            return None
        now = trio.current_time()
        start, failures = self._failures.get(request.ip, (now, 0))
        if now - start >= FAILURE_WINDOW:
            start, failures = now, 0
        if failures >= MAX_FAILURES:
            retry = str(int(start + FAILURE_WINDOW - now) + 1)
            return HttpResponse(
                429, b'{"error": "too many wrong tokens"}', "application/json", (("Retry-After", retry),)
            )
        if not self._authorized(request):
            self._failures.pop(request.ip, None)  # re-inserted last: the oldest are forgotten first
            self._failures[request.ip] = (start, failures + 1)
            if len(self._failures) > MAX_TRACKED:
                del self._failures[next(iter(self._failures))]
            return HttpResponse(
                401, b'{"error": "unauthorized"}', "application/json", headers=(("WWW-Authenticate", "Bearer"),)
            )
        action = path.removeprefix(PREFIX + "/api/")
        if action == "status" and request.method == "GET":
            return _json(200, attrs.asdict(self.relay.statistics()))
        if request.method != "POST":
            return _json(405, {"error": "use POST"})
        if action == "drain":
            self.relay.drain()
            return _json(200, {"ok": True})
        if action == "undrain":
            self.relay.undrain()
            return _json(200, {"ok": True, "draining": self.relay.draining})
        if action == "kick":
            try:
                client_id = json.loads(request.body or b"{}")["client_id"]
            except (ValueError, KeyError, TypeError):
                return _json(400, {"error": 'send {"client_id": "..."}'})
            if not isinstance(client_id, str) or not self.relay.kick(client_id):
                return _json(404, {"ok": False, "error": "no such client"})
            return _json(200, {"ok": True})
        return _json(404, {"error": "no such action"})


_PAGE_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
    ("Referrer-Policy", "no-referrer"),
)


@relay.hookimpl
def relay_addoption(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("admin (relay_plugins.admin)")
    group.add_argument(
        "--admin", action="store_true", help=f"serve the admin dashboard and API at {PREFIX} (needs RELAY_ADMIN_TOKEN)"
    )


@relay.hookimpl
def relay_configure(relay: Relay) -> None:
    if not getattr(relay.options, "admin", False):
        return
    token = os.environ.get("RELAY_ADMIN_TOKEN", "")
    if len(token) < MIN_TOKEN_LENGTH:
        raise PluginError(f"--admin needs RELAY_ADMIN_TOKEN set to a secret of at least {MIN_TOKEN_LENGTH} characters")
    relay.pm.register(Admin(relay, token), "admin-api")
