"""The peer: Hugging Face transformers `generate` on the same model pair, in-process, no RPCs.

Why this module exists: our stack pays for two gRPC hops, packed probability rows and a stateless
orchestrator; HF assisted generation (`generate(..., assistant_model=draft)`) is the well-known in-process
implementation of the same algorithm (with ``do_sample`` it runs Leviathan/Chen speculative sampling, greedy
it keeps the longest matching prefix). Measuring both on the same prompts, token budget, K and sampling
settings says what the service architecture costs or gains. Fairness settings: K is fixed
(``num_assistant_tokens=K`` with the ``constant`` schedule) and HF's dynamic confidence-based early stop of
the draft is disabled (``assistant_confidence_threshold=0``), so each round drafts exactly K tokens as ours
does. Plain `generate()` (K = 0) is HF's own target-only baseline.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from specdec.sampling import SamplingParams


@dataclass(frozen=True)
class PeerRecord:
    """One measured HF generation."""

    mode: str
    k: int  # 0 = plain generate(); else assisted generation with K draft tokens per round
    prompt_index: int
    repeat: int
    wall_ms: float
    tokens: int  # generated tokens, up to and including an end-of-sequence token
    rounds: int = 0  # target forward calls (one per round: each verifies K drafts, or makes 1 token when K = 0)


def generation_config(
    params: SamplingParams, max_new_tokens: int, eos_token_id: int | None, pad_token_id: int | None
) -> GenerationConfig:
    """HF's settings for our SamplingParams: greedy, or temperature -> top-k -> top-p (HF's order, ours too)."""
    common = {"max_new_tokens": max_new_tokens, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    if params.greedy:
        return GenerationConfig(do_sample=False, temperature=None, top_k=None, top_p=None, **common)
    return GenerationConfig(
        do_sample=True, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, **common
    )


def configure_assistant(draft: torch.nn.Module, k: int) -> None:
    """Make HF draft exactly K tokens every round (HF reads these from the assistant's own config)."""
    cfg = draft.generation_config
    cfg.num_assistant_tokens = k
    cfg.num_assistant_tokens_schedule = "constant"
    cfg.assistant_confidence_threshold = 0.0


def count_generated(new_tokens: Sequence[int], eos_token_id: int | None) -> int:
    """Tokens generated up to and including the first end-of-sequence token (HF pads after it)."""
    for i, token in enumerate(new_tokens):
        if token == eos_token_id:
            return i + 1
    return len(new_tokens)


@torch.inference_mode()
def hf_generate(
    target: torch.nn.Module,
    draft: torch.nn.Module | None,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    k: int,
    seed: int,
) -> tuple[list[int], float, int]:
    """One HF generation (assisted when k > 0): (new token ids, wall ms, target forward calls)."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)  # [1, T]
    kwargs: dict = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "generation_config": config}
    if k > 0:
        if draft is None:
            raise ValueError("assisted generation needs a draft model")
        configure_assistant(draft, k)
        kwargs["assistant_model"] = draft
    calls = [0]
    hook = target.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = target.generate(**kwargs)
        wall_ms = (time.perf_counter() - start) * 1e3
    finally:
        hook.remove()
    return out[0, ids.shape[1]:].tolist(), wall_ms, calls[0]


class PeerRuns:
    """HF plain (K = 0) and assisted generation in this process (a `bench.schedule.Timed`)."""

    def __init__(
        self, target: torch.nn.Module, draft: torch.nn.Module, max_new_tokens: int, warmup_new_tokens: int,
        seed: int, eos_token_id: int | None, pad_token_id: int | None,
    ) -> None:
        self._target, self._draft, self._seed = target, draft, seed
        self._max_new_tokens, self._warmup_new_tokens = max_new_tokens, warmup_new_tokens
        self._eos, self._pad = eos_token_id, pad_token_id
        self.records: list[PeerRecord] = []

    def warm(self, mode: str, params: SamplingParams, k: int, prompt: Sequence[int], w: int) -> None:
        config = generation_config(params, self._warmup_new_tokens, self._eos, self._pad)
        hf_generate(self._target, self._draft, prompt, config, k, self._seed - 1 - w)

    def measure(self, mode: str, params: SamplingParams, k: int, prompt: Sequence[int], p: int, r: int) -> None:
        config = generation_config(params, self._max_new_tokens, self._eos, self._pad)
        new, wall_ms, calls = hf_generate(self._target, self._draft, prompt, config, k, self._seed + 1000 * r + p)
        self.records.append(PeerRecord(mode, k, p, r, wall_ms, count_generated(new, self._eos), calls))
