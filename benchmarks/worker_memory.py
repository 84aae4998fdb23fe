"""Measure the server's resident memory as calls spread over more gRPC worker threads.

Run from the repository root:

    .venv/bin/python benchmarks/worker_memory.py [--store STORE] [--calls 2 8 16] [--rounds 3]

Without ``--store`` the benchmark trains the short fixture model of ``grpc_throughput.py`` in a
temporary folder. For each number of calls it starts a fresh ``python -m appliance serve``
child process on 127.0.0.1, reads its resident memory once it serves, then runs ``--rounds``
rounds of that many Generate calls at once. gRPC runs each concurrent call on a worker thread
of its own, and each call draws one full batch (128 beats at margin 0, two draws per beat). It
prints one JSON line per number of calls, with the growth after each round.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path

from unread_streams import resident_mib

from appliance.client import ApplianceClient
from appliance.engine import INFERENCE_BATCH
from appliance.pipeline import ServerProcess


def measure(store: Path, calls: int, rounds: int) -> dict[str, object]:
    """Return the server's memory when it serves and its growth after each round."""
    with tempfile.TemporaryDirectory() as work:
        server = ServerProcess(store, Path(work))
        try:
            address = server.wait_serving()
            pid = server.process.pid
            serving = resident_mib(pid)
            failures: list[BaseException] = []

            def call(seed: int) -> None:
                try:
                    with ApplianceClient(address) as client:
                        client.generate(
                            count=INFERENCE_BATCH // 2, margin=0.0, seed=seed, max_draws_per_beat=2
                        )
                except Exception as exc:  # reported after the round
                    failures.append(exc)

            growth = []
            for round_index in range(rounds):
                threads = [
                    threading.Thread(target=call, args=(round_index * calls + index,))
                    for index in range(calls)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                if failures:
                    raise SystemExit(f"a Generate call failed: {failures[0]}")
                growth.append(round(resident_mib(pid) - serving, 1))
        finally:
            server.stop()
    return {
        "concurrent_calls": calls,
        "server_rss_serving_mib": round(serving, 1),
        "growth_after_each_round_mib": growth,
    }


def main() -> int:
    """Parse the arguments and print one JSON line per number of concurrent calls."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--store", type=Path, help="model store to serve (default: train the fixture model)"
    )
    parser.add_argument(
        "--calls", type=int, nargs="+", default=[2, 8, 16], help="concurrent calls per round"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of concurrent calls")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        store = args.store
        if store is None:
            from grpc_throughput import train_store

            train_store(Path(folder))
            store = Path(folder) / "store"
        for calls in args.calls:
            sys.stdout.write(json.dumps(measure(store, calls, args.rounds)) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
