"""A stand-in for ``Engine.start_generate`` runs that never finish, for stalled-stream tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

# Maximum time a stalled run waits for its call to be cancelled, in seconds.
STALL_LIMIT_S = 60.0


class StalledRun:
    """A generation run whose draws are all rejected and that ignores its time limit."""

    done = False

    def advance(self, should_stop: Callable[[], bool], until_s: float = 0.0) -> None:
        """Wait until the call is cancelled, or ``STALL_LIMIT_S`` at most."""
        deadline = time.monotonic() + STALL_LIMIT_S
        while not should_stop() and time.monotonic() < deadline:
            time.sleep(0.05)


def stall_after_first_run(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``engine`` start real runs for the first portion only, and stalled runs after it."""
    real_start = engine.start_generate
    runs: list[object] = []

    def second_run_stalls(*args: Any, **kwargs: Any) -> Any:
        runs.append(args)
        return real_start(*args, **kwargs) if len(runs) == 1 else StalledRun()

    monkeypatch.setattr(engine, "start_generate", second_run_stalls)
