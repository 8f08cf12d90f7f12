// Unit tests of static/relay-client.js, run inside Chromium by tests/test_browser.py.
// `run(names)` runs the named tests (all if omitted) and returns [{name, ok, error}].

const { backoffDelay, UrlRotation, CandidateQueue, RelayClient, DEFAULTS, FallbackSocket, MAX_POST_CHARS } = await import(
  `${location.origin}/relay-client.js`
);

function assert(condition, message) {
  if (!condition) throw new Error(message || "assertion failed");
}

function equal(actual, expected, message) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) throw new Error(`${message || "not equal"}: got ${a}, want ${e}`);
}

/** Timers under the test's control: nothing fires until `advance`. */
class FakeTimers {
  constructor() {
    this.now = 0;
    this.queue = new Map();
    this.nextId = 1;
    this.setTimeout = (fn, delay) => {
      const id = this.nextId++;
      this.queue.set(id, { fn, at: this.now + delay, delay });
      return id;
    };
    this.clearTimeout = (id) => this.queue.delete(id);
  }
  /** Fire the earliest timer; returns its delay. */
  fireNext() {
    const [id, timer] = [...this.queue.entries()].sort((a, b) => a[1].at - b[1].at)[0];
    this.queue.delete(id);
    this.now = timer.at;
    timer.fn();
    return timer.delay;
  }
  /** The delays of the pending timers, soonest first. */
  pending() {
    return [...this.queue.values()].sort((a, b) => a.at - b.at).map((t) => t.delay);
  }
}

/** A WebSocket double: the test opens, feeds and fails it. */
function fakeWebSocketClass() {
  return class FakeWebSocket {
    static instances = [];
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.sent = [];
      FakeWebSocket.instances.push(this);
    }
    send(text) {
      this.sent.push(JSON.parse(text));
    }
    close() {
      this.drop(1000);
    }
    welcome() {
      this.readyState = 1;
      this.onopen?.({});
      const id = `c${FakeWebSocket.instances.length}`;
      this.receive({ type: "welcome", protocol: 1, client_id: id, resume_token: `${id}.secret` });
    }
    receive(msg) {
      this.onmessage({ data: JSON.stringify(msg) });
    }
    drop(code = 1006) {
      if (this.readyState === 3) return;
      this.readyState = 3;
      this.onclose?.({ code, reason: "" });
    }
  };
}

function makeClient(urls, extra = {}) {
  const WS = fakeWebSocketClass();
  const timers = new FakeTimers();
  const events = [];
  const client = new RelayClient(urls, { WebSocket: WS, timers, random: () => 0.5, fallback: false, ...extra });
  const types = ["connected", "queued", "matched", "ended", "reconnecting", "disconnected", "peerleft", "resumed",
    "peerreconnecting", "peerresumed", "signal", "transport"];
  for (const type of types) {
    client.addEventListener(type, (e) => events.push([type, e.detail]));
  }
  return { client, WS, timers, events, last: () => WS.instances.at(-1) };
}

/** fetch() for the HTTP fallback: /healthz answers, /fallback/open streams what the test pushes. */
function fakeFetch() {
  const requests = [];
  const streams = [];
  const fetch = async (url, init = {}) => {
    requests.push({ url, method: init.method || "GET", headers: init.headers || {}, body: init.body });
    if (url.endsWith("/healthz")) return new Response("{}", { status: 200 });
    if (url.endsWith("/fallback/open")) {
      let controller;
      const body = new ReadableStream({ start: (c) => { controller = c; } });
      streams.push({ push: (text) => controller.enqueue(new TextEncoder().encode(text)) });
      return new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } });
    }
    return new Response(null, { status: 204 });
  };
  return { fetch, requests, streams };
}

/** Let fetches, stream reads and their promises run (real time: a few macrotask turns). */
async function settle() {
  for (let i = 0; i < 3; i++) await new Promise((resolve) => setTimeout(resolve, 0));
}

/** A client whose WebSockets fail three times where HTTP answers: it is on the fallback, welcomed. */
async function onTheFallback(extra = {}) {
  const http = fakeFetch();
  const made = makeClient("ws://a/ws", { fallback: true, fetch: http.fetch, ...extra });
  for (let i = 0; i < 3; i++) {
    made.last().drop();
    if (i < 2) made.timers.fireNext();
  }
  await settle(); // the health check
  made.timers.fireNext(); // the next attempt
  await settle();
  const stream = http.streams[0];
  stream.push('event: stream\ndata: {"stream":"s1.key"}\n\n');
  stream.push('data: {"type":"welcome","protocol":1,"client_id":"f1","resume_token":"f1.t"}\n\n');
  await settle();
  return { ...made, http, stream };
}

const tests = {
  backoff_is_full_jitter_doubling_up_to_the_cap() {
    const options = { initialDelay: 500, maxDelay: 15000 };
    const ceilings = [0, 1, 2, 3, 4, 5, 6, 10, 100].map((n) => backoffDelay(n, options, () => 0.999999));
    equal(ceilings, [499, 999, 1999, 3999, 7999, 14999, 14999, 14999, 14999], "ceilings");
    equal(backoffDelay(3, options, () => 0), 0, "full jitter reaches down to 0");
    equal(backoffDelay(3, options, () => 0.5), 2000, "uniform in between");
    for (let i = 0; i < 1000; i++) {
      const delay = backoffDelay(i % 12, DEFAULTS);
      assert(delay >= 0 && delay < DEFAULTS.maxDelay, `delay ${delay} in range`);
    }
  },

  url_rotation_moves_on_after_three_failures_and_wraps() {
    const rotation = new UrlRotation(["a", "b"], 3);
    const seen = [];
    for (let i = 0; i < 7; i++) {
      seen.push(rotation.current);
      rotation.failed();
    }
    equal(seen, ["a", "a", "a", "b", "b", "b", "a"]);
  },

  url_rotation_prefers_the_first_again_after_a_success() {
    const rotation = new UrlRotation(["a", "b", "c"], 3);
    for (let i = 0; i < 3; i++) rotation.failed();
    equal(rotation.current, "b");
    rotation.succeeded();
    equal(rotation.current, "a", "next failure cycle starts from the first URL");
    rotation.failed();
    equal(rotation.current, "a", "a single failure does not move on");
  },

  candidate_queue_keeps_early_candidates_in_order() {
    const queue = new CandidateQueue();
    equal(queue.push({ candidate: "1" }), null, "kept before the remote description");
    equal(queue.push({ candidate: "2" }), null);
    equal(queue.drain(), [{ candidate: "1" }, { candidate: "2" }], "handed over in order");
    equal(queue.push({ candidate: "3" }), { candidate: "3" }, "passed straight through afterwards");
    equal(queue.drain(), [], "nothing kept twice");
    queue.reset();
    equal(queue.push({ candidate: "4" }), null, "a new negotiation queues again");
    equal(queue.pending, [{ candidate: "4" }]);
  },

  client_reconnects_with_backoff_and_fails_over_after_three_attempts() {
    const { WS, timers, events, last } = makeClient(["ws://a/ws", "ws://b/ws"]);
    for (let i = 0; i < 3; i++) {
      equal(last().url, "ws://a/ws", `attempt ${i + 1} on the first URL`);
      last().drop();
      timers.fireNext();
    }
    equal(last().url, "ws://b/ws", "fourth attempt on the second URL");
    const delays = events.filter(([t]) => t === "reconnecting").map(([, d]) => d.delay);
    equal(delays, [250, 500, 1000], "backoff doubles (random fixed at 0.5)");
    last().welcome();
    equal(events.at(-1)[0], "connected");
    equal(WS.instances.length, 4);
  },

  client_comes_back_to_the_first_url_after_a_drop() {
    const { client, timers, last } = makeClient(["ws://a/ws", "ws://b/ws"]);
    for (let i = 0; i < 3; i++) {
      last().drop();
      timers.fireNext();
    }
    last().welcome(); // connected to b
    last().drop(); // b drops later
    timers.fireNext();
    equal(last().url, `ws://a/ws?resume=${client.clientId}`, "the preferred URL first again (naming its client)");
  },

  client_resumes_after_a_lost_connection_and_keeps_its_session() {
    const { client, timers, events, last } = makeClient("ws://a/ws", { interests: ["music"] });
    last().welcome();
    client.join();
    last().receive({ type: "matched", session_id: "s1", peer_id: "p", initiator: true, interests: ["music"], ice_servers: [] });
    last().receive({ type: "signal", n: 7, data: { x: 1 } });
    last().drop(); // vanished
    assert(!events.some(([t]) => t === "ended"), "the session is not given up yet");
    assert(client.signal({ late: true }), "a signal while reconnecting is kept");
    timers.fireNext();
    equal(last().url, "ws://a/ws?resume=c1", "the reconnection names the client (a cluster on Fly.io routes it)");
    last().welcome();
    equal(last().sent, [{ type: "resume", token: "c1.secret", last: 7 }], "resume first, with what it saw last");
    last().receive({ type: "resumed", client_id: "c1", resume_token: "c1.next", state: "matched", session_id: "s1", peer_id: "p" });
    equal(last().sent.slice(1), [{ type: "signal", data: { late: true } }], "then what was kept");
    equal([client.state, client.clientId, client.resumeToken], ["matched", "c1", "c1.next"]);
    assert(!events.some(([t]) => t === "ended"), "the session went on");
    last().receive({ type: "signal", n: 8, data: { missed: true } });
    equal(client.lastSignal, 8);
  },

  client_keeps_a_working_call_the_relay_lost_and_next_ends_it() {
    const { client, timers, events, last } = makeClient("ws://a/ws", { interests: ["music"] });
    client.addEventListener("sessionlost", (e) => e.preventDefault()); // as PeerSession does while connected
    last().welcome();
    client.join();
    last().receive({ type: "matched", session_id: "s1", peer_id: "p", initiator: true, interests: ["music"], ice_servers: [] });
    last().drop();
    timers.fireNext();
    last().welcome();
    last().receive({ type: "error", code: "resume_failed", message: "cannot resume" }); // the relay restarted
    assert(!events.some(([t]) => t === "ended"), "the call goes on");
    equal([client.state, client.detached, client.session.session_id], ["matched", true, "s1"]);
    equal(last().sent, [{ type: "resume", token: "c1.secret", last: 0 }], "no join while in the call");
    assert(!client.signal({ x: 1 }), "nothing can be signaled: the relay does not know the session");
    client.next();
    equal(events.filter(([t]) => t === "ended").map(([, d]) => d),
      [{ session_id: "s1", reason: "next", by: "self", detached: true }], "next ends it (the peer is told directly)");
    equal(last().sent.at(-1), { type: "next" }, "and looks for someone new");
    equal(client.detached, false);
  },

  client_ends_a_lost_call_when_the_peer_says_bye() {
    const { client, timers, events, last } = makeClient("ws://a/ws", { interests: ["music"] });
    client.addEventListener("sessionlost", (e) => e.preventDefault());
    last().welcome();
    client.join();
    last().receive({ type: "matched", session_id: "s1", peer_id: "p", initiator: false, interests: [], ice_servers: [] });
    last().drop();
    timers.fireNext();
    last().welcome();
    last().receive({ type: "error", code: "resume_failed", message: "cannot resume" });
    client.peerGone("next"); // what PeerSession calls when the peer's {"bye": "next"} arrives
    equal(events.filter(([t]) => t === "ended").map(([, d]) => d.by), ["peer"]);
    equal(last().sent.at(-1), { type: "join", interests: ["music"] }, "and joins again on its own");
  },

  client_starts_afresh_when_the_resume_is_refused() {
    const { client, timers, events, last } = makeClient("ws://a/ws", { interests: ["music"] });
    last().welcome();
    client.join();
    last().receive({ type: "matched", session_id: "s1", peer_id: "p", initiator: true, interests: ["music"], ice_servers: [] });
    last().drop();
    timers.fireNext();
    last().welcome();
    last().receive({ type: "error", code: "resume_failed", message: "cannot resume" });
    equal(
      events.filter(([t]) => t === "ended").map(([, d]) => d),
      [{ session_id: "s1", reason: "disconnected", by: "connection", detached: false }],
      "the lost session ends only now",
    );
    equal(last().sent.at(-1), { type: "join", interests: ["music"] }, "joined again on the new connection");
    equal(client.clientId, "c2", "as the new connection's client");
    assert(!events.some(([t, d]) => t === "error"), "a refused resume is not an error to show");
  },

  client_tells_about_the_peer_reconnecting() {
    const { client, events, last } = makeClient("ws://a/ws");
    last().welcome();
    client.join();
    last().receive({ type: "matched", session_id: "s1", peer_id: "p", initiator: false, interests: [], ice_servers: [] });
    last().receive({ type: "peer_reconnecting", session_id: "s1" });
    last().receive({ type: "peer_resumed", session_id: "s1" });
    equal(events.filter(([t]) => t.startsWith("peer")).map(([t]) => t), ["peerreconnecting", "peerresumed"]);
  },

  client_sends_its_token_as_a_subprotocol() {
    const { last } = makeClient("ws://a/ws", { token: () => "eyJ.token.sig" });
    equal(last().protocols, ["relay-jwt", "eyJ.token.sig"]);
    equal(makeClient("ws://a/ws").last().protocols, undefined, "no token, no subprotocol");
  },

  client_does_not_rejoin_after_leave_and_stops_on_close() {
    const { client, timers, WS, last } = makeClient("ws://a/ws");
    last().welcome();
    client.join();
    client.leave();
    last().drop();
    timers.fireNext();
    last().welcome();
    last().receive({ type: "resumed", client_id: "c1", resume_token: "c1.n", state: "idle" });
    equal(last().sent.map((m) => m.type), ["resume"], "no join after leave");
    client.close();
    equal(timers.pending(), [], "no timer left");
    const count = WS.instances.length;
    last().drop();
    equal(WS.instances.length, count, "no reconnect after close");
    equal(client.connection, "closed");
  },

  client_rejoins_after_peer_left_and_drops_stale_signals() {
    const { client, events, last } = makeClient("ws://a/ws");
    last().welcome();
    client.join();
    last().receive({ type: "matched", session_id: "s1", peer_id: "p", initiator: false, interests: [], ice_servers: [] });
    client.next();
    last().receive({ type: "signal", data: { late: true } }); // from the old peer, sent before our next
    assert(!events.some(([t]) => t === "signal"), "a signal of an ended session is dropped");
    last().receive({ type: "queued", position: 1, queue_size: 1 });
    last().receive({ type: "matched", session_id: "s2", peer_id: "q", initiator: true, interests: [], ice_servers: [] });
    last().receive({ type: "peer_left", session_id: "s2", reason: "left" });
    equal(last().sent.map((m) => m.type), ["join", "next", "join"], "joins again after peer_left");
  },

  async client_falls_back_to_http_when_websockets_fail_where_http_answers() {
    const { client, WS, http, stream, events } = await onTheFallback();
    equal(WS.instances.length, 3, "three WebSockets, then the fallback");
    equal(http.requests.slice(0, 2).map((r) => [r.method, r.url]), [["GET", "http://a/healthz"], ["POST", "http://a/fallback/open"]]);
    equal(http.requests[1].headers["X-Relay-Fallback"], "1");
    equal([client.connection, client.transport, client.clientId], ["open", "fallback", "f1"]);
    equal(events.filter(([t]) => t === "transport").map(([, d]) => d.transport), ["fallback"]);
    client.join({ interests: ["chess"] });
    client.signal({ early: true }); // not matched: refused locally
    await settle();
    const post = http.requests.at(-1);
    equal([post.url, post.headers["X-Relay-Stream"], post.body], ["http://a/fallback/send", "s1.key", '{"type":"join","interests":["chess"]}']);
    stream.push('data: {"type":"matched","session_id":"s","peer_id":"p","initiator":true,"interests":[],"ice_servers":[]}\n\n');
    stream.push('data: {"n":1,"type":"signal",\ndata: "data":{"a":1}}\n\n'); // one message on two data lines
    await settle();
    equal(events.filter(([t]) => t === "signal").map(([, d]) => d.data), [{ a: 1 }]);
    stream.push(": keepalive\n\n"); // the relay asks for a sign of life: a ping goes out
    await settle();
    equal(http.requests.at(-1).body, '{"type":"ping"}');
  },

  async client_on_the_fallback_moves_back_to_a_websocket_without_losing_a_signal() {
    const { client, WS, stream, timers, events, last } = await onTheFallback({ upgradeInterval: 1000 });
    client.join();
    stream.push('data: {"type":"matched","session_id":"s","peer_id":"p","initiator":true,"interests":[],"ice_servers":[]}\n\n');
    stream.push('data: {"n":1,"type":"signal","data":{"i":1}}\n\n');
    await settle();
    const before = WS.instances.length;
    while (WS.instances.length === before) timers.fireNext(); // the probe's turn
    const probe = last();
    probe.welcome();
    equal(probe.sent, [{ type: "resume", token: "f1.t", last: 1 }], "the probe takes the client over");
    stream.push('data: {"n":2,"type":"signal","data":{"i":2}}\n\n'); // the stream still had this one
    stream.push('event: close\ndata: {"code":4000,"reason":"resumed on another connection"}\n\n');
    probe.receive({ type: "resumed", client_id: "f1", resume_token: "f1.u", state: "matched", session_id: "s", peer_id: "p" });
    probe.receive({ type: "signal", n: 2, data: { i: 2 } }); // replayed after last 1: a repeat
    probe.receive({ type: "signal", n: 3, data: { i: 3 } });
    await settle();
    timers.fireNext(); // the stream's end is told
    equal([client.transport, client.connection, client.resumeToken], ["websocket", "open", "f1.u"]);
    equal(events.filter(([t]) => t === "signal").map(([, d]) => d.data.i), [1, 2, 3], "each signal once, in order");
    equal(events.filter(([t]) => t === "transport").map(([, d]) => d.transport), ["fallback", "websocket"]);
    assert(!events.some(([t]) => t === "ended" || t === "disconnected"), "the session never noticed");
    assert(client.signal({ x: 1 }));
    equal(probe.sent.at(-1), { type: "signal", data: { x: 1 } });
  },

  async fallback_posts_keep_order_and_stay_under_the_body_limit() {
    const http = fakeFetch();
    const socket = new FallbackSocket("ws://a/ws", { fetch: http.fetch, timers: new FakeTimers() });
    await settle();
    http.streams[0].push('event: stream\ndata: {"stream":"s.k"}\n\n');
    await settle();
    equal(socket.readyState, 1);
    const sent = Array.from({ length: 12 }, (_, i) => JSON.stringify({ type: "signal", data: { i, sdp: "x".repeat(6000) } }));
    for (const text of sent) socket.send(text);
    for (let i = 0; i < 20; i++) await settle();
    const posts = http.requests.filter((r) => r.url.endsWith("/fallback/send")).map((r) => r.body);
    assert(posts.length > 2, `several posts: ${posts.length}`);
    assert(posts.every((body) => body.length <= MAX_POST_CHARS + 7000), "each within the limit (or one message)");
    equal(posts.join("\n").split("\n"), sent, "every message once, in order");
  },

  client_gives_up_a_silent_connection() {
    const { timers, last } = makeClient("ws://a/ws", { pingInterval: 1000, pongTimeout: 500 });
    const ws = last();
    ws.welcome();
    equal(timers.fireNext(), 1000, "ping after a quiet second");
    equal(ws.sent.at(-1), { type: "ping" });
    equal(timers.fireNext(), 500, "then waits for any answer");
    equal(ws.readyState, 3, "no answer: closed, to reconnect");
  },
};

export async function run(names = Object.keys(tests)) {
  const results = [];
  for (const name of names) {
    try {
      await tests[name]();
      results.push({ name, ok: true });
    } catch (err) {
      results.push({ name, ok: false, error: String(err && err.stack ? err.stack : err) });
    }
  }
  return results;
}

export const names = Object.keys(tests);
