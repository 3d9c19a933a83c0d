"""Every random draw of a generation, derived from (seed, position, purpose) alone with a counter-based generator.

Why it exists: a seed must mean the same randomness whatever happens around it. Drawing from one running
generator ties each draw to everything drawn before it — a fallback round that skips a draw, another K, a
batch composition — and a CPU ``torch.Generator`` ignores the high 32 bits of its seed. Here each draw is a
pure function of the whole 64-bit seed, the token position it decides (its index in prompt + output) and
what it is for: numpy's Philox4x64 (Salmon et al. 2011, the generator of JAX and cuRAND) keyed by the seed,
its counter set to (0, position, purpose, 0). Different positions or purposes never share a stream.

Purposes:

* ``ACCEPT``: the uniform that accepts or rejects the draft token at a position (modified rejection
  sampling);
* ``FINAL``: the uniform of the recovered or bonus draw at a position (inverse CDF);
* ``DRAFT``: the draft model's own noise at a position, when the target does not share it;
* ``TOKEN``: the Gumbel noise of the coupled mode, shared by draft and target (`specdec.sampling`).

A row of Gumbel noise covers token ids 0..width-1 in order, so two rows of different widths agree on every
token id they both cover: the draft (its vocabulary) and the orchestrator (a packed row's support) see the
same noise for the same token.
"""

from __future__ import annotations

import numpy as np

ACCEPT, FINAL, DRAFT, TOKEN = 1, 2, 3, 4
_SEED_BITS = 64


def _stream(seed: int, position: int, purpose: int) -> np.random.Generator:
    if not 0 <= seed < 1 << _SEED_BITS:
        raise ValueError(f"seed must be an unsigned 64-bit integer, got {seed}")
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")
    return np.random.Generator(np.random.Philox(key=seed, counter=[0, position, purpose, 0]))


def uniform(seed: int, position: int, purpose: int) -> float:
    """One uniform in [0, 1) for (seed, position, purpose)."""
    return float(_stream(seed, position, purpose).random())


def uniforms(seed: int, first_position: int, count: int, purpose: int) -> np.ndarray:
    """[count] float64: `uniform` at positions first_position .. first_position + count - 1."""
    return np.array([uniform(seed, first_position + i, purpose) for i in range(count)], dtype=np.float64)


def gumbel(seed: int, position: int, purpose: int, width: int) -> np.ndarray:
    """[width] float64 standard Gumbel noise for token ids 0..width-1 at (seed, position, purpose)."""
    u = _stream(seed, position, purpose).random(width)
    with np.errstate(divide="ignore"):
        return -np.log(-np.log(u))  # u = 0 gives -inf: a token that cannot win (probability 2^-53)
