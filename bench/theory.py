"""What a model draft could deliver: α, the cost ratios, Leviathan's ideal speedup.

Why this module exists: a measured speedup says little on its own. Leviathan et al. 2023 (§3) predict the
speedup from three numbers: α (the mean of Σ_x min(p(x), q(x)) over the positions a generation visits),
c (one draft step / one target step) and, on a CPU, v(K) (the target scoring K+1 tokens at once / scoring
1 token; a GPU makes it ~1, a CPU does not). α is measured here, in-process, on the target's own
generations (it needs no timing); the benchmark takes c and v(K) from the stack as served
(`bench.summary.model_rows`), and the self-draft sweep times them in-process with `step_times`.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from specdec.engine import CausalLMEngine
from specdec.kv_cache import KVCache
from specdec.sampling import SamplingParams, sample, warp
from specdec.speedup import acceptance_rate_alpha, ideal_speedup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Costs:
    """Median in-process step times (ms) at a representative context length."""

    context_length: int
    target_step_ms: float  # the target appending 1 token (one autoregressive step)
    draft_step_ms: float  # the draft appending 1 token
    verify_ms: dict[int, float] = field(default_factory=dict)  # K -> the target appending K+1 tokens

    @property
    def draft_cost_ratio(self) -> float:
        """c: one draft step relative to one target step."""
        return self.draft_step_ms / self.target_step_ms

    def verify_cost_ratio(self, k: int) -> float:
        """v(K): scoring K+1 tokens at once relative to one target step (1 for K = 0)."""
        return 1.0 if k == 0 else self.verify_ms[k] / self.target_step_ms


@dataclass(frozen=True)
class Alpha:
    """Mean acceptance probability over generated positions, with the number of positions it averages."""

    mean: float
    positions: int


def ideal_speedups(alpha: float, costs: Costs, ks: Iterable[int]) -> dict[int, float]:
    """K -> Leviathan's expected speedup over target-only with this α, c and the measured v(K)."""
    return {k: ideal_speedup(alpha, k, costs.draft_cost_ratio, costs.verify_cost_ratio(k)) for k in ks}


def best_k(speedups: dict[int, float]) -> int:
    """The K with the largest speedup (the smallest K on ties)."""
    return max(sorted(speedups), key=lambda k: speedups[k])


@torch.inference_mode()
def measure_alpha(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    sequences: Sequence[tuple[Sequence[int], int]],
    params: SamplingParams,
) -> Alpha:
    """α over the generated positions of ``sequences`` ((token ids, prompt length) pairs).

    Each sequence is scored teacher-forced in one forward per model: at every position that produced a
    generated token, p and q are warped with ``params`` and β = Σ_x min(p(x), q(x)) is taken (under greedy
    warping that is 1 when both argmaxes agree, else 0). α is the mean β over all those positions.
    """
    betas: list[torch.Tensor] = []
    for ids, prompt_len in sequences:
        if len(ids) <= prompt_len or prompt_len < 1:
            continue
        x = torch.tensor([list(ids)], dtype=torch.long)  # [1, T]
        span = slice(prompt_len - 1, len(ids) - 1)  # positions whose next token was generated
        p = warp(target(input_ids=x).logits[0, span], params)  # [N, V]
        q = warp(draft(input_ids=x).logits[0, span], params)  # [N, V]
        betas.append(acceptance_rate_alpha(p, q))  # [N]
    if not betas:
        return Alpha(mean=math.nan, positions=0)
    all_betas = torch.cat(betas)
    return Alpha(mean=float(all_betas.mean()), positions=int(all_betas.numel()))


def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams,
    seed: int,
    eos_token_id: int | None = None,
) -> list[int]:
    """Target-only sampling with our own sampler (warp + sample) and engine: prompt + generated ids."""
    engine = CausalLMEngine(model)
    cache = engine.new_cache()
    generator = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    logits = engine.extend(cache, 0, ids, 1)  # [1, V]
    for _ in range(max_new_tokens):
        token = int(sample(warp(logits, params), generator)[0])
        ids.append(token)
        if token == eos_token_id:
            break
        logits = engine.extend(cache, len(ids) - 1, [token], 1)
    return ids


def _time_extend(engine: CausalLMEngine, cache: KVCache, keep: int, tokens: list[int]) -> float:
    start = time.perf_counter()
    engine.extend(cache, keep, tokens, len(tokens))
    return (time.perf_counter() - start) * 1e3


def step_times(
    jobs: Sequence[tuple[torch.nn.Module, Iterable[int]]], context: Sequence[int], trials: int
) -> list[dict[int, float]]:
    """For each (model, widths) job: median ms for the model to append ``w`` tokens to a cached ``context``.

    Exactly the servers' work per request: crop the cache back to the context, feed ``w`` tokens, return
    ``w`` logit rows. All (model, width) pairs are interleaved trial by trial, so background load drifting
    during the measurement hits every pair alike and the ratios (c, v(K)) stay meaningful.
    """
    context = list(context)
    plans = []
    for model, widths in jobs:
        engine = CausalLMEngine(model)
        cache = engine.new_cache()
        engine.extend(cache, 0, context, 1)
        plans.append((engine, cache, sorted(set(widths))))
    filler = [context[i % len(context)] for i in range(max(max(w) for *_, w in plans))]
    for engine, cache, widths in plans:  # warm-up: first calls allocate
        for w in widths:
            _time_extend(engine, cache, len(context), filler[:w])
    samples: list[dict[int, list[float]]] = [{w: [] for w in widths} for *_, widths in plans]
    for _ in range(trials):
        for (engine, cache, widths), per_width in zip(plans, samples):
            for w in widths:
                per_width[w].append(_time_extend(engine, cache, len(context), filler[:w]))
    return [{w: statistics.median(s) for w, s in per_width.items()} for per_width in samples]
