"""Server memory: capped allocator arenas, a blocked privacy search, an engine warmed at start."""

from __future__ import annotations

import platform
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from appliance.allocator import limit_malloc_arenas, peak_resident_mib
from appliance.client import ApplianceClient
from appliance.engine import INFERENCE_BATCH
from appliance.pipeline import ServerProcess
from appliance.privacy import QUERY_BATCH, NearestNeighbourIndex, privacy_space
from appliance.server import StoppedWhileLoading, load_served_engine, warm_up
from appliance.service import ThreadPlan

# Concurrent Generate calls per round, each on a gRPC worker thread of its own.
CALLS_PER_ROUND = 8
ROUNDS = 3
# Growth of the server's resident memory over all rounds, measured on the fixture model. Before
# the arena cap, the smaller search blocks and the warm up, it was 138 MiB.
MAX_GROWTH_MIB = 40.0
# The thread plan of a 2-CPU server: two engine slots of one ONNX Runtime thread.
TWO_SLOTS = ThreadPlan(
    cpu_limit=2.0, cpu_limit_source="test", workers=4, engine_slots=2, intra_op_threads=1
)
# Counts glibc's malloc arenas in a child process after threads that each allocate and wait.
ARENA_COUNT_SCRIPT = """
import ctypes, sys, tempfile, threading
import numpy as np
from appliance.allocator import limit_malloc_arenas
cap = int(sys.argv[1])
if cap:
    assert limit_malloc_arenas(cap)
hold, arrays = threading.Event(), []
def allocate():
    arrays.append(np.ones(100_000))
    hold.wait()
threads = [threading.Thread(target=allocate) for _ in range(12)]
for thread in threads:
    thread.start()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile(suffix=".xml") as report:
    stream = libc.fopen(report.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    print(open(report.name).read().count("<heap nr="))
hold.set()
"""


def resident_mib(pid: int) -> float:
    """Return the resident memory of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS line for process {pid}")


def test_arena_cap_rejects_zero() -> None:
    with pytest.raises(ValueError, match="arenas=0 must be at least 1"):
        limit_malloc_arenas(0)
    assert peak_resident_mib() > 10


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_arena_cap_bounds_thread_arenas() -> None:
    def arenas(cap: int) -> int:
        child = subprocess.run(
            [sys.executable, "-c", ARENA_COUNT_SCRIPT, str(cap)],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return int(child.stdout.strip())

    # 12 threads that allocate at once get arenas of their own without a cap.
    assert arenas(0) > 3
    assert arenas(3) == 3


def test_privacy_search_in_blocks_is_exact_and_bounded() -> None:
    rng = np.random.default_rng(3)
    index = NearestNeighbourIndex(privacy_space(rng.standard_normal((20_000, 1, 256))))
    queries = privacy_space(rng.standard_normal((QUERY_BATCH, 1, 256)))
    tracemalloc.start()
    blocked = index.nearest_distance(queries)
    peak_mib = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    index.chunk_rows = len(index)
    whole = index.nearest_distance(queries)
    np.testing.assert_array_equal(blocked, whole)
    # One block of the whole index needed about 60 MiB here.
    assert peak_mib < 30, f"search of 256 queries took {peak_mib:.1f} MiB"


def test_server_memory_does_not_grow_with_worker_threads(
    model_store: Path, tmp_path: Path
) -> None:
    server = ServerProcess(model_store, tmp_path)
    try:
        address = server.wait_serving()
        pid = server.process.pid
        serving_mib = resident_mib(pid)
        failures: list[BaseException] = []

        def call(seed: int) -> None:
            try:
                with ApplianceClient(address, timeout_s=120.0) as client:
                    # Twice as many draws as beats is one full batch at margin 0.
                    client.generate(
                        count=INFERENCE_BATCH // 2, margin=0.0, seed=seed, max_draws_per_beat=2
                    )
            except BaseException as exc:
                failures.append(exc)

        growth = []
        for round_index in range(ROUNDS):
            threads = [
                threading.Thread(target=call, args=(round_index * CALLS_PER_ROUND + i,))
                for i in range(CALLS_PER_ROUND)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            growth.append(round(resident_mib(pid) - serving_mib, 1))
        assert not failures, failures[0]
        assert growth[-1] < MAX_GROWTH_MIB, (
            f"server grew by {growth} MiB after each round of {CALLS_PER_ROUND} concurrent "
            f"Generate calls, from {serving_mib:.0f} MiB when it started serving"
        )
    finally:
        assert server.stop() == 0


def test_stop_during_warm_up_is_not_a_failure(
    model_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = load_served_engine(model_store, intra_op_threads=1)

    def stopped(*args: object, **kwargs: object) -> None:
        raise StoppedWhileLoading("SIGTERM")

    monkeypatch.setattr(engine, "generate", stopped)
    # serve reports this as a stop before the model was loaded, not as a failed warm up.
    with pytest.raises(StoppedWhileLoading, match="SIGTERM"):
        warm_up(engine, TWO_SLOTS)


def test_failed_warm_up_names_slots(model_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = load_served_engine(model_store, intra_op_threads=1)

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError("cannot allocate 67108864 bytes")

    monkeypatch.setattr(engine, "generate", out_of_memory)
    with pytest.raises(RuntimeError) as caught:
        warm_up(engine, TWO_SLOTS)
    message = str(caught.value)
    assert f"on {INFERENCE_BATCH} beats in 2 engine slots at once failed" in message
    assert "MemoryError: cannot allocate 67108864 bytes" in message
    assert "--intra-op-threads 2" in message
