"""The per-sequence store: capacity, release, idle TTL, and its error kinds."""

from __future__ import annotations

import pytest

from specdec.sequences import CapacityError, SequenceBusyError, SequenceNotFoundError, SequenceStore
from tests.fakes import FakeClock


def test_start_creates_and_resets_and_checkin_returns() -> None:
    store = SequenceStore(list, 4, 60)
    entry = store.checkout(1, start=True)
    entry.state.append("x")
    store.checkin(entry)
    assert store.checkout(1, start=False).state == ["x"]


def test_start_on_a_live_sequence_resets_it() -> None:
    store = SequenceStore(list, 4, 60)
    entry = store.checkout(1, start=True)
    entry.state.append("x")
    store.checkin(entry)
    assert store.checkout(1, start=True).state == []


def test_unknown_sequence_is_not_found() -> None:
    with pytest.raises(SequenceNotFoundError, match="no cache"):
        SequenceStore(list, 4, 60).checkout(99, start=False)


def test_a_busy_sequence_is_refused() -> None:
    store = SequenceStore(list, 4, 60)
    store.checkout(1, start=True)
    with pytest.raises(SequenceBusyError, match="already running"):
        store.checkout(1, start=False)


def test_capacity_and_release() -> None:
    store = SequenceStore(list, 1, 60)
    store.checkin(store.checkout(1, start=True))
    with pytest.raises(CapacityError, match="capacity is 1"):
        store.checkout(2, start=True)
    assert store.release(1) is True
    assert store.release(1) is False
    store.checkout(2, start=True)


def test_idle_sequences_are_evicted_after_the_ttl_but_never_while_busy() -> None:
    clock = FakeClock(0.0)
    evicted: list[int] = []
    store = SequenceStore(list, 3, idle_ttl_s=10, clock=clock, on_evict=lambda sid, state: evicted.append(sid))
    store.checkin(store.checkout(1, start=True))
    clock.now = 5
    store.checkin(store.checkout(2, start=True))
    store.checkout(3, start=True)  # busy from now on
    clock.now = 30
    assert store.evict_idle() == [1, 2]
    assert evicted == [1, 2] and 3 in store and len(store) == 1
