// The demo page's script: a random video chat on top of relay-client.js.
//
// URL parameters (all optional): relay=ws://a/ws,ws://b/ws (default: this server's /ws),
// interests=music,film (prefills the field), policy=relay (force TURN: iceTransportPolicy "relay").

import { PeerSession, RelayClient } from "/relay-client.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const relays = (params.get("relay") || `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`)
  .split(",")
  .map((url) => url.trim())
  .filter(Boolean);
const rtcConfig = params.get("policy") === "relay" ? { iceTransportPolicy: "relay" } : {};
if (params.has("interests")) $("interests").value = params.get("interests");

let client = null;
let peer = null;
let countdown = null; // the "Reconnecting in 2.4 s…" timer

function setText(id, text) {
  $(id).textContent = text;
}

function notice(text) {
  // Stays until replaced: what a person must know (their camera), not a passing state.
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

function parseInterests(text) {
  const seen = new Set();
  for (const part of text.split(",")) {
    const interest = part.trim().toLowerCase().slice(0, 32);
    if (interest) seen.add(interest);
  }
  return [...seen].slice(0, 10);
}

function say(who, text) {
  const item = document.createElement("li");
  item.className = who;
  const name = document.createElement("strong");
  name.textContent = who === "you" ? "You: " : who === "stranger" ? "Stranger: " : "";
  item.append(name, document.createTextNode(text));
  $("chat-log").append(item);
  item.scrollIntoView({ block: "end" });
}

function chatEnabled(on) {
  $("chat-input").disabled = !on;
  $("chat-send").disabled = !on;
}

function running(on) {
  $("start").disabled = on;
  $("next").disabled = !on;
  $("stop").disabled = !on;
  $("interests").disabled = false;
}

async function openCamera() {
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
    notice("");
    return stream;
  } catch (err) {
    notice(`No camera or microphone (${err.name}): you will only see and hear the other side.`);
    return null;
  }
}

function closeCamera() {
  // Stop means stop: the camera light goes off, and nothing is sent until Start asks again.
  for (const track of peer?.stream?.getTracks() ?? []) track.stop();
  if (peer) peer.stream = null;
  $("local").srcObject = null;
}

async function start() {
  running(true);
  const interests = parseInterests($("interests").value);
  const stream = await openCamera();
  $("local").srcObject = stream;
  if (!client) {
    const upgrade = Number(params.get("upgrade-interval")); // on the HTTP fallback: ms between WebSocket tries
    client = new RelayClient(relays, { interests, ...(upgrade > 0 ? { upgradeInterval: upgrade } : {}) });
    peer = new PeerSession(client, {
      rtcConfig,
      onTrack: (event) => {
        $("remote").srcObject = event.streams[0] || new MediaStream([event.track]);
      },
    });
    wire(client, peer);
    window.demo = { client, peer, resumed: 0, peerReconnected: 0 }; // for tests and the curious
  }
  peer.stream = stream;
  setText("peer-state", "Looking for someone…");
  client.join({ interests });
}

function showConnection(text) {
  clearInterval(countdown);
  countdown = null;
  setText("connection", text);
}

function wire(client, peer) {
  const connectedText = () =>
    `Connected (${new URL(client.url).host}${client.transport === "fallback" ? ", over HTTP: WebSockets are blocked here" : ""})`;
  client.addEventListener("connected", () => {
    showConnection(connectedText());
    if (client.detached) setText("peer-state", "In a call. The server restarted; the call goes on.");
  });
  client.addEventListener("transport", () => {
    document.body.dataset.transport = client.transport;
    if (client.connection === "open") showConnection(connectedText());
  });
  client.addEventListener("reconnecting", (e) => {
    const until = Date.now() + e.detail.delay;
    const show = () => {
      const left = Math.max(0, until - Date.now());
      setText("connection", `Connection lost. Reconnecting in ${(left / 1000).toFixed(1)} s…`);
      if (left === 0) {
        clearInterval(countdown);
        countdown = null;
        setText("connection", "Connection lost. Reconnecting…");
      }
    };
    clearInterval(countdown);
    show();
    countdown = setInterval(show, 100);
  });
  client.addEventListener("disconnected", (e) => {
    if (!e.detail.willReconnect) showConnection("Disconnected");
  });
  client.addEventListener("queued", (e) => {
    setText("position", `You are #${e.detail.position} in line (${e.detail.queue_size} waiting).`);
    setText("peer-state", "Looking for someone…");
  });
  client.addEventListener("matched", (e) => {
    setText("position", "");
    $("chat-log").replaceChildren();
    // In its own line, so that the connection's states do not write over it.
    setText("shared", e.detail.interests.length ? `You both like ${e.detail.interests.join(", ")}.` : "");
    setText("peer-state", "Matched! Connecting…");
    $("report").disabled = false;
  });
  client.addEventListener("ended", (e) => {
    $("remote").srcObject = null;
    setText("shared", "");
    $("report").disabled = true;
    chatEnabled(false);
    if (e.detail.by === "peer") say("system", "The stranger left. Looking for someone new…");
    if (e.detail.by === "connection") say("system", "Connection to the server lost.");
  });
  client.addEventListener("error", (e) => console.warn("relay error:", e.detail.code, e.detail.message));
  client.addEventListener("resumed", () => {
    window.demo.resumed += 1;
    showConnection(`Connected again (${new URL(client.url).host}), nothing lost`);
  });
  client.addEventListener("peerreconnecting", () => {
    window.demo.peerReconnected += 1;
    setText("peer-state", "The stranger's connection dropped. Waiting for them…");
  });
  client.addEventListener("peerresumed", () => setText("peer-state", "The stranger is back."));

  peer.addEventListener("statechange", (e) => {
    const state = e.detail.connectionState;
    const text = {
      new: "Connecting…",
      connecting: "Connecting…",
      connected: "Connected. Say hi!",
      disconnected: "Connection interrupted…",
      failed: "Could not connect to this person. Press Next.",
      closed: "",
    }[state];
    if (text) setText("peer-state", text);
    document.body.dataset.peerState = state;
  });
  peer.addEventListener("channelopen", () => chatEnabled(true));
  peer.addEventListener("candidateerror", (e) => console.warn("ICE server error:", e.detail.errorCode, e.detail.url));
  peer.addEventListener("message", (e) => say("stranger", e.detail.text));
}

$("controls").addEventListener("submit", (event) => {
  event.preventDefault();
  start();
});

$("next").addEventListener("click", () => {
  if (!client) return;
  client.next();
  $("chat-log").replaceChildren();
  setText("peer-state", "Looking for someone…");
});

$("stop").addEventListener("click", () => {
  if (!client) return;
  client.leave();
  closeCamera();
  running(false);
  setText("position", "");
  setText("peer-state", "Stopped. Press Start to meet someone.");
});

$("report").addEventListener("click", () => {
  if (!client?.report("reported from the demo")) return;
  $("chat-log").replaceChildren();
  say("system", "Reported. You will not be matched with this person again.");
  setText("peer-state", "Looking for someone…");
});

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (text && peer?.send(text)) {
    say("you", text);
    $("chat-input").value = "";
  }
});
