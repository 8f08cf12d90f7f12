"""The short soak (bench/soak.py has the long one): rounds of people joining, signaling, pressing
next, leaving, vanishing and resuming at random; afterwards the relay is empty and its memory is
back where it was after the first round."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
soak = importlib.util.module_from_spec(spec)
spec.loader.exec_module(soak)

MIB = 2**20


def test_soak_leaves_nothing_behind(tmp_path):
    log = tmp_path / "relay.log"
    proc, port = soak.start_relay(log, grace=1.0)
    try:
        results = trio.run(soak.soak, [port], [proc.pid], 300, 5, 3.0, 1.0, None)  # 300 people, 5 rounds of 3 s
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for r in results:
        h, tally = r["health"], r["tally"]
        assert (h["connections"], h["queued"], h["sessions"]) == (0, 0, 0), r  # nobody left behind
        assert tally.get("matched", 0) > 100 and tally.get("signal", 0) > 500 and tally.get("resumed", 0) > 10, tally
        assert tally.get("fallback", 0) > 50, tally  # a quarter of the connections use the HTTP fallback
    # The first two rounds warm the allocator up; from then on memory must stay put. (Calibrated: with
    # lazier GC thresholds, whose garbage cycles piled up, this grew 12.8 MiB over rounds 2 to 5.)
    rss = [r["rss"] / MIB for r in results]
    assert rss[-1] - rss[1] < 6, rss  # measured here: under 1 MiB; the leak it guards against: 12.8
    text = log.read_text()
    assert "Traceback" not in text and " ERROR " not in text


def test_a_cluster_soak_leaves_nothing_behind_in_the_nodes_or_in_redis(tmp_path, redis_server):
    """The same people over three nodes of a cluster, each connection (and resume) to a node picked at
    random: afterwards no node and no Redis key holds a client or a session."""
    relays = [
        soak.start_relay(tmp_path / f"relay{i}.log", 1.0, "--redis-url", redis_server.url, "--node-id", f"s{i}")
        for i in range(3)
    ]
    try:
        ports, pids = [port for _, port in relays], [p.pid for p, _ in relays]
        results = trio.run(soak.soak, ports, pids, 300, 3, 3.0, 1.0, redis_server.port)
    finally:
        for proc, _ in relays:
            proc.terminate()
            proc.wait(timeout=30)
    for r in results:
        h, tally = r["health"], r["tally"]
        assert not any(h.values()), r  # nobody left: nodes' connections, queue, sessions; Redis's clients, sessions
        enough = tally.get("matched", 0) > 100 and tally.get("signal", 0) > 300
        assert enough, f"round {results.index(r) + 1}: {json.dumps(tally, sort_keys=True)}"
    # Resumes need a person's second connection within the 3 s round: on a loaded machine the first
    # round (fresh processes) can end before any comes. Over the three rounds there are always many.
    assert sum(r["tally"].get("resumed", 0) for r in results) > 30, [r["tally"] for r in results]
    for i in range(3):
        text = (tmp_path / f"relay{i}.log").read_text()
        assert "Traceback" not in text and " ERROR " not in text, text[-3000:]
