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
let local = null;

function setText(id, text) {
  $(id).textContent = text;
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

async function camera() {
  try {
    return await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
  } catch (err) {
    setText("peer-state", `No camera or microphone (${err.name}): you will only see and hear the other side.`);
    return null;
  }
}

async function start() {
  running(true);
  const interests = parseInterests($("interests").value);
  if (!client) {
    local = await camera();
    $("local").srcObject = local;
    client = new RelayClient(relays, { interests });
    peer = new PeerSession(client, {
      stream: local,
      rtcConfig,
      onTrack: (event) => {
        $("remote").srcObject = event.streams[0] || new MediaStream([event.track]);
      },
    });
    wire(client, peer);
    window.demo = { client, peer, resumed: 0, peerReconnected: 0 }; // for tests and the curious
  }
  setText("peer-state", "Looking for someone…");
  client.join({ interests });
}

function wire(client, peer) {
  client.addEventListener("connected", (e) => setText("connection", `Connected (${new URL(e.detail.url).host})`));
  client.addEventListener("reconnecting", (e) =>
    setText("connection", `Connection lost. Reconnecting in ${(e.detail.delay / 1000).toFixed(1)} s…`),
  );
  client.addEventListener("disconnected", (e) => {
    if (!e.detail.willReconnect) setText("connection", "Disconnected");
  });
  client.addEventListener("queued", (e) => {
    setText("position", `You are #${e.detail.position} in line (${e.detail.queue_size} waiting).`);
    setText("peer-state", "Looking for someone…");
  });
  client.addEventListener("matched", (e) => {
    setText("position", "");
    $("chat-log").replaceChildren();
    const shared = e.detail.interests.length ? ` You both like ${e.detail.interests.join(", ")}.` : "";
    setText("peer-state", `Matched! Connecting…${shared}`);
  });
  client.addEventListener("ended", (e) => {
    $("remote").srcObject = null;
    chatEnabled(false);
    if (e.detail.by === "peer") say("system", "The stranger left. Looking for someone new…");
    if (e.detail.by === "connection") say("system", "Connection to the server lost.");
  });
  client.addEventListener("error", (e) => console.warn("relay error:", e.detail.code, e.detail.message));
  client.addEventListener("resumed", () => {
    window.demo.resumed += 1;
    setText("connection", `Connected again (${new URL(client.url).host}), nothing lost`);
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
  running(false);
  setText("position", "");
  setText("peer-state", "Stopped. Press Start to meet someone.");
});

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (text && peer?.send(text)) {
    say("you", text);
    $("chat-input").value = "";
  }
});
