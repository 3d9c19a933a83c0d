"""What a seed guarantees, through the loop with fakes (docs/architecture.md, "Seeds").

Reproducible (the coupled mode): the same seeded request returns the same tokens whatever K (fixed or auto),
whichever drafter answers, and if the draft fails mid-generation; it is the target-only sample for the seed.
Not reproducible (modified rejection sampling): the same request on the same path returns the same tokens;
all 64 bits of the seed count in both.
"""

from __future__ import annotations

import pytest

from orchestrator.clients import DraftError
from orchestrator.loop import SpeculativeLoop
from specdec.sampling import SamplingParams
from tests.fakes import FakeDraft, FakeTarget, agree_first, asyncio_test, ids, output, request, run

SAMPLED = SamplingParams(temperature=0.9, top_p=0.95)
SEED = 2**40 + 99


async def tokens(k: int | None, draft: FakeDraft | None = None, reproducible: bool = True, seed: int = SEED) -> list[int]:
    loop = SpeculativeLoop(FakeTarget(), draft or FakeDraft(), new_sequence_id=ids())
    req = request(params=SAMPLED, seed=seed, num_draft_tokens=k, max_new_tokens=24, reproducible=reproducible)
    return output(await run(loop, req))


@asyncio_test
async def test_a_reproducible_seed_gives_the_same_tokens_whatever_k_drafter_or_failure():
    reference = await tokens(0)  # target-only
    for k in (1, 4, None):
        assert await tokens(k) == reference, f"K={k}"
    assert await tokens(4, FakeDraft(policy=agree_first(2))) == reference  # a deterministic drafter
    assert await tokens(4, FakeDraft(fail_at={2: DraftError("draft died")})) == reference  # a fallback mid-way


@asyncio_test
async def test_without_reproducibility_the_seed_still_reproduces_the_same_path():
    first = await tokens(4, reproducible=False)
    assert await tokens(4, reproducible=False) == first
    assert await tokens(4, reproducible=False, seed=SEED + 3 * 2**32) != first  # the high bits count


@pytest.mark.parametrize("reproducible", [True, False])
@asyncio_test
async def test_seeds_that_differ_only_in_their_high_bits_give_different_text(reproducible: bool):
    low = await tokens(4, reproducible=reproducible, seed=7)
    high = await tokens(4, reproducible=reproducible, seed=7 + 5 * 2**32)
    assert low != high
