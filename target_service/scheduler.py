"""When to run the next forward: now, or a few milliseconds later with the sequences that are on their way.

Why it exists: each generation sends its next request only after the orchestrator has handled the answer
to its last one (a few milliseconds, more when many generations share the orchestrator's event loop). A
batcher that starts the next forward the moment the last one ends takes only the requests already queued,
and with several generations in flight it settles into a convoy: the sequences split into groups that take
turns, each forward carries half of them, and every generation gets a token every other forward (measured
with Triton's own batcher: 8 generations in flight, 4 sequences per forward, a p50 of 150 ms per token for
a 65 ms forward). Triton's queue delay cannot tell a lone caller from a convoy: any delay is paid by every
request, alone or not (bench/README.md, "Batching").

So the model batches for itself (its Triton config is decoupled: ``execute()`` only hands requests over).
`StepScheduler` keeps, per sequence of the last forwards, when its answer went out. The next forward waits
until every such sequence has sent its next request, for at most ``max_wait_s`` after the last forward
ended — and never for a sequence that took longer than that last time (it is drafting with a model, or has
gone): those join whichever forward is next when they come. A lone caller never waits: its next request is
the only one expected. A sequence that ended (END) is no longer expected.

Pure threading and a clock (the thread named for the OS too): no Triton, no torch (tests drive it with plain callables).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from specdec.procs import name_this_thread

log = logging.getLogger(__name__)

T = TypeVar("T")

_FORGET_S = 60.0  # a sequence not seen for this long is no longer tracked


@dataclass
class Pending(Generic[T]):
    """One request waiting for a forward: its sequence, whether it ends it, and what the runner needs."""

    sequence_id: int
    ends: bool
    item: T
    arrived: float = 0.0


@dataclass
class _Track:
    answered: float  # when its last request's forward ended
    slow: bool = False  # it came back later than max_wait last time: not waited for


@dataclass
class SchedulerStats:
    """Cumulative figures, for the model's metrics."""

    forwards: int = 0
    waited_s: float = 0.0  # time spent holding a forward back for expected sequences
    gave_up: int = 0  # forwards that went without an expected sequence


class StepScheduler(Generic[T]):
    """Collects requests from any thread (`submit`) and runs them in batches on its own thread (``run``),
    which first calls ``on_start``."""

    def __init__(
        self, run: Callable[[list[T]], None], max_wait_s: float, clock: Callable[[], float] = time.monotonic,
        name: str = "specdec-steps", on_start: Callable[[], None] = lambda: None,
    ) -> None:
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._run, self.max_wait_s, self._clock, self._on_start = run, max_wait_s, clock, on_start
        self._cond = threading.Condition()
        self._pending: list[Pending[T]] = []
        self._tracks: dict[int, _Track] = {}
        self._last_end = 0.0  # when the last forward ended
        self._stopping = False
        self.stats = SchedulerStats()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, requests: Sequence[Pending[T]], *, continued: bool = False) -> None:
        """Queue requests (in their order) for the next forwards. ``continued``: the runner puts back requests
        that need another forward (a decode, the rest of a prompt, a request its last forward had no room
        for); they go before every request that came meanwhile (they were first; a sequence's requests keep
        their order), and that they are back at once says nothing about their caller."""
        now = self._clock()
        with self._cond:
            for request in requests:
                request.arrived = now
                track = self._tracks.get(request.sequence_id)
                if track is not None and not continued:
                    track.slow = now - track.answered > self.max_wait_s
            self._pending = [*requests, *self._pending] if continued else [*self._pending, *requests]
            self._cond.notify()

    def stop(self, timeout_s: float = 10.0) -> list[T]:
        """Stop the thread after the forward under way; returns what was still queued (never run)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)
        with self._cond:
            left, self._pending = [p.item for p in self._pending], []
        return left

    def _missing(self) -> list[int]:
        """Sequences expected back soon that have no request queued."""
        queued = {p.sequence_id for p in self._pending}
        return [sid for sid, track in self._tracks.items() if not track.slow and sid not in queued]

    def _next_batch(self) -> list[Pending[T]] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            started = self._clock()
            deadline = self._last_end + self.max_wait_s
            while (missing := self._missing()) and (now := self._clock()) < deadline and not self._stopping:
                self._cond.wait(deadline - now)
            if missing:
                for sid in missing:  # it did not come back in time: do not wait for it again until it does
                    self._tracks[sid].slow = True
                self.stats.gave_up += 1
            self.stats.waited_s += self._clock() - started
            batch, self._pending = self._pending, []
            return batch

    def _loop(self) -> None:
        name_this_thread(self._thread.name)  # `top -H` and /proc show which of the process's threads runs forwards
        self._on_start()  # on this thread, before any batch (per-thread settings such as OpenMP's thread count)
        while (batch := self._next_batch()) is not None:
            try:
                self._run([p.item for p in batch])
            except Exception:  # noqa: BLE001 - the runner answers its own requests; keep serving
                log.exception("a batch failed")
            now = self._clock()
            with self._cond:
                self._last_end = now
                self.stats.forwards += 1
                for p in batch:
                    if p.ends:
                        self._tracks.pop(p.sequence_id, None)
                    elif (track := self._tracks.get(p.sequence_id)) is not None:
                        track.answered = now  # slow stays as its arrival showed: late this time, late next
                    else:
                        self._tracks[p.sequence_id] = _Track(answered=now)
                for sid in [s for s, t in self._tracks.items() if now - t.answered > _FORGET_S]:
                    del self._tracks[sid]
