"""Per-sequence state with an idle TTL and a capacity, for servers that keep something per sequence id.

Why it exists: both model servers keep state per sequence id between requests (the Triton target its KV
cache; the draft service its context, its drafters' indexes and, for a model draft, a KV cache) and need
the same bookkeeping a long-running server needs: an idle TTL, a capacity, and distinct errors for "no such
sequence" (the caller re-sends the prefix) and "full" (the caller backs off). It knows nothing of what the
state is, nor of gRPC or Triton; the servers map its errors to statuses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class SequenceNotFoundError(LookupError):
    """The sequence holds no state here (never started, released, evicted, or the server restarted)."""


class CapacityError(RuntimeError):
    """Starting another sequence would exceed the configured capacity."""


class SequenceBusyError(ValueError):
    """The sequence is already in a step (two requests of one sequence at once: a caller's bug)."""


@dataclass
class Entry(Generic[T]):
    """One sequence's state and the store's bookkeeping of it."""

    sequence_id: int
    state: T
    last_used: float
    busy: bool = False


class SequenceStore(Generic[T]):
    """Sequence id -> state, with an idle TTL and a capacity. Thread-safe.

    ``checkout`` takes a sequence for one step (``start`` creates it with ``new_state()``, or resets it);
    ``checkin`` gives it back; ``release`` drops it. A sequence in a step is never evicted."""

    def __init__(
        self,
        new_state: Callable[[], T],
        max_sequences: int,
        idle_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[int, T], None] | None = None,
    ) -> None:
        if max_sequences < 1:
            raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
        if idle_ttl_s <= 0:
            raise ValueError(f"idle_ttl_s must be > 0, got {idle_ttl_s}")
        self.new_state = new_state
        self.max_sequences = max_sequences
        self.idle_ttl_s = idle_ttl_s
        self._clock = clock
        self._on_evict = on_evict
        self._entries: dict[int, Entry[T]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, sequence_id: int) -> bool:
        with self._lock:
            return sequence_id in self._entries

    def states(self) -> Iterator[T]:
        """A snapshot of every live state (for memory accounting)."""
        with self._lock:
            return iter([entry.state for entry in self._entries.values()])

    def checkout(self, sequence_id: int, *, start: bool) -> Entry[T]:
        """Take a sequence for one step; ``start`` creates it (or resets it) instead of requiring it.

        Raises SequenceNotFoundError, CapacityError or SequenceBusyError."""
        now = self._clock()
        with self._lock:
            self._evict_idle_locked(now)
            entry = self._entries.get(sequence_id)
            if entry is not None and entry.busy:
                raise SequenceBusyError(f"sequence {sequence_id} is already running a step")
            if start:
                if entry is None and len(self._entries) >= self.max_sequences:
                    raise CapacityError(
                        f"{len(self._entries)} sequences are live, the capacity is {self.max_sequences}"
                    )
                entry = Entry(sequence_id, self.new_state(), now)
                self._entries[sequence_id] = entry
            elif entry is None:
                raise SequenceNotFoundError(f"sequence {sequence_id} has no cache here (released, evicted or restarted)")
            entry.busy = True
            entry.last_used = now
            return entry

    def checkin(self, entry: Entry[T]) -> None:
        with self._lock:
            entry.busy = False
            entry.last_used = self._clock()

    def release(self, sequence_id: int) -> bool:
        """Drop a sequence's state; False if it held none."""
        return self.pop(sequence_id) is not None

    def pop(self, sequence_id: int) -> T | None:
        """Drop a sequence and hand back its state (None if it held none)."""
        with self._lock:
            entry = self._entries.pop(sequence_id, None)
        return None if entry is None else entry.state

    def evict_idle(self) -> list[int]:
        """Drop states idle for longer than the TTL; returns their ids."""
        with self._lock:
            return self._evict_idle_locked(self._clock())

    def _evict_idle_locked(self, now: float) -> list[int]:
        expired = [sid for sid, e in self._entries.items() if not e.busy and now - e.last_used > self.idle_ttl_s]
        for sid in expired:
            entry = self._entries.pop(sid)
            log.info("sequence_id=%d evicted: idle for more than %.0f s", sid, self.idle_ttl_s)
            if self._on_evict is not None:
                self._on_evict(sid, entry.state)
        return expired
