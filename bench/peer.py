"""The peer: Hugging Face transformers `generate` on the same model, in-process, no RPCs.

Why this module exists: our stack pays for two gRPC hops, packed probability rows and a stateless
orchestrator; Hugging Face `generate` is what a user would otherwise run. Plain `generate()` is its
target-only baseline, and `generate(prompt_lookup_num_tokens=K)` its model-free drafter (prompt lookup
decoding: copy the K tokens that followed the latest match of the context's last n-gram), the peer of our
`ngram` and `suffix` drafters. Same model, prompts, token budget and sampling settings as our stack.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
from transformers import GenerationConfig

from bench.arms import Arm, Record
from specdec.sampling import SamplingParams


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


def count_generated(new_tokens: Sequence[int], eos_token_id: int | None) -> int:
    """Tokens generated up to and including the first end-of-sequence token (HF pads after it)."""
    for i, token in enumerate(new_tokens):
        if token == eos_token_id:
            return i + 1
    return len(new_tokens)


@torch.inference_mode()
def hf_generate(
    target: torch.nn.Module, prompt_ids: Sequence[int], config: GenerationConfig, lookup: int, seed: int
) -> tuple[list[int], float, int]:
    """One HF generation (prompt lookup of ``lookup`` tokens when > 0): (new token ids, wall ms, target forwards)."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)  # [1, T]
    if lookup:
        config = copy.deepcopy(config)
        config.prompt_lookup_num_tokens = lookup
    calls = [0]
    hook = target.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        wall_ms = (time.perf_counter() - start) * 1e3
    finally:
        hook.remove()
    return out[0, ids.shape[1]:].tolist(), wall_ms, calls[0]


class Peer:
    """HF generate of one model in this process, plain or with prompt lookup."""

    def __init__(self, target: torch.nn.Module, eos_token_id: int | None, pad_token_id: int | None) -> None:
        self._target, self._eos, self._pad = target, eos_token_id, pad_token_id

    def run(self, arm: Arm, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int, seed: int,
            **labels: object) -> Record:
        config = generation_config(params, max_new_tokens, self._eos, self._pad)
        new, wall_ms, calls = hf_generate(self._target, prompt_ids, config, arm.k or 0, seed)
        tokens = count_generated(new, self._eos)
        return Record(wall_ms=wall_ms, tokens=tokens, output_ids=tuple(new[:tokens]), rounds=calls, arm=arm.label,
                      **labels)
