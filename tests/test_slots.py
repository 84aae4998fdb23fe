"""Engine slots handed to waiting calls in arrival order."""

from __future__ import annotations

import threading

import pytest

from appliance.slots import FairSlots

WAIT_S = 5.0


def test_free_slot_is_granted_at_once() -> None:
    slots = FairSlots(2)
    first, second = slots.request(), slots.request()
    assert first.granted
    assert second.granted
    third = slots.request()
    assert not third.granted
    assert not third.wait(0.01)


def test_release_serves_longest_waiter() -> None:
    slots = FairSlots(1)
    holder = slots.request()
    assert holder.granted
    waiters = [slots.request() for _ in range(3)]
    # The holder releases and requests again at once; it queues behind the three waiters.
    slots.release()
    again = slots.request()
    assert [w.granted for w in waiters] == [True, False, False]
    assert not again.granted
    slots.release()
    assert waiters[1].granted
    slots.release()
    assert waiters[2].granted
    assert not again.granted
    slots.release()
    assert again.granted


def test_polling_waiter_keeps_its_place() -> None:
    slots = FairSlots(1)
    slots.request()
    early, late = slots.request(), slots.request()
    for _ in range(3):
        assert not early.wait(0.01)
    slots.release()
    assert early.granted
    assert not late.granted


def test_withdrawn_ticket_passes_slot_on() -> None:
    slots = FairSlots(1)
    slots.request()
    withdrawn, next_in_line = slots.request(), slots.request()
    slots.withdraw(withdrawn)
    slots.release()
    assert next_in_line.granted
    assert not withdrawn.granted
    # A ticket granted just before its caller withdraws gives the slot back.
    slots.release()
    handed = slots.request()
    assert handed.granted
    slots.withdraw(handed)
    assert slots.request().granted


def test_waiter_thread_wakes_on_release() -> None:
    slots = FairSlots(1)
    slots.request()
    ticket = slots.request()
    woke = threading.Event()

    def wait() -> None:
        if ticket.wait(WAIT_S):
            woke.set()

    thread = threading.Thread(target=wait)
    thread.start()
    slots.release()
    thread.join(WAIT_S)
    assert woke.is_set()


def test_zero_slots_is_refused() -> None:
    with pytest.raises(ValueError, match="slots=0 must be at least 1"):
        FairSlots(0)
