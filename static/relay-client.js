// relay-client.js: the browser client of relay (https://github.com/…/relay), protocol version 1.
//
// An ES module without dependencies or build step, served by the relay at /relay-client.js.
//
//   import { RelayClient, PeerSession } from "/relay-client.js";
//   const client = new RelayClient(["wss://a.example/ws", "wss://b.example/ws"], { interests: ["music"] });
//   const peer = new PeerSession(client, { stream, onTrack: (event) => { remoteVideo.srcObject = event.streams[0]; } });
//   client.addEventListener("queued", (e) => show(`You are #${e.detail.position} in line`));
//   client.join();            // later: client.next(), client.leave(), client.close()
//
// RelayClient keeps one WebSocket to the relay: it reconnects forever (exponential backoff with full
// jitter, rotating through the URLs) and, after a reconnect, joins again with the same interests, so
// a dropped connection costs a new match, never a stuck screen. Where WebSockets are blocked (a proxy
// that does not pass them) but the relay answers plain HTTP, it switches to the relay's HTTP fallback
// (FallbackSocket) and keeps trying WebSockets now and then, moving back without losing a signal.
// PeerSession does the WebRTC side of each match. The protocol is documented in docs/protocol.md.

/** The protocol version this client speaks (the relay's `welcome` says which it speaks). */
export const PROTOCOL = 1;

/** Defaults of the RelayClient options (all overridable). */
export const DEFAULTS = Object.freeze({
  interests: [],
  initialDelay: 500, // ms: the first reconnect waits up to this long (full jitter)
  maxDelay: 15000, // ms: no reconnect waits longer than this
  attemptsPerUrl: 3, // failed attempts on one URL before trying the next
  connectTimeout: 10000, // ms: an attempt that has not opened by then counts as failed
  pingInterval: 25000, // ms: a quiet connection sends a ping this often...
  pongTimeout: 10000, // ms: ...and is given up as dead if nothing arrives in this time
  rejoinAfterPeerLeft: true, // when the peer leaves, queue up again for the next person
  token: null, // a JWT for relays that require one (or a function returning one, called per connection)
  maxQueuedSignals: 100, // signals kept while the connection is being resumed
  fallback: true, // after attemptsPerUrl failed WebSockets to a relay that answers HTTP, use its HTTP fallback
  upgradeInterval: 60000, // ms: on the fallback, how often to try a WebSocket again
});

/**
 * The relay's HTTP base for a WebSocket URL: `wss://a.example/ws` -> `https://a.example`.
 * @param {string} url
 * @returns {string}
 */
export function httpBase(url) {
  const u = new URL(url);
  u.protocol = u.protocol === "wss:" ? "https:" : "http:";
  return `${u.origin}${u.pathname.replace(/\/ws$/, "")}`;
}

/**
 * The URL a reconnection opens: the relay's, naming the client it resumes (`?resume=<id>`), so that
 * a cluster on Fly.io can have its proxy take the connection to the machine holding that client.
 * @param {string} url
 * @param {string} clientId
 * @returns {string}
 */
export function resumeUrl(url, clientId) {
  try {
    const u = new URL(url);
    u.searchParams.set("resume", clientId);
    return u.toString();
  } catch {
    return url; // (not a URL: the attempt fails as it would have)
  }
}

/**
 * Parse one Server-Sent Events block (the lines between two blank lines) of the fallback stream.
 * @param {string} block
 * @returns {{event: string, data: string | null, comment: boolean}}
 */
export function parseEvent(block) {
  let event = "message";
  const data = [];
  let comment = false;
  for (const line of block.split(/\r\n|\r|\n/)) {
    if (line.startsWith(":")) comment = true;
    else if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(line[5] === " " ? 6 : 5));
  }
  return { event, data: data.length ? data.join("\n") : null, comment };
}

/**
 * The relay's HTTP fallback (docs/protocol.md, "The HTTP fallback") behind the part of the WebSocket
 * interface RelayClient uses: `readyState`, `send(text)`, `close()`, `onopen`, `onmessage`, `onclose`.
 * The relay's messages come on one streaming response (`POST /fallback/open`, read with fetch(), not
 * EventSource: it carries Origin and Authorization and never reconnects on its own); what is sent
 * goes in POSTs, one at a time so that order holds, batching what waits meanwhile. A keepalive
 * comment is answered with a ping. Any failure ends it as a dropped WebSocket would (1006).
 */
/** Characters of messages one fallback POST carries at most (the relay takes 64 KiB; UTF-8 may be longer). */
export const MAX_POST_CHARS = 16 * 1024;

export class FallbackSocket {
  /**
   * @param {string} url the relay's WebSocket URL (its HTTP base is derived from it)
   * @param {{token?: string | null, fetch?: typeof fetch, timers?: {setTimeout: Function}}} [options]
   */
  constructor(url, { token = null, fetch: fetchImpl, timers } = {}) {
    this.url = url;
    this.readyState = 0; // as a WebSocket's: 0 connecting, 1 open, 3 closed
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    this._base = httpBase(url);
    this._fetch = fetchImpl || globalThis.fetch.bind(globalThis);
    this._timers = timers || globalThis;
    this._token = token;
    this._credential = null;
    this._outbox = [];
    this._posting = false;
    this._abort = new AbortController();
    this._run();
  }

  send(text) {
    if (this.readyState !== 1) return;
    this._outbox.push(text);
    this._post();
  }

  close(code = 1000, reason = "") {
    this._finish(code, reason);
  }

  _headers(extra) {
    return this._token ? { ...extra, Authorization: `Bearer ${this._token}` } : extra;
  }

  async _run() {
    let response;
    try {
      response = await this._fetch(`${this._base}/fallback/open`, {
        method: "POST",
        headers: this._headers({ "X-Relay-Fallback": "1" }),
        cache: "no-store",
        signal: this._abort.signal,
      });
    } catch {
      this._finish(1006, "");
      return;
    }
    if (!response.ok || !response.body) {
      this._finish(1006, `HTTP ${response.status}`);
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || this.readyState === 3) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while (this.readyState !== 3 && (end = buffer.indexOf("\n\n")) >= 0) {
          this._event(parseEvent(buffer.slice(0, end)));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch {
      // aborted, or the connection broke
    }
    this._finish(1006, "");
  }

  _event({ event, data, comment }) {
    if (data === null) {
      if (comment && this.readyState === 1) this.send('{"type":"ping"}'); // the relay asks for a sign of life
      return;
    }
    if (event === "stream") {
      this._credential = JSON.parse(data).stream;
      this.readyState = 1;
      this.onopen?.({});
    } else if (event === "close") {
      const { code, reason } = JSON.parse(data);
      this._finish(code, reason);
    } else if (event === "message") {
      this.onmessage?.({ data });
    }
  }

  async _post() {
    if (this._posting || !this._outbox.length || this.readyState !== 1) return;
    this._posting = true;
    let count = 0;
    for (let size = 0; count < this._outbox.length; count++) {
      size += this._outbox[count].length + 1;
      if (count > 0 && size > MAX_POST_CHARS) break; // the rest goes in the next POST
    }
    const body = this._outbox.splice(0, count).join("\n");
    let status = 0;
    try {
      const response = await this._fetch(`${this._base}/fallback/send`, {
        method: "POST",
        headers: this._headers({ "X-Relay-Stream": this._credential, "Content-Type": "text/plain" }),
        body,
        cache: "no-store",
      });
      status = response.status;
    } catch {
      // the network: as a dropped connection
    }
    this._posting = false;
    if (status !== 204) this._finish(1006, status ? `HTTP ${status}` : "");
    else this._post();
  }

  _finish(code, reason) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this._abort.abort();
    this._timers.setTimeout(() => this.onclose?.({ code, reason, wasClean: code !== 1006 }), 0);
  }
}

/**
 * How long to wait before reconnect attempt number `attempt` (0 for the first), in ms:
 * "full jitter" (a uniformly random wait between 0 and min(maxDelay, initialDelay * 2^attempt)),
 * so that thousands of clients dropped at once by a deploy do not come back at once.
 * @param {number} attempt
 * @param {{initialDelay: number, maxDelay: number}} options
 * @param {() => number} [random] a source of numbers in [0, 1)
 * @returns {number}
 */
export function backoffDelay(attempt, { initialDelay, maxDelay }, random = Math.random) {
  const ceiling = Math.min(maxDelay, initialDelay * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/**
 * Which URL to try next: the same one until it has failed `attemptsPerUrl` times in a row, then the
 * next in the list (wrapping around). After a connection succeeds, the next failure cycle starts again
 * from the first URL: the list is in order of preference.
 */
export class UrlRotation {
  /** @param {string[]} urls @param {number} attemptsPerUrl */
  constructor(urls, attemptsPerUrl) {
    if (!urls.length) throw new TypeError("RelayClient needs at least one URL");
    this.urls = urls;
    this.attemptsPerUrl = attemptsPerUrl;
    this.index = 0;
    this.failures = 0;
  }
  /** @returns {string} the URL for the next attempt */
  get current() {
    return this.urls[this.index];
  }
  /** The current URL failed once. */
  failed() {
    this.failures += 1;
    if (this.failures >= this.attemptsPerUrl) {
      this.failures = 0;
      this.index = (this.index + 1) % this.urls.length;
    }
  }
  /** The current URL worked: from the next drop on, prefer the first URL again. */
  succeeded() {
    this.failures = 0;
    this.index = 0;
  }
}

/**
 * ICE candidates that arrive before the remote description is set cannot be added yet; they wait
 * here, in order, and are handed over once it is.
 */
export class CandidateQueue {
  constructor() {
    /** @type {RTCIceCandidateInit[]} */
    this.pending = [];
    this.ready = false;
  }
  /**
   * Take a candidate: returns it if it can be added now, else keeps it and returns null.
   * @param {RTCIceCandidateInit} candidate
   * @returns {RTCIceCandidateInit | null}
   */
  push(candidate) {
    if (this.ready) return candidate;
    this.pending.push(candidate);
    return null;
  }
  /** The remote description is set: returns the kept candidates, in arrival order. */
  drain() {
    this.ready = true;
    const out = this.pending;
    this.pending = [];
    return out;
  }
  /** A new negotiation starts from scratch (a new peer). */
  reset() {
    this.pending = [];
    this.ready = false;
  }
}

/** A JSON object from a message's text, or null for anything else. */
function parse(text) {
  try {
    const msg = JSON.parse(text);
    return msg && typeof msg === "object" ? msg : null;
  } catch {
    return null;
  }
}

/**
 * A connection to the relay, kept alive across drops. Events (CustomEvent, `detail` as listed):
 *
 * - `connected`: `{clientId, url}`; the relay said welcome.
 * - `queued`: the relay's `queued` message: `{position, queue_size}` ("You are #3 in line").
 * - `matched`: the relay's `matched` message: `{session_id, peer_id, initiator, interests, ice_servers}`.
 * - `signal`: the relay's `signal` message: `{data}` from the peer.
 * - `peerleft`: the relay's `peer_left` message: `{session_id, reason}`.
 * - `ended`: any end of the current session: `{session_id, reason, by}` with `by` "peer" (peer_left),
 *   "self" (next, leave, close) or "connection" (the connection dropped and could not be resumed).
 * - `resumed`: the relay's `resumed` message: the connection came back and kept its place or session
 *   (the RTCPeerConnection never noticed); signals missed meanwhile follow.
 * - `sessionlost`: cancelable, `detail` the session's `matched` message: the relay no longer knows the
 *   session (it restarted, or the resume came too late). Cancel it (`preventDefault()`, as PeerSession
 *   does while its call still connects the two browsers) to keep the call: the client is then
 *   `detached`, the call goes on browser to browser, nothing more is signaled, and `next()`/`leave()`
 *   still work (the peer is told over the data channel); else the session ends (`ended`, "connection").
 * - `peerreconnecting` / `peerresumed`: the peer's connection vanished / came back (the call goes on).
 * - `reconnecting`: `{attempt, delay, url}`: the next attempt, in `delay` ms.
 * - `disconnected`: `{code, reason, willReconnect}`: the connection (WebSocket or fallback) closed.
 * - `transport`: `{transport}`: the client now reaches the relay over "websocket" or "fallback" (HTTP).
 * - `error`: the relay's `error` message `{code, message}`, or `{code: "protocol", message}` when the
 *   relay speaks another protocol version.
 */
export class RelayClient extends EventTarget {
  /**
   * @param {string | string[]} urls relay WebSocket URLs, in order of preference
   * @param {Partial<typeof DEFAULTS> & {WebSocket?: typeof WebSocket, timers?: {setTimeout: Function, clearTimeout: Function}, random?: () => number}} [options]
   */
  constructor(urls, options = {}) {
    super();
    const { WebSocket: WS, timers, random, fetch: fetchImpl, ...rest } = options;
    this.options = { ...DEFAULTS, ...rest };
    this.rotation = new UrlRotation(Array.isArray(urls) ? [...urls] : [urls], this.options.attemptsPerUrl);
    this._WebSocket = WS || globalThis.WebSocket;
    this._timers = timers || globalThis;
    this._random = random || Math.random;
    this._fetch = fetchImpl || globalThis.fetch?.bind(globalThis);
    /** @type {string[]} */
    this.interests = [...this.options.interests];
    /** "connecting" | "open" | "reconnecting" | "closed" */
    this.connection = "connecting";
    /** "idle" | "queued" | "matched": where the relay has this client */
    this.state = "idle";
    this.clientId = null;
    this.resumeToken = null; // sent in `resume` after a lost connection
    this.lastSignal = 0; // the number ("n") of the last signal received: resume asks for the rest
    this.session = null; // the current `matched` message, while matched
    this.detached = false; // the relay lost the session but the call goes on (see `sessionlost`)
    this.url = null; // the URL of the open connection
    /** "websocket" | "fallback": how this client reaches the relay (the `transport` event says when it changes) */
    this.transport = "websocket";
    this._fallback = false; // the next attempts use the HTTP fallback (WebSockets failed where HTTP works)
    this._probe = null; // on the fallback: a WebSocket being tried, to move back to
    this._probeTimer = null;
    this._wantMatch = false; // join/next called, and no leave since: re-join after a reconnect
    this._attempt = 0; // consecutive failed attempts, for the backoff
    this._resumable = false; // the relay may still hold this client: try resume before anything else
    this._resuming = null; // the new connection's welcome, while its resume is pending (the fallback)
    this._outbox = []; // signals sent while the connection was being resumed
    this._ws = null;
    this._timer = null;
    this._pingTimer = null;
    this._pongTimer = null;
    this._closed = false;
    this._onOnline = () => this._reconnectNow();
    globalThis.addEventListener?.("online", this._onOnline);
    this._open();
  }

  /** Ask for a match (queue up). Interests, if given, replace the current ones. */
  join({ interests } = {}) {
    if (interests !== undefined) this.interests = [...interests];
    this._wantMatch = true;
    this._send({ type: "join", interests: this.interests });
  }

  /** End the current session (if any) and queue up again. */
  next() {
    this._wantMatch = true;
    this._endSession("next", "self");
    if (!this._send({ type: "next" })) this._resumable = false; // the relay will not know: start afresh
  }

  /** Leave the queue or the session; stay connected, idle. */
  leave() {
    this._wantMatch = false;
    this._endSession("left", "self");
    if (!this._send({ type: "leave" })) this._resumable = false;
  }

  /** Report the current peer (abuse): the session ends and the two are never paired again. */
  report(reason = "") {
    if (this.state !== "matched" || this.detached) return false;
    this._endSession("reported", "self");
    this._send({ type: "report", reason: String(reason).slice(0, 200) });
    if (this._wantMatch) this._send({ type: "join", interests: this.interests });
    return true;
  }

  /** The peer ended a detached session itself (it said so over the data channel): the call is over. */
  peerGone(reason = "left") {
    if (!this.detached || !this.session) return;
    this._emit("peerleft", { type: "peer_left", session_id: this.session.session_id, reason });
    this._endSession(reason, "peer");
    if (this.options.rejoinAfterPeerLeft && this._wantMatch) this._send({ type: "join", interests: this.interests });
  }

  /** Send `data` (a JSON-able object) to the current peer. Returns false if it could not be sent. */
  signal(data) {
    if (this.state !== "matched" || this.detached) return false;
    if (this.connection === "open" && !this._resuming) return this._send({ type: "signal", data });
    if (!this._resumable || this._outbox.length >= this.options.maxQueuedSignals) return false;
    this._outbox.push({ type: "signal", data }); // sent once the session is resumed
    return true;
  }

  /** Close for good: no reconnect. */
  close() {
    this._closed = true;
    this._wantMatch = false;
    this._endSession("left", "self");
    this._timers.clearTimeout(this._timer);
    this._stopKeepalive();
    this._stopProbing();
    globalThis.removeEventListener?.("online", this._onOnline);
    const ws = this._ws;
    this._ws = null;
    this.connection = "closed";
    if (ws && ws.readyState <= 1) ws.close(1000, "client closed");
    this._emit("disconnected", { code: 1000, reason: "client closed", willReconnect: false });
  }

  // -- internals ------------------------------------------------------------------------------------

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _send(msg) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1 || this.connection !== "open") return false;
    ws.send(JSON.stringify(msg));
    return true;
  }

  _connect(url, fallback = this._fallback) {
    const token = typeof this.options.token === "function" ? this.options.token() : this.options.token;
    if (fallback) return new FallbackSocket(url, { token, fetch: this._fetch, timers: this._timers });
    return token ? new this._WebSocket(url, ["relay-jwt", token]) : new this._WebSocket(url);
  }

  _open() {
    const url = this.rotation.current;
    const transport = this._fallback ? "fallback" : "websocket";
    let ws;
    try {
      const resuming = this._resumable && this.resumeToken && !this._fallback;
      ws = this._connect(resuming ? resumeUrl(url, this.clientId) : url);
    } catch (err) {
      // A malformed URL: count it as a failed attempt.
      this._failed(url, transport);
      return;
    }
    this._ws = ws;
    const giveUp = this._timers.setTimeout(() => ws.close(), this.options.connectTimeout);
    ws.onmessage = (event) => {
      if (ws !== this._ws) return;
      const msg = parse(event.data);
      if (msg?.type !== "welcome") return;
      this._timers.clearTimeout(giveUp);
      this._adopt(ws);
      this._setTransport(transport);
      this._welcome(msg, url);
    };
    ws.onclose = () => {
      this._timers.clearTimeout(giveUp);
      if (ws !== this._ws) return;
      this._ws = null;
      this._stopKeepalive();
      this._failed(url, transport);
    };
    ws.onerror = () => {}; // a close event always follows
  }

  _adopt(ws) {
    // A welcomed connection: every message is handled; its end is a drop (resumed on the next one).
    ws.onmessage = (event) => {
      if (ws !== this._ws) return;
      this._heard();
      const msg = parse(event.data);
      if (msg) this._handle(msg);
    };
    ws.onclose = (event) => {
      if (ws !== this._ws) return;
      this._ws = null;
      this._stopKeepalive();
      this._stopProbing();
      this._dropped(event);
    };
  }

  _setTransport(transport) {
    if (transport === "fallback") this._startProbing();
    if (transport === this.transport) return;
    this.transport = transport;
    this._emit("transport", { transport });
  }

  _welcome(msg, url) {
    if (msg.protocol !== PROTOCOL) {
      this._emit("error", { code: "protocol", message: `relay speaks protocol ${msg.protocol}, not ${PROTOCOL}` });
    }
    this.url = url;
    this.connection = "open";
    this._attempt = 0;
    this.rotation.succeeded();
    this._startKeepalive();
    if (this._resumable && this.resumeToken) {
      // The relay may still hold our place or session: ask for it (and for the signals we missed).
      this._resuming = msg;
      this._send({ type: "resume", token: this.resumeToken, last: this.lastSignal });
      return;
    }
    this._start(msg);
  }

  _start(welcome) {
    // A new client on the relay: its own id, and (if we want one and are not in a call) a fresh match.
    this.clientId = welcome.client_id;
    this.resumeToken = welcome.resume_token;
    this.lastSignal = 0;
    this._resumable = true;
    this._outbox = [];
    this._emit("connected", { clientId: this.clientId, url: this.url });
    if (this._wantMatch && !this.detached) this._send({ type: "join", interests: this.interests });
  }

  _sessionLost() {
    // The relay no longer has our session: keep the call if a listener says it still connects us.
    if (!this.session) return;
    if (this.detached) return; // already on our own
    const event = new CustomEvent("sessionlost", { detail: this.session, cancelable: true });
    if (!this.dispatchEvent(event)) {
      this.detached = true;
      this._outbox = [];
      return;
    }
    this._endSession("disconnected", "connection");
  }

  _resumed(msg) {
    this._resuming = null;
    this.clientId = msg.client_id;
    this.resumeToken = msg.resume_token;
    this._emit("connected", { clientId: this.clientId, url: this.url, resumed: true });
    this._emit("resumed", msg);
    if (msg.state === "matched" && this.session && msg.session_id === this.session.session_id) {
      this.state = "matched";
      for (const queued of this._outbox.splice(0)) this._send(queued);
      return;
    }
    this._outbox = [];
    this._sessionLost(); // it ended while we were away (or, detached, it is not the relay's anyway)
    if (this.detached) return; // in a call the relay does not know: join after it
    if (msg.state === "queued") {
      this.state = "queued";
      this._emit("queued", { type: "queued", position: msg.position, queue_size: msg.queue_size });
    } else if (msg.state === "idle" && this._wantMatch) {
      this._send({ type: "join", interests: this.interests });
    }
  }

  _handle(msg) {
    switch (msg.type) {
      case "queued":
        this.state = "queued";
        this._emit("queued", msg);
        break;
      case "matched":
        this.state = "matched";
        this.session = msg;
        this.detached = false;
        this._emit("matched", msg);
        break;
      case "signal":
        if (msg.n && msg.n <= this.lastSignal) break; // a repeat (moving between transports): had it
        if (msg.n) this.lastSignal = msg.n;
        if (this.state === "matched") this._emit("signal", msg);
        break;
      case "peer_left": {
        const current = this.session && this.session.session_id === msg.session_id;
        this._emit("peerleft", msg);
        this._endSession(msg.reason, "peer");
        if (current && this.options.rejoinAfterPeerLeft && this._wantMatch) {
          this._send({ type: "join", interests: this.interests });
        }
        break;
      }
      case "resumed":
        this._resumed(msg);
        break;
      case "peer_reconnecting":
        this._emit("peerreconnecting", msg);
        break;
      case "peer_resumed":
        this._emit("peerresumed", msg);
        break;
      case "error":
        if (msg.code === "resume_failed" && this._resuming) {
          // Too late, or the relay restarted: start afresh on this connection (a call may go on).
          const welcome = this._resuming;
          this._resuming = null;
          this._sessionLost();
          this._start(welcome);
          break;
        }
        this._emit("error", msg);
        break;
      default: // pong, left, draining, and anything newer: nothing to do
        break;
    }
  }

  _endSession(reason, by) {
    // After this, signals still in flight from the old peer are dropped (see _handle "signal").
    const session = this.session;
    const detached = this.detached;
    this.session = null;
    this.detached = false;
    this.state = "idle";
    if (session) this._emit("ended", { session_id: session.session_id, reason, by, detached });
  }

  _failed(url, transport) {
    const rotation = this.rotation;
    if (transport === "fallback") {
      // What worked last is tried again (the relay may be restarting); another URL starts with WebSockets.
      if (rotation.urls.length > 1 && rotation.failures + 1 >= rotation.attemptsPerUrl) this._fallback = false;
    } else if (this.options.fallback && this._fetch && rotation.failures + 1 >= rotation.attemptsPerUrl) {
      // WebSockets keep failing here. If the relay answers plain HTTP, a proxy is blocking them: fall back.
      this._reachable(url).then((reachable) => {
        if (this._closed) return;
        if (reachable) {
          this._fallback = true;
          rotation.failures = 0;
        } else {
          rotation.failed();
        }
        this._schedule();
      });
      return;
    }
    rotation.failed();
    this._schedule();
  }

  async _reachable(url) {
    try {
      await this._fetch(`${httpBase(url)}/healthz`, { cache: "no-store", mode: "no-cors" });
      return true;
    } catch {
      return false;
    }
  }

  _startProbing() {
    // On the fallback: try a WebSocket now and then; when one is welcomed, move the client to it.
    this._timers.clearTimeout(this._probeTimer);
    this._probeTimer = this._timers.setTimeout(() => this._tryWebSocket(), this.options.upgradeInterval);
  }

  _stopProbing() {
    this._timers.clearTimeout(this._probeTimer);
    this._probeTimer = null;
    const probe = this._probe;
    this._probe = null;
    if (probe && probe.readyState <= 1) probe.close(1000, "not needed");
  }

  _tryWebSocket() {
    // The move loses nothing: the probe resumes this client, the relay ends the stream (4000) and
    // replays on the probe the signals after the last one read; what the probe gets waits until the
    // stream has ended, and signals that came both ways are dropped (their n is not new).
    this._probeTimer = null;
    const stream = this._ws;
    if (this.transport !== "fallback" || this.connection !== "open" || this._resuming || !stream) return;
    let probe;
    try {
      probe = this._connect(this.url, false);
    } catch {
      this._startProbing();
      return;
    }
    this._probe = probe;
    const waiting = [];
    let moving = false;
    const giveUp = this._timers.setTimeout(() => probe.close(), this.options.connectTimeout);
    probe.onmessage = (event) => {
      if (probe !== this._probe) return;
      const msg = parse(event.data);
      if (!msg) return;
      if (!moving) {
        if (msg.type !== "welcome" || this._ws !== stream || this.connection !== "open" || this._resuming) {
          probe.close(1000, "not needed");
          return;
        }
        moving = true;
        probe.send(JSON.stringify({ type: "resume", token: this.resumeToken, last: this.lastSignal }));
        return;
      }
      waiting.push(msg);
      if (msg.type === "error" && msg.code === "resume_failed") probe.close(1000, "not needed"); // stay
    };
    probe.onclose = () => {
      this._timers.clearTimeout(giveUp);
      if (probe !== this._probe) return;
      this._probe = null;
      if (this.transport === "fallback" && this._ws) this._startProbing(); // later, then
    };
    const adopt = () => {
      // The stream has ended (4000, or dropped): the probe is the connection now.
      this._timers.clearTimeout(giveUp);
      if (probe !== this._probe || probe.readyState !== 1) return false;
      this._probe = null;
      this._ws = probe;
      this._adopt(probe);
      this._fallback = false;
      this._setTransport("websocket");
      this._heard();
      for (const msg of waiting.splice(0)) this._handle(msg);
      return true;
    };
    const streamClosed = stream.onclose;
    stream.onclose = (event) => {
      if (moving && this._ws === stream && adopt()) return;
      streamClosed(event);
    };
  }

  _dropped(event) {
    // Keep the session: the next connection asks to resume it. Only if that fails does it end.
    if (!this._resumable) this._sessionLost();
    this._resuming = null;
    this.connection = "reconnecting";
    this._emit("disconnected", { code: event.code, reason: event.reason, willReconnect: !this._closed });
    this._schedule();
  }

  _schedule() {
    if (this._closed) return;
    this.connection = "reconnecting";
    const delay = backoffDelay(this._attempt, this.options, this._random);
    this._attempt += 1;
    this._emit("reconnecting", { attempt: this._attempt, delay, url: this.rotation.current });
    this._timers.clearTimeout(this._timer);
    this._timer = this._timers.setTimeout(() => {
      this._timer = null;
      this._open();
    }, delay);
  }

  _reconnectNow() {
    // The browser says the network is back: skip the rest of the wait.
    if (this._timer !== null && !this._closed) {
      this._timers.clearTimeout(this._timer);
      this._timer = null;
      this._open();
    }
  }

  _startKeepalive() {
    this._stopKeepalive();
    this._pingTimer = this._timers.setTimeout(() => {
      this._send({ type: "ping" });
      this._pongTimer = this._timers.setTimeout(() => this._ws?.close(), this.options.pongTimeout);
    }, this.options.pingInterval);
  }

  _heard() {
    // Anything from the relay proves the connection alive: restart the keepalive cycle.
    if (this.connection === "open") this._startKeepalive();
  }

  _stopKeepalive() {
    this._timers.clearTimeout(this._pingTimer);
    this._timers.clearTimeout(this._pongTimer);
    this._pingTimer = this._pongTimer = null;
  }
}

/**
 * The WebRTC side of each match: one RTCPeerConnection per session, negotiated through the relay.
 *
 * - The `initiator` (the side that waited) adds its tracks, a "chat" data channel (text messages) and
 *   a "control" one (`{"bye": reason}` when a side ends a call the relay lost) and makes the
 *   offer; the other side adds its tracks when the offer arrives. Later renegotiations use the
 *   "perfect negotiation" pattern (the non-initiator is polite), so glare never deadlocks.
 * - ICE candidates that arrive before the remote description are queued, not lost.
 * - `ice_servers` from `matched` are used (plus `rtcConfig`, e.g. `{iceTransportPolicy: "relay"}`).
 * - On peer_left, next, leave or a dropped connection the RTCPeerConnection is closed.
 *
 * Events (CustomEvent): `statechange` `{connectionState, iceConnectionState, signalingState}`,
 * `track` (the RTCTrackEvent), `channelopen`, `message` `{text}` (chat), `closed` `{reason}`, and
 * `candidateerror` `{errorCode, errorText, url}` when a STUN/TURN server refuses (401: bad credentials).
 */
export class PeerSession extends EventTarget {
  /**
   * @param {RelayClient} client
   * @param {{stream?: MediaStream | null, onTrack?: (event: RTCTrackEvent) => void, rtcConfig?: RTCConfiguration}} [options]
   */
  constructor(client, { stream = null, onTrack = null, rtcConfig = {} } = {}) {
    super();
    this.client = client;
    this.stream = stream;
    this.onTrack = onTrack;
    this.rtcConfig = rtcConfig;
    /** @type {RTCPeerConnection | null} the current session's connection */
    this.pc = null;
    /** @type {RTCDataChannel | null} */
    this.channel = null;
    /** @type {{errorCode: number, errorText: string, url: string}[]} this session's ICE server errors (last 10) */
    this.candidateErrors = [];
    this.sessionId = null;
    this.polite = false;
    this.candidates = new CandidateQueue();
    this._makingOffer = false;
    this._ignoreOffer = false;
    this._tracksAdded = false;
    /** @type {RTCDataChannel | null} */
    this.control = null;
    this._listeners = {
      matched: (e) => this._start(e.detail),
      signal: (e) => this._onSignal(e.detail.data).catch((err) => this._fail(err)),
      ended: (e) => this._ended(e.detail),
      sessionlost: (e) => {
        // The relay restarted under a working call: keep it (the two browsers need no relay to talk).
        if (this.pc?.connectionState === "connected" && this.control?.readyState === "open") e.preventDefault();
      },
    };
    for (const [type, fn] of Object.entries(this._listeners)) client.addEventListener(type, fn);
  }

  /** Send a chat message over the data channel. Returns false if it is not open. */
  send(text) {
    if (this.channel?.readyState !== "open") return false;
    this.channel.send(String(text));
    return true;
  }

  /** Stop handling matches (and close the current connection). */
  close() {
    for (const [type, fn] of Object.entries(this._listeners)) this.client.removeEventListener(type, fn);
    this._stop("closed");
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _start(matched) {
    this._stop("replaced");
    this.sessionId = matched.session_id;
    this.polite = !matched.initiator;
    this.candidates.reset();
    this.candidateErrors = [];
    this._makingOffer = this._ignoreOffer = this._tracksAdded = false;
    const pc = new RTCPeerConnection({ ...this.rtcConfig, iceServers: matched.ice_servers || [] });
    this.pc = pc;
    const report = () => {
      if (pc !== this.pc) return;
      this._emit("statechange", {
        connectionState: pc.connectionState,
        iceConnectionState: pc.iceConnectionState,
        signalingState: pc.signalingState,
      });
    };
    pc.onsignalingstatechange = report;
    pc.onconnectionstatechange = () => {
      report();
      // A call the relay lost that breaks: nobody can renegotiate it; it is over.
      if (pc === this.pc && this.client.detached && ["failed", "closed"].includes(pc.connectionState)) {
        this.client.peerGone("disconnected");
      }
    };
    pc.oniceconnectionstatechange = () => {
      report();
      // The network changed under the call (a phone switched to mobile data): the initiator
      // restarts ICE, which renegotiates through the relay.
      if (pc === this.pc && pc.iceConnectionState === "failed" && !this.polite) pc.restartIce();
    };
    pc.ontrack = (event) => {
      if (pc !== this.pc) return;
      this.onTrack?.(event);
      this._emit("track", event);
    };
    pc.onicecandidate = ({ candidate }) => {
      if (candidate && pc === this.pc) this.client.signal({ candidate: candidate.toJSON() });
    };
    pc.ondatachannel = ({ channel }) => (channel.label === "control" ? this._useControl(channel) : this._useChannel(channel));
    pc.onicecandidateerror = ({ errorCode, errorText, url }) => {
      if (pc !== this.pc) return;
      const error = { errorCode, errorText, url };
      this.candidateErrors = [...this.candidateErrors.slice(-9), error];
      this._emit("candidateerror", error);
    };
    pc.onnegotiationneeded = async () => {
      if (pc !== this.pc || (this.polite && !this._tracksAdded)) return; // the answerer waits for the offer
      try {
        this._makingOffer = true;
        await pc.setLocalDescription();
        if (pc === this.pc) this.client.signal({ description: pc.localDescription.toJSON() });
      } catch (err) {
        this._fail(err);
      } finally {
        this._makingOffer = false;
      }
    };
    if (!this.polite) {
      this._useChannel(pc.createDataChannel("chat"));
      this._useControl(pc.createDataChannel("control"));
      this._addTracks();
    }
    report();
  }

  _addTracks() {
    const pc = this.pc;
    this._tracksAdded = true;
    if (this.stream) {
      for (const track of this.stream.getTracks()) pc.addTrack(track, this.stream);
    } else {
      // No camera: still receive the peer's audio and video.
      pc.addTransceiver("audio", { direction: "recvonly" });
      pc.addTransceiver("video", { direction: "recvonly" });
    }
  }

  _useChannel(channel) {
    this.channel = channel;
    channel.onopen = () => channel === this.channel && this._emit("channelopen", {});
    channel.onmessage = (event) => channel === this.channel && this._emit("message", { text: String(event.data) });
  }

  _useControl(channel) {
    this.control = channel;
    channel.onmessage = (event) => {
      if (channel !== this.control) return;
      const msg = parse(String(event.data));
      if (msg && typeof msg.bye === "string") this.client.peerGone(msg.bye);
    };
  }

  _ended({ reason, by, detached }) {
    // A call the relay lost, ended here: the peer can only learn it from us.
    const pc = this.pc;
    if (pc && detached && by === "self" && this.control?.readyState === "open") {
      this.control.send(JSON.stringify({ bye: reason }));
      this.pc = this.channel = this.control = this.sessionId = null;
      setTimeout(() => pc.close(), 300); // a moment later, so that the bye leaves first
      this._emit("closed", { reason });
      return;
    }
    this._stop(reason);
  }

  async _onSignal(data) {
    const pc = this.pc;
    if (!pc || !data) return;
    if (data.description) {
      const description = data.description;
      const collision = description.type === "offer" && (this._makingOffer || pc.signalingState !== "stable");
      this._ignoreOffer = !this.polite && collision;
      if (this._ignoreOffer) return;
      await pc.setRemoteDescription(description);
      if (pc !== this.pc) return;
      for (const candidate of this.candidates.drain()) await this._addCandidate(pc, candidate);
      if (description.type === "offer") {
        if (!this._tracksAdded) this._addTracks(); // the answerer's tracks ride on the first answer
        await pc.setLocalDescription();
        if (pc === this.pc) this.client.signal({ description: pc.localDescription.toJSON() });
      }
    } else if (data.candidate) {
      const now = this.candidates.push(data.candidate);
      if (now) await this._addCandidate(pc, now);
    }
  }

  async _addCandidate(pc, candidate) {
    try {
      await pc.addIceCandidate(candidate);
    } catch (err) {
      if (!this._ignoreOffer) throw err; // candidates of an offer we ignored may fail: fine
    }
  }

  _stop(reason) {
    const pc = this.pc;
    if (!pc) return;
    this.pc = null;
    this.channel = null;
    this.control = null;
    this.sessionId = null;
    pc.close();
    this._emit("closed", { reason });
  }

  _fail(err) {
    console.error("relay PeerSession:", err);
    this._emit("statechange", {
      connectionState: "failed",
      iceConnectionState: this.pc?.iceConnectionState ?? "closed",
      signalingState: this.pc?.signalingState ?? "closed",
      error: String(err),
    });
  }
}
