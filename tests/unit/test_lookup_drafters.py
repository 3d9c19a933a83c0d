"""The model-free drafters: prompt lookup (``ngram``), suffix drafting (``suffix``) and its shared cache,
and the hybrid's choice between a lookup and the model."""

from __future__ import annotations

import pytest

from draft_service.drafters.base import DraftRequest, DraftSequence
from draft_service.drafters.hybrid import HybridDrafter
from draft_service.drafters.ngram import NgramDrafter
from draft_service.drafters.suffix import SuffixCache, SuffixDrafter
from specdec.proposal import Proposal
from specdec.sampling_params import SamplingParams


def sequence(tokens: list[int], keep: int = 0) -> DraftSequence:
    seq = DraftSequence()
    seq.apply(0, tokens[:keep] or tokens)
    if keep:
        seq.apply(keep, tokens[keep:])
    return seq


def ask(drafter, seq: DraftSequence, k: int = 8) -> tuple[int, ...]:
    proposal = drafter.propose(DraftRequest(seq, k, SamplingParams(temperature=0.7), seed=0))
    assert proposal.q is None and proposal.cache_length == len(seq.tokens)  # deterministic, context length
    return proposal.token_ids


# --- ngram ------------------------------------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_most_recent_earlier_match() -> None:
    tokens = [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7, 0, 2, 3]
    assert ask(NgramDrafter(2, 3), sequence(tokens), k=3) == (5, 6, 7)  # [2, 3] last seen before 5 6 7


def test_ngram_prefers_the_longest_match() -> None:
    tokens = [7, 2, 3, 8, 8, 1, 2, 3, 4, 4, 1, 2, 3]
    # [1, 2, 3] matches at positions 5-7 (then 4 4); [2, 3] alone also matches at 1-2 (then 8).
    assert ask(NgramDrafter(2, 3), sequence(tokens), k=2) == (4, 4)


def test_ngram_caps_at_k_and_proposes_nothing_without_a_match() -> None:
    drafter = NgramDrafter(2, 4)
    assert ask(drafter, sequence([1, 2, 3, 4, 5, 6, 1, 2]), k=2) == (3, 4)
    assert ask(drafter, sequence([1, 2, 3, 4, 5, 6]), k=4) == ()


def test_ngram_follows_the_context_across_rounds_and_rebuilds_after_a_rollback() -> None:
    drafter = NgramDrafter(2, 2)
    seq = sequence([5, 6, 7, 8])
    assert ask(drafter, seq) == ()
    seq.apply(4, [5, 6])  # the context grows: [5, 6] was seen before 7 8
    assert ask(drafter, seq, k=2) == (7, 8)
    seq.apply(2, [9, 5, 6])  # a rollback replaced 7 8 ...: the index forgets them
    assert ask(drafter, seq, k=2) == (9, 5)


# --- suffix -----------------------------------------------------------------------------------------------


def suffix(min_score: float = 0.3, entries: int = 1000, ttl_s: float = 100.0, clock=lambda: 0.0) -> SuffixDrafter:
    return SuffixDrafter(SuffixCache(depth=6, max_entries=entries, ttl_s=ttl_s, clock=clock), min_score=min_score)


def test_suffix_follows_the_most_frequent_continuation() -> None:
    tokens = [1, 2, 3, 9, 1, 2, 3, 9, 1, 2, 3, 4, 1, 2]
    assert ask(suffix(), sequence(tokens), k=3) == (3, 9, 1)  # after [1, 2, 3]: 9 twice, 4 once


def test_suffix_stops_when_the_index_is_unsure() -> None:
    tokens = [1, 2, 5, 1, 2, 6, 1, 2, 7, 1, 2]  # after [1, 2]: 5, 6, 7 once each: a 1/3 share
    assert ask(suffix(min_score=0.5), sequence(tokens)) == ()
    assert ask(suffix(min_score=0.3), sequence(tokens), k=1) == (5,)  # ties: the lower token id


def test_suffix_proposals_grow_with_the_match_length() -> None:
    drafter = suffix(min_score=0.0)
    text = list(range(10, 50))
    long_match = sequence(text + [0] + text[:5])  # a 5-token match: up to 4 x 5 tokens
    assert ask(drafter, long_match, k=32) == tuple(text[5:25])
    short_match = sequence(text + [0, 0] + text[:2])  # a 2-token match: up to 8
    assert len(ask(drafter, short_match, k=32)) == 8


def test_the_shared_cache_learns_finished_outputs_and_serves_other_sequences() -> None:
    drafter = suffix()
    prompt, output = [1, 2, 3], [40, 41, 42, 43, 44, 45]
    first = sequence(prompt)
    first.apply(3, output)
    assert ask(drafter, sequence([7, 40, 41])) == ()  # nothing learnt yet
    drafter.finish(first)  # the output joins the shared cache
    assert ask(drafter, sequence([7, 40, 41]), k=3) == (42, 43, 44)


def test_the_shared_cache_is_bounded_and_ages_out() -> None:
    now = [0.0]
    cache = SuffixCache(depth=3, max_entries=50, ttl_s=10.0, clock=lambda: now[0])
    cache.add(list(range(100)), start=0)
    assert len(cache) == 50 and 0 < cache.approx_bytes < 50 * 500
    assert cache.counts((97, 98)) == {99: 1}  # the most recent survive
    assert cache.counts((1, 2)) is None  # the oldest went first
    now[0] = 11.0
    cache.add([500, 501], start=1)  # any add sweeps what aged out
    assert len(cache) == 1 and cache.counts((500,)) == {501: 1}


# --- hybrid -----------------------------------------------------------------------------------------------


class Recorder:
    name = "model"

    def __init__(self) -> None:
        self.asked = 0

    def propose(self, request: DraftRequest) -> Proposal:
        self.asked += 1
        return Proposal((11, 12), None, len(request.sequence.tokens))

    def finish(self, sequence: DraftSequence) -> None:
        pass


@pytest.mark.parametrize(("tokens", "expected", "model_asked"), [([1, 2, 3, 1, 2], (3, 1), 0), ([1, 2, 3], (11, 12), 1)])
def test_hybrid_asks_the_model_only_when_the_lookup_has_nothing(tokens, expected, model_asked) -> None:
    model = Recorder()
    assert ask(HybridDrafter(NgramDrafter(2, 2), model), sequence(tokens), k=2) == expected
    assert model.asked == model_asked
