"""The ceiling of our stack: a bare trio-websocket server that pairs connections two by two, in the
order they arrive, and forwards every frame to the partner. No parsing, no matching, no limits.

    python bench/forwarder.py --port 9000
"""

from __future__ import annotations

import argparse
import gc
import sys

import trio
import trio_websocket


class Forwarder:
    def __init__(self) -> None:
        self.waiting: tuple[trio_websocket.WebSocketConnection, trio.Event, list] | None = None

    async def handler(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        if self.waiting is None:
            box: list[trio_websocket.WebSocketConnection] = []
            paired = trio.Event()
            self.waiting = (ws, paired, box)
            await paired.wait()
            peer = box[0]
        else:
            peer, paired, box = self.waiting
            self.waiting = None
            box.append(ws)
            paired.set()
        try:
            while True:
                await peer.send_message(await ws.get_message())
        except trio_websocket.ConnectionClosed:
            await peer.aclose()


async def main(port: int) -> None:
    fwd = Forwarder()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, fwd.handler, "127.0.0.1", port, None)
        gc.freeze()  # as the relay's main() does
        print(f"forwarder listening on 127.0.0.1:{server.port}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    trio.run(main, parser.parse_args().port)
