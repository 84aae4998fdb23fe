"""Measure the server's resident memory while clients leave Generate streams unread.

Run from the repository root:

    .venv/bin/python benchmarks/unread_streams.py [--store STORE] [--streams 1 2 4 6]

Without ``--store`` the benchmark trains the short fixture model of ``grpc_throughput.py`` (two
epochs on the bundled records, a few minutes) in a temporary folder.

For each number of streams the benchmark starts a fresh ``python -m appliance serve`` child
process on 127.0.0.1 and runs one full Generate to warm it up. It then opens that many Generate
calls of 100,000 beats, each on its own channel, and reads none of them. After ``--wait-s``
seconds it reads the server's resident memory, cancels the calls and reads it again. It prints
one JSON line per number of streams.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc

from appliance.client import ApplianceClient
from appliance.pipeline import ServerProcess
from appliance.v1 import appliance_pb2 as pb
from appliance.v1 import appliance_pb2_grpc as pb_grpc

UNREAD_COUNT = 100_000
WARM_UP_COUNT = 2000


def resident_mib(pid: int) -> float:
    """Return the resident memory of process ``pid`` in MiB, from ``/proc``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS line for process {pid}")


def measure(store: Path, streams: int, wait_s: float, bdp_probe: bool) -> dict[str, object]:
    """Return the server's memory before, during and after ``streams`` unread streams."""
    with tempfile.TemporaryDirectory() as work:
        server = ServerProcess(store, Path(work))
        try:
            address = server.wait_serving()
            with ApplianceClient(address) as client:
                client.generate(count=WARM_UP_COUNT, seed=1, margin=0.0)
            pid = server.process.pid
            before = resident_mib(pid)
            options = [] if bdp_probe else [("grpc.http2.bdp_probe", 0)]
            channels = [grpc.insecure_channel(address, options=options) for _ in range(streams)]
            calls = [
                pb_grpc.ApplianceServiceStub(channel).Generate(
                    pb.GenerateRequest(count=UNREAD_COUNT, seed=index, margin=0.0)
                )
                for index, channel in enumerate(channels)
            ]
            time.sleep(wait_s)
            unread = resident_mib(pid)
            for call in calls:
                call.cancel()
            time.sleep(3.0)
            after = resident_mib(pid)
            for channel in channels:
                channel.close()
        finally:
            server.stop()
    return {
        "streams": streams,
        "client_bdp_probe": bdp_probe,
        "server_rss_before_mib": round(before, 1),
        "server_rss_unread_mib": round(unread, 1),
        "growth_mib": round(unread - before, 1),
        "server_rss_after_cancel_mib": round(after, 1),
    }


def main() -> int:
    """Parse the arguments and print one JSON line per number of streams."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--store", type=Path, help="model store to serve (default: train the fixture model)"
    )
    parser.add_argument(
        "--streams", type=int, nargs="+", default=[1, 2, 4, 6], help="unread streams per run"
    )
    parser.add_argument(
        "--wait-s", type=float, default=25.0, help="seconds the streams stay unread"
    )
    parser.add_argument(
        "--no-bdp-probe",
        action="store_true",
        help="open the unread channels with gRPC's bandwidth-delay probing off",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        store = args.store
        if store is None:
            from grpc_throughput import train_store

            train_store(Path(folder))
            store = Path(folder) / "store"
        for streams in args.streams:
            figures = measure(store, streams, args.wait_s, bdp_probe=not args.no_bdp_probe)
            sys.stdout.write(json.dumps(figures) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
