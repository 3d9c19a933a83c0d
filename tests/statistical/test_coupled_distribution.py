"""Statistical tests of the coupled mode: the output is the target's distribution, and it is the target-only
sample for the seed, whatever K.

The same first-order Markov toy model as `test_sampling_distribution.py`. Each row has its own 64-bit seed;
every random draw comes from `specdec.noise` at (seed, position): the draft proposes the Gumbel-max of its
warped q with the TOKEN noise of each position (as the model drafter does in the coupled mode), and the
production `coupled_sample_on_support` accepts a draft token iff it is the target's own Gumbel-max there.
The negative control forgets to advance the position (every token reuses one position's noise): the same
G-tests must reject it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdec import noise
from specdec.rows import PackedRows, pack_rows
from specdec.sampling import SamplingParams, coupled_sample_on_support, sample_by_gumbel, warp
from tests.statistical.gtest import P_THRESHOLD, report
from tests.statistical.test_sampling_distribution import PLAIN, START, WARPS, V, distribution_tests

pytestmark = [pytest.mark.statistical, pytest.mark.usefixtures("single_torch_thread")]

ROWS = 12_000
BASE_SEED = (0xC0FFEE << 32) + 17  # a seed with high bits set: all 64 are used


def simulate(
    params: SamplingParams, k: int, length: int | None = None, position_of=lambda j: j
) -> tuple[np.ndarray, float]:
    """[ROWS, length] tokens (K+1 by default) from the coupled mode, and the acceptance rate of the drafts."""
    target_table = warp(PLAIN.target_logits, params)  # [V, V]
    draft_table = warp(PLAIN.draft_logits, params)
    values, index = pack_rows(target_table)
    length = length or k + 1
    out = np.full((ROWS, length), -1, dtype=np.int64)
    drafted = accepted = 0
    for row in range(ROWS):
        seed = BASE_SEED + row
        tokens = [START]  # the prompt is one token: output position j is token index j + 1

        def gumbel(j: int, width: int) -> np.ndarray:
            return noise.gumbel(seed, position_of(j), noise.TOKEN, width)

        while len(tokens) - 1 < length:
            first = len(tokens)  # the position of the round's first new token
            drafts: list[int] = []
            for i in range(min(k, length - (len(tokens) - 1))):
                q = draft_table[(tokens + drafts)[-1]]  # [V]
                drafts.append(sample_by_gumbel(q, gumbel(first + i, V)))
            ctx = (tokens + drafts)[-(len(drafts) + 1):]
            p = PackedRows.from_arrays(values[ctx], None if index is None else index[ctx], V)
            result = coupled_sample_on_support(drafts, p, lambda i, w: gumbel(first + i, w))
            drafted, accepted = drafted + len(drafts), accepted + result.accepted
            tokens += result.tokens
        out[row] = tokens[1 : length + 1]
    return out, accepted / max(drafted, 1)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("warp_name", list(WARPS))
def test_coupled_tokens_follow_target_and_are_the_target_only_sample(warp_name: str, k: int) -> None:
    params = WARPS[warp_name]
    tokens, acceptance = simulate(params, k)
    tests = distribution_tests(PLAIN, params, tokens)
    text = report(f"coupled {warp_name} K={k} (acceptance {acceptance:.3f})", tests)
    assert all(t.pvalue >= P_THRESHOLD for t in tests), text
    assert acceptance > 0.2  # drafts are accepted: the coupling is doing something
    target_only, _ = simulate(params, 0, length=k + 1)  # K = 0: every token is the target's own sample
    assert np.array_equal(tokens, target_only)


def test_negative_control_noise_that_does_not_follow_the_position_is_rejected() -> None:
    params = WARPS["temperature0.8"]
    tokens, _ = simulate(params, 3, position_of=lambda j: 1)  # every position reuses one position's noise
    tests = distribution_tests(PLAIN, params, tokens)
    text = report("negative coupled-with-one-noise K=3", tests)
    assert min(t.pvalue for t in tests) < P_THRESHOLD, text


def test_greedy_coupling_needs_no_noise() -> None:
    p = warp(torch.randn(4, V), SamplingParams(temperature=0.0))  # one-hot rows
    drafts = [int(t) for t in p[:3].argmax(-1)]
    result = coupled_sample_on_support(drafts, p, None)
    assert result.accepted == 3 and result.tokens == [*drafts, int(p[3].argmax())]
