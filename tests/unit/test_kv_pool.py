"""The pooled KV slots: decodes that hold slots attend in one call per layer and get the rows they would get alone.

What a server sees: slots with holes (a sequence released between others), decodes beside prompts,
verifications and roll-backs, a sequence that found no free slot, one that outgrew its slot, and slots
whose unused positions hold garbage. Also the slot bookkeeping: lowest first, back to the pool when a
cache is dropped or outgrows its slot.
"""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import LlamaForCausalLM

from specdec import engine as engine_module
from specdec.engine import CausalLMEngine, StepItem
from specdec.kv_cache import KVCache, KVPool
from specdec.tiny import tiny_llama

TOL = dict(atol=2e-5, rtol=2e-5)
SLOTS, SLOT_TOKENS = 4, 48


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama(seed=1, hidden_size=48, num_attention_heads=6, num_key_value_heads=2)  # 3 heads per KV head


@pytest.fixture
def pooled(model: LlamaForCausalLM) -> CausalLMEngine:
    engine = CausalLMEngine(model, slots=SLOTS, slot_tokens=SLOT_TOKENS)
    engine.pool.tensor.fill_(float("nan"))  # garbage where nothing was written: masking must hide it
    return engine


@pytest.fixture
def pooled_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of decodes each pooled attention call carried."""
    calls: list[int] = []
    attend = engine_module._PooledDecodes.attend

    def spy(self, layer, query, scaling):  # noqa: ANN001, ANN202
        calls.append(self.count)
        return attend(self, layer, query, scaling)

    monkeypatch.setattr(engine_module._PooledDecodes, "attend", spy)
    return calls


def full_logits(model: LlamaForCausalLM, ids: list[int], n: int) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -n:].float()


def histories(*lengths: int, seed: int = 7) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (n,), generator=generator).tolist() for n in lengths]


def test_decodes_in_slots_with_a_hole_attend_together_and_equal_a_full_forward(
    pooled: CausalLMEngine, model: LlamaForCausalLM, pooled_calls: list[int]
) -> None:
    a, gone, c, d, e = histories(10, 5, 30, 20, 12)
    caches = [pooled.new_cache() for _ in range(5)]
    pooled.step([StepItem(cache, 0, h, 1) for cache, h in zip(caches, (a, gone, c, d, e))])
    assert [cache.slot for cache in caches] == [0, 1, 2, 3, None]  # the fifth found no free slot
    del caches[1]
    gc.collect()
    assert pooled.pool.free == 1  # slot 1 is back: a hole between the decodes of slots 0 and 2
    ca, cc, cd, ce = caches
    fresh = pooled.new_cache()
    prompt = histories(9, seed=8)[0]
    pooled_calls.clear()
    # Out of slot order, beside a prompt (it takes slot 1), a verification that rolls back, and a decode
    # outside the pool.
    plan = [(cc, 30, [3], 1), (fresh, 0, prompt, 2), (ca, 10, [5], 1), (cd, 17, [1, 2, 3], 3), (ce, 12, [9], 1)]
    results = pooled.step([StepItem(cache, keep, new, n) for cache, keep, new, n in plan])
    assert pooled_calls == [2, 2]  # one call per layer for the two pooled decodes (slots 2 and 0)
    assert fresh.slot == 1
    expected = [full_logits(model, c + [3], 1), full_logits(model, prompt, 2), full_logits(model, a + [5], 1),
                full_logits(model, d[:17] + [1, 2, 3], 3), full_logits(model, e + [9], 1)]
    for result, want in zip(results, expected):
        assert torch.isfinite(result).all()
        torch.testing.assert_close(result, want, **TOL)


def test_pooled_rows_equal_the_rows_of_an_engine_without_a_pool(pooled: CausalLMEngine, model: LlamaForCausalLM,
                                                                pooled_calls: list[int]) -> None:
    plain = CausalLMEngine(model)
    starts = histories(4, 25, 11, 40, seed=9)
    sides = {}
    for name, engine in (("plain", plain), ("pooled", pooled)):
        caches = [engine.new_cache() for _ in starts]
        engine.step([StepItem(cache, 0, h, 1) for cache, h in zip(caches, starts)])
        rows = []
        for step in range(6):  # every sequence decodes; two of them roll back one token on the way
            keep = [cache.length - (1 if step == 3 and i % 2 else 0) for i, cache in enumerate(caches)]
            items = [StepItem(cache, k, [step + i], 1) for i, (cache, k) in enumerate(zip(caches, keep))]
            rows.append(engine.step(items))
        sides[name] = rows
    assert len(pooled_calls) == 6 * 2 and set(pooled_calls) == {4}
    for plain_rows, pooled_rows in zip(sides["plain"], sides["pooled"]):
        for want, got in zip(plain_rows, pooled_rows):
            assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
            torch.testing.assert_close(got, want, **TOL)


def test_a_prompt_attends_alone_beside_pooled_decodes(pooled: CausalLMEngine, model: LlamaForCausalLM,
                                                      pooled_calls: list[int]) -> None:
    a, b, c = histories(6, 7, 40, seed=11)
    caches = [pooled.new_cache() for _ in range(3)]
    pooled.step([StepItem(caches[0], 0, a, 1), StepItem(caches[1], 0, b, 1)])
    pooled_calls.clear()
    items = [StepItem(caches[0], 6, [1], 1), StepItem(caches[2], 0, c, 2), StepItem(caches[1], 7, [2], 1)]
    results = pooled.step(items)
    assert pooled_calls == [2, 2] and caches[2].slot == 2  # the prompt holds a slot but attends alone
    for result, want in zip(results, (full_logits(model, a + [1], 1), full_logits(model, c, 2),
                                      full_logits(model, b + [2], 1))):
        torch.testing.assert_close(result, want, **TOL)


def test_a_sequence_that_outgrows_its_slot_keeps_its_history_and_frees_the_slot(pooled: CausalLMEngine,
                                                                               model: LlamaForCausalLM) -> None:
    cache = pooled.new_cache()
    ids = histories(40)[0]
    pooled.extend(cache, 0, ids, 1)
    assert cache.slot == 0 and cache.capacity == SLOT_TOKENS and pooled.pool.free == SLOTS - 1
    assert cache.nbytes == SLOT_TOKENS * cache.layout.bytes_per_token
    more = [3] * 20
    out = pooled.extend(cache, 40, more, 1)
    assert cache.slot is None and cache.capacity >= 60 and pooled.pool.free == SLOTS
    torch.testing.assert_close(out, full_logits(model, ids + more, 1), **TOL)
    other = pooled.new_cache()
    pooled.extend(other, 0, [1, 2], 1)
    assert other.slot == 0  # the slot it left, lowest first


def test_a_prompt_longer_than_a_slot_never_takes_one(pooled: CausalLMEngine, model: LlamaForCausalLM) -> None:
    cache = pooled.new_cache()
    ids = histories(SLOT_TOKENS + 1)[0]
    torch.testing.assert_close(pooled.extend(cache, 0, ids, 1), full_logits(model, ids, 1), **TOL)
    assert cache.slot is None and pooled.pool.free == SLOTS


def test_slots_are_taken_lowest_first_zeroed_and_given_back_when_dropped(model: LlamaForCausalLM) -> None:
    engine = CausalLMEngine(model, slots=3, slot_tokens=8)
    pool = engine.pool
    pool.tensor.fill_(1.0)
    caches = [engine.new_cache() for _ in range(4)]
    for cache in caches:
        cache.reserve(8)
    assert [c.slot for c in caches] == [0, 1, 2, None] and caches[3].capacity >= 8
    assert bool((pool.tensor[:, :, 1] == 0).all())
    caches[0] = caches[2] = KVCache(engine.layout, pool)  # drop the holders of slots 0 and 2
    gc.collect()
    assert pool.free == 2 and pool.take() == 0 and pool.take() == 2 and pool.take() is None


@pytest.mark.parametrize(("slots", "tokens"), [(0, 8), (3, 0), (-1, 8)])
def test_a_pool_needs_slots_and_tokens(model: LlamaForCausalLM, slots: int, tokens: int) -> None:
    layout = CausalLMEngine(model).layout
    with pytest.raises(ValueError, match="slots >= 1 and slot_tokens >= 1"):
        KVPool(layout, slots, tokens)
    assert CausalLMEngine(model, slots=max(slots, 0), slot_tokens=max(tokens, 0)).pool is None
