"""A native (non-browser) peer of the relay, written from docs/protocol.md alone: aiortc for WebRTC.

    pip install aiortc websockets
    python examples/native_peer.py --relay ws://127.0.0.1:8080/ws --chat "hello from python"

It connects, joins, and when matched with anyone (a browser running relay-client.js, say) sends a
test video (a moving colour pattern) and talks on the "chat" data channel: it sends ``--chat`` once
the channel opens and prints every message it receives as ``chat: <text>``. It plays either role:
as the initiator it offers (video, and the "chat" and "control" channels), as the answerer it
answers; either way it accepts offers at any time, since a browser answerer that has tracks the
offer lacked offers again. Browser ICE candidates arrive one by one (``{"candidate": {...}}``,
their ``candidate`` string prefixed "candidate:"); aiortc sends its own inside its SDP. It stops
after ``--seconds`` of a session, or when the peer leaves.

aiortc runs on asyncio (the relay itself is Trio; a client is free to be anything). Its ICE agent
(aioice) leaves 127.0.0.1 out of the addresses it gathers; ``--loopback`` puts it back, for a
machine whose only network is loopback (the relay's tests run so).
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import time

import websockets
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.sdp import candidate_from_sdp
from av import VideoFrame


class Pattern(VideoStreamTrack):
    """A 320x240 test picture whose colour changes every frame (so a receiver sees it move)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        self.count += 1
        frame = VideoFrame(width=320, height=240, format="rgb24")
        for plane in frame.planes:
            plane.update(bytes([(self.count * 7) % 256]) * plane.buffer_size)
        frame.pts, frame.time_base = pts, time_base or fractions.Fraction(1, 90000)
        return frame


async def run(args: argparse.Namespace) -> None:
    async with websockets.connect(args.relay) as ws:

        async def send(**message: object) -> None:
            await ws.send(json.dumps(message))

        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome" and welcome["protocol"] == 1, welcome
        await send(type="join", interests=args.interests)
        pc: RTCPeerConnection | None = None
        ends_at = None
        while ends_at is None or time.monotonic() < ends_at:
            try:
                raw = await asyncio.wait_for(ws.recv(), timeout=0.5)
            except TimeoutError:
                continue
            msg = json.loads(raw)
            if msg["type"] == "matched":
                pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no public STUN server unasked
                pc.addTrack(Pattern())
                wire(pc, args)
                ends_at = time.monotonic() + args.seconds
                if msg["initiator"]:
                    chat = pc.createDataChannel("chat")
                    use_chat(chat, args)
                    pc.createDataChannel("control")
                    await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers all candidates here
                    await send(type="signal", data={"description": description(pc)})
            elif msg["type"] == "signal" and pc is not None:
                data = msg["data"]
                if "description" in data:
                    await pc.setRemoteDescription(RTCSessionDescription(**data["description"]))
                    if data["description"]["type"] == "offer":  # a first offer, or a browser's second one
                        await pc.setLocalDescription(await pc.createAnswer())
                        await send(type="signal", data={"description": description(pc)})
                elif data.get("candidate", {}).get("candidate"):  # an empty one: the end of candidates
                    init = data["candidate"]
                    candidate = candidate_from_sdp(init["candidate"].removeprefix("candidate:"))
                    candidate.sdpMid, candidate.sdpMLineIndex = init.get("sdpMid"), init.get("sdpMLineIndex")
                    await pc.addIceCandidate(candidate)
            elif msg["type"] == "peer_left":
                print(f"peer left: {msg['reason']}", flush=True)
                break
        if pc is not None:
            await pc.close()
        await send(type="leave")


def description(pc: RTCPeerConnection) -> dict[str, str]:
    return {"type": pc.localDescription.type, "sdp": pc.localDescription.sdp}


def wire(pc: RTCPeerConnection, args: argparse.Namespace) -> None:
    @pc.on("datachannel")
    def on_datachannel(channel: RTCDataChannel) -> None:
        if channel.label == "chat":
            use_chat(channel, args)

    @pc.on("connectionstatechange")
    def on_state() -> None:
        print(f"connection: {pc.connectionState}", flush=True)


def use_chat(channel: RTCDataChannel, args: argparse.Namespace) -> None:
    def hello() -> None:
        if args.chat:
            channel.send(args.chat)

    if channel.readyState == "open":
        hello()
    else:
        channel.on("open", hello)
    channel.on("message", lambda text: print(f"chat: {text}", flush=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--relay", default="ws://127.0.0.1:8080/ws")
    parser.add_argument("--interests", nargs="*", default=[])
    parser.add_argument("--chat", default="", help="a message to send once the chat channel opens")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to stay in a session")
    parser.add_argument("--loopback", action="store_true", help="let ICE use 127.0.0.1 (a loopback-only machine)")
    args = parser.parse_args()
    if args.loopback:
        import aioice.ice

        aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
