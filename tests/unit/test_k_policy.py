"""The K policy with scripted rounds: it drafts when drafting pays, stops when it does not, probes, and
follows the costs as they change. No clock, no loop: every round's times are given."""

from __future__ import annotations

import random

import pytest

from orchestrator.k_policy import GREEDY, KPolicy, PolicySettings, RoundOutcome, SharedEstimates

STEP = 0.050  # a target step, s


def target_time(scored: int, step: float = STEP, per_token: float = 0.1) -> float:
    """A target whose verify of n tokens costs a step plus ``per_token`` of a step per extra token."""
    return step * (1 + per_token * (scored - 1))


def play(policy: KPolicy, rounds: int, accept: float, draft_per_token: float, hop: float = 0.0005,
         step: float = STEP, proposes: float = 1.0, seed: int = 0, per_token: float = 0.1,
         sharing: int = 1, mirrored: bool = False) -> list[int]:
    """Run ``rounds`` rounds of a drafter that proposes each token with probability ``proposes`` (a lookup
    whose match may run out) and has each accepted with probability ``accept``, on a target whose forwards
    run ``sharing`` sequences, the others one token each (or, ``mirrored``, as many as this one); returns
    the Ks chosen."""
    rng = random.Random(seed)
    chosen = []
    for _ in range(rounds):
        choice = policy.choose(limit=100)
        chosen.append(choice.k)
        proposed = 0
        while proposed < choice.k and rng.random() < proposes:
            proposed += 1
        accepted = 0
        while accepted < proposed and rng.random() < accept:
            accepted += 1
        draft = hop + draft_per_token * proposed if choice.k else 0.0
        forward = (1 + proposed) * (sharing if mirrored else 1) + (0 if mirrored else sharing - 1)
        target = target_time(forward, step, per_token)
        policy.observe(RoundOutcome(choice.k, proposed, accepted, draft, target, 0.001, sharing, forward))
    return chosen


def fresh(**settings) -> KPolicy:
    return KPolicy(SharedEstimates(PolicySettings(**settings)), "model", GREEDY)


def test_a_free_drafter_that_is_accepted_gets_a_large_k() -> None:
    chosen = play(fresh(), 60, accept=0.9, draft_per_token=0.0)
    assert min(chosen[10:]) >= 5


def test_a_draft_that_costs_half_a_step_per_token_is_turned_off() -> None:
    # SmolLM2's self-draft on this CPU: c ≈ 0.5 and α ≈ 0.7 do not pay (Leviathan's ideal < 1).
    chosen = play(fresh(), 200, accept=0.7, draft_per_token=0.5 * STEP)
    assert chosen[20:].count(0) / len(chosen[20:]) > 0.9


def test_speculation_off_probes_with_backoff_and_resumes_when_it_pays() -> None:
    policy = fresh(probe_rounds=4, probe_rounds_max=16)
    off = play(policy, 100, accept=0.02, draft_per_token=0.0, hop=0.002)  # a lookup whose guesses all miss
    probes = [i for i, k in enumerate(off[30:]) if k > 0]
    assert probes and all(b - a >= 5 for a, b in zip(probes, probes[1:]))  # never two probes in a row
    assert max(b - a for a, b in zip(probes, probes[1:])) == 17  # the wait doubled up to its cap
    # The text becomes predictable: a probe sees it and speculation resumes.
    resumed = play(policy, 60, accept=0.95, draft_per_token=0.0, hop=0.002, seed=1)
    assert resumed[-20:].count(0) <= 2  # a neighbour of K = 1 may be 0 now and then


def test_generations_shorter_than_the_wait_still_probe_and_resume_when_it_pays() -> None:
    # Generations of 3 rounds each never reach their own wait (4): on a drafter that stopped paying, they
    # probe once every generation's rounds off since the last probe exceed probe_rounds_max (16), and once
    # the text is predictable again a probe sees it and the next generations draft from their first round.
    shared = SharedEstimates(PolicySettings(probe_rounds=4, probe_rounds_max=16))
    first = KPolicy(shared, "model", GREEDY)
    play(first, 60, accept=0.02, draft_per_token=0.0, hop=0.002)  # it stops paying: speculation off
    short = [play(KPolicy(shared, "model", GREEDY), 3, accept=0.02, draft_per_token=0.0, hop=0.002, seed=i)
             for i in range(40)]
    probes = [i for i, k in enumerate(k for ks in short for k in ks) if k]
    assert len(probes) >= 5 and min(b - a for a, b in zip(probes, probes[1:])) >= 16
    later = [play(KPolicy(shared, "model", GREEDY), 3, accept=0.95, draft_per_token=0.0, hop=0.002, seed=i)
             for i in range(40)]
    assert all(ks[0] > 0 for ks in later[-10:])


def test_an_expensive_draft_probes_rarely_a_cheap_one_often() -> None:
    def probe_gaps(draft_per_token: float) -> list[int]:
        policy = fresh(probe_rounds=4, probe_rounds_max=512, probe_budget=0.02)
        chosen = play(policy, 600, accept=0.05, draft_per_token=draft_per_token, hop=0.001)
        probes = [i for i, k in enumerate(chosen) if k > 0][1:]  # after its first, exploring round
        return [b - a for a, b in zip(probes, probes[1:])]

    cheap, expensive = probe_gaps(0.0), probe_gaps(0.5 * STEP)
    assert cheap[0] < 10  # a free lookup's probe costs little: the first comes after probe_rounds
    # A probe of one draft token costing half a step must wait 0.5 / 0.02 = 25 rounds off, or more.
    assert min(expensive) >= 25 and len(expensive) < len(cheap) + 2


def test_a_lookup_drafter_with_nothing_to_propose_is_not_asked() -> None:
    chosen = play(fresh(), 100, accept=0.9, draft_per_token=0.0, hop=0.002, proposes=0.0)
    assert chosen[10:].count(0) / len(chosen[10:]) > 0.85


def test_k_follows_the_verify_cost_as_it_grows_with_load() -> None:
    policy = fresh(half_life_rounds=16)
    cheap = play(policy, 80, accept=0.8, draft_per_token=0.05 * STEP)
    rng = random.Random(3)
    loaded = []
    for _ in range(80):  # under load each extra token costs as much as a step
        choice = policy.choose(100)
        loaded.append(choice.k)
        proposed = choice.k
        accepted = next((i for i in range(proposed) if rng.random() > 0.8), proposed)
        draft = 0.0005 + 0.05 * STEP * proposed if proposed else 0.0
        policy.observe(RoundOutcome(choice.k, proposed, accepted, draft, target_time(1 + proposed, per_token=1.0), 0.001))
    assert sum(loaded[-30:]) / 30 < sum(cheap[-30:]) / 30


def test_a_generation_learns_from_the_process_and_from_itself() -> None:
    shared = SharedEstimates(PolicySettings())
    play(KPolicy(shared, "model", GREEDY), 100, accept=0.9, draft_per_token=0.0)
    newcomer = KPolicy(shared, "model", GREEDY)
    assert newcomer.choose(100).k >= 4  # starts from what the process learnt
    assert KPolicy(shared, "suffix", GREEDY).rates(8)[8] < newcomer.rates(8)[8] / 2  # another drafter: its own prior
    chosen = play(newcomer, 40, accept=0.0, draft_per_token=0.0, hop=0.002)  # this text is not predictable
    assert chosen[-10:].count(0) >= 8


@pytest.mark.parametrize(("limit", "max_k", "expected_max"), [(0, 8, 0), (2, 8, 2), (100, 3, 3)])
def test_k_never_exceeds_the_room_left_or_the_maximum(limit: int, max_k: int, expected_max: int) -> None:
    policy = fresh(max_k=max_k)
    play(policy, 30, accept=1.0, draft_per_token=0.0)
    assert policy.choose(limit).k == expected_max


def test_the_first_round_of_a_new_process_is_target_only() -> None:
    """No cost measured yet: no rate to compare, so it measures the target first."""
    assert fresh().choose(100).k == 0


def test_under_load_a_round_pays_for_the_wait_it_adds_to_the_others() -> None:
    # 16 sequences per forward: a step of 4 single steps, each token 0.4 of a single step. A free drafter
    # accepted half the time pays alone (K = 1: 1.5 tokens for 1.1 steps), not when its extra token holds
    # 15 others up as long as itself (16 × 1.5 tokens per 16.4 steps < 16 per 10).
    alone = play(fresh(), 200, accept=0.5, draft_per_token=0.0)
    loaded = play(fresh(), 200, accept=0.5, draft_per_token=0.0, step=4 * STEP, per_token=0.1, sharing=16)
    assert sum(k > 0 for k in alone[20:]) / 180 > 0.9
    assert sum(k > 0 for k in loaded[20:]) / 180 < 0.2
    # The same load, a drafter that is nearly always right: it still pays the others' wait, and drafts.
    sure = play(fresh(), 200, accept=0.95, draft_per_token=0.0, step=4 * STEP, per_token=0.1, sharing=16)
    assert sum(k > 0 for k in sure[20:]) / 180 > 0.9


def test_the_same_costs_without_sharing_draft_as_before() -> None:
    # The load alone (a slow step) changes nothing when no other sequence waits on the forward.
    loaded_alone = play(fresh(), 200, accept=0.5, draft_per_token=0.0, step=4 * STEP, per_token=0.025)
    assert sum(k > 0 for k in loaded_alone[20:]) / 180 > 0.9


def test_when_the_others_draft_as_this_one_does_a_token_still_costs_one_token():
    # 4 sequences per forward whose Ks move together: a round's target time grows 4 tokens' worth per token
    # it proposes. Fitted against the forward's tokens, a token costs what one token costs, and a free
    # drafter accepted 70 % of the time keeps drafting (4 × 2.8 tokens per 0.145 s beats 4 per 0.065 s);
    # fitted against the round's own tokens, it would pay four times for each token and turn off.
    chosen = play(fresh(), 200, accept=0.7, draft_per_token=0.0, sharing=4, mirrored=True)
    assert sum(k > 0 for k in chosen[20:]) / 180 > 0.9


def test_a_decoded_round_counts_as_its_tokens_for_the_costs_and_the_wait_for_a_probe() -> None:
    # With speculation off the target decodes m tokens per round: one round trip (hop) shared by m steps.
    hop = 0.01

    def decoded_rounds(policy: KPolicy, steps: int, rounds: int) -> list[int]:
        chosen = []
        for _ in range(rounds):
            choice = policy.choose(limit=100)
            chosen.append(choice.k)
            if choice.k:  # a probe: one scored round, its draft all wrong
                policy.observe(RoundOutcome(choice.k, choice.k, 0, 0.001, hop + target_time(1 + choice.k), 0.001))
            else:
                policy.observe(RoundOutcome(0, 0, 0, 0.0, hop + steps * STEP, 0.002 * steps, steps=steps))
        return chosen

    policy = fresh(probe_rounds=16, probe_rounds_max=16)
    play(policy, 20, accept=0.0, draft_per_token=0.0)  # off by now
    chosen = decoded_rounds(policy, 8, 12)
    probes = [i for i, k in enumerate(chosen) if k]
    # 16 tokens off (two decodes of 8), then a probe
    assert probes and min(b - a for a, b in zip(probes, probes[1:])) == 3
    # rate(0) is the decode's time per token: the hop and the orchestrator's time shared by its 8 steps
    _, costs = policy.outlook(0)
    assert costs[0] < STEP + hop / 2 + 0.002


def test_a_generation_probes_on_its_own_only_while_its_wait_is_left_to_use_what_it_finds() -> None:
    shared = SharedEstimates(PolicySettings(probe_rounds=16, probe_rounds_max=256))
    play(KPolicy(shared, "model", GREEDY), 20, accept=0.0, draft_per_token=0.0)  # the drafter does not pay

    def generation(tokens: int) -> list[int]:
        """Decodes of 8 tokens while speculation is off; a probe's one draft token is rejected."""
        policy, chosen, left = KPolicy(shared, "model", GREEDY), [], tokens
        while left > 0:
            choice = policy.choose(limit=left - 1)
            chosen.append(choice.k)
            if choice.k:
                policy.observe(RoundOutcome(choice.k, choice.k, 0, 0.001, target_time(1 + choice.k), 0.001))
                left -= 1
            else:
                policy.observe(RoundOutcome(0, 0, 0, 0.0, 8 * STEP, 0.002 * 8, steps=8))
                left -= 8
        return chosen

    # 16 tokens off make a probe due at the third round; a 32-token generation has 15 left then, too few
    assert generation(32) == [0, 0, 0, 0]
    longer = generation(64)  # 47 left: it probes there
    assert longer[:2] == [0, 0] and longer[2] > 0


def decoding_play(policy: KPolicy, rounds: int, accept: float, off_per_token: float, steps: int = 8,
                  seed: int = 0) -> list[int]:
    """A free drafter accepted with probability ``accept`` per token, scored rounds as in `play`; K = 0 rounds
    are decodes of ``steps`` tokens that cost ``off_per_token`` each (the target's own lookups included)."""
    rng = random.Random(seed)
    chosen = []
    for _ in range(rounds):
        choice = policy.choose(limit=100)
        chosen.append(choice.k)
        if choice.k == 0:
            policy.observe(RoundOutcome(0, 0, 0, 0.0, steps * off_per_token, 0.0, steps=steps))
            continue
        accepted = 0
        while accepted < choice.k and rng.random() < accept:
            accepted += 1
        policy.observe(RoundOutcome(choice.k, choice.k, accepted, 0.0005, target_time(1 + choice.k), 0.001))
    return chosen


def test_k0_is_what_the_targets_decodes_measured_so_cheaper_decodes_turn_drafting_off() -> None:
    # Drafting at 50 % acceptance gives ~2 tokens per 1.2-1.4 steps; target-only on a scored line would cost a
    # step per token, so it drafts. But the target's decodes (their lookups paying) cost 0.5 step per token.
    drafting = decoding_play(fresh(), 200, accept=0.5, off_per_token=1.2 * STEP)
    assert sum(k > 0 for k in drafting[20:]) / 180 > 0.9
    cheap = decoding_play(fresh(), 200, accept=0.5, off_per_token=0.5 * STEP)
    assert cheap[40:].count(0) / 160 > 0.8


def test_while_drafting_k0_is_explored_when_it_is_within_reach() -> None:
    # Decodes that nearly match drafting: one K = 0 round every 4 * explore_every rounds measures them again.
    chosen = decoding_play(fresh(explore_every=8), 200, accept=0.75, off_per_token=0.7 * STEP)
    zeros = [i for i, k in enumerate(chosen) if k == 0 and i >= 60]  # once it has learnt the acceptance
    assert zeros and all(b - a >= 32 for a, b in zip(zeros, zeros[1:]))
    far = decoding_play(fresh(explore_every=8), 200, accept=0.95, off_per_token=2.0 * STEP)
    assert far[40:].count(0) == 0  # target-only far behind: never explored


def test_k0_rounds_of_requests_that_turned_speculation_off_do_not_measure_c0() -> None:
    shared = SharedEstimates(PolicySettings())
    auto = KPolicy(shared, "suffix", GREEDY)
    auto.observe(RoundOutcome(0, 0, 0, 0.0, 8 * 0.5 * STEP, 0.0, steps=8))  # auto's decode: lookups paid
    fixed = KPolicy(shared, "suffix", GREEDY)
    for _ in range(50):  # plain target-only decodes of requests with K = 0, under heavy load
        fixed.observe(RoundOutcome(0, 0, 0, 0.0, 8 * 3 * STEP, 0.0, steps=8, speculating=False))
    newcomer = KPolicy(shared, "suffix", GREEDY)
    _, costs = newcomer.outlook(0)
    assert costs[0] == pytest.approx(0.5 * STEP)


def test_a_c0_measured_alone_follows_the_load_as_a_ratio_to_the_scored_line() -> None:
    policy = fresh()
    for _ in range(20):  # scored rounds alone: a token costs a step
        policy.observe(RoundOutcome(1, 1, 0, 0.0, target_time(2), 0.0))
    policy.observe(RoundOutcome(0, 0, 0, 0.0, 8 * 0.5 * STEP, 0.0, steps=8))  # decodes: half of that
    alone = policy.outlook(0)[1][0]
    assert alone == pytest.approx(0.5 * STEP, rel=0.1)
    for _ in range(300):  # then 15 other sequences' tokens in every forward: the forward costs 2.5 steps
        policy.observe(RoundOutcome(1, 1, 0, 0.0, target_time(17), 0.0, 16, 17))
    loaded = policy.outlook(0)[1][0]
    assert loaded == pytest.approx(0.5 * target_time(16), rel=0.15)  # the same ratio at today's load


def test_under_load_a_probe_pays_for_the_others_wait_on_its_draft_call() -> None:
    # A lookup that finds nothing: a probe adds no rows, only its draft call (5 ms). Alone that is cheap;
    # among 15 decoding sequences, the target holds their forward for it: 75 ms, which the 2 % budget
    # spreads over at least 0.075 / (0.02 * 0.126) ≈ 30 rounds off (a round off: a forward of 16, 0.126 s).
    def first_gap(sharing: int) -> int:
        policy = fresh(probe_rounds=4, probe_rounds_max=512, probe_budget=0.02)
        chosen = play(policy, 300, accept=0.9, draft_per_token=0.0, hop=0.005, proposes=0.0, sharing=sharing)
        drafted = next(i for i, k in enumerate(chosen) if k > 0)  # on the prior, before it learns
        off = next(i for i, k in enumerate(chosen) if k == 0 and i > drafted)
        return next(i for i, k in enumerate(chosen) if k > 0 and i > off) - off

    alone, loaded = first_gap(1), first_gap(16)
    assert alone <= 10 and loaded >= 30  # alone: 0.005 / (0.02 * 0.051) ≈ 5 rounds, or probe_rounds


def test_a_draft_call_holds_up_the_sequences_that_decode_not_those_that_draft() -> None:
    # A lookup with a 5 ms call, accepted half the time, among 15 other sequences in every forward, on a
    # target whose extra rows are nearly free. Among sequences that draft too (another generation), the
    # calls overlap and drafting pays: it drafts. Among sequences that decode (8 tokens per round), each of
    # its calls holds up 15 of them, 75 ms in all, more than a step: it stops.
    def drafting_share(among_decoders: bool) -> float:
        shared = SharedEstimates(PolicySettings())
        me, other, chosen = KPolicy(shared, "model", GREEDY), KPolicy(shared, "ngram", GREEDY), []
        for i in range(160):
            if among_decoders:
                other.observe(RoundOutcome(0, 0, 0, 0.0, 8 * target_time(16, per_token=0.01), 0.008, 16, 16, steps=8))
            else:
                other.observe(RoundOutcome(4, 4, 2, 0.005, target_time(20, per_token=0.01), 0.001, 16, 20))
            chosen += play(me, 1, accept=0.5, draft_per_token=0.0, hop=0.005, per_token=0.01, sharing=16, seed=i)
        return sum(k > 0 for k in chosen[60:]) / 100

    assert drafting_share(among_decoders=False) > 0.8
    assert drafting_share(among_decoders=True) < 0.2
