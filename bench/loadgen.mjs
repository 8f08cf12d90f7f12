// The load generator of bench/load.py, in Node: drives the relay or PeerJS 1.0.2 with the same
// traffic from one process and prints one line of JSON.
//
//   node bench/loadgen.mjs throughput relay|peerjs PORT PAIRS SECONDS [RATE] [PROBES] [MIX]
//   (PORT may be two ports, "8080,8081": each pair's first side on the first, its second on the other:
//   two relay nodes of a cluster)
//   node bench/loadgen.mjs handshakes relay|peerjs PORT SECONDS CONCURRENCY
//   node bench/loadgen.mjs idle relay|peerjs PORT COUNT [join|wait]  (prints "ready", waits for stdin to close;
//                                                                     join: in pairs, matched; wait: queued, each
//                                                                     with an interest of its own)
//
// It speaks WebSocket over plain sockets: every frame it sends is built once (masked with the key 0,
// which RFC 6455 allows), and of what it receives it parses frame headers only, so it costs far less
// per message than either server (its own CPU use is reported: a generator near 100 % would mean the
// figure measures the generator). Both servers get the same pairs, the same messages (an SDP of ~2 KB
// then ten ICE candidates of ~250 B, over and over, both ways), the same window (at most WINDOW
// messages in flight per side); only the envelope differs: the relay's {"type":"signal","data":...}
// to the peer it matched, PeerJS's {"type":"OFFER","dst":id,"payload":...} to the id it names.
// MIX (relay only): "ws-ws" (the default), "ws-fb" or "fb-fb": which sides of each pair (and of the
// latency probes) use the relay's HTTP fallback (a stream of Server-Sent Events; one POST at a time,
// on a connection of its own, carrying what waits, one message per line) instead of a WebSocket.
import net from "node:net";
import crypto from "node:crypto";

const WINDOW = 22; // messages in flight per side (two cycles)
const [mode, server, port, ...rest] = process.argv.slice(2);
const PORTS = port.split(",").map(Number);
const PORT = PORTS[0];
const RELAY = server === "relay";

function frame(payload, opcode = 0x1) {
  const data = Buffer.from(payload);
  const n = data.length;
  let head;
  if (n < 126) head = Buffer.from([0x80 | opcode, 0x80 | n]);
  else if (n < 65536) head = Buffer.from([0x80 | opcode, 0x80 | 126, n >> 8, n & 0xff]);
  else throw new Error("too large");
  return Buffer.concat([head, Buffer.alloc(4), data]);
}

const SDP_HEAD = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n";
const SDP = { sdp: { type: "offer", sdp: SDP_HEAD + "a=x:" + "x".repeat(2048 - 80 - SDP_HEAD.length) } };
const CANDIDATE = {
  candidate: {
    candidate:
      "candidate:842163049 1 udp 1677729535 203.0.113.7 46154 typ srflx raddr 10.0.0.2 " +
      "rport 46154 generation 0 ufrag EEtu network-cost 999",
    sdpMid: "0",
    sdpMLineIndex: 0,
    usernameFragment: "EEtu",
  },
};

function cycle(to, fallback = false) {
  // what one side sends, over and over: 11 frames in one buffer (for the fallback: 11 lines)
  const wrap = RELAY
    ? (data) => JSON.stringify({ type: "signal", data })
    : (data) => JSON.stringify({ type: data.sdp ? "OFFER" : "CANDIDATE", dst: to, payload: data });
  if (fallback) return [wrap(SDP), ...Array(10).fill(wrap(CANDIDATE))].join("\n");
  return Buffer.concat([frame(wrap(SDP)), ...Array(10).fill(frame(wrap(CANDIDATE)))]);
}
const CYCLE_LENGTH = 11;

class Conn {
  // One raw WebSocket client connection.
  constructor(id, to = PORT) {
    this.id = id;
    this.port = to;
    this.buf = Buffer.alloc(0);
    this.received = 0;
    this.onFrames = null; // (count, lastPayload) while streaming
    this.waiters = [];
  }

  open() {
    return new Promise((resolve, reject) => {
      const path = RELAY ? "/ws" : `/peerjs?key=peerjs&id=${this.id}&token=${this.id}`;
      const sock = net.connect({ port: this.port, host: "127.0.0.1" });
      this.sock = sock;
      sock.setNoDelay(true);
      let head = Buffer.alloc(0);
      const onData = (chunk) => {
        head = Buffer.concat([head, chunk]);
        const end = head.indexOf("\r\n\r\n");
        if (end < 0) return;
        sock.off("data", onData);
        if (!head.subarray(0, 12).toString().startsWith("HTTP/1.1 101")) {
          reject(new Error(head.subarray(0, end).toString()));
          return;
        }
        sock.on("data", (data) => this.data(data));
        this.data(head.subarray(end + 4));
        resolve(this);
      };
      sock.on("data", onData);
      sock.on("error", (err) => reject(err));
      sock.on("connect", () => {
        const key = crypto.randomBytes(16).toString("base64");
        sock.write(
          `GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
            `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
        );
      });
    });
  }

  data(chunk) {
    let buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    let pos = 0;
    let frames = 0;
    const size = buf.length;
    let last = null;
    while (size - pos >= 2) {
      let n = buf[pos + 1] & 0x7f;
      let offset = 2;
      if (n === 126) {
        if (size - pos < 4) break;
        n = buf.readUInt16BE(pos + 2);
        offset = 4;
      } else if (n === 127) {
        if (size - pos < 10) break;
        n = Number(buf.readBigUInt64BE(pos + 2));
        offset = 10;
      }
      if (size - pos < offset + n) break;
      const opcode = buf[pos] & 0x0f;
      if (opcode === 0x9) this.sock.write(frame(buf.subarray(pos + offset, pos + offset + n), 0xa));
      else if (opcode === 0x1) {
        frames += 1;
        if (!this.onFrames || this.waiters.length) last = buf.subarray(pos + offset, pos + offset + n);
        if (this.waiters.length) this.message(last.toString());
      } else if (opcode === 0x8) this.closed = true;
      pos += offset + n;
    }
    this.buf = pos < size ? Buffer.from(buf.subarray(pos)) : Buffer.alloc(0);
    this.received += frames;
    if (this.onFrames && frames) this.onFrames(frames);
  }

  message(text) {
    const msg = JSON.parse(text);
    const waiter = this.waiters[0];
    if (waiter && waiter.types.includes(msg.type)) {
      this.waiters.shift();
      waiter.resolve(msg);
    }
  }

  expect(...types) {
    // the next message of one of these types (others are skipped)
    return new Promise((resolve) => this.waiters.push({ types, resolve }));
  }

  send(data) {
    this.sock.write(typeof data === "string" ? frame(data) : data);
  }

  close() {
    // a clean close: the close frame (1000), then the end of the connection
    this.sock.end(Buffer.from([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]));
  }
}

class FallbackConn {
  // One client of the relay's HTTP fallback, with Conn's interface.
  constructor(id, to = PORT) {
    this.id = id;
    this.port = to;
    this.buf = "";
    this.received = 0;
    this.onFrames = null;
    this.waiters = [];
    this.outbox = [];
    this.posting = false;
  }

  open() {
    return new Promise((resolve, reject) => {
      const sock = net.connect({ port: this.port, host: "127.0.0.1" });
      this.sock = sock;
      sock.setNoDelay(true);
      sock.setEncoding("utf8");
      let head = "";
      const onData = (chunk) => {
        head += chunk;
        const end = head.indexOf("\r\n\r\n");
        if (end < 0) return;
        sock.off("data", onData);
        if (!head.startsWith("HTTP/1.1 200")) {
          reject(new Error(head.slice(0, end)));
          return;
        }
        this.opened = resolve;
        sock.on("data", (data) => this.data(data));
        this.data(head.slice(end + 4));
      };
      sock.on("data", onData);
      sock.on("error", (err) => reject(err));
      sock.on("connect", () => {
        sock.write(`POST /fallback/open HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Relay-Fallback: 1\r\nContent-Length: 0\r\n\r\n`);
      });
    });
  }

  data(chunk) {
    const buf = this.buf + chunk;
    let pos = 0;
    let frames = 0;
    let end;
    while ((end = buf.indexOf("\n\n", pos)) >= 0) {
      if (buf.startsWith("data: ", pos)) {
        frames += 1;
        if (this.waiters.length) this.message(buf.slice(pos + 6, end));
      } else if (buf.startsWith("event: stream\ndata: ", pos)) {
        this.credential = JSON.parse(buf.slice(pos + 20, end)).stream;
        this.opened(this);
      } else if (buf[pos] === ":") {
        this.send('{"type":"ping"}'); // a keepalive: a sign of life
      }
      pos = end + 2;
    }
    this.buf = buf.slice(pos);
    this.received += frames;
    if (this.onFrames && frames) this.onFrames(frames);
  }

  message(text) {
    Conn.prototype.message.call(this, text);
  }

  expect(...types) {
    return new Promise((resolve) => this.waiters.push({ types, resolve }));
  }

  send(data) {
    this.outbox.push(data);
    this.post();
  }

  post() {
    if (this.posting || !this.outbox.length) return;
    this.posting = true;
    const body = Buffer.from(this.outbox.splice(0).join("\n"));
    const s = net.connect({ port: this.port, host: "127.0.0.1" });
    s.setNoDelay(true);
    s.on("connect", () => {
      s.write(
        `POST /fallback/send HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Relay-Stream: ${this.credential}\r\n` +
          `Content-Length: ${body.length}\r\n\r\n`,
      );
      s.write(body);
    });
    const done = () => {
      if (!this.posting) return;
      this.posting = false;
      this.post();
    };
    s.on("data", () => {});
    s.on("close", done);
    s.on("error", done);
  }

  close() {
    this.sock.destroy();
  }
}

let counter = 0;
const newId = () => `${process.pid}x${(counter += 1)}`;

const MIX = (process.argv[9] || "ws-ws").split("-"); // per side of a pair: "ws" or "fb"

async function connect(kind = "ws", to = PORT) {
  const c = kind === "fb" ? new FallbackConn(newId(), to) : new Conn(newId(), to);
  const ready = c.expect(RELAY ? "welcome" : "OPEN");
  await c.open();
  await ready;
  return c;
}

async function pair() {
  const a = await connect(MIX[0], PORTS[0]);
  const b = await connect(MIX[1], PORTS[PORTS.length - 1]);
  if (RELAY) {
    const queued = a.expect("queued");
    a.send('{"type":"join"}');
    await queued;
    const matchedA = a.expect("matched");
    const matchedB = b.expect("matched");
    b.send('{"type":"join"}');
    await Promise.all([matchedA, matchedB]);
  }
  return [a, b];
}

function cpu() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function percentile(sorted, p) {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] : null;
}

async function probeLatency(samples) {
  // relay: join sent -> matched received by the side that completes a pair. PeerJS has no queue: its
  // equivalent is the first message between two fresh connections (sent -> received).
  const a = await connect(MIX[0], PORTS[0]);
  const b = await connect(MIX[1], PORTS[PORTS.length - 1]);
  let start;
  if (RELAY) {
    const queued = a.expect("queued");
    a.send('{"type":"join"}');
    await queued;
    const matched = b.expect("matched");
    start = process.hrtime.bigint();
    b.send('{"type":"join"}');
    await matched;
  } else {
    const offer = b.expect("OFFER");
    start = process.hrtime.bigint();
    a.send(JSON.stringify({ type: "OFFER", dst: b.id, payload: SDP }));
    await offer;
  }
  samples.push(Number(process.hrtime.bigint() - start) / 1e6);
  a.close();
  b.close();
}

async function throughput(pairs, seconds, rate, probes) {
  const all = [];
  for (let i = 0; i < pairs; i++) all.push(await pair());
  const sides = [];
  for (const [a, b] of all) {
    sides.push([a, b], [b, a]);
  }
  // rate: messages per second in all (0: flat out); a side sends a cycle when its window allows
  // (and, paced, when it has a token: cycles per side per 10 ms tick)
  const perTick = rate ? rate / CYCLE_LENGTH / sides.length / 100 : 0;
  for (const [from, to] of sides) {
    const fallback = from instanceof FallbackConn;
    const blob = cycle(to.id, fallback);
    from.inFlight = 0;
    const pump = () => {
      while (from.inFlight <= WINDOW - CYCLE_LENGTH && (!perTick || from.tokens >= 1)) {
        from.inFlight += CYCLE_LENGTH;
        if (perTick) from.tokens -= 1;
        if (fallback) from.send(blob);
        else from.sock.write(blob);
      }
    };
    from.pump = pump;
    from.tokens = 1;
    to.onFrames = (n) => {
      from.inFlight -= n;
      pump();
    };
  }
  let timer = null;
  if (perTick) {
    timer = setInterval(() => {
      for (const [from] of sides) {
        from.tokens = Math.min(from.tokens + perTick, 2);
        from.pump();
      }
    }, 10);
  }
  for (const [from] of sides) from.pump();
  await sleep(1000); // warm-up
  const count = () => sides.reduce((sum, [, to]) => sum + to.received, 0);
  const t0 = process.hrtime.bigint();
  const c0 = cpu();
  const n0 = count();
  const samples = [];
  const probing = (async () => {
    while (samples.length < probes && Number(process.hrtime.bigint() - t0) / 1e9 < seconds) {
      await probeLatency(samples);
      await sleep(20);
    }
  })();
  await sleep(seconds * 1000);
  const n1 = count();
  const c1 = cpu();
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  if (timer) clearInterval(timer);
  await probing;
  samples.sort((x, y) => x - y);
  return {
    msgs_per_s: (n1 - n0) / wall,
    generator_cpu: (c1 - c0) / wall,
    latency_p50_ms: percentile(samples, 0.5),
    latency_p99_ms: percentile(samples, 0.99),
    latency_samples: samples.length,
  };
}

async function handshakes(seconds, concurrency) {
  // connect, upgrade (and the server's first message), close: as many as fit in `seconds`
  let done = 0;
  const t0 = process.hrtime.bigint();
  const c0 = cpu();
  const end = Date.now() + seconds * 1000;
  const worker = async () => {
    while (Date.now() < end) {
      const c = await connect();
      c.close();
      done += 1;
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  return { handshakes_per_s: done / wall, generator_cpu: (cpu() - c0) / wall };
}

async function idle(count, join) {
  const conns = [];
  const batch = 100;
  for (let i = 0; i < count; i += batch) {
    conns.push(...(await Promise.all(Array.from({ length: Math.min(batch, count - i) }, () => connect()))));
  }
  if (join === "wait" && RELAY) {
    for (let i = 0; i < conns.length; i++) {
      const queued = conns[i].expect("queued");
      conns[i].send(JSON.stringify({ type: "join", interests: [`w${i}`] }));
      await queued;
    }
  } else if (join && RELAY) {
    for (let i = 0; i < conns.length; i += 2) {
      const [a, b] = [conns[i], conns[i + 1]];
      const queued = a.expect("queued");
      a.send('{"type":"join"}');
      await queued;
      const matched = b.expect("matched");
      b.send('{"type":"join"}');
      await matched;
    }
  }
  process.stdout.write(JSON.stringify({ connections: conns.length }) + "\n");
  process.stdin.resume();
  await new Promise((r) => process.stdin.on("end", r));
  for (const c of conns) c.close();
}

let result;
if (mode === "throughput") {
  const [pairs, seconds, rate = "0", probes = "0"] = rest;
  result = await throughput(Number(pairs), Number(seconds), Number(rate), Number(probes));
} else if (mode === "handshakes") {
  const [seconds, concurrency] = rest;
  result = await handshakes(Number(seconds), Number(concurrency));
} else if (mode === "idle") {
  const [count, join] = rest;
  await idle(Number(count), join);
  process.exit(0);
} else {
  throw new Error(`unknown mode ${mode}`);
}
process.stdout.write(JSON.stringify(result) + "\n");
process.exit(0);
