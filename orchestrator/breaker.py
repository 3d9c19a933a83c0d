"""Circuit breakers in front of the draft service: one per draft replica, shared by every generation.

Why it exists: when the draft service is down or drowning, every new generation would first try it, wait
for the failure (a refused connection, or a whole per-round timeout) and only then go target-only. After
``failure_threshold`` consecutive draft failures the breaker *opens*: generations skip the draft entirely
(target-only rounds, no connection attempt) for ``cooldown_s``. Then it is *half-open*: exactly one draft
round is let through as a trial; its success *closes* the breaker, its failure opens it for another
cooldown. Target-only rounds are the same distribution (K = 0 through the same path), so an open breaker
costs speed, never correctness.

A breaker knows nothing about drafts or asyncio: callers ask ``allow()`` before a draft round and then
report exactly one of ``record_success()``, ``record_failure()`` or ``record_abandoned()`` (the round
ended for a reason that says nothing about the draft: a deadline, a cancelled caller). The clock is
injectable for tests.

`BreakerBoard` holds one breaker per draft replica, so that one stuck or failing replica of a pool stops
only the rounds sent to it: the healthy replicas' generations keep drafting, and the pool opens new
generations elsewhere while it is open (``admits``). The breaker under the name ``""`` stands for the
draft client itself: a client without replicas (all its rounds count there), or a pool that could open a
session on none of its replicas.
"""

from __future__ import annotations

import enum
import functools
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class BreakerState(enum.Enum):
    """The breaker's states; the values are what the metrics gauge reports."""

    CLOSED = 0  # drafting normally
    HALF_OPEN = 1  # cooldown over: one trial round may go to the draft
    OPEN = 2  # skipping the draft until the cooldown ends


class CircuitBreaker:
    """Counts consecutive failures; opens at ``failure_threshold`` (0 = never opens)."""

    def __init__(
        self,
        failure_threshold: int = 3,
        cooldown_s: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[BreakerState], None] | None = None,
        name: str = "draft",
    ) -> None:
        if failure_threshold < 0 or cooldown_s < 0:
            raise ValueError("failure_threshold and cooldown_s must be >= 0")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._on_transition = on_transition
        self._name = name
        self._state = BreakerState.CLOSED
        self._failures = 0  # consecutive, while closed
        self._opened_at = 0.0
        self._trial_started_at: float | None = None  # a half-open trial round is under way

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose cooldown has passed reads as half-open)."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            return BreakerState.HALF_OPEN
        return self._state

    def admits(self) -> bool:
        """Would ``allow()`` say yes now? (Asks without taking the half-open trial.)"""
        state = self.state
        if state is not BreakerState.HALF_OPEN:
            return state is BreakerState.CLOSED
        # A trial whose caller vanished without reporting would block the breaker forever: after a
        # cooldown without news, another caller may try.
        started = self._trial_started_at
        return started is None or self._clock() - started >= max(self.cooldown_s, 1.0)

    def allow(self) -> bool:
        """May this round call the draft? In half-open, True for one caller at a time (the trial)."""
        if not self.admits():
            return False
        if self._state is BreakerState.OPEN:
            self._set(BreakerState.HALF_OPEN)
            log.info("%s circuit breaker half-open: trying one round", self._name)
        if self._state is BreakerState.HALF_OPEN:
            self._trial_started_at = self._clock()
        return True

    @property
    def settled(self) -> bool:
        """Closed with no failure counted: nothing to remember."""
        return self._state is BreakerState.CLOSED and not self._failures

    def record_success(self) -> None:
        self._failures = 0
        self._trial_started_at = None
        if self._state is not BreakerState.CLOSED:
            log.info("%s circuit breaker closed: the trial round succeeded", self._name)
            self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        self._trial_started_at = None
        if self._state is BreakerState.HALF_OPEN:
            self._open("the trial round failed")
            return
        if self._state is BreakerState.OPEN:  # a round let through before the breaker opened
            return
        self._failures += 1
        if self.failure_threshold and self._failures >= self.failure_threshold:
            self._open(f"{self._failures} consecutive failures")

    def record_abandoned(self) -> None:
        """The allowed round ended without telling anything about the draft: free the trial slot."""
        self._trial_started_at = None

    def _open(self, why: str) -> None:
        self._failures = 0
        self._opened_at = self._clock()
        log.warning("%s circuit breaker open (%s): skipping it for %.1f s", self._name, why, self.cooldown_s)
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        self._state = state
        if self._on_transition is not None:
            self._on_transition(state)


class BreakerBoard:
    """One `CircuitBreaker` per draft replica address (``""``: the draft client itself), made on first use.

    All share the threshold, cooldown, clock and ``on_transition``; ``state`` is the most open of them (what
    the metrics gauge shows). Breakers that have nothing to remember are dropped once there are many, so
    replicas that come and go (addresses re-resolved) do not pile up."""

    KEEP = 64  # breakers kept before the settled ones are dropped

    def __init__(
        self,
        failure_threshold: int = 3,
        cooldown_s: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self._make = functools.partial(
            CircuitBreaker, failure_threshold, cooldown_s, clock=clock, on_transition=on_transition
        )
        self._breakers = {"": self._make(name="draft")}  # made now: bad settings fail here, not at a failure

    def get(self, replica: str = "") -> CircuitBreaker:
        """The breaker of ``replica`` (``""``: the draft client itself)."""
        breaker = self._breakers.get(replica)
        if breaker is None:
            if len(self._breakers) >= self.KEEP:
                self._breakers = {k: b for k, b in self._breakers.items() if not b.settled}
            breaker = self._make(name=f"draft replica {replica}" if replica else "draft")
            self._breakers[replica] = breaker
        return breaker

    @property
    def size(self) -> int:
        """Breakers held now."""
        return len(self._breakers)

    def admits(self, replica: str = "") -> bool:
        """Would a round on ``replica`` be let through now? (A replica never seen: yes.)"""
        breaker = self._breakers.get(replica)
        return breaker is None or breaker.admits()

    @property
    def state(self) -> BreakerState:
        """The most open state of all: OPEN if any is open, else HALF_OPEN if any is, else CLOSED."""
        return max((b.state for b in self._breakers.values()), key=lambda s: s.value, default=BreakerState.CLOSED)
