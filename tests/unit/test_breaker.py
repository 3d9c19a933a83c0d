"""The draft circuit breakers: one alone with a fake clock, a board of them (one per replica), then inside
the loop with the loop's fake clients (the pool's side: tests/unit/test_pools.py).

Proves: N consecutive failures open it; while open no draft is even tried (no session opened) and the
rounds are target-only, counted as fallbacks with reason "breaker_open", with exactly the target's greedy
output; after the cooldown one trial goes through (only one, even with concurrent generations); its
success closes the breaker, its failure re-opens it; a trial that ends without news frees the slot. A
board keeps them apart per replica, asks without taking the trial, and forgets only what is settled.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from orchestrator.breaker import BreakerBoard, BreakerState, CircuitBreaker
from orchestrator.clients import DeadlineExceeded, DraftError
from orchestrator.loop import SpeculativeLoop
from tests.fakes import FakeDraft, FakeTarget, asyncio_test, greedy_reference, output, request, run


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, failures: int = 3, cooldown_s: float = 10.0) -> tuple[CircuitBreaker, list[BreakerState]]:
    transitions: list[BreakerState] = []
    return CircuitBreaker(failures, cooldown_s, clock=clock, on_transition=transitions.append), transitions


# --- the breaker alone ------------------------------------------------------------------------------------


def test_opens_after_consecutive_failures_only():
    clock = Clock()
    b, transitions = breaker(clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    b.record_success()  # resets the count
    for _ in range(2):
        b.record_failure()
    assert b.state is BreakerState.CLOSED and b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN and transitions == [BreakerState.OPEN]
    assert not b.allow()


def test_half_open_lets_one_trial_through_and_success_closes():
    clock = Clock()
    b, transitions = breaker(clock)
    for _ in range(3):
        b.record_failure()
    clock.now += 9.9
    assert not b.allow()
    clock.now += 0.2
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()  # the trial
    assert not b.allow() and not b.allow()  # everyone else waits for its outcome
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.allow()
    assert transitions == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_a_failed_trial_reopens_for_a_full_cooldown():
    clock = Clock()
    b, transitions = breaker(clock)
    for _ in range(3):
        b.record_failure()
    clock.now += 10
    assert b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN and not b.allow()
    clock.now += 9
    assert not b.allow()
    clock.now += 1
    assert b.allow()
    assert transitions == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.OPEN, BreakerState.HALF_OPEN]


def test_an_abandoned_or_vanished_trial_frees_the_slot():
    clock = Clock()
    b, _ = breaker(clock)
    for _ in range(3):
        b.record_failure()
    clock.now += 10
    assert b.allow()
    b.record_abandoned()  # e.g. the caller's deadline passed during the trial
    assert b.allow()  # another trial at once
    clock.now += 10  # that one never reports: after a cooldown another caller may try
    assert b.allow()


def test_zero_failures_means_never_open():
    b, _ = breaker(Clock(), failures=0)
    for _ in range(100):
        b.record_failure()
    assert b.state is BreakerState.CLOSED and b.allow()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        CircuitBreaker(-1, 1.0)
    with pytest.raises(ValueError):
        CircuitBreaker(1, -1.0)


def test_bad_settings_are_refused_by_a_board_at_once():
    with pytest.raises(ValueError):
        BreakerBoard(-1, 1.0)


# --- one per replica ----------------------------------------------------------------------------------------


def test_a_board_keeps_one_breaker_per_replica_and_admits_asks_without_taking_the_trial():
    clock = Clock()
    transitions: list[BreakerState] = []
    board = BreakerBoard(2, 5.0, clock=clock, on_transition=transitions.append)
    for _ in range(2):
        board.get("a:1").record_failure()
    board.get("b:1").record_failure()  # one failure: still closed
    assert board.get("a:1").state is BreakerState.OPEN and board.get("b:1").state is BreakerState.CLOSED
    assert not board.admits("a:1") and board.admits("b:1") and board.admits("never-seen:1") and board.admits("")
    assert board.state is BreakerState.OPEN  # the most open of them
    clock.now += 5.0
    assert board.admits("a:1") and board.admits("a:1")  # asking twice takes nothing
    assert board.state is BreakerState.HALF_OPEN
    assert board.get("a:1").allow()  # the trial
    assert not board.admits("a:1") and not board.get("a:1").allow()
    board.get("a:1").record_success()
    assert board.state is BreakerState.CLOSED and board.admits("a:1")
    assert transitions == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_a_board_drops_the_breakers_that_remember_nothing_once_there_are_many():
    board = BreakerBoard(3, 5.0, clock=Clock())
    board.get("failing:1").record_failure()
    for i in range(BreakerBoard.KEEP):
        board.get(f"10.0.0.{i}:1").record_success()
    assert board.size < BreakerBoard.KEEP  # the settled ones went
    board.get("failing:1").record_failure()
    board.get("failing:1").record_failure()  # the third in a row: the count survived the pruning
    assert not board.admits("failing:1")


# --- inside the loop --------------------------------------------------------------------------------------


class SwitchableDraft(FakeDraft):
    """A FakeDraft whose every round fails while ``down`` (like a draft service that was killed)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.failures = 0

    async def open(self, sequence_id: int, *, timeout: float | None = None, avoid: str = ""):
        session = await super().open(sequence_id, timeout=timeout)
        real = session.propose

        async def propose(*args):
            if self.down:
                self.failures += 1
                raise DraftError("draft service UNAVAILABLE: connection refused")
            return await real(*args)

        session.propose = propose
        return session


@asyncio_test
async def test_the_loop_skips_an_open_breaker_without_trying_the_draft():
    clock = Clock()
    breakers = BreakerBoard(2, 5.0, clock=clock)
    b = breakers.get("")  # the draft client's own: a draft without replicas
    draft, target = SwitchableDraft(), FakeTarget()
    loop = SpeculativeLoop(target, draft, breakers=breakers)
    draft.down = True
    for _ in range(2):  # each generation fails once, then finishes target-only
        rounds = await run(loop, request(max_new_tokens=8))
        assert output(rounds) == greedy_reference(8)
        assert rounds[-1].stats.draft_fallback_reason == "error"
    assert b.state is BreakerState.OPEN and draft.failures == 2
    opened = len(draft.calls.opened)

    rounds = await run(loop, request(max_new_tokens=8))  # open: no draft session at all
    stats = rounds[-1].stats
    assert output(rounds) == greedy_reference(8)  # still exactly the target's output
    assert len(draft.calls.opened) == opened and draft.failures == 2
    assert stats.draft_fallback_reason == "breaker_open"
    assert stats.draft_fallback_rounds == stats.rounds - 1 > 0  # all but the last single-token round
    assert stats.drafted_tokens == 0 and all(r.draft_fallback for r in rounds[:-1])
    assert target.calls.closed == target.calls.opened  # released as always

    draft.down = False
    clock.now += 5.0  # half-open: the next round is the trial, it succeeds and closes the breaker
    rounds = await run(loop, request(max_new_tokens=8))
    assert b.state is BreakerState.CLOSED
    assert rounds[-1].stats.drafted_tokens > 0 and rounds[-1].stats.draft_fallback_rounds == 0
    assert output(rounds) == greedy_reference(8)


@asyncio_test
async def test_half_open_admits_one_trial_among_concurrent_generations():
    clock = Clock()
    breakers = BreakerBoard(1, 5.0, clock=clock)
    b = breakers.get("")
    draft, target = SwitchableDraft(), FakeTarget(delay_s=0.01)
    loop = SpeculativeLoop(target, draft, breakers=breakers)
    draft.down = True
    await run(loop, request(max_new_tokens=4))
    assert b.state is BreakerState.OPEN
    clock.now += 5.0
    failures = draft.failures
    results = await asyncio.gather(*(run(loop, request(max_new_tokens=6)) for _ in range(8)))
    assert draft.failures == failures + 1  # one trial, failed: open again, nobody else tried
    assert b.state is BreakerState.OPEN
    reasons = sorted(r[-1].stats.draft_fallback_reason for r in results)
    assert reasons == ["breaker_open"] * 7 + ["error"]
    assert all(output(r) == greedy_reference(6) for r in results)


@asyncio_test
async def test_a_deadline_during_the_trial_is_not_a_draft_failure():
    clock = Clock()
    breakers = BreakerBoard(1, 5.0, clock=clock)
    b = breakers.get("")
    b.record_failure()
    clock.now += 5.0
    draft = FakeDraft(delay_s=0.5)
    loop = SpeculativeLoop(FakeTarget(), draft, breakers=breakers)
    with pytest.raises(DeadlineExceeded):
        await run(loop, request(max_new_tokens=8, deadline=time.monotonic() + 0.05))
    assert b.state is BreakerState.HALF_OPEN and b.allow()  # the slot is free again, nothing recorded
