"""The chunked-prefill rule (`specdec.forward_budget.share`): rows whole, prompts first come first, progress."""

from __future__ import annotations

import pytest

from specdec.forward_budget import share


def test_rows_run_whole_and_prompts_share_the_rest_in_arrival_order() -> None:
    sizes = [(40, 1), (1, 1), (10, 1), (5, 5), (5, 1)]  # a prompt, a decode, a prompt, a verification, a prompt
    assert share(sizes, 24) == [18, 1, None, 5, None]
    assert share(sizes, 60) == [40, 1, 10, 5, 4]  # the last prompt in part: 4 of its 5
    assert share(sizes, 61) == [40, 1, 10, 5, 5]
    assert share(sizes, 0) == [40, 1, 10, 5, 5]  # no limit


def test_a_chunk_never_reaches_the_rows_a_request_returns() -> None:
    assert share([(6, 4)], 4) == [2]
    assert share([(6, 6)], 4) == [6]  # all rows: whole, over the budget


def test_the_oldest_prompt_advances_however_many_rows_there_are() -> None:
    assert share([(17, 17)] * 2 + [(100, 1), (100, 1)], 32) == [17, 17, 8, None]  # a quarter of 32
    assert share([(0, 0), (3, 1)], 1) == [0, 1]  # a release runs (no tokens); the prompt gets one token


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="budget must be >= 0"):
        share([(1, 1)], -1)
