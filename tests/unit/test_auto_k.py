"""Auto K through the loop and the servicer, with fakes whose costs are real delays.

A draft that costs more than it saves is turned off (and probed now and then); a free draft that the
target accepts is used; greedy output is the target-only output token for token either way; the
statistics and the metrics show the K chosen per round and the rounds with speculation off; a drafter the
deployment does not offer is refused at the edge.
"""

from __future__ import annotations

import grpc
import pytest

from orchestrator.k_policy import GREEDY, PolicySettings
from orchestrator.loop import LoopSettings, SpeculativeLoop
from tests.fakes import (
    FakeDraft,
    FakeTarget,
    agree_first,
    asyncio_test,
    big_target,
    greedy_reference,
    ids,
    metric_value,
    output,
    req,
    request,
    run,
    serving,
)


@asyncio_test
async def test_a_draft_that_costs_more_than_it_saves_is_turned_off_and_probed():
    target, draft = FakeTarget(delay_s=0.004), FakeDraft(policy=agree_first(1), delay_s=0.03)
    # A probe budget of 100 %: probes as often as probe_rounds allows (test_k_policy covers the budget).
    policy = PolicySettings(probe_rounds=4, probe_budget=1.0)
    loop = SpeculativeLoop(target, draft, new_sequence_id=ids(), policy=policy)
    rounds = await run(loop, request(num_draft_tokens=None, max_new_tokens=60))
    assert output(rounds) == greedy_reference(60)  # exact whatever K the rounds ran with
    stats = rounds[-1].stats
    assert stats.auto_num_draft_tokens and sum(stats.rounds_by_k) == stats.rounds
    assert stats.speculation_off_rounds > stats.rounds / 2
    assert stats.probe_rounds >= 1 and stats.probe_rounds < 10
    assert stats.rounds_by_k[0] >= stats.speculation_off_rounds


@asyncio_test
async def test_a_drafter_that_finds_nothing_costs_auto_a_draft_call_not_a_one_token_round():
    settings = LoopSettings(target_steps=4)
    policy = PolicySettings(probe_rounds=4, probe_budget=1.0)
    rounds_by_k = {}
    for k in (None, 3):  # auto, then a fixed K
        target, draft = FakeTarget(delay_s=0.004), FakeDraft(policy=lambda prefix, position: None)
        loop = SpeculativeLoop(target, draft, new_sequence_id=ids(), policy=policy, settings=settings)
        rounds = await run(loop, request(num_draft_tokens=k, max_new_tokens=80))
        assert output(rounds) == greedy_reference(80)
        rounds_by_k[k] = [r for r in rounds if r.num_draft_tokens > 0]
        assert rounds_by_k[k] and all(r.proposed == 0 for r in rounds_by_k[k])
    auto = rounds_by_k[None]
    assert any(r.probe for r in auto) and any(not r.probe for r in auto)  # drafting rounds and probes alike
    assert all(len(r.token_ids) > 1 for r in auto)  # each a decode (up to 4 tokens), not one scored token
    assert all(len(r.token_ids) == 1 for r in rounds_by_k[3])  # a fixed K asks again at the next position


@asyncio_test
async def test_a_free_draft_that_the_target_accepts_is_used():
    target, draft = FakeTarget(delay_s=0.004), FakeDraft(policy=agree_first(99))
    loop = SpeculativeLoop(target, draft, new_sequence_id=ids())
    rounds = await run(loop, request(num_draft_tokens=None, max_new_tokens=60))
    assert output(rounds) == greedy_reference(60)
    stats = rounds[-1].stats
    assert stats.speculation_off_rounds <= 2 and stats.rounds < 20  # several tokens per round
    assert max(k for k, n in enumerate(stats.rounds_by_k) if n) >= 4


@asyncio_test
async def test_the_policy_learns_how_many_sequences_share_the_targets_forward():
    # What the target says of each forward reaches the process-wide estimates the policy prices rounds with.
    target, draft = FakeTarget(forward_sequences=8), FakeDraft(policy=agree_first(99))
    loop = SpeculativeLoop(target, draft, new_sequence_id=ids())
    generation = request(num_draft_tokens=None, max_new_tokens=20)
    await run(loop, generation)
    assert loop.estimates.snapshot(generation.drafter, GREEDY).sharing == pytest.approx(8.0)


@asyncio_test
async def test_auto_k_is_reported_in_the_stats_and_the_metrics(tokenizer):
    slow = FakeDraft(policy=agree_first(1), delay_s=0.03)
    async with serving(tokenizer, target=FakeTarget(model=big_target, delay_s=0.004), draft=slow,
                       default_num_draft_tokens="auto", k_probe_rounds=4) as running:
        response = await running.stub.Generate(req(max_new_tokens=30, sampling=dict(temperature=0.0)))
        stats = response.stats
        assert stats.auto_num_draft_tokens and stats.num_draft_tokens == 16  # --max-num-draft-tokens
        assert sum(stats.rounds_by_k) == stats.rounds and stats.speculation_off_rounds > 0
        chosen = metric_value(running, "specdec_orchestrator_chosen_k_count")
        assert chosen == stats.rounds
        assert metric_value(running, "specdec_orchestrator_speculation_off_rounds_total") == stats.speculation_off_rounds
        assert metric_value(running, "specdec_orchestrator_probe_rounds_total") == stats.probe_rounds
        fixed = await running.stub.Generate(req(max_new_tokens=5, num_draft_tokens=2))
        assert not fixed.stats.auto_num_draft_tokens and fixed.stats.num_draft_tokens == 2
        assert len(fixed.stats.rounds_by_k) == 3 and fixed.stats.rounds_by_k[2] >= 1  # K = 2 until the last tokens
        assert sum(fixed.stats.rounds_by_k) == fixed.stats.rounds and fixed.stats.speculation_off_rounds == 0


@asyncio_test
async def test_a_drafter_the_deployment_does_not_offer_is_refused_at_the_edge(tokenizer):
    draft = FakeDraft()
    draft.offered = ("suffix", "model")
    async with serving(tokenizer, draft=draft) as running:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.Generate(req(max_new_tokens=3, drafter="hybrid"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "drafter" in info.value.details() and "'suffix', 'model'" in info.value.details()
        assert draft.calls.opened == []
        response = await running.stub.Generate(req(max_new_tokens=3, drafter="model"))
        assert response.stats.drafter == "model" and len(response.token_ids) == 3
