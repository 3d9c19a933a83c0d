"""The target's contract on the batched engine (`target_service.steps`), without Triton: a tiny random Llama.

Cached rows equal a full forward (start, append, rollback), a batch runs as one forward whose rows equal
each request alone, release and END drop the cache, and each failure maps to its code (INVALID_ARG,
NOT_FOUND "no cache:", UNAVAILABLE "capacity:", INTERNAL without a traceback on the wire).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
import torch

from specdec import target_contract as contract
from specdec.engine import CausalLMEngine
from specdec.round_draws import draw_round
from specdec.rows import PackedRows
from specdec.sampling import SamplingParams, warp
from specdec.sequences import SequenceStore
from target_service.steps import (
    ErrorCode,
    StepError,
    StepRequest,
    fit,
    lookup_drafts,
    read_request,
    run_batch,
    run_to_completion,
)
from tests.fakes import FakeClock, tiny_llama

V = 64


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama(V, max_positions=128)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@dataclass
class Target:
    """The engine and the store, as the Triton model holds them."""

    engine: CausalLMEngine
    store: SequenceStore

    def step(self, request: StepRequest | StepError):
        return run_batch(self.engine, self.store, [request])[0]


@pytest.fixture
def target(model: torch.nn.Module, clock: FakeClock) -> Target:
    engine = CausalLMEngine(model)
    return Target(engine, SequenceStore(engine.new_cache, max_sequences=2, idle_ttl_s=60.0, clock=clock))


def request(
    sid: int, ids: list[int], keep: int, n: int, *, start: bool = False, end: bool = False,
    sampling: tuple[float, float, float] | None = None,
) -> StepRequest:
    params = None if sampling is None else SamplingParams(sampling[0], int(sampling[1]), sampling[2])
    return StepRequest(sid, tuple(ids), keep, n, start, end, params)


FORWARD = {contract.FORWARD_SEQUENCES, contract.FORWARD_TOKENS}  # what every forward's answers also carry


def ok(result: dict[str, np.ndarray] | StepError) -> np.ndarray:
    """The LOGITS of a request sent without sampling settings."""
    assert isinstance(result, dict) and set(result) - FORWARD == {contract.LOGITS}, result
    assert result[contract.LOGITS].dtype == np.float32
    return result[contract.LOGITS]


def probs(result: dict[str, np.ndarray] | StepError, vocab_size: int = V) -> torch.Tensor:
    """PROBS and PROBS_INDEX of a request sent with sampling settings, unpacked to dense [N, V] rows."""
    assert isinstance(result, dict), result
    assert set(result) - FORWARD == {contract.PROBS, contract.PROBS_INDEX}, result
    values, index = result[contract.PROBS], result[contract.PROBS_INDEX]
    assert values.dtype == np.float32 and index.dtype == np.int32 and values.shape[:2] == index.shape[:2]
    return PackedRows.from_arrays(values[0], index[0], vocab_size).dense()


def err(result: dict[str, np.ndarray] | StepError, code: ErrorCode) -> str:
    assert isinstance(result, StepError), f"expected {code}, got logits {getattr(result, 'shape', result)}"
    assert result.code == code, result
    return result.message


@torch.inference_mode()
def full_forward(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    """Logits of every position without a cache: [T, V]."""
    return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


PROMPT = [5, 17, 3, 42, 8, 11]
DRAFTS = [60, 2, 33, 7]


@pytest.mark.parametrize(
    ("sampling", "packed"),
    [((0.0, 0, 1.0), True), ((0.7, 0, 0.5), True), ((1.2, 5, 1.0), True), ((0.9, 0, 1.0), False)],
)
def test_sampling_settings_return_the_warped_rows_packed(target, model, sampling, packed):
    # The same step without settings gives the logits; warping them must give exactly PROBS, bit for bit.
    logits = ok(target.step(request(1, PROMPT, 0, 3, start=True)))
    result = target.step(request(2, PROMPT, 0, 3, start=True, sampling=sampling))
    temperature, top_k, top_p = sampling
    expected = warp(torch.from_numpy(logits[0]), SamplingParams(temperature, int(top_k), top_p))  # [3, V]
    assert torch.equal(probs(result), expected)
    index = result[contract.PROBS_INDEX]
    if packed:  # only the support travels
        assert index.shape[-1] == int(torch.count_nonzero(expected, dim=-1).max()) < V / 2
    else:  # plain temperature: every token is possible, the rows travel dense
        assert index.shape == (1, 3, 0) and result[contract.PROBS].shape == (1, 3, V)
    assert torch.equal(probs(target.step(request(2, [9], len(PROMPT), 1, sampling=sampling))), warp(
        torch.from_numpy(ok(target.step(request(1, [9], len(PROMPT), 1)))[0]),
        SamplingParams(temperature, int(top_k), top_p),
    ))


@pytest.mark.parametrize(
    ("sampling", "field"),
    [((-1.0, 0, 1.0), "temperature"), ((float("nan"), 0, 1.0), "temperature"), ((1.0, -2, 1.0), "top_k"),
     ((1.0, 1.5, 1.0), "TOP_K"), ((1.0, 0, 0.0), "top_p"), ((1.0, 0, 1.5), "top_p")],
)
def test_bad_sampling_settings_are_refused_where_the_request_is_read(sampling, field):
    temperature, top_k, top_p = sampling
    arrays = {
        contract.INPUT_IDS: np.array([[9]], np.int32), contract.KEEP_LENGTH: np.array([[5]], np.int32),
        contract.NUM_LOGITS: np.array([[1]], np.int32), contract.TEMPERATURE: np.array([[temperature]], np.float32),
        contract.TOP_K: np.array([[top_k]], np.float64), contract.TOP_P: np.array([[top_p]], np.float32),
    }
    with pytest.raises(ValueError, match=field):
        read_request(1, arrays.get)


def test_top_k_above_the_vocabulary_is_invalid_and_keeps_the_cache(target):
    ok(target.step(request(1, PROMPT, 0, 1, start=True)))
    message = err(target.step(request(1, [9], len(PROMPT), 1, sampling=(1.0, V + 1, 1.0))), ErrorCode.INVALID_ARG)
    assert message.startswith(contract.INVALID_PREFIX) and "top_k" in message
    ok(target.step(request(1, [9], len(PROMPT), 1)))  # the cache was not touched


def test_release_with_sampling_settings_returns_empty_rows(target):
    ok(target.step(request(1, PROMPT, 0, 1, start=True)))
    result = target.step(request(1, [], 0, 0, end=True, sampling=(0.0, 0, 1.0)))
    assert probs(result).shape == (0, V) and 1 not in target.store


def test_start_returns_the_last_logits_of_a_full_forward(target, model):
    logits = ok(target.step(request(1, PROMPT, 0, 3, start=True)))
    assert logits.shape == (1, 3, V)
    np.testing.assert_allclose(logits[0], full_forward(model, PROMPT)[-3:], atol=1e-5)


def test_appending_drafts_matches_a_full_forward(target, model):
    ok(target.step(request(1, PROMPT, 0, 1, start=True)))
    logits = ok(target.step(request(1, DRAFTS, len(PROMPT), len(DRAFTS) + 0)))
    assert logits.shape == (1, len(DRAFTS), V)
    np.testing.assert_allclose(logits[0], full_forward(model, PROMPT + DRAFTS)[-len(DRAFTS):], atol=1e-5)


def test_rollback_gives_the_logits_of_a_fresh_sequence(target, model):
    ok(target.step(request(1, PROMPT, 0, 1, start=True)))
    ok(target.step(request(1, DRAFTS, len(PROMPT), len(DRAFTS))))
    keep = len(PROMPT) + 2  # two drafts accepted, then a new token
    rolled = ok(target.step(request(1, [9, 10], keep, 2)))
    fresh = ok(target.step(request(2, PROMPT + DRAFTS[:2] + [9, 10], 0, 2, start=True)))
    np.testing.assert_allclose(rolled, fresh, atol=1e-5)
    np.testing.assert_allclose(rolled[0], full_forward(model, PROMPT + DRAFTS[:2] + [9, 10])[-2:], atol=1e-5)


def test_start_resets_an_existing_sequence(target, model):
    ok(target.step(request(1, PROMPT, 0, 1, start=True)))
    again = ok(target.step(request(1, [4, 4], 0, 1, start=True)))
    np.testing.assert_allclose(again[0], full_forward(model, [4, 4])[-1:], atol=1e-5)


def test_release_request_drops_the_cache_and_returns_no_rows(target):
    ok(target.step(request(1, PROMPT, 0, 1, start=True)))
    released = ok(target.step(request(1, [], 0, 0, end=True)))
    assert released.shape == (1, 0, V)
    assert 1 not in target.store
    assert "no cache" in err(target.step(request(1, [1], 0, 1)), ErrorCode.NOT_FOUND)


def test_a_release_cancels_what_its_sequence_asked_before_it_and_has_not_run(target, model):
    """A generation cancelled mid-prompt: its START and its release reach one batch. The prompt is not run
    (nobody reads its rows), the other sequence's decode is, and a release before a request cancels nothing."""
    ok(target.step(request(2, PROMPT, 0, 1, start=True)))
    forwards: list[int] = []
    batch = [request(1, LONG, 0, 1, start=True), request(2, [9], 6, 1), request(1, [], 0, 0, end=True)]
    answers = run_batch(target.engine, target.store, batch, forwards.append)
    assert "released before this request ran" in err(answers[0], ErrorCode.CANCELLED)
    np.testing.assert_allclose(ok(answers[1])[0], full_forward(model, PROMPT + [9])[-1:], atol=2e-5)
    assert ok(answers[2]).shape == (1, 0, V)
    assert forwards == [1] and 1 not in target.store and 2 in target.store
    # the release first, then a new START of the same id: that one runs
    batch = [request(1, [], 0, 0, end=True), request(1, PROMPT, 0, 1, start=True)]
    answers = run_batch(target.engine, target.store, batch)
    np.testing.assert_allclose(ok(answers[1])[0], full_forward(model, PROMPT)[-1:], atol=2e-5)
    assert 1 in target.store


def test_release_is_idempotent_and_may_carry_start(target):
    assert ok(target.step(request(7, [], 0, 0, end=True))).shape == (1, 0, V)
    assert ok(target.step(request(7, [], 0, 0, start=True, end=True))).shape == (1, 0, V)
    assert len(target.store) == 0


def test_an_empty_request_without_end_is_invalid(target):
    ok(target.step(request(1, PROMPT, 0, 1, start=True)))
    assert "release" in err(target.step(request(1, [], 6, 0)), ErrorCode.INVALID_ARG)
    assert 1 in target.store


def test_end_on_a_normal_request_returns_logits_then_drops_the_cache(target, model):
    ok(target.step(request(1, PROMPT, 0, 1, start=True)))
    logits = ok(target.step(request(1, [9], len(PROMPT), 1, end=True)))
    np.testing.assert_allclose(logits[0], full_forward(model, PROMPT + [9])[-1:], atol=1e-5)
    assert 1 not in target.store


def test_end_drops_the_cache_even_when_the_step_fails(target):
    ok(target.step(request(1, PROMPT, 0, 1, start=True)))
    err(target.step(request(1, [9], 99, 1, end=True)), ErrorCode.INVALID_ARG)
    assert 1 not in target.store


def test_unknown_sequence_is_not_found_with_a_recognisable_message(target):
    message = err(target.step(request(12345, [1, 2], 0, 1)), ErrorCode.NOT_FOUND)
    assert message.startswith(contract.NOT_FOUND_PREFIX)
    assert "sequence" in message and "no cache" in message and "12345" in message
    assert contract.classify_error(None, message) is contract.ErrorKind.SEQUENCE_LOST


def test_idle_sequences_are_evicted_after_the_ttl(target, clock):
    ok(target.step(request(1, PROMPT, 0, 1, start=True)))
    clock.now += 61.0
    err(target.step(request(1, [3], len(PROMPT), 1)), ErrorCode.NOT_FOUND)


def test_capacity_is_unavailable_with_a_capacity_prefix(target):
    ok(target.step(request(1, [1], 0, 1, start=True)))
    ok(target.step(request(2, [1], 0, 1, start=True)))
    message = err(target.step(request(3, [1], 0, 1, start=True)), ErrorCode.UNAVAILABLE)
    assert message.startswith("capacity:")
    assert contract.classify_error("StatusCode.UNAVAILABLE", message) is contract.ErrorKind.CAPACITY
    ok(target.step(request(1, [], 0, 0, end=True)))
    ok(target.step(request(3, [1], 0, 1, start=True)))  # room again


@pytest.mark.parametrize(
    ("ids", "keep", "n", "start", "needle"),
    [
        ([V], 6, 1, False, "vocabulary"),  # token id out of the vocabulary
        ([-1], 6, 1, False, "vocabulary"),
        ([1], 7, 1, False, "exceeds the cached length"),  # keep_length > cached
        ([1], -1, 1, False, "keep_length"),
        ([1, 2], 6, 0, False, "num_logits"),  # tokens but no logits
        ([1, 2], 6, 3, False, "num_logits"),  # more logits than tokens appended
        ([1], 3, 1, True, "keep_length 0"),  # START must keep nothing
        ([1] * 123, 6, 1, False, "context length"),  # 6 + 123 > 128 positions
    ],
)
def test_invalid_arguments(target, model, ids, keep, n, start, needle):
    ok(target.step(request(1, PROMPT, 0, 1, start=True)))
    message = err(target.step(request(1, ids, keep, n, start=start)), ErrorCode.INVALID_ARG)
    assert needle in message
    # the cache survives a refused request intact
    logits = ok(target.step(request(1, [9], len(PROMPT), 1)))
    np.testing.assert_allclose(logits[0], full_forward(model, PROMPT + [9])[-1:], atol=1e-5)


@pytest.mark.parametrize(
    ("ids", "keep", "n"),
    [
        (np.array([1, 2], dtype=np.int32), np.array([[0]], np.int32), np.array([[1]], np.int32)),  # 1-D ids
        (np.array([[1, 2]], np.int32), np.array([[0, 0]], np.int32), np.array([[1]], np.int32)),
        (np.array([[1, 2]], np.int32), np.array([[0]], np.int32), np.zeros((1, 0), np.int32)),
    ],
)
def test_malformed_shapes_are_invalid(ids, keep, n):
    arrays = {contract.INPUT_IDS: ids, contract.KEEP_LENGTH: keep, contract.NUM_LOGITS: n}
    with pytest.raises(ValueError, match="shape"):
        read_request(1, arrays.get)


def test_sequence_id_zero_is_invalid(target):
    err(target.step(request(0, [1], 0, 1, start=True)), ErrorCode.INVALID_ARG)


def test_unexpected_errors_are_internal_without_details_on_the_wire(target, caplog, monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(target.engine, "model", broken)
    with caplog.at_level(logging.ERROR):
        message = err(target.step(request(1, [1], 0, 1, start=True)), ErrorCode.INTERNAL)
    assert "secret" not in message and "Traceback" not in message
    assert "secret detail" in caplog.text  # the traceback goes to the (Triton) log
    assert 1 in target.store  # the cache survives: the sequence kept what it held (nothing yet)


# --- batches ------------------------------------------------------------------------------------------


def test_a_batch_is_one_forward_and_each_answer_equals_the_request_alone(model, clock):
    engine = CausalLMEngine(model)
    store = SequenceStore(engine.new_cache, 8, 60.0, clock=clock)
    forwards: list[int] = []
    run_batch(engine, store, [request(s, PROMPT[: s + 1], 0, 1, start=True) for s in (1, 2, 3)], forwards.append)
    batch = [request(1, [9, 10], 2, 2), request(2, [4], 3, 1), request(3, DRAFTS, 4, 4, sampling=(0.8, 0, 0.9))]
    answers = run_batch(engine, store, batch, forwards.append)
    assert forwards == [3, 3]  # one forward per execute, every sequence in it
    # and each answer says so, with the forward's tokens in all (2 + 1 + 4)
    assert [(a[contract.FORWARD_SEQUENCES].item(), a[contract.FORWARD_TOKENS].item()) for a in answers] == [(3, 7)] * 3
    for (s, keep, new, sampling), answer in zip([(1, 2, [9, 10], None), (2, 3, [4], None),
                                                (3, 4, DRAFTS, (0.8, 0, 0.9))], answers):
        rows = probs(answer) if sampling else torch.from_numpy(ok(answer)[0])
        alone = full_forward(model, PROMPT[: s + 1][:keep] + new)[-len(rows):]
        expected = warp(torch.from_numpy(alone), SamplingParams(*sampling)) if sampling else torch.from_numpy(alone)
        torch.testing.assert_close(rows, expected, atol=2e-5, rtol=2e-4)


def test_two_requests_of_one_sequence_in_a_batch_run_in_order(target, model):
    answers = [target.step(request(1, PROMPT, 0, 1, start=True))]
    answers += run_batch(target.engine, target.store, [request(1, [9], 6, 1), request(1, [10], 7, 1, end=True)])
    np.testing.assert_allclose(ok(answers[2])[0], full_forward(model, PROMPT + [9, 10])[-1:], atol=2e-5)
    assert [(a[contract.FORWARD_SEQUENCES].item(), a[contract.FORWARD_TOKENS].item()) for a in answers[1:]] == [
        (1, 1), (1, 1)]  # a forward each
    assert 1 not in target.store


# --- a forward's token budget: prompts in chunks beside the rows in flight --------------------------------


LONG = [(7 * i + 3) % V for i in range(40)]  # a prompt longer than the budgets below


def test_fit_runs_rows_whole_and_shares_what_is_left_among_prompts_first_come_first():
    batch = [request(1, LONG, 0, 1, start=True), request(2, [4], 9, 1), request(3, LONG[:10], 0, 1, start=True),
             request(4, DRAFTS, 3, 4), request(5, LONG[:5], 0, 1, start=True)]
    put_off: set[int] = set()
    assert fit(batch, range(5), 24, put_off) == {0: 19, 1: 1, 3: 4}  # rows 1 + 4, then 19 of the first prompt
    assert put_off == {1, 3, 5}  # chunked or put off: nothing more of them in this batch
    assert fit(batch, range(5), 0, set()) == {0: 40, 1: 1, 2: 10, 3: 4, 4: 5}  # no limit
    assert fit(batch, range(5), 100, set()) == {0: 40, 1: 1, 2: 10, 3: 4, 4: 5}  # 60 fit
    assert fit(batch, range(5), 50, set()) == {0: 40, 1: 1, 2: 5, 3: 4}  # the second prompt in part, the third waits
    # a chunk never reaches the positions whose rows it returns; the oldest prompt always advances
    assert fit([request(1, LONG[:6], 0, 4, start=True)], [0], 4, set()) == {0: 2}
    rows = [request(s, DRAFTS, 3, 4) for s in range(10, 16)]  # 24 rows: more than the budget
    assert fit([*rows, request(1, LONG, 0, 1, start=True)], range(7), 16, set())[6] == 4  # a quarter of it
    # a sequence chunked in an earlier forward of the batch runs nothing more in it
    assert fit([request(2, [4], 9, 1)], [0], 16, {2}) == {}


def test_a_prompt_over_the_budget_runs_in_chunks_beside_the_rows_and_ends_with_its_own_rows(model, clock):
    engine = CausalLMEngine(model)
    store = SequenceStore(engine.new_cache, 8, 60.0, clock=clock)
    run_batch(engine, store, [request(2, PROMPT, 0, 1, start=True)])
    forwards: list[int] = []
    first = run_batch(engine, store, [request(1, LONG, 0, 2, start=True, end=True), request(2, [9], 6, 1)],
                      forwards.append, budget=16)
    assert isinstance(first[0], StepRequest) and first[0].keep_length == 15 and not first[0].start
    np.testing.assert_allclose(ok(first[1])[0], full_forward(model, PROMPT + [9])[-1:], atol=2e-5)  # not held up
    assert first[1][contract.FORWARD_TOKENS].item() == 16 and 1 in store  # END waits for the last chunk
    [done] = run_to_completion(engine, store, [first[0]], forwards.append, budget=16)
    assert forwards == [2, 1, 1]  # 15 + 1, then 16, then the last 9 with the two rows
    np.testing.assert_allclose(ok(done)[0], full_forward(model, LONG)[-2:], atol=2e-5)
    assert 1 not in store  # released after its answer


def test_a_request_put_off_keeps_its_sequence_in_order_and_a_chunked_decode_prompt_still_decodes(model, clock):
    engine = CausalLMEngine(model)
    store = SequenceStore(engine.new_cache, 8, 60.0, clock=clock)
    batch = [request(1, LONG[:24], 0, 1, start=True), request(2, LONG[:30], 0, 1, start=True),
             request(2, [9], 30, 1, end=True)]
    answers = run_batch(engine, store, batch, budget=24)
    assert answers[1:] == batch[1:] and 2 not in store  # no room: both put off whole, in order, END not applied
    np.testing.assert_allclose(ok(answers[0])[0], full_forward(model, LONG[:24])[-1:], atol=2e-5)
    done = run_to_completion(engine, store, answers[1:], budget=24)
    np.testing.assert_allclose(ok(done[0])[0], full_forward(model, LONG[:30])[-1:], atol=2e-5)
    np.testing.assert_allclose(ok(done[1])[0], full_forward(model, LONG[:30] + [9])[-1:], atol=2e-5)
    assert 2 not in store
    lone = Target(engine, SequenceStore(engine.new_cache, 8, 60.0, clock=clock))
    expected = scored_tokens(lone, 9, LONG, 3, (0.9, 0, 0.95), seed=5, reproducible=False)
    forwards: list[int] = []
    [decoded] = run_to_completion(engine, store, [decode_request(3, LONG, 0, 3, seed=5, start=True)], forwards.append,
                                  budget=16)
    assert decoded[contract.TOKENS].tolist() == [expected] and len(forwards) == 3 + 2  # 16 + 16 + 8, then 2 more


# --- decodes (DECODE_STEPS): the model samples target-only tokens itself --------------------------------


def decode_request(sid: int, ids: list[int], keep: int, steps: int, sampling=(0.9, 0, 0.95), *, seed: int = 11,
                   reproducible: bool = False, stop: int = -1, start: bool = False, end: bool = False) -> StepRequest:
    return replace(request(sid, ids, keep, 1, start=start, end=end, sampling=sampling),
                   decode=contract.Decode(steps, seed, reproducible, stop))


def scored_tokens(target: Target, sid: int, prompt: list[int], steps: int, sampling, *, seed: int,
                  reproducible: bool) -> list[int]:
    """What the orchestrator draws from one scored step per token: the rows, then the shared round rule."""
    params = SamplingParams(sampling[0], int(sampling[1]), sampling[2])
    tokens: list[int] = []
    answer = target.step(request(sid, prompt, 0, 1, start=True, sampling=sampling))
    while True:
        rows = probs(answer)
        position = len(prompt) + len(tokens)
        tokens.append(draw_round([], None, rows, seed=seed, greedy=params.greedy, reproducible=reproducible,
                                 first=position).tokens[0])
        if len(tokens) == steps:
            return tokens
        answer = target.step(request(sid, [tokens[-1]], position, 1, sampling=sampling))


@pytest.mark.parametrize("sampling", [(0.0, 0, 1.0), (0.9, 0, 0.95), (1.3, 7, 1.0)])
@pytest.mark.parametrize("reproducible", [False, True])
def test_a_decode_gives_the_tokens_the_orchestrator_draws_from_scored_steps(target, sampling, reproducible):
    expected = scored_tokens(target, 1, PROMPT, 6, sampling, seed=1234, reproducible=reproducible)
    forwards: list[int] = []
    first = run_batch(target.engine, target.store, [decode_request(2, PROMPT, 0, 6, sampling, seed=1234,
                                                                   reproducible=reproducible, start=True)],
                      forwards.append)[0]
    assert isinstance(first, StepRequest) and first.sampled == tuple(expected[:1])  # its continuation
    [answer] = run_to_completion(target.engine, target.store, [first], forwards.append)
    assert answer[contract.TOKENS].tolist() == [expected] and answer[contract.TOKENS].dtype == np.int32
    assert forwards == [1] * 6  # a forward per token
    # The cache holds every token but the last: feeding it next gives the rows of the whole text.
    after = target.step(request(2, expected[-1:], len(PROMPT) + 5, 1))
    np.testing.assert_allclose(ok(after)[0], full_forward(target.engine.model, PROMPT + expected)[-1:], atol=2e-5)


def test_a_decode_stops_after_the_stop_token_and_an_end_releases_after_its_last_forward(target):
    greedy = (0.0, 0, 1.0)
    tokens = scored_tokens(target, 1, PROMPT, 5, greedy, seed=0, reproducible=False)
    stop = tokens[2]
    cut = tokens[: tokens.index(stop) + 1]
    [answer] = run_to_completion(target.engine, target.store,
                                 [decode_request(2, PROMPT, 0, 5, greedy, stop=stop, start=True, end=True)])
    assert answer[contract.TOKENS].tolist() == [cut]
    assert 2 not in target.store


def test_decodes_and_scores_of_other_sequences_share_each_forward(model, clock):
    engine = CausalLMEngine(model)
    store = SequenceStore(engine.new_cache, 8, 60.0, clock=clock)
    lone = Target(engine, SequenceStore(engine.new_cache, 8, 60.0, clock=clock))
    expected = scored_tokens(lone, 9, PROMPT, 3, (0.9, 0, 0.95), seed=5, reproducible=False)
    forwards: list[int] = []
    batch = [decode_request(1, PROMPT, 0, 3, seed=5, start=True), request(2, PROMPT[:4], 0, 2, start=True)]
    answers = run_batch(engine, store, batch, forwards.append)
    assert isinstance(answers[0], StepRequest) and forwards == [2]
    np.testing.assert_allclose(ok(answers[1])[0], full_forward(model, PROMPT[:4])[-2:], atol=2e-5)
    [done] = run_to_completion(engine, store, [answers[0]], forwards.append)
    assert done[contract.TOKENS].tolist() == [expected] and forwards == [2, 1, 1]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (dict(params=None), "needs the sampling settings"),
        (dict(num_logits=2), "NUM_LOGITS 1"),
        (dict(decode=contract.Decode(2, 1, False, V)), "outside the vocabulary"),
    ],
)
def test_bad_decodes_are_invalid(target, change, needle):
    bad = replace(decode_request(1, PROMPT, 0, 2, start=True), **change)
    assert needle in err(target.step(bad), ErrorCode.INVALID_ARG)


def test_decode_settings_are_read_from_their_tensors_and_need_a_seed():
    tensors = {contract.INPUT_IDS: np.array([[1, 2]], dtype=np.int32), contract.KEEP_LENGTH: np.array([[0]]),
               contract.NUM_LOGITS: np.array([[1]]), contract.TEMPERATURE: np.array([[0.5]], dtype=np.float32)}
    for decode in (contract.Decode(4, (1 << 64) - 1, True, 7), contract.Decode(30, 5, False, -1, lookup=16)):
        read = read_request(3, {**tensors, **dict(contract.decode_tensors(decode))}.get)
        assert read.decode == decode
    assert read_request(3, tensors.get).decode is None
    without_seed = {**tensors, contract.DECODE_STEPS: np.array([[4]], dtype=np.int32)}
    with pytest.raises(ValueError, match="DECODE_STEPS needs SEED"):
        read_request(3, without_seed.get)
    with pytest.raises(ValueError, match="DECODE_STEPS must be >= 1"):
        read_request(3, {**without_seed, contract.DECODE_STEPS: np.array([[0]]), contract.SEED: np.array([[1]])}.get)


# --- decodes with LOOKUP: each forward also verifies a draft looked up in the sequence's own tokens --------

LOOPING = [1, 2, 3, 1, 2, 3, 1, 2]  # the tiny model's greedy text from here repeats itself: lookups pay


def recording_steps(engine: CausalLMEngine) -> list[list[int]]:
    """Tokens fed per sequence in each forward of ``engine`` from now on."""
    fed: list[list[int]] = []
    step = engine.step

    def recorded(items):
        fed.append([len(item.token_ids) for item in items])
        return step(items)

    engine.step = recorded  # type: ignore[method-assign]
    return fed


@pytest.mark.parametrize(("sampling", "reproducible"), [((0.0, 0, 1.0), False), ((0.9, 0, 0.95), True)])
def test_a_decode_with_lookup_gives_the_same_tokens_in_fewer_forwards(target, sampling, reproducible):
    # Greedy, and the coupled mode: the tokens do not depend on the drafts, only on the rows (exactness).
    # (The tiny random model's sampled text hardly repeats, so there its drafts are verified but rejected;
    # its greedy text loops, and the drafts save forwards.)
    expected = scored_tokens(target, 1, LOOPING, 20, sampling, seed=3, reproducible=reproducible)
    fed = recording_steps(target.engine)
    lookup = replace(decode_request(2, LOOPING, 0, 20, sampling, seed=3, reproducible=reproducible, start=True),
                     decode=contract.Decode(20, 3, reproducible, -1, lookup=8))
    [answer] = run_to_completion(target.engine, target.store, [lookup])
    assert answer[contract.TOKENS].tolist() == [expected]
    assert fed[0][0] > len(LOOPING)  # the first forward verified a draft with the prompt (its end repeats)
    assert len(fed) < 20 if sampling[0] == 0 else len(fed) == 20
    # The cache holds the prompt and all but the last token, whatever the rejected drafts left beyond.
    after = target.step(request(2, expected[-1:], len(LOOPING) + 19, 1))
    np.testing.assert_allclose(ok(after)[0], full_forward(target.engine.model, LOOPING + expected)[-1:], atol=2e-5)


def test_lookup_drafts_stay_within_the_decode_and_the_context(target):
    greedy = (0.0, 0, 1.0)
    [first] = run_batch(target.engine, target.store, [decode_request(1, LOOPING, 0, 8, greedy, start=True)])
    entry = target.store.checkout(1, start=False)
    try:
        cache = entry.state
        assert cache.ids == LOOPING  # the engine keeps the ids of the cached positions
        assert lookup_drafts(first, cache, 128) == ()  # no LOOKUP: no draft
        # As if the first token had been 3: LOOPING + [3] repeats [1, 2, 3], followed by 1 2 3.
        ask = replace(first, token_ids=(3,), sampled=(3,), decode=contract.Decode(8, 11, False, -1, lookup=16))
        drafts = lookup_drafts(ask, cache, 128)
        assert 1 <= len(drafts) <= 6  # 7 tokens still to come, one of them this forward's own draw
        assert lookup_drafts(replace(ask, sampled=ask.sampled + (1,) * 6), cache, 128) == ()  # one token left
        assert len(lookup_drafts(ask, cache, ask.position + 2)) == 2  # no further than the context length
        assert lookup_drafts(replace(ask, keep_length=len(LOOPING) + 1), cache, 128) == ()  # beyond the cache
    finally:
        target.store.checkin(entry)
