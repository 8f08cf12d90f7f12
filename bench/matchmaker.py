"""The matchmaker's cost per join does not grow with the queue: measured at 1,000 to 100,000 waiting.

    python bench/matchmaker.py

For each queue size N, N clients wait, each with an interest nobody else has (so nobody pairs them
and the queue stays N long). Then, over and over: a newcomer joins with the interest of a random
waiting client and is paired with it at once, and a new client with a fresh interest takes its place
in the queue. Reported: microseconds per pairing join and per queueing join, and their ratio to the
smallest queue. Pure computation, no sockets (the clock is frozen, so no interest timeout passes).
The cyclic garbage collector runs with the relay's thresholds (``relay.GC_THRESHOLDS``: the relay
makes no reference cycles, so it lets the collector run rarely); ``--python-gc`` uses Python's
defaults instead, whose passes over a large heap (not the matchmaker's own work) make a waiting join
dearer at 100,000.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay import GC_THRESHOLDS, Matchmaker, Paired, Queued


def measure(size: int, rounds: int) -> tuple[float, float]:
    mm = Matchmaker(clock=lambda: 0.0, rng=random.Random(1))
    rng = random.Random(2)
    waiting: list[int] = []
    for i in range(size):
        mm.connect(f"w{i}")
        mm.join(f"w{i}", [f"topic{i}"])
        waiting.append(i)
    next_id = size
    pair_time = queue_time = 0.0
    for r in range(rounds):
        slot = rng.randrange(len(waiting))
        target = waiting[slot]
        newcomer = f"n{r}"
        mm.connect(newcomer)
        start = time.perf_counter()
        [decision] = mm.join(newcomer, [f"topic{target}", "nobody-else"])
        pair_time += time.perf_counter() - start
        assert isinstance(decision, Paired) and decision.session.initiator == f"w{target}"
        replacement = f"w{next_id}"
        mm.connect(replacement)
        start = time.perf_counter()
        [decision] = mm.join(replacement, [f"topic{next_id}"])
        queue_time += time.perf_counter() - start
        assert isinstance(decision, Queued)
        waiting[slot] = next_id
        next_id += 1
        mm.disconnect(newcomer)
        mm.disconnect(f"w{target}")
    assert mm.queue_size == size
    return 1e6 * pair_time / rounds, 1e6 * queue_time / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=20_000)
    parser.add_argument("--python-gc", action="store_true", help="Python's GC thresholds, not the relay's")
    args = parser.parse_args()
    if not args.python_gc:
        gc.set_threshold(*GC_THRESHOLDS)
    results = {size: measure(size, args.rounds) for size in args.sizes}
    base_pair, base_queue = results[args.sizes[0]]
    print(f"python {sys.version.split()[0]}, GC thresholds {gc.get_threshold()}; {args.rounds:,} joins of each kind")
    print("| clients waiting | µs per join that pairs | µs per join that waits | ratio to the smallest queue |")
    print("|---:|---:|---:|---:|")
    for size, (pair_us, queue_us) in results.items():
        ratios = f"{pair_us / base_pair:.2f} / {queue_us / base_queue:.2f}"
        print(f"| {size:,} | {pair_us:.1f} | {queue_us:.1f} | {ratios} |")


if __name__ == "__main__":
    main()
