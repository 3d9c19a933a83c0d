"""The batched engine: a sequence's rows from a ragged batch equal its rows computed alone, and a full forward.

Ragged means what a server sees: sequences with different cache lengths, different numbers of new tokens
and roll-backs in the same step. Also: caches grow without losing their history, a refused item leaves its
neighbours alone, and the model still runs plain forwards (SDPA) outside a step.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from specdec.engine import CausalLMEngine, StepItem
from specdec.kv_cache import KVCache
from specdec.tiny import tiny_llama

TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama(num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def engine(model: LlamaForCausalLM) -> CausalLMEngine:
    return CausalLMEngine(model)


def full_logits(model: LlamaForCausalLM, ids: list[int], n: int) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -n:].float()


def test_append_and_rollback_match_a_full_forward(engine: CausalLMEngine, model: LlamaForCausalLM) -> None:
    cache = engine.new_cache()
    prompt = [5, 9, 13, 2]
    torch.testing.assert_close(engine.extend(cache, 0, prompt, 2), full_logits(model, prompt, 2), **TOL)
    engine.extend(cache, 4, [7, 8, 9], 3)
    rolled = engine.extend(cache, 5, [30, 31], 2)  # keep prompt + [7], drop [8, 9]
    torch.testing.assert_close(rolled, full_logits(model, [*prompt, 7, 30, 31], 2), **TOL)
    assert cache.length == 7


def test_a_ragged_batch_equals_each_sequence_alone(engine: CausalLMEngine, model: LlamaForCausalLM) -> None:
    generator = torch.Generator().manual_seed(3)
    histories = [torch.randint(0, 64, (n,), generator=generator).tolist() for n in (3, 17, 40, 9, 1)]
    alone, batched = [engine.new_cache() for _ in histories], [engine.new_cache() for _ in histories]
    for caches in (alone, batched):  # prefill every sequence, in one batch for the batched side
        if caches is alone:
            for cache, history in zip(caches, histories):
                engine.extend(cache, 0, history, 1)
        else:
            engine.step([StepItem(c, 0, h, 1) for c, h in zip(caches, histories)])
    # One step: different cache lengths, new-token counts, and two roll-backs (keep < length).
    plan = [(3, [4, 5, 6, 7, 8], 5), (12, [1], 1), (40, [2, 3], 2), (9, [10, 11, 12, 13], 2), (0, [6, 6, 6], 3)]
    results = engine.step([StepItem(c, keep, new, n) for c, (keep, new, n) in zip(batched, plan)])
    for cache, history, (keep, new, n), result in zip(alone, histories, plan, results):
        expected = engine.extend(cache, keep, new, n)
        torch.testing.assert_close(result, expected, **TOL)
        torch.testing.assert_close(result, full_logits(model, history[:keep] + new, n), **TOL)
    assert [c.length for c in batched] == [8, 13, 42, 13, 3]


def test_a_prompt_fed_in_chunks_beside_others_equals_it_fed_at_once(engine: CausalLMEngine,
                                                                     model: LlamaForCausalLM) -> None:
    prompt = torch.randint(0, 64, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    chunked, other = engine.new_cache(), engine.new_cache()
    engine.extend(other, 0, [1, 2, 3], 1)
    first = engine.step([StepItem(chunked, 0, prompt[:12], 0), StepItem(other, 3, [4], 1)])
    assert first[0].shape == (0, 64) and first[1].shape == (1, 64)  # a chunk returns no rows
    engine.step([StepItem(other, 4, [5], 1), StepItem(chunked, 12, prompt[12:25], 0)])
    (last,) = engine.step([StepItem(chunked, 25, prompt[25:], 2)])
    torch.testing.assert_close(last, full_logits(model, prompt, 2), **TOL)
    assert chunked.length == 30 and chunked.ids == prompt
    torch.testing.assert_close(engine.extend(other, 5, [6], 1), full_logits(model, [1, 2, 3, 4, 5, 6], 1), **TOL)


def test_a_refused_item_leaves_its_batch_alone(engine: CausalLMEngine, model: LlamaForCausalLM) -> None:
    good, bad = engine.new_cache(), engine.new_cache()
    engine.step([StepItem(good, 0, [1, 2], 1), StepItem(bad, 0, [3], 1)])
    results = engine.step([StepItem(bad, 5, [4], 1), StepItem(good, 2, [9], 1), StepItem(good, 2, [9], 1)])
    assert isinstance(results[0], ValueError) and "exceeds the cached length 1" in str(results[0])
    assert isinstance(results[2], ValueError) and "twice" in str(results[2])
    torch.testing.assert_close(results[1], full_logits(model, [1, 2, 9], 1), **TOL)
    assert bad.length == 1  # untouched


@pytest.mark.parametrize(
    ("keep", "tokens", "num_logits", "message"),
    [
        (0, [], 1, "at least one token"),
        (0, [1, 2], 3, "num_logits must be in"),
        (0, [1, 2], -1, "num_logits must be in"),
        (3, [1], 1, "exceeds the cached length 2"),
        (-1, [1], 1, "exceeds the cached length"),
        (2, list(range(255)), 1, "exceed the context length 256"),
    ],
)
def test_bad_items_are_value_errors(engine: CausalLMEngine, keep, tokens, num_logits, message) -> None:
    cache = engine.new_cache()
    engine.extend(cache, 0, [1, 2], 1)
    with pytest.raises(ValueError, match=message):
        engine.extend(cache, keep, tokens, num_logits)
    assert cache.length == 2


def test_a_cache_grows_without_losing_its_history(engine: CausalLMEngine, model: LlamaForCausalLM) -> None:
    cache = engine.new_cache()
    ids = list(range(60))
    engine.extend(cache, 0, ids, 1)
    first_capacity = cache.capacity
    more = [7] * 100
    out = engine.extend(cache, 60, more, 1)
    assert cache.capacity > first_capacity and cache.capacity >= 160
    torch.testing.assert_close(out, full_logits(model, ids + more, 1), **TOL)
    assert cache.nbytes == cache.capacity * cache.layout.bytes_per_token


def test_a_failed_forward_keeps_every_cache_at_its_kept_length(engine: CausalLMEngine, model) -> None:
    cache = engine.new_cache()
    engine.extend(cache, 0, [1, 2, 3], 1)
    with pytest.raises(IndexError):
        engine.step([StepItem(cache, 2, [999], 1)])  # a token outside the embedding: the forward fails
    assert cache.length == 2
    torch.testing.assert_close(engine.extend(cache, 2, [4], 1), full_logits(model, [1, 2, 4], 1), **TOL)


def test_plain_forwards_still_work_outside_a_step(engine: CausalLMEngine, model: LlamaForCausalLM) -> None:
    with torch.inference_mode():
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_an_empty_step_and_a_fresh_cache(engine: CausalLMEngine) -> None:
    assert engine.step([]) == []
    cache: KVCache = engine.new_cache()
    assert (cache.length, cache.capacity, cache.nbytes) == (0, 0, 0)
