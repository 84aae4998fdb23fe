"""Engine slots that waiting calls receive in the order they requested them.

``threading.Semaphore`` wakes one waiter on release, but the releasing thread can take the slot
back before that waiter runs. A call that releases and requests again between pieces of work, as
``Generate`` and ``Validate`` do, could then keep a slot while other calls wait. Here a released
slot goes straight to the longest waiter, and a waiter keeps its place while it polls for its
client's cancellation.
"""

from __future__ import annotations

import threading
from collections import deque


class Ticket:
    """A place in the queue for one slot; ``wait`` returns True once the slot is handed over."""

    def __init__(self) -> None:
        self._granted = threading.Event()

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds for the slot; return whether it is held now."""
        return self._granted.wait(timeout_s)

    def _grant(self) -> None:
        self._granted.set()

    @property
    def granted(self) -> bool:
        """Whether the slot has been handed to this ticket."""
        return self._granted.is_set()


class FairSlots:
    """A counting semaphore that serves its waiters first in, first out.

    Arguments:
        slots: Number of slots, at least 1.
    """

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"slots={slots} must be at least 1")
        self._free = slots
        self._lock = threading.Lock()
        self._waiting: deque[Ticket] = deque()

    def request(self) -> Ticket:
        """Join the queue; the ticket is granted at once when a slot is free and none waits."""
        ticket = Ticket()
        with self._lock:
            if self._free > 0 and not self._waiting:
                self._free -= 1
                ticket._grant()
            else:
                self._waiting.append(ticket)
        return ticket

    def withdraw(self, ticket: Ticket) -> None:
        """Leave the queue; a slot granted in the meantime is released again."""
        with self._lock:
            if not ticket.granted:
                self._waiting.remove(ticket)
                return
        self.release()

    def release(self) -> None:
        """Hand the slot to the longest waiter, or free it when none waits."""
        with self._lock:
            if self._waiting:
                self._waiting.popleft()._grant()
            else:
                self._free += 1
