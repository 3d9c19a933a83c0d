"""Replica pools (orchestrator.resolve, orchestrator.replicas, orchestrator.pools) over fake replicas.

What a fleet relies on: endpoints parse and names resolve to all their addresses, re-resolved; a new
generation goes to the healthy replica with the fewest live generations and stays pinned to it; a replica
that cannot be opened is ejected at once and the next is tried; failed health checks eject a replica and
abandon its sessions, a passing one readmits it; a generation whose target or draft replica dies finishes
on another one, and so does one whose target model fails (a round unanswered, or a stub Triton reports
not healthy: its replica is then readmitted only once its model answers, not on Triton's readiness); a
draft replica whose rounds time out trips only its own circuit breaker, the generations it held move to
another replica, and new generations draft on the others meanwhile; and when no replica is left the error
names the pool and every attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from orchestrator.breaker import BreakerBoard, BreakerState
from orchestrator.clients import DraftUnavailable, TargetUnavailable
from orchestrator.generation import LoopSettings
from orchestrator.loop import SpeculativeLoop
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.pools import DraftPool, TargetPool
from orchestrator.replicas import PoolSettings, ReplicaPool
from orchestrator.resolve import Address, Endpoint, parse_endpoints, resolve
from tests.fakes import (
    FakeDraftReplica,
    FakeTargetReplica,
    agree_first,
    asyncio_test,
    fake_resolver,
    greedy_reference,
    ids,
    output,
    request,
    run,
)

FAST = PoolSettings(resolve_interval_s=0.05, health_interval_s=0.02, health_timeout_s=0.5, health_failures=2)


def target_pool(replicas: dict[str, FakeTargetReplica], spec: str | None = None, **kwargs) -> TargetPool:
    return TargetPool(spec or ",".join(replicas), make_client=lambda a: replicas[a.address], **kwargs)


def draft_pool(replicas: dict[str, FakeDraftReplica], **kwargs) -> DraftPool:
    return DraftPool(",".join(replicas), make_client=lambda a: replicas[a.address], **kwargs)


def fake_targets(*addresses: str) -> dict[str, FakeTargetReplica]:
    return {a: FakeTargetReplica(a) for a in addresses}


A, B, C = "10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"


# --- endpoints and names ----------------------------------------------------------------------------------


def test_endpoints_parse_lists_dns_targets_and_ipv6() -> None:
    assert parse_endpoints(" a:1, dns:///b.svc:2 ,[::1]:3,") == [Endpoint("a", 1), Endpoint("b.svc", 2), Endpoint("::1", 3)]
    assert [e.is_name for e in parse_endpoints("a:1,10.0.0.1:2,[::1]:3")] == [True, False, False]
    for bad in ("a", "a:", ":5", "a:0", "a:x", "a:70000", "a:1,a:1"):
        with pytest.raises(ValueError, match="endpoint|twice"):
            parse_endpoints(bad)


@asyncio_test
async def test_a_name_resolves_to_all_its_addresses_and_a_literal_to_itself() -> None:
    resolver = fake_resolver({"triton.svc": ["10.0.0.2", "10.0.0.1", "10.0.0.2"]})
    assert await resolve(Endpoint("triton.svc", 8001), resolver) == [
        Address("10.0.0.1:8001", "triton.svc"), Address("10.0.0.2:8001", "triton.svc"),
    ]  # fmt: skip
    assert await resolve(Endpoint("10.0.0.9", 8001), resolver) == [Address("10.0.0.9:8001", "")]
    with pytest.raises(OSError):
        await resolve(Endpoint("nowhere.svc", 1), resolver)


@asyncio_test
async def test_re_resolution_adds_and_retires_replicas_and_a_failure_keeps_them() -> None:
    table = {"triton.svc": ["10.0.0.1", "10.0.0.2"]}
    replicas = fake_targets(A, B, C)
    pool = target_pool(replicas, spec="triton.svc:8001", resolver=fake_resolver(table), settings=FAST)
    await pool.start()
    try:
        assert [s.address for s in pool.snapshot()] == [A, B]
        pinned = await pool.open(1)
        on = pinned.replica
        table["triton.svc"] = ["10.0.0.3"] + (["10.0.0.1"] if on == B else ["10.0.0.2"])  # the pinned one vanished
        await pool.pool.refresh()
        assert {s.address for s in pool.snapshot()} == {A, B, C}  # the vanished one stays while in use
        for i in range(4):  # but takes no new generation
            session = await pool.open(10 + i)
            assert session.replica != on
            await session.close()
        await pinned.close()
        assert on not in {s.address for s in pool.snapshot()}
        await asyncio.sleep(0)
        assert replicas[on].client_closed == 1  # its channel is closed once idle
        del table["triton.svc"]  # a DNS failure keeps what the pool had
        await pool.pool.refresh()
        assert len(pool.snapshot()) == 2
    finally:
        await pool.close()


# --- choice and pinning -----------------------------------------------------------------------------------


@asyncio_test
async def test_new_generations_go_to_the_replica_with_fewest_live_and_stay_pinned() -> None:
    replicas = fake_targets(A, B)
    pool = target_pool(replicas)
    await pool.start()
    try:
        sessions = [await pool.open(i + 1) for i in range(4)]
        assert sorted(s.replica for s in sessions) == [A, A, B, B]
        await sessions[0].close()
        freed = sessions[0].replica
        again = await pool.open(99)
        assert again.replica == freed  # the one with fewer live generations
        for s in sessions[1:]:
            await s.score(0, [1, 2], 1, request().params)
        for address, replica in replicas.items():  # each session's calls went to its own replica only
            expected = {s._inner.sequence_id for s in sessions[1:] if s.replica == address}
            assert {r[0] for r in replica.calls.requests} == expected
        live = {s.address: s.live for s in pool.snapshot()}
        assert live == {A: 2, B: 2}
    finally:
        await pool.close()


@asyncio_test
async def test_ties_are_broken_at_random() -> None:
    pool = target_pool(fake_targets(A, B, C))
    pool.pool._rng = random.Random(7)
    await pool.start()
    try:
        chosen = set()
        for i in range(30):
            session = await pool.open(i + 1)
            chosen.add(session.replica)
            await session.close()
        assert chosen == {A, B, C}
    finally:
        await pool.close()


# --- ejection, health, readmission -------------------------------------------------------------------------


@asyncio_test
async def test_a_replica_that_fails_to_open_is_ejected_at_once_and_the_next_one_is_tried() -> None:
    replicas = fake_targets(A, B)
    replicas[A].down = True
    pool = target_pool(replicas)
    await pool.start()
    try:
        sessions = [await pool.open(i + 1) for i in range(3)]
        assert [s.replica for s in sessions] == [B, B, B]
        assert len(replicas[A].calls.opened) == 0
        state = {s.address: s for s in pool.snapshot()}
        assert not state[A].healthy and state[A].ejections == 1 and state[B].healthy
    finally:
        await pool.close()


@asyncio_test
async def test_with_every_replica_down_the_error_names_the_pool_and_each_attempt() -> None:
    replicas = fake_targets(A, B)
    for r in replicas.values():
        r.down = True
    pool = target_pool(replicas)
    await pool.start()
    try:
        for _ in range(2):  # ejected replicas are still tried before giving up
            with pytest.raises(TargetUnavailable) as info:
                await pool.open(1)
            message = str(info.value)
            assert message.startswith(f"no target replica is available (pool {A},{B}); tried ")
            assert f"target (Triton at {A}) is unavailable: down" in message
            assert f"target (Triton at {B}) is unavailable: down" in message
        replicas[B].down = False  # back: served at once, before any health check readmits it
        assert (await pool.open(2)).replica == B
    finally:
        await pool.close()


@asyncio_test
async def test_a_generation_leaving_a_replica_is_never_reopened_on_it() -> None:
    drafts = {A: FakeDraftReplica(A)}
    pool = draft_pool(drafts)
    await pool.start()
    try:
        with pytest.raises(DraftUnavailable, match=f"has no replica other than {A}"):
            await pool.open(1, avoid=A)
        assert drafts[A].calls.opened == [] and pool.snapshot()[0].healthy  # not tried, not ejected
    finally:
        await pool.close()


@asyncio_test
async def test_a_pool_whose_name_resolves_to_nothing_is_unavailable_with_a_clear_message() -> None:
    pool = DraftPool("draft.svc:50052", resolver=fake_resolver({}))
    await pool.start()
    try:
        with pytest.raises(DraftUnavailable) as info:
            await pool.open(1)
        assert str(info.value) == "the draft pool (draft.svc:50052) has no replica: no endpoint resolved to an address"
    finally:
        await pool.close()


@asyncio_test
async def test_failed_health_checks_eject_and_abandon_then_a_passing_check_readmits() -> None:
    replicas = fake_targets(A, B)
    pool = target_pool(replicas, settings=FAST)
    await pool.start()
    try:
        sessions = [await pool.open(i + 1) for i in range(2)]
        on_a = next(s for s in sessions if s.replica == A)
        replicas[A].down = True
        await until_state(pool, A, healthy=False)
        assert replicas[A].abandoned and replicas[A].abandoned[0][0] == on_a._inner.sequence_id
        assert "2 health checks failed" in replicas[A].abandoned[0][1]
        assert [(await pool.open(10 + i)).replica for i in range(3)] == [B, B, B]
        replicas[A].down = False
        await until_state(pool, A, healthy=True)
        assert (await pool.open(20)).replica == A  # fewest live again
    finally:
        await pool.close()


async def until_state(pool: TargetPool | DraftPool, address: str, *, healthy: bool) -> None:
    for _ in range(250):
        if any(s.address == address and s.healthy == healthy for s in pool.snapshot()):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{address} never became {'healthy' if healthy else 'ejected'}: {pool.snapshot()}")


# --- failover of whole generations --------------------------------------------------------------------------


@asyncio_test
async def test_a_generation_whose_target_replica_dies_is_re_prefilled_on_another_and_finishes() -> None:
    replicas = fake_targets(A, B)
    first_replica: list[str] = []
    pool = target_pool(replicas)
    await pool.start()
    try:
        loop = SpeculativeLoop(pool, None, new_sequence_id=ids())
        rounds = []
        async for r in loop.generate(request(max_new_tokens=8, num_draft_tokens=0)):
            rounds.append(r)
            if len(rounds) == 3:  # kill the replica under the generation mid-way
                first_replica.append(next(s.address for s in pool.snapshot() if s.live == 1))
                replicas[first_replica[0]].down = True
        assert await loop.wait_released(5.0)
        assert output(rounds) == greedy_reference(8)
        assert rounds[-1].stats.target_reprefills == 1
        other = B if first_replica[0] == A else A
        assert len(replicas[other].calls.opened) == 1  # re-prefilled there
        assert {s.address: s.live for s in pool.snapshot()} == {A: 0, B: 0}
    finally:
        await pool.close()


@pytest.mark.parametrize("failure", ["stuck", "stub_unhealthy"])
@asyncio_test
async def test_a_failed_model_moves_the_generation_and_its_replica_waits_until_the_model_answers(failure) -> None:
    """A round left unanswered (``stuck``), or answered that the model's stub is not healthy: Triton's
    readiness passes in both cases, and must not readmit the replica."""
    replicas = fake_targets(A, B)
    pool = target_pool(replicas, settings=FAST, stall_timeout_s=0.3)
    await pool.start()
    failed: list[str] = []
    try:
        loop = SpeculativeLoop(pool, None, new_sequence_id=ids())
        rounds = []
        async for r in loop.generate(request(max_new_tokens=8, num_draft_tokens=0)):
            rounds.append(r)
            if len(rounds) == 3:  # the model under the generation fails; its Triton stays ready
                failed.append(next(s.address for s in pool.snapshot() if s.live == 1))
                setattr(replicas[failed[0]], failure, True)
        assert await loop.wait_released(5.0)
        assert output(rounds) == greedy_reference(8)
        assert rounds[-1].stats.target_reprefills == 1
        other = B if failed[0] == A else A
        assert len(replicas[other].calls.opened) == 1  # re-prefilled there
        (abandoned,) = replicas[failed[0]].abandoned
        why = "a round got no answer within 0.3 s" if failure == "stuck" else "is not healthy"
        assert why in abandoned[1]
        checks = replicas[failed[0]].checks
        await asyncio.sleep(0.5)  # 25 health intervals: Triton's readiness would pass every one
        assert {s.address: s.healthy for s in pool.snapshot()} == {failed[0]: False, other: True}
        assert replicas[failed[0]].checks == checks and replicas[failed[0]].answer_checks >= 1
        assert [(await pool.open(10 + i)).replica for i in range(2)] == [other, other]
        setattr(replicas[failed[0]], failure, False)  # its model answers again (restarted): readmitted
        await until_state(pool, failed[0], healthy=True)
        assert (await pool.open(20)).replica == failed[0]
    finally:
        await pool.close()



@asyncio_test
async def test_a_readiness_check_under_way_when_its_replica_is_quarantined_does_not_readmit_it() -> None:
    """A stuck model behind a Triton that reports itself ready: a readiness check that started before the
    quarantine passes after it, and must not readmit the replica (only the model's answer does)."""
    started, release, answers = asyncio.Event(), asyncio.Event(), [False]

    async def ready(client: object, timeout: float) -> None:
        started.set()
        await release.wait()  # Triton says ready, a little late

    async def answer(client: object, timeout: float) -> None:
        if not answers[0]:
            raise TargetUnavailable("the model does not answer")

    pool = ReplicaPool("target", A, make_client=lambda address: FakeTargetReplica(A), check=ready, answer_check=answer,
                       settings=PoolSettings(health_failures=1))  # fmt: skip
    await pool.refresh()  # no background checks: the test runs them
    (replica,) = pool.candidates()
    under_way = asyncio.ensure_future(pool.check_all())
    await started.wait()
    pool.quarantine(replica, "a round got no answer")
    release.set()
    await under_way
    assert not replica.healthy and replica.quarantined and [s.healthy for s in pool.snapshot()] == [False]
    await pool.check_all()  # the next check is the model's answer: none yet
    assert not replica.healthy
    answers[0] = True
    await pool.check_all()
    assert replica.healthy and not replica.quarantined and [s.healthy for s in pool.snapshot()] == [True]
    await pool.close()

def test_a_negative_stall_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="stall_timeout_s must be >= 0"):
        target_pool(fake_targets(A), stall_timeout_s=-1)


@asyncio_test
async def test_a_generation_whose_draft_replica_dies_continues_on_another_draft_replica() -> None:
    drafts = {A: FakeDraftReplica(A, policy=agree_first(99)), B: FakeDraftReplica(B, policy=agree_first(99))}
    target = target_pool(fake_targets(C))
    pool = draft_pool(drafts)
    await target.start()
    await pool.start()
    try:
        loop = SpeculativeLoop(target, pool, new_sequence_id=ids())
        rounds = []
        async for r in loop.generate(request(max_new_tokens=15, num_draft_tokens=2)):
            rounds.append(r)
            if len(rounds) == 1:
                drafts[next(s.address for s in pool.snapshot() if s.live == 1)].down = True
        assert await loop.wait_released(5.0)
        stats = rounds[-1].stats
        assert output(rounds) == greedy_reference(15)
        assert stats.draft_fallback_rounds == 0 and all(r.num_draft_tokens == 2 for r in rounds[:-1])
        assert sorted(len(d.calls.opened) for d in drafts.values()) == [1, 1]  # one session on each
        assert not loop.breakers.state.value  # all closed: no draft failure was counted
    finally:
        await pool.close()
        await target.close()


@asyncio_test
async def test_with_its_only_draft_replica_down_a_generation_finishes_target_only() -> None:
    drafts = {A: FakeDraftReplica(A, policy=agree_first(99))}
    target = target_pool(fake_targets(C))
    pool = draft_pool(drafts)
    await target.start()
    await pool.start()
    try:
        drafts[A].down = True
        rounds = await run(SpeculativeLoop(target, pool, new_sequence_id=ids()), request(max_new_tokens=6))
        assert output(rounds) == greedy_reference(6)
        assert rounds[-1].stats.draft_fallback_rounds == rounds[-1].stats.rounds - 1  # the last round drafts nothing
        assert rounds[-1].stats.draft_fallback_reason == "error"
    finally:
        await pool.close()
        await target.close()


@contextlib.asynccontextmanager
async def loop_over_drafts(
    drafts: dict[str, FakeDraftReplica], breakers: BreakerBoard, **settings: float
) -> AsyncIterator[SpeculativeLoop]:
    """A loop over a pool of ``drafts`` whose choice asks ``breakers``, and one target replica."""
    target = target_pool(fake_targets(C))
    pool = draft_pool(drafts, admits=breakers.admits)
    await target.start()
    await pool.start()
    try:
        yield SpeculativeLoop(target, pool, LoopSettings(**settings), new_sequence_id=ids(), breakers=breakers)
    finally:
        await pool.close()
        await target.close()


@asyncio_test
async def test_a_stuck_draft_replica_trips_only_its_own_breaker_and_its_generations_draft_on_the_other() -> None:
    drafts = {A: FakeDraftReplica(A, policy=agree_first(99)), B: FakeDraftReplica(B, policy=agree_first(99))}
    drafts[A].delay_s = 30.0  # stuck: it answers health checks and opens, its rounds never end
    breakers = BreakerBoard(1, 600.0)
    async with loop_over_drafts(drafts, breakers, draft_round_timeout_s=0.05) as loop:
        # Two at once: one on each replica (fewest live). The one on A times out and moves to B.
        first = await asyncio.gather(*(run(loop, request(max_new_tokens=8, num_draft_tokens=2)) for _ in range(2)))
        for rounds in first:
            assert output(rounds) == greedy_reference(8)
            assert rounds[-1].stats.draft_fallback_rounds == 0 and rounds[-1].stats.drafted_tokens > 0
        assert [len(drafts[a].calls.opened) for a in (A, B)] == [1, 2]
        assert breakers.get(A).state is BreakerState.OPEN
        # A's breaker is open: new generations open on B and draft every round there; B's and the draft
        # client's own breakers stay closed (one process-wide breaker would skip drafting for all).
        for _ in range(6):
            rounds = await run(loop, request(max_new_tokens=8, num_draft_tokens=2))
            assert output(rounds) == greedy_reference(8)
            assert rounds[-1].stats.draft_fallback_rounds == 0 and rounds[-1].stats.drafted_tokens > 0
        assert [len(drafts[a].calls.opened) for a in (A, B)] == [1, 8]
        assert breakers.get(B).state is breakers.get("").state is BreakerState.CLOSED
        assert breakers.state is BreakerState.OPEN  # what the gauge shows: the most open of them
        assert {s.address: s.admitted for s in loop.draft.snapshot()} == {A: False, B: True}  # per replica


@asyncio_test
async def test_with_every_draft_replicas_breaker_open_a_generation_opens_no_stream_and_runs_target_only() -> None:
    drafts = {A: FakeDraftReplica(A, policy=agree_first(99))}
    drafts[A].delay_s = 30.0
    breakers = BreakerBoard(1, 600.0)
    async with loop_over_drafts(drafts, breakers, draft_round_timeout_s=0.05) as loop:
        rounds = await run(loop, request(max_new_tokens=6, num_draft_tokens=2))
        assert rounds[-1].stats.draft_fallback_reason == "timeout" and not breakers.admits(A)
        rounds = await run(loop, request(max_new_tokens=6, num_draft_tokens=2))
        assert output(rounds) == greedy_reference(6)
        assert rounds[-1].stats.draft_fallback_reason == "breaker_open"
        assert len(drafts[A].calls.opened) == 1  # not even a stream to it
        assert breakers.get("").state is BreakerState.CLOSED  # skipping is no failure of the draft client


@asyncio_test
async def test_a_timed_out_round_moves_its_generation_off_its_replica_even_when_that_one_is_the_least_loaded() -> None:
    drafts = {A: FakeDraftReplica(A, policy=agree_first(99)), B: FakeDraftReplica(B, policy=agree_first(99))}
    drafts[A].delay_s = 30.0
    breakers = BreakerBoard(3, 600.0)  # one timeout leaves A's breaker closed: only the move keeps it off A
    async with loop_over_drafts(drafts, breakers, draft_round_timeout_s=0.05) as loop:
        held = await loop.draft.open(999, avoid=A)  # B holds a generation: A has the fewest live
        try:
            rounds = await run(loop, request(max_new_tokens=8, num_draft_tokens=2))
        finally:
            await held.close()
        assert output(rounds) == greedy_reference(8)
        assert rounds[-1].stats.draft_fallback_rounds == 0 and rounds[-1].stats.drafted_tokens > 0
        assert [len(drafts[a].calls.opened) for a in (A, B)] == [1, 2]  # B: the held one and the moved one
        assert breakers.get(A).state is BreakerState.CLOSED and not breakers.get(A).settled  # one failure counted
        assert breakers.get(B).settled and breakers.get("").settled


@asyncio_test
async def test_a_timed_out_round_finishes_target_only_once_the_generations_re_prefills_are_spent() -> None:
    drafts = {A: FakeDraftReplica(A, policy=agree_first(99)), B: FakeDraftReplica(B, policy=agree_first(99))}
    drafts[A].delay_s = drafts[B].delay_s = 30.0  # both stuck: the move to B times out as well
    breakers = BreakerBoard(3, 600.0)
    async with loop_over_drafts(drafts, breakers, draft_round_timeout_s=0.05) as loop:
        rounds = await run(loop, request(max_new_tokens=6, num_draft_tokens=2))
        assert output(rounds) == greedy_reference(6)
        assert rounds[-1].stats.draft_fallback_reason == "timeout"
        assert sorted(len(d.calls.opened) for d in drafts.values()) == [1, 1]  # one move (max_draft_reprefills=1)
        assert not breakers.get(A).settled and not breakers.get(B).settled  # one timeout counted on each


@asyncio_test
async def test_a_generation_does_not_move_to_a_draft_replica_whose_breaker_is_open() -> None:
    drafts = {A: FakeDraftReplica(A, policy=agree_first(99)), B: FakeDraftReplica(B, policy=agree_first(99))}
    breakers = BreakerBoard(1, 600.0)
    breakers.get(B).record_failure()  # B's breaker is open
    async with loop_over_drafts(drafts, breakers) as loop:
        rounds = []
        async for r in loop.generate(request(max_new_tokens=12, num_draft_tokens=2)):
            rounds.append(r)
            drafts[A].down = True  # dies after the first round: B is healthy, but its breaker is open
        assert output(rounds) == greedy_reference(12)
        assert rounds[-1].stats.draft_fallback_reason == "error"
        assert [len(drafts[a].calls.opened) for a in (A, B)] == [1, 0]


# --- metrics ------------------------------------------------------------------------------------------------


@asyncio_test
async def test_per_replica_counts_are_exported() -> None:
    replicas = fake_targets(A, B)
    pool = target_pool(replicas)
    await pool.start()
    metrics = OrchestratorMetrics(CollectorRegistry())
    metrics.watch_replicas(pool.snapshot)
    try:
        sessions = [await pool.open(i + 1) for i in range(3)]
        await sessions[0].close()
        pool.pool.eject(next(r for r in pool.pool.candidates() if r.address == A), "test")

        def value(name: str, address: str) -> float | None:
            return metrics.registry.get_sample_value(name, {"pool": "target", "replica": address})

        p = "specdec_orchestrator_replica_"
        assert value(p + "generations_total", A) + value(p + "generations_total", B) == 3
        assert value(p + "live_generations", A) + value(p + "live_generations", B) == 2
        assert (value(p + "healthy", A), value(p + "healthy", B)) == (0.0, 1.0)
        assert (value(p + "ejections_total", A), value(p + "ejections_total", B)) == (1.0, 0.0)
        assert (value(p + "admitted", A), value(p + "admitted", B)) == (1.0, 1.0)  # Triton's: no breaker
    finally:
        await pool.close()


def test_pool_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        PoolSettings(health_interval_s=0)
    with pytest.raises(ValueError):
        PoolSettings(health_failures=0)
    with pytest.raises(ValueError, match="no endpoints"):
        TargetPool(" , ")


@asyncio_test
async def test_a_plain_stream_failure_moves_the_generation_only_if_the_replica_stops_answering() -> None:
    from orchestrator.clients import TargetConnectionLost, TargetError

    replicas = fake_targets(A, B)
    pool = target_pool(replicas)
    await pool.start()
    try:
        session = await pool.open(1)
        replica = replicas[session.replica]
        replica.fail_at = {0: TargetError("target stream INTERNAL: Internal error from Core")}
        with pytest.raises(TargetError) as info:  # the replica still answers: an ordinary error
            await session.score(0, [1, 2], 1, request().params)
        assert type(info.value) is TargetError
        replica.fail_at = {1: TargetError("target stream INTERNAL: Internal error from Core")}
        replica.ready = False  # now it does not answer its health check either
        with pytest.raises(TargetConnectionLost, match="does not answer"):
            await session.score(0, [1, 2], 1, request().params)
        assert not {s.address: s.healthy for s in pool.snapshot()}[replica.address]
    finally:
        await pool.close()
