"""The per-sequence KV-cache engine: rollback equals recompute, TTL, capacity, and its error kinds."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.engine import CapacityError, CausalLMEngine, SequenceNotFoundError, SequenceStore


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def full_logits(model: LlamaForCausalLM, ids: list[int], n: int) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -n:].float()


def test_append_and_rollback_match_a_full_forward(model: LlamaForCausalLM) -> None:
    engine = CausalLMEngine(model, SequenceStore(4, 60))
    prompt = [5, 9, 13, 2]
    first = engine.extend(1, 0, prompt, 2, start=True)
    torch.testing.assert_close(first, full_logits(model, prompt, 2), atol=1e-5, rtol=1e-5)
    engine.extend(1, 4, [7, 8, 9], 3, start=False)
    rolled = engine.extend(1, 5, [30, 31], 2, start=False)  # keep prompt + [7], drop [8, 9]
    torch.testing.assert_close(rolled, full_logits(model, [*prompt, 7, 30, 31], 2), atol=1e-5, rtol=1e-5)


def test_sequences_are_independent(model: LlamaForCausalLM) -> None:
    engine = CausalLMEngine(model, SequenceStore(4, 60))
    engine.extend(1, 0, [1, 2, 3], 1, start=True)
    engine.extend(2, 0, [40, 41], 1, start=True)
    out = engine.extend(1, 3, [4], 1, start=False)
    torch.testing.assert_close(out, full_logits(model, [1, 2, 3, 4], 1), atol=1e-5, rtol=1e-5)
    assert len(engine.store) == 2


def test_unknown_sequence_is_not_found(model: LlamaForCausalLM) -> None:
    engine = CausalLMEngine(model, SequenceStore(4, 60))
    with pytest.raises(SequenceNotFoundError, match="no cache"):
        engine.extend(99, 3, [1], 1, start=False)


def test_capacity_and_release(model: LlamaForCausalLM) -> None:
    engine = CausalLMEngine(model, SequenceStore(1, 60))
    engine.extend(1, 0, [1], 1, start=True)
    with pytest.raises(CapacityError, match="capacity is 1"):
        engine.extend(2, 0, [1], 1, start=True)
    assert engine.store.release(1) is True
    assert engine.store.release(1) is False
    engine.extend(2, 0, [1], 1, start=True)


def test_idle_sequences_are_evicted_after_the_ttl(model: LlamaForCausalLM) -> None:
    clock = FakeClock()
    store = SequenceStore(2, idle_ttl_s=10, clock=clock)
    engine = CausalLMEngine(model, store)
    engine.extend(1, 0, [1], 1, start=True)
    clock.now = 5
    engine.extend(2, 0, [1], 1, start=True)
    clock.now = 12
    assert store.evict_idle() == [1]
    assert 2 in store and 1 not in store


@pytest.mark.parametrize(
    ("sequence_id", "keep", "tokens", "num_logits", "start", "message"),
    [
        (0, 0, [1], 1, True, "sequence_id must be non-zero"),
        (1, 0, [], 1, True, "at least one token"),
        (1, 0, [1, 2], 3, True, "num_logits must be in"),
        (1, 0, [64], 1, True, "out of the vocabulary"),
        (1, 2, [1], 1, True, "starts with keep_length 0"),
        (1, -1, [1], 1, False, "keep_length must be >= 0"),
        (1, 0, list(range(33)), 1, True, "exceed the context length 32"),
    ],
)
def test_bad_arguments_are_value_errors(model, sequence_id, keep, tokens, num_logits, start, message) -> None:
    engine = CausalLMEngine(model, SequenceStore(4, 60))
    with pytest.raises(ValueError, match=message):
        engine.extend(sequence_id, keep, tokens, num_logits, start=start)


def test_keep_beyond_the_cache_is_refused_and_the_sequence_survives(model: LlamaForCausalLM) -> None:
    engine = CausalLMEngine(model, SequenceStore(4, 60))
    engine.extend(1, 0, [1, 2], 1, start=True)
    with pytest.raises(ValueError, match="exceeds the cached length 2"):
        engine.extend(1, 3, [3], 1, start=False)
    out = engine.extend(1, 2, [3], 1, start=False)
    torch.testing.assert_close(out, full_logits(model, [1, 2, 3], 1), atol=1e-5, rtol=1e-5)
