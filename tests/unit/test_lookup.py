"""Prompt lookup next to the target (`specdec.lookup`): the longest, most recent match, and a draft as
long as the match earns."""

from __future__ import annotations

import numpy as np

from specdec.lookup import MAX_ALLOWANCE, Acceptance, propose


def test_the_longest_match_wins_and_earns_per_match_tokens_per_matched_token() -> None:
    # [1, 2, 3] ends at index 2 (then 4 5 6 7); the last token 3 alone also ends at index 8 (then 9).
    context = [1, 2, 3, 4, 5, 6, 7, 0, 3, 9, 1, 2, 3]
    assert propose(context, 16, per_match=1) == (4, 5, 6)  # 3 matched tokens: 3 drafts
    assert propose(context, 16, per_match=2) == (4, 5, 6, 7, 0, 3)
    assert propose(context, 2, per_match=4) == (4, 5)  # never more than max_tokens
    assert propose(context, 16, max_match=1, per_match=1) == (9,)  # matching one token: the most recent


def test_among_equal_matches_the_most_recent_wins() -> None:
    assert propose([5, 1, 5, 2, 5], 3, per_match=3) == (2, 5)  # 5 ends at 0 (then 1) and at 2 (then 2)


def test_a_draft_stops_at_the_end_of_the_context() -> None:
    assert propose([7, 8, 7], 16) == (8, 7)


def test_no_match_no_draft() -> None:
    assert propose([1, 2, 3, 4], 8) == ()
    assert propose([4], 8) == () and propose([], 8) == ()
    assert propose([1, 2, 1], 0) == ()


def test_numpy_context_and_long_matches() -> None:
    context = np.array([3, 1, 4, 1, 5, 9, 2, 6] * 4, dtype=np.int32)
    # The last 8 tokens match most recently at the previous period, which only one period follows.
    assert propose(context, 16) == tuple(int(t) for t in context[:8])
    assert all(isinstance(t, int) for t in propose(context, 4))


def test_drafts_pay_alone_and_need_a_higher_acceptance_in_a_bigger_forward() -> None:
    record = Acceptance()  # starts at a quarter
    assert record.allowance(1, 0.05) == MAX_ALLOWANCE  # above 5 %: alone, as long as the match allows
    assert record.allowance(4, 0.05) == 1  # above 17 %: among others, one more than twice its last run (none)
    assert record.allowance(16, 0.05) == 0  # below 44 %
    for _ in range(20):
        record.add(4, 3)  # three quarters of its drafts accepted
    assert record.rate() > 0.7 and record.allowance(16, 0.05) == 7 and record.allowance(1, 0.05) == MAX_ALLOWANCE
    for _ in range(40):
        record.add(4, 1)  # a quarter
    assert 0.2 < record.rate() < 0.3 and record.allowance(4, 0.05) == 3
    allowed = [record.allowance(16, 0.05) for _ in range(92)]  # below 44 %: a one-token try now and then,
    assert allowed == ([0] * 45 + [1]) * 2  # its row's cost to the 16 kept under 1 %: every 45 forwards
    assert record.allowance(16, 0.0) == MAX_ALLOWANCE  # free rows always pay
    for _ in range(40):
        record.add(4, 0)  # nothing accepted: alone, below 5 %, it tries every 8 forwards
    assert [record.allowance(1, 0.05) for _ in range(18)] == ([0] * 8 + [1]) * 2


def test_among_others_drafts_grow_with_what_was_accepted() -> None:
    record = Acceptance()
    lengths = []
    for _ in range(5):  # text that keeps repeating: every draft accepted
        lengths.append(record.allowance(4, 0.05))
        record.add(lengths[-1], lengths[-1])
    assert lengths == [1, 3, 7, 15, 31]
    record.add(8, 2)  # a miss after two: back to five tokens
    assert record.allowance(4, 0.05) == 5 and record.allowance(4, 0.0) == MAX_ALLOWANCE  # free rows: no cap
