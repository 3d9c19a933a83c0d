"""The speculative loop against scripted fake clients that count calls and record keep/append arguments.

The fakes keep real caches (token lists) and compute logits from the cache *contents*, so any slip in the
loop's keep-length bookkeeping changes the output and the greedy-equivalence tests catch it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from orchestrator.clients import (
    DeadlineExceeded,
    DraftCacheLost,
    DraftError,
    Proposal,
    TargetCacheLost,
    TargetError,
    TargetUnavailable,
)
from orchestrator.loop import FinishReason, LoopSettings, SpeculativeLoop
from specdec.sampling import SamplingParams
from tests.fakes import (
    PROMPT,
    FakeDraft,
    FakeDraftSession,
    FakeTarget,
    FakeTargetSession,
    V,
    agree_first,
    argmax_target,
    asyncio_test,
    greedy_reference,
    ids,
    noisy_draft_logits,
    output,
    request,
    run,
    target_logits,
)

# --- bookkeeping ------------------------------------------------------------------------------------------

P = len(PROMPT)


@asyncio_test
async def test_accept_all_bookkeeping():
    target, draft = FakeTarget(), FakeDraft(policy=agree_first(99))
    rounds = await run(SpeculativeLoop(target, draft, new_sequence_id=ids()), request(max_new_tokens=10))
    out = output(rounds)
    assert out == greedy_reference(10)
    assert [r.accepted for r in rounds] == [4, 4]
    # Round 1: both start from scratch.
    assert draft.calls.requests[0] == (100, 0, list(PROMPT), 4)
    assert target.calls.requests[0] == (100, 0, list(PROMPT) + out[:4], 5)
    # Round 2: the draft's context is the prompt (keep P) and it is sent the 4 accepted drafts + the bonus;
    # the target fed all 4 (keep P+4).
    assert draft.calls.requests[1] == (100, P, out[:5], 4)
    assert target.calls.requests[1] == (100, P + 4, out[4:5] + out[5:9], 5)
    assert len(rounds[-1].token_ids) == 5 and rounds[-1].finish_reason is FinishReason.LENGTH


@asyncio_test
async def test_reject_at_zero_bookkeeping():
    target, draft = FakeTarget(), FakeDraft(policy=agree_first(0))
    rounds = await run(SpeculativeLoop(target, draft, new_sequence_id=ids()), request(max_new_tokens=6))
    out = output(rounds)
    assert out == greedy_reference(6)
    assert [r.accepted for r in rounds] == [0] * 6
    # Nothing of the draft's own tokens is kept: both caches roll back to the prompt, then the recovered token.
    assert draft.calls.requests[1][1:] == (P, out[:1], 4)
    assert target.calls.requests[1][1] == P
    assert target.calls.requests[1][2][:1] == out[:1] and len(target.calls.requests[1][2]) == 5
    # Rounds never draft past the limit: the last one has room for a single token and drafts nothing.
    assert [r.num_draft_tokens for r in rounds] == [4, 4, 3, 2, 1, 0]
    assert len(draft.calls.requests) == 5
    assert rounds[-1].stats.accepted_per_position == [0, 0, 0, 0]


@asyncio_test
async def test_partial_accept_bookkeeping():
    target, draft = FakeTarget(), FakeDraft(policy=agree_first(2))
    rounds = await run(SpeculativeLoop(target, draft, new_sequence_id=ids()), request(max_new_tokens=6))
    out = output(rounds)
    assert out == greedy_reference(6)
    assert [r.accepted for r in rounds] == [2, 2]
    assert draft.calls.requests[1][1:3] == (P, out[:3])  # the context, then the accepted drafts and the new token
    assert target.calls.requests[1][1] == P + 2
    assert target.calls.requests[1][2][:1] == out[2:3]
    stats = rounds[-1].stats
    assert stats.accepted_per_position == [2, 2, 0, 0]
    assert stats.emitted_tokens == stats.accepted_tokens + stats.rounds == 6


@asyncio_test
async def test_k1_sends_the_accepted_draft_and_the_bonus():
    target, draft = FakeTarget(), FakeDraft(policy=agree_first(99))
    loop = SpeculativeLoop(target, draft, new_sequence_id=ids())
    rounds = await run(loop, request(num_draft_tokens=1, max_new_tokens=4))
    out = output(rounds)
    assert out == greedy_reference(4)
    assert draft.calls.requests[1][1:3] == (P, out[:2])


@asyncio_test
async def test_target_only_k0():
    target, draft = FakeTarget(), FakeDraft()
    loop = SpeculativeLoop(target, draft, new_sequence_id=ids())
    rounds = await run(loop, request(num_draft_tokens=0, max_new_tokens=5))
    out = output(rounds)
    assert out == greedy_reference(5)
    assert draft.calls.opened == [] and draft.calls.requests == []
    assert [req[1:] for req in target.calls.requests] == [(0, list(PROMPT), 1)] + [
        (P + i - 1, [out[i - 1]], 1) for i in range(1, 5)
    ]
    stats = rounds[-1].stats
    assert (stats.rounds, stats.drafted_tokens, stats.draft_fallback_rounds) == (5, 0, 0)
    assert stats.accepted_per_position == []


@asyncio_test
async def test_target_only_rounds_decode_on_the_target_with_the_same_tokens():
    # With target_steps, a K = 0 round is one decode: the target samples up to that many tokens itself (the
    # fake, as the Triton model, scores one token per forward and draws with the shared round rule).
    target = FakeTarget()
    loop = SpeculativeLoop(target, FakeDraft(), LoopSettings(target_steps=4), new_sequence_id=ids())
    rounds = await run(loop, request(num_draft_tokens=0, max_new_tokens=10))
    out = output(rounds)
    assert out == greedy_reference(10)
    assert [len(r.token_ids) for r in rounds] == [4, 4, 2]  # never past the limit
    # The next round's keep is every token but the last of the decode before: the target fed the rest.
    starts = [req[1:3] for req in target.calls.requests if len(req[2]) > 1 or req[1] in (P + 3, P + 7)]
    assert starts[0] == (0, list(PROMPT)) and (P + 3, out[3:4]) in starts and (P + 7, out[7:8]) in starts
    assert rounds[-1].stats.rounds == 3 and rounds[-1].stats.rounds_by_k == [3]


@pytest.mark.parametrize(("k", "lookup"), [(None, 6), (3, 6), (0, 0)])
@asyncio_test
async def test_decodes_look_up_drafts_next_to_the_target_unless_the_request_turned_speculation_off(k, lookup):
    target = FakeTarget()
    loop = SpeculativeLoop(target, None, LoopSettings(target_steps=4, target_lookup=6), new_sequence_id=ids())
    await run(loop, request(num_draft_tokens=k, max_new_tokens=10))  # no draft: every round decodes
    assert [d.lookup for d in target.calls.decodes] == [lookup] * 3


@pytest.mark.parametrize(("k", "fallback"), [(None, ""), (3, "no_draft")])
@asyncio_test
async def test_without_a_draft_auto_k_runs_target_only_rounds_and_only_a_fixed_k_reports_a_fallback(k, fallback):
    loop = SpeculativeLoop(FakeTarget(), None, LoopSettings(target_steps=4), new_sequence_id=ids())
    rounds = await run(loop, request(num_draft_tokens=k, max_new_tokens=10))
    stats = rounds[-1].stats
    assert output(rounds) == greedy_reference(10)
    assert stats.draft_fallback_reason == fallback
    assert [r.draft_fallback for r in rounds] == [k is not None] * len(rounds)
    assert stats.draft_fallback_rounds == (stats.rounds if k else 0) and stats.rounds == len(rounds) == 3


@pytest.mark.parametrize(("k", "reproducible"), [(0, False), (0, True), (None, True)])
@asyncio_test
async def test_a_seeded_generation_is_the_same_whoever_samples_its_target_only_tokens(k, reproducible):
    # Each token's noise is keyed by (seed, position): a decode on the target draws what the loop would. (With
    # auto K, which positions are drafted depends on the rounds; only the coupled mode makes that moot.)
    params = SamplingParams(temperature=0.9, top_k=8, top_p=0.95)

    async def sampled(target_steps: int) -> list[int]:
        loop = SpeculativeLoop(FakeTarget(), FakeDraft(), LoopSettings(target_steps=target_steps))
        req = request(params=params, seed=99, max_new_tokens=24, num_draft_tokens=k, reproducible=reproducible)
        return output(await run(loop, req))

    one = await sampled(1)
    assert one == await sampled(8) == await sampled(3)
    assert one != output(await run(SpeculativeLoop(FakeTarget(), None, LoopSettings(target_steps=8)),
                                   request(params=params, seed=100, max_new_tokens=24, num_draft_tokens=0)))


@asyncio_test
async def test_a_decode_that_loses_the_target_cache_reprefills_and_stops_at_eos():
    reference = greedy_reference(12)
    eos = reference[6]
    target = FakeTarget(fail_at={2: TargetCacheLost("evicted")})
    loop = SpeculativeLoop(target, None, LoopSettings(target_steps=4), new_sequence_id=ids())
    rounds = await run(loop, request(num_draft_tokens=0, max_new_tokens=12, eos_token_id=eos))
    assert output(rounds) == reference[: reference.index(eos)] and rounds[-1].finish_reason is FinishReason.EOS
    assert rounds[-1].stats.target_reprefills == 1 and len(target.calls.opened) == 2
    assert sorted(target.calls.closed) == sorted(target.calls.opened)


@asyncio_test
async def test_max_new_tokens_limits_the_last_round():
    target, draft = FakeTarget(), FakeDraft(policy=agree_first(99))
    rounds = await run(SpeculativeLoop(target, draft, new_sequence_id=ids()), request(max_new_tokens=8))
    assert output(rounds) == greedy_reference(8)
    assert [r.num_draft_tokens for r in rounds] == [4, 2]  # 5 + 3 tokens: never drafts past the limit
    assert rounds[-1].finish_reason is FinishReason.LENGTH


@asyncio_test
async def test_context_length_finish():
    target, draft = FakeTarget(), FakeDraft(policy=agree_first(99))
    rounds = await run(SpeculativeLoop(target, draft), request(max_new_tokens=50, context_length=P + 7))
    assert output(rounds) == greedy_reference(7)
    assert rounds[-1].finish_reason is FinishReason.CONTEXT_LENGTH
    assert max(len(r[2]) + r[1] for r in target.calls.requests) <= P + 7


@asyncio_test
async def test_eos_stops_and_is_not_emitted():
    reference = greedy_reference(12)
    eos = reference[6]
    expected = reference[: reference.index(eos)]
    target, draft = FakeTarget(), FakeDraft()
    rounds = await run(SpeculativeLoop(target, draft), request(max_new_tokens=12, eos_token_id=eos))
    assert output(rounds) == expected
    assert rounds[-1].finish_reason is FinishReason.EOS
    assert len(target.calls.closed) == 1 and len(draft.calls.closed) == 1


# --- release on every exit path ---------------------------------------------------------------------------


@asyncio_test
async def test_release_once_on_normal_end():
    target, draft = FakeTarget(), FakeDraft()
    rounds = await run(SpeculativeLoop(target, draft, new_sequence_id=ids()), request())
    assert target.calls.opened == [100] and draft.calls.opened == [100]
    assert target.calls.closed == [100] and draft.calls.closed == [100]
    assert rounds[-1].stats.finished_at is not None


class _HeldClose:
    """Makes a fake session's close wait until ``let_go`` is set."""

    def __init__(self) -> None:
        self.let_go = asyncio.Event()

    def hold(self, session_type: type) -> Callable[[], None]:
        original = session_type.close

        async def close(session: Any) -> None:
            await self.let_go.wait()
            await original(session)

        session_type.close = close
        return lambda: setattr(session_type, "close", original)


@asyncio_test
async def test_the_generation_ends_without_waiting_for_the_releases():
    target, draft = FakeTarget(delay_s=0.01), FakeDraft(delay_s=0.01)
    loop = SpeculativeLoop(target, draft, new_sequence_id=ids())
    held = _HeldClose()
    restore = [held.hold(FakeTargetSession), held.hold(FakeDraftSession)]
    try:
        rounds = [r async for r in loop.generate(request())]  # would hang if the end awaited the closes
        stats = rounds[-1].stats
        assert rounds[-1].finish_reason is FinishReason.LENGTH and stats.finished_at is not None
        assert target.calls.closed == [] and draft.calls.closed == []  # still under way
        assert stats.draft_time_s > 0 and stats.target_time_s > 0
        assert stats.total_time_s >= stats.draft_time_s + stats.target_time_s
        assert not await loop.wait_released(0.05)
        held.let_go.set()
        assert await loop.wait_released(5.0)
        assert target.calls.closed == [100] and draft.calls.closed == [100]
    finally:
        for undo in restore:
            undo()


@asyncio_test
async def test_release_once_on_early_consumer_close():
    target, draft = FakeTarget(), FakeDraft()
    loop = SpeculativeLoop(target, draft, new_sequence_id=ids())
    async with contextlib.aclosing(loop.generate(request(max_new_tokens=40))) as rounds:
        async for _ in rounds:
            break
    assert await loop.wait_released(5.0)
    assert target.calls.closed == [100] and draft.calls.closed == [100]
    assert len(target.calls.requests) == 1


@asyncio_test
async def test_release_once_on_exception():
    target = FakeTarget(fail_at={1: TargetError("boom")})
    draft = FakeDraft()
    with pytest.raises(TargetError, match="boom"):
        await run(SpeculativeLoop(target, draft, new_sequence_id=ids()), request())
    assert target.calls.closed == [100] and draft.calls.closed == [100]


@asyncio_test
async def test_release_on_cancel():
    target, draft = FakeTarget(delay_s=0.05), FakeDraft()
    loop = SpeculativeLoop(target, draft, new_sequence_id=ids())
    task = asyncio.create_task(run(loop, request(max_new_tokens=100)))
    await asyncio.sleep(0.12)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await loop.wait_released(5.0)
    assert target.calls.closed == [100] and draft.calls.closed == [100]


@asyncio_test
async def test_deadline_releases_and_raises():
    target, draft = FakeTarget(delay_s=0.05), FakeDraft()
    req = request(max_new_tokens=100, deadline=time.monotonic() + 0.12)
    with pytest.raises(DeadlineExceeded):
        await run(SpeculativeLoop(target, draft, new_sequence_id=ids()), req)
    assert target.calls.closed == [100] and draft.calls.closed == [100]


@asyncio_test
async def test_past_deadline_calls_nothing():
    target, draft = FakeTarget(), FakeDraft()
    with pytest.raises(DeadlineExceeded):
        await run(SpeculativeLoop(target, draft), request(deadline=time.monotonic() - 1))
    assert target.calls.opened == [] and draft.calls.opened == []


# --- exactness --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
@asyncio_test
async def test_greedy_speculative_equals_greedy_target_only(k):
    spec = await run(SpeculativeLoop(FakeTarget(), FakeDraft()), request(num_draft_tokens=k, max_new_tokens=30))
    base = await run(SpeculativeLoop(FakeTarget(), None), request(num_draft_tokens=0, max_new_tokens=30))
    assert output(spec) == output(base) == greedy_reference(30)
    assert 0 < spec[-1].stats.accepted_tokens < spec[-1].stats.drafted_tokens  # a mix of accepts and rejects


@asyncio_test
async def test_sampled_run_is_reproducible_per_seed():
    params = SamplingParams(temperature=0.9, top_k=8, top_p=0.95)

    async def sampled(seed: int) -> list[int]:
        loop = SpeculativeLoop(FakeTarget(), FakeDraft())
        return output(await run(loop, request(params=params, seed=seed, max_new_tokens=24)))

    first = await sampled(7)
    assert first == await sampled(7)
    assert first != await sampled(8)


@asyncio_test
async def test_narrow_draft_q_is_padded():
    draft = FakeDraft(model=lambda prefix: noisy_draft_logits(prefix)[: V - 3])  # q [K, V - 3]
    params = SamplingParams(temperature=1.0)
    rounds = await run(SpeculativeLoop(FakeTarget(), draft), request(params=params, max_new_tokens=20))
    assert len(output(rounds)) == 20 and rounds[-1].stats.accepted_tokens > 0


@asyncio_test
async def test_narrow_target_vocabulary_is_padded():
    draft = FakeDraft()  # q rows of V columns: the loop pads the target's narrower p [., V - 2] with zeros
    target = FakeTarget(model=lambda prefix: target_logits(prefix)[: V - 2])
    params = SamplingParams(temperature=1.0)
    rounds = await run(SpeculativeLoop(target, draft), request(params=params, max_new_tokens=20))
    assert all(0 <= t < V - 2 for t in output(rounds))


# --- failures ---------------------------------------------------------------------------------------------


@asyncio_test
async def test_draft_error_falls_back_to_target_only():
    target, draft = FakeTarget(), FakeDraft(fail_at={1: DraftError("draft down")})
    rounds = await run(SpeculativeLoop(target, draft, new_sequence_id=ids()), request(max_new_tokens=12))
    assert output(rounds) == greedy_reference(12)
    stats = rounds[-1].stats
    assert stats.draft_fallback_rounds == stats.rounds - 2 > 0  # not the first, nor the last single-token round
    assert all(r.proposed == 0 for r in rounds[1:]) and all(r.draft_fallback for r in rounds[1:-1])
    assert len(draft.calls.requests) == 2 and draft.calls.closed == [100]
    assert target.calls.closed == [100]


@asyncio_test
async def test_draft_cache_lost_reprefills_once_then_falls_back():
    target = FakeTarget()
    draft = FakeDraft(fail_at={1: DraftCacheLost("gone"), 3: DraftCacheLost("gone again")})
    rounds = await run(SpeculativeLoop(target, draft, new_sequence_id=ids()), request(max_new_tokens=20))
    assert output(rounds) == greedy_reference(20)
    # Round 2 lost the cache: a new stream (new id) re-sends everything with keep 0.
    seq, keep, append, _ = draft.calls.requests[2]
    assert (seq, keep) == (101, 0) and append == list(PROMPT) + output(rounds[:1])
    assert draft.calls.opened == [100, 101] and sorted(draft.calls.closed) == [100, 101]
    assert rounds[-1].stats.draft_fallback_rounds > 0  # the second loss ends drafting


@asyncio_test
async def test_slow_draft_falls_back():
    target, draft = FakeTarget(), FakeDraft(delay_s=0.2)
    loop = SpeculativeLoop(target, draft, LoopSettings(draft_round_timeout_s=0.02), new_sequence_id=ids())
    rounds = await run(loop, request(max_new_tokens=6))
    assert output(rounds) == greedy_reference(6)
    assert rounds[-1].stats.draft_fallback_rounds == 5  # all but the last single-token round
    assert draft.calls.closed == [100]


@asyncio_test
async def test_target_cache_lost_reprefills_under_a_new_id():
    target, draft = FakeTarget(fail_at={1: TargetCacheLost("no cache")}), FakeDraft(policy=agree_first(1))
    rounds = await run(SpeculativeLoop(target, draft, new_sequence_id=ids()), request(max_new_tokens=10))
    assert output(rounds) == greedy_reference(10)
    lost, resent = target.calls.requests[1], target.calls.requests[2]
    assert resent[0] == 101 and resent[1] == 0
    assert resent[2] == list(PROMPT) + output(rounds[:1]) + lost[2][1:]  # the whole prefix + the same drafts
    assert target.calls.opened == [100, 101] and sorted(target.calls.closed) == [100, 101]
    assert rounds[-1].stats.target_reprefills == 1
    assert set(r[0] for r in draft.calls.requests) == {100}  # the draft keeps its cache


@asyncio_test
async def test_target_cache_lost_too_often_is_unavailable():
    lost = TargetCacheLost("no cache")
    target, draft = FakeTarget(fail_at={1: lost, 2: lost, 3: lost}), FakeDraft()
    with pytest.raises(TargetUnavailable):
        loop = SpeculativeLoop(target, draft, LoopSettings(max_target_reprefills=2), new_sequence_id=ids())
        await run(loop, request())
    assert len(target.calls.closed) == len(target.calls.opened) == 3
    assert draft.calls.closed == [100]


@pytest.mark.parametrize(
    "malform",
    [
        lambda p: Proposal(p.token_ids + (1,), None, p.cache_length),  # more tokens than K
        lambda p: Proposal(p.token_ids, None, p.cache_length + 1),  # a context the orchestrator did not send
        lambda p: Proposal(p.token_ids, torch.ones(len(p.token_ids) + 1, V) / V, p.cache_length),  # q rows != tokens
    ],
    ids=["too many tokens", "wrong cache length", "q rows do not match"],
)
@asyncio_test
async def test_malformed_proposal_falls_back(malform):
    class Malformed(FakeDraft):
        async def open(self, sequence_id: int, *, timeout: float | None = None, avoid: str = ""):
            session = await super().open(sequence_id, timeout=timeout)
            real = session.propose

            async def propose(*args):
                return malform(await real(*args))

            session.propose = propose
            return session

    target, draft = FakeTarget(), Malformed()
    rounds = await run(SpeculativeLoop(target, draft), request(max_new_tokens=5))
    assert output(rounds) == greedy_reference(5)
    assert rounds[-1].stats.draft_fallback_rounds == 4


@asyncio_test
async def test_short_and_deterministic_proposals_under_sampling_are_used():
    """A lookup drafter: no q rows (one-hot: exact under any settings), and fewer than K tokens, or none."""
    def lookup(prefix: list[int], i: int) -> int | None:
        return None if len(prefix) % 3 == 0 or i >= 2 else argmax_target(prefix)

    draft = FakeDraft(policy=lookup)
    params = SamplingParams(temperature=0.7)
    rounds = await run(SpeculativeLoop(FakeTarget(), draft), request(params=params, max_new_tokens=12))
    assert len(output(rounds)) == 12
    stats = rounds[-1].stats
    assert stats.drafted_tokens > 0 and stats.draft_fallback_rounds == 0
    assert {r.proposed for r in rounds[:-1]} <= {0, 1, 2} and 0 in {r.proposed for r in rounds}
    for r in rounds:  # the target scored exactly what was proposed
        assert r.accepted <= r.proposed <= r.num_draft_tokens
