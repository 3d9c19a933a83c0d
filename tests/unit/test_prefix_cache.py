"""Shared prompt heads (`specdec.prefix_cache`) and the target's prompts that start from them
(`target_service.steps.run_batch` with ``prefix``), on a tiny random Llama.

A head is kept only once two different prompts share it; a later prompt copies it and runs the rest; its
rows then equal a full forward's to float tolerance (and a head from the wrong text does not: the control);
decodes give the same tokens; memory stays within its bound, least recently used out.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdec import target_contract as contract
from specdec.engine import CausalLMEngine, StepItem
from specdec.prefix_cache import PrefixCache, common_length
from specdec.sequences import SequenceStore
from target_service.steps import StepRequest, run_batch, run_to_completion
from tests.fakes import FakeClock, tiny_llama
from tests.unit.test_target_steps import decode_request, full_forward, ok, request

V = 64
HEAD = [(5 * i + 1) % V for i in range(20)]  # the first 20 tokens of every prompt below


def prompt(tail: int, length: int = 12) -> list[int]:
    return HEAD + [(tail * 7 + 3 * i) % V for i in range(length)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama(V, max_positions=128)


@pytest.fixture
def engine(model) -> CausalLMEngine:
    return CausalLMEngine(model, slots=8, slot_tokens=64)


def prefilled(engine: CausalLMEngine, ids: list[int]):
    cache = engine.new_cache()
    engine.step([StepItem(cache, 0, ids, 1)])
    return cache


def test_common_length():
    a = np.array([1, 2, 3, 4])
    assert common_length(a, np.array([1, 2, 9])) == 2
    assert common_length(a, np.array([1, 2])) == 2
    assert common_length(a, np.array([7])) == 0
    assert common_length(a, a) == 4


def test_a_head_is_kept_once_two_different_prompts_share_it(engine):
    prefix = PrefixCache(max_bytes=1 << 20, min_tokens=8)
    first = prompt(1)
    prefix.learn(first, prefilled(engine, first))
    prefix.learn(first, prefilled(engine, first))  # the same prompt again: nothing shared with another
    assert len(prefix) == 0 and prefix.match(prompt(3), 31) is None
    second = prompt(2)
    prefix.learn(second, prefilled(engine, second))
    assert len(prefix) == 1 and prefix.nbytes == 20 * engine.layout.bytes_per_token
    hit = prefix.match(prompt(3), 31)
    assert hit is not None and hit.tokens == 20 and hit.head.ids.tolist() == HEAD
    assert prefix.match(prompt(3), 15).tokens == 15  # a prompt's own rows still run: at most `most`
    assert prefix.match(prompt(3), 7) is None  # under min_tokens
    assert prefix.match([t + 1 for t in HEAD], 20) is None
    assert (prefix.stats.prompts, prefix.stats.heads_kept, prefix.stats.reused_tokens) == (3, 1, 0)  # none filled


def test_a_longer_shared_head_replaces_the_shorter_one_it_extends(engine):
    prefix = PrefixCache(max_bytes=1 << 20, min_tokens=8)
    for ids in (prompt(1), prompt(2)):
        prefix.learn(ids, prefilled(engine, ids))
    longer = HEAD + [9, 9, 9, 9]
    for tail in (1, 2):
        ids = longer + [tail] * 6
        prefix.learn(ids, prefilled(engine, ids))
    assert len(prefix) == 1 and prefix.match(longer + [5] * 6, 29).tokens == 24
    assert prefix.nbytes == 24 * engine.layout.bytes_per_token


def test_memory_stays_within_its_bound_least_recently_used_out(engine):
    per_token = engine.layout.bytes_per_token
    prefix = PrefixCache(max_bytes=45 * per_token, min_tokens=8)
    heads = [[(h * 11 + 5 * i) % V for i in range(20)] for h in range(3)]
    for head in heads[:2]:
        for tail in (1, 2):
            ids = head + [tail] * 5
            prefix.learn(ids, prefilled(engine, ids))
    assert len(prefix) == 2 and prefix.nbytes == 40 * per_token
    assert prefix.match(heads[0] + [7] * 5, 24) is not None  # the first head is now the most recently used
    for tail in (1, 2):
        ids = heads[2] + [tail] * 5
        prefix.learn(ids, prefilled(engine, ids))
    assert prefix.nbytes == 40 * per_token <= prefix.max_bytes
    assert prefix.match(heads[1] + [7] * 5, 24) is None  # the least recently used went
    assert prefix.match(heads[0] + [7] * 5, 24) is not None and prefix.match(heads[2] + [7] * 5, 24) is not None
    assert PrefixCache(max_bytes=10 * per_token, min_tokens=8).nbytes == 0
    tiny = PrefixCache(max_bytes=10 * per_token, min_tokens=8)
    for tail in (1, 2):
        ids = heads[0] + [tail] * 5
        tiny.learn(ids, prefilled(engine, ids))
    assert len(tiny) == 0  # a head bigger than the whole bound is not kept


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCache(max_bytes=-1)
    with pytest.raises(ValueError, match="min_tokens"):
        PrefixCache(max_bytes=1, min_tokens=0)


def store_for(engine: CausalLMEngine) -> SequenceStore:
    return SequenceStore(engine.new_cache, 8, 60.0, clock=FakeClock())


def test_a_prompt_starting_from_a_head_runs_the_rest_and_its_rows_equal_a_full_forward(engine, model):
    prefix = PrefixCache(max_bytes=1 << 20, min_tokens=8)
    store = store_for(engine)
    for sid in (1, 2):
        [answer] = run_batch(engine, store, [request(sid, prompt(sid), 0, 1, start=True, end=True)], prefix=prefix)
        assert answer[contract.FORWARD_TOKENS].item() == 32  # nothing held yet: the whole prompt
    third = prompt(3, length=14)
    [answer] = run_batch(engine, store, [request(3, third, 0, 3, start=True)], prefix=prefix)
    assert answer[contract.FORWARD_TOKENS].item() == 14  # the head was copied, the rest ran
    np.testing.assert_allclose(ok(answer)[0], full_forward(model, third)[-3:], atol=2e-5)
    # and the sequence goes on from there like any other
    [after] = run_batch(engine, store, [request(3, [7, 8], 34, 2)], prefix=prefix)
    np.testing.assert_allclose(ok(after)[0], full_forward(model, third + [7, 8])[-2:], atol=2e-5)
    assert prefix.stats.reused_tokens == 20


def test_the_control_a_head_of_other_text_gives_other_rows(engine, model):
    """What the tolerance above can tell apart: the same copy from a head of different tokens."""
    prefix = PrefixCache(max_bytes=1 << 20, min_tokens=8)
    other = [(t + 1) % V for t in HEAD]
    for tail in (1, 2):
        ids = other + [tail] * 6
        prefix.learn(ids, prefilled(engine, ids))
    hit = prefix.match(other + [4] * 6, 20)
    cache = engine.new_cache()
    prefix.fill(cache, hit, 32)
    cache.ids[:] = HEAD  # claim the head was HEAD's
    (rows,) = engine.step([StepItem(cache, 20, prompt(3)[20:], 1)])
    assert not np.allclose(rows.numpy(), full_forward(model, prompt(3))[-1:], atol=1e-2)


def test_a_decode_starting_from_a_head_gives_the_same_tokens(engine):
    greedy, sampled = (0.0, 0, 1.0), (0.9, 0, 0.95)
    for sampling in (greedy, sampled):
        plain = run_to_completion(engine, store_for(engine),
                                  [decode_request(9, prompt(4), 0, 6, sampling, seed=3, start=True, end=True)])
        prefix = PrefixCache(max_bytes=1 << 20, min_tokens=8)
        store = store_for(engine)
        run_to_completion(engine, store, [request(s, prompt(s), 0, 1, start=True, end=True) for s in (1, 2)],
                          prefix=prefix)
        forwards: list[int] = []
        again = run_to_completion(engine, store,
                                  [decode_request(9, prompt(4), 0, 6, sampling, seed=3, start=True, end=True)],
                                  forwards.append, prefix=prefix)
        assert again[0][contract.TOKENS].tolist() == plain[0][contract.TOKENS].tolist()
        assert prefix.stats.reused_tokens == 20 and 9 not in store


def test_a_head_and_a_chunked_rest_in_a_batch_beside_other_rows(engine, model):
    prefix = PrefixCache(max_bytes=1 << 20, min_tokens=8)
    store = store_for(engine)
    run_batch(engine, store, [request(s, prompt(s), 0, 1, start=True) for s in (1, 2)], prefix=prefix)
    long = prompt(5, length=30)  # 50 tokens: 20 from the head, then 30 in chunks of the budget
    answers = run_batch(engine, store, [request(1, [4], 32, 1), request(5, long, 0, 2, start=True)], budget=16,
                        prefix=prefix)
    np.testing.assert_allclose(ok(answers[0])[0], full_forward(model, prompt(1) + [4])[-1:], atol=2e-5)
    assert isinstance(answers[1], StepRequest) and answers[1].keep_length == 35  # 20 copied + 15 run
    [done] = run_to_completion(engine, store, [answers[1]], budget=16, prefix=prefix)
    np.testing.assert_allclose(ok(done)[0], full_forward(model, long)[-2:], atol=2e-5)


def test_a_prompt_put_off_comes_back_as_it_came_and_starts_from_the_head_later(engine, model):
    prefix = PrefixCache(max_bytes=1 << 20, min_tokens=8)
    store = store_for(engine)
    run_batch(engine, store, [request(s, prompt(s), 0, 1, start=True) for s in (1, 2)], prefix=prefix)
    first, second = request(3, prompt(3, length=30), 0, 1, start=True), request(4, prompt(4), 0, 1, start=True)
    answers = run_batch(engine, store, [first, second], budget=30, prefix=prefix)  # the first takes it all
    assert answers[1] == second and 4 not in store  # put off whole: the request as it came, START and all
    [done] = run_to_completion(engine, store, [answers[1]], prefix=prefix)
    assert done[contract.FORWARD_TOKENS].item() == 12  # the head copied then
    np.testing.assert_allclose(ok(done)[0], full_forward(model, prompt(4))[-1:], atol=2e-5)


def test_invalid_and_refused_prompts_are_answered_as_without_heads(engine):
    prefix = PrefixCache(max_bytes=1 << 20, min_tokens=8)
    store = store_for(engine)
    run_batch(engine, store, [request(s, prompt(s), 0, 1, start=True) for s in (1, 2)], prefix=prefix)
    bad = request(3, prompt(3), 2, 1, start=True)  # START with keep_length 2
    out_of_vocab = request(4, prompt(3) + [V + 5], 0, 1, start=True)
    answers = run_batch(engine, store, [bad, out_of_vocab], prefix=prefix)
    assert "keep_length 0" in answers[0].message and "out of the vocabulary" in answers[1].message
    assert 3 not in store and prefix.stats.reused_tokens == 0


def test_a_verification_that_starts_a_sequence_teaches_its_prompt_not_its_drafts(engine):
    """A first round verifies its drafts with the prompt: two such rounds of the same prompt with other drafts
    share the whole prompt, but a repeated prompt is not a head (only what different prompts share is)."""
    prefix = PrefixCache(max_bytes=1 << 20, min_tokens=8)
    store = store_for(engine)
    same = prompt(1)
    run_batch(engine, store, [request(1, same + [4, 5, 6], 0, 4, start=True),
                              request(2, same + [7, 8, 9], 0, 4, start=True)], prefix=prefix)
    assert len(prefix) == 0 and prefix.stats.prompt_tokens == 2 * len(same)
    run_batch(engine, store, [request(3, prompt(2) + [4, 5], 0, 3, start=True)], prefix=prefix)
    assert len(prefix) == 1 and prefix.match(prompt(5), 31).tokens == 20
