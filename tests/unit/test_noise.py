"""specdec.noise: every draw is a function of (the whole 64-bit seed, position, purpose) alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdec import noise
from specdec.rows import PackedRows, pack_rows
from specdec.sampling import SamplingParams, coupled_sample_on_support, warp

SEED = 1234


def test_seeds_that_differ_only_in_their_high_bits_give_different_draws() -> None:
    high = SEED + 7 * 2**32
    assert noise.uniform(SEED, 5, noise.ACCEPT) != noise.uniform(high, 5, noise.ACCEPT)
    assert not np.array_equal(noise.gumbel(SEED, 5, noise.TOKEN, 64), noise.gumbel(high, 5, noise.TOKEN, 64))
    # The torch generator the sampler used to use cannot tell them apart: the reason for this module.
    assert torch.equal(torch.rand(4, generator=torch.Generator().manual_seed(SEED)),
                       torch.rand(4, generator=torch.Generator().manual_seed(high)))


def test_a_draw_depends_only_on_seed_position_and_purpose() -> None:
    assert noise.uniform(SEED, 9, noise.FINAL) == noise.uniform(SEED, 9, noise.FINAL)
    draws = {noise.uniform(SEED, position, purpose) for position in range(4) for purpose in (1, 2, 3, 4)}
    assert len(draws) == 16
    np.testing.assert_array_equal(noise.uniforms(SEED, 3, 4, noise.ACCEPT),
                                  [noise.uniform(SEED, p, noise.ACCEPT) for p in range(3, 7)])


def test_noise_rows_of_different_widths_agree_on_the_tokens_both_cover() -> None:
    wide, narrow = noise.gumbel(SEED, 2, noise.TOKEN, 1000), noise.gumbel(SEED, 2, noise.TOKEN, 37)
    np.testing.assert_array_equal(wide[:37], narrow)


def test_noise_looks_like_standard_gumbel() -> None:
    g = noise.gumbel(SEED, 0, noise.TOKEN, 200_000)
    assert abs(g.mean() - 0.5772) < 0.01 and abs(g.var() - np.pi**2 / 6) < 0.03


@pytest.mark.parametrize(("seed", "position"), [(-1, 0), (2**64, 0), (0, -1)])
def test_out_of_range_arguments_are_refused(seed: int, position: int) -> None:
    with pytest.raises(ValueError):
        noise.uniform(seed, position, noise.ACCEPT)


def test_the_coupled_sampler_agrees_on_packed_and_dense_rows() -> None:
    p = warp(torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 2, SamplingParams(0.8, top_p=0.9))
    packed = PackedRows.from_arrays(*pack_rows(p), 300)
    drafts = [int(t) for t in p[:3].argmax(-1)]

    def gumbel(i: int, width: int) -> np.ndarray:
        return noise.gumbel(SEED, 40 + i, noise.TOKEN, width)

    assert coupled_sample_on_support(drafts, p, gumbel) == coupled_sample_on_support(drafts, packed, gumbel)
