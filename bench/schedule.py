"""The one schedule every timed system follows: warm-ups, then each prompt under every configuration in turn.

Why it exists: this machine's speed drifts by 20-30 % over minutes. Timing our stack and the HF peer in
separate phases let that drift into their ratio (one run had HF's target-only 25 % faster than ours, with
Triton's model time at 1.1-1.2 times the in-process step). So every system runs in one loop, generation by
generation: the same prompt, mode and K through the stack, then through HF, then the in-process step costs
behind the ideal (`bench.theory.CostProbe`), then the next configuration.
Cycling through the configurations inside each prompt also makes a burst of background load hit all of them
alike instead of wrecking one. While one system generates, the other sits idle (the stack's services wait
on their sockets; the in-process models wait for the next call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from specdec.sampling import SamplingParams


class Timed(Protocol):
    """A system the benchmark times, one generation at a time."""

    def warm(self, mode: str, params: SamplingParams, k: int, prompt: Sequence[int], w: int) -> None:
        """The ``w``-th short unmeasured generation of a configuration."""

    def measure(self, mode: str, params: SamplingParams, k: int, prompt: Sequence[int], p: int, r: int) -> None:
        """Time prompt ``p`` (repeat ``r``) under (mode, K) and keep the record."""


def run_interleaved(
    systems: Sequence[Timed],
    prompts: Sequence[Sequence[int]],
    modes: Sequence[tuple[str, SamplingParams]],
    ks: Sequence[int],
    repeats: int,
    warmup: int,
    progress: Callable[[int], None] = lambda n: None,
) -> None:
    """``warmup`` generations per configuration and system, then ``repeats`` passes over the prompts in which
    each prompt runs under every configuration, on every system in turn. ``progress`` gets 1 per generation."""
    configs = [(mode, params, k) for mode, params in modes for k in ks]
    for mode, params, k in configs:
        for w in range(warmup):
            for system in systems:
                system.warm(mode, params, k, prompts[w % len(prompts)], w)
                progress(1)
    for r in range(repeats):
        for p, prompt in enumerate(prompts):
            for mode, params, k in configs:
                for system in systems:
                    system.measure(mode, params, k, prompt, p, r)
                    progress(1)
