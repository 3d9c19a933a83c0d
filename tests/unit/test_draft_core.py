"""The draft round (`draft_service.core`) with the model drafter on a tiny random Llama: no gRPC.

The oracle is the plain model run without any cache: every q row the drafter returns must equal ``warp``
of the model's logits for the same prefix, so cache cropping, appending, reusing last round's fed drafts
and the never-fed last token are all checked against a recompute from scratch. Also: the context
bookkeeping (``cache_length`` is the context, drafts never part of it), validation naming the field, the
choice of drafter, capacity, and that the model's forwards reuse what the cache holds.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from draft_service.build import build_core
from draft_service.config import DraftConfig
from draft_service.core import DraftCore, ProposeRound
from specdec.models import load_model
from specdec.sampling import SamplingParams, warp
from specdec.sequences import CapacityError, SequenceNotFoundError
from specdec.tiny import TINY_MAX_POSITIONS, TINY_VOCAB_SIZE, save_tiny_llama

PROMPT = (5, 17, 3, 42, 8)
SAMPLED = SamplingParams(temperature=1.0)
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return load_model(str(save_tiny_llama(folder, seed=0)))


def make_core(model: torch.nn.Module, **settings) -> Iterator[DraftCore]:
    config = DraftConfig(**{"max_sequences": 4, "max_num_draft_tokens": 8, "threads": 1, **settings})
    core, loop = build_core(config, model)
    try:
        yield core
    finally:
        if loop is not None:
            loop.stop()


@pytest.fixture()
def core(model: torch.nn.Module) -> Iterator[DraftCore]:
    yield from make_core(model)


def round_(seq: int = 1, keep: int = 0, append=PROMPT, k: int = 4, sampling=SAMPLED, seed: int = 0,
           drafter: str = "model") -> ProposeRound:
    return ProposeRound(seq, keep, tuple(append), k, sampling, seed, drafter)


@torch.inference_mode()
def reference_logits(model: torch.nn.Module, prefix: list[int]) -> torch.Tensor:
    """Next-token logits [V] after ``prefix``, computed from scratch (no cache)."""
    return model(input_ids=torch.tensor([prefix])).logits[0, -1].float()


def test_cache_length_is_the_context_and_drafts_are_never_part_of_it(core: DraftCore) -> None:
    first = core.propose(round_(k=4))
    assert len(first.token_ids) == 4 and all(0 <= t < TINY_VOCAB_SIZE for t in first.token_ids)
    assert core.vocab_size == TINY_VOCAB_SIZE
    assert first.cache_length == len(PROMPT)
    with pytest.raises(ValueError, match="keep_length 6 exceeds the cached length 5"):
        core.propose(round_(keep=first.cache_length + 1, append=[1]))
    # The target accepted two drafts and emitted a third token: the next round appends all three.
    accepted = [*first.token_ids[:2], 9]
    second = core.propose(round_(keep=first.cache_length, append=accepted, k=3))
    assert second.cache_length == len(PROMPT) + 3
    third = core.propose(round_(keep=len(PROMPT) + 1, append=[7, 9], k=2))  # roll back into the context
    assert third.cache_length == len(PROMPT) + 3


def test_q_rows_are_distributions_containing_their_token(core: DraftCore) -> None:
    for params in (SAMPLED, SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.3, top_p=0.5)):
        proposal = core.propose(round_(k=6, sampling=params, seed=3))
        q = proposal.q
        assert q is not None and q.shape == (6, TINY_VOCAB_SIZE) and q.dtype == torch.float32
        torch.testing.assert_close(q.sum(-1), torch.ones(6), atol=1e-5, rtol=0)
        assert (q[torch.arange(6), torch.tensor(proposal.token_ids)] > 0).all()
        if params.top_k:
            assert ((q > 0).sum(-1) <= params.top_k).all()


def test_q_rows_equal_the_uncached_model_across_rounds_and_rollback(core: DraftCore, model) -> None:
    params = SamplingParams(temperature=0.8, top_k=20)
    first = core.propose(round_(k=4, sampling=params, seed=1))
    # The target accepted the first draft and replaced the second with 11.
    second = core.propose(round_(keep=len(PROMPT), append=[first.token_ids[0], 11], k=4, sampling=params, seed=2))
    for proposal, prefix in ((first, list(PROMPT)), (second, [*PROMPT, first.token_ids[0], 11])):
        for i, token in enumerate(proposal.token_ids):
            torch.testing.assert_close(proposal.q[i], warp(reference_logits(model, prefix), params), atol=1e-5, rtol=1e-4)
            prefix.append(token)


def test_greedy_sends_no_q_and_follows_the_argmax_chain(core: DraftCore, model) -> None:
    def greedy_reference(prefix: list[int], k: int) -> list[int]:
        prefix, out = list(prefix), []
        for _ in range(k):
            out.append(int(reference_logits(model, prefix).argmax()))
            prefix.append(out[-1])
        return out

    first = core.propose(round_(k=6, sampling=GREEDY))
    assert first.q is None and list(first.token_ids) == greedy_reference(list(PROMPT), 6)
    second = core.propose(round_(keep=len(PROMPT), append=[*first.token_ids[:2], 40], k=5, sampling=GREEDY))
    assert list(second.token_ids) == greedy_reference([*PROMPT, *first.token_ids[:2], 40], 5)


def test_accepted_drafts_are_reused_from_the_cache_not_recomputed(core: DraftCore, model, monkeypatch) -> None:
    fed: list[int] = []
    engine = core.drafters["model"].engine
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda items: (fed.append(sum(len(i.token_ids) for i in items)), step(items))[1])
    first = core.propose(round_(k=4, sampling=GREEDY))
    assert fed == [len(PROMPT), 1, 1, 1]  # the prompt, then drafts 1-3 (the 4th is never fed)
    fed.clear()
    core.propose(round_(keep=len(PROMPT), append=[*first.token_ids[:3], 7], k=2, sampling=GREEDY))
    assert fed == [1, 1]  # three accepted drafts were in the cache: only the new token is fed


def test_rollback_then_propose_equals_a_fresh_sequence(core: DraftCore) -> None:
    first = core.propose(round_(seq=1, k=6, seed=10))
    rolled = core.propose(round_(seq=1, keep=len(PROMPT), append=[*first.token_ids[:2], 33, 2], k=5, seed=99))
    fresh = core.propose(round_(seq=2, append=[*PROMPT, *first.token_ids[:2], 33, 2], k=5, seed=99))
    assert rolled.token_ids == fresh.token_ids and rolled.cache_length == fresh.cache_length
    torch.testing.assert_close(rolled.q, fresh.q, atol=1e-5, rtol=1e-4)


def test_same_seed_same_tokens_and_the_seed_matters(core: DraftCore) -> None:
    params = SamplingParams(temperature=2.0)
    a = core.propose(round_(seq=1, k=8, sampling=params, seed=123))
    b = core.propose(round_(seq=2, k=8, sampling=params, seed=123))
    assert a.token_ids == b.token_ids
    others = {core.propose(round_(seq=3, k=8, sampling=params, seed=s)).token_ids for s in range(5)}
    assert len(others) > 1


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (round_(seq=0), "sequence_id must be non-zero"),
        (round_(append=[]), "append_token_ids must hold at least one token"),
        (round_(append=[1, TINY_VOCAB_SIZE]), r"append_token_ids must be in \[0, 64\)"),
        (round_(append=[-1]), r"append_token_ids must be in \[0, 64\)"),
        (round_(k=0), r"num_draft_tokens must be in \[1, 8\], got 0"),
        (round_(k=9), r"num_draft_tokens must be in \[1, 8\], got 9"),
        (round_(append=[1] * (TINY_MAX_POSITIONS - 2), k=4), "exceeds the draft model's context length 256"),
        (round_(sampling=SamplingParams(top_k=TINY_VOCAB_SIZE + 1)), "sampling.top_k must be <= vocab size 64"),
        (round_(drafter="magic"), "drafter must be one of"),
    ],
)
def test_invalid_requests_are_value_errors_naming_the_field(core: DraftCore, request_: ProposeRound, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        core.propose(request_)
    assert core.stats().live_sequences == 0  # nothing was created


def test_the_default_drafter_is_the_first_offered(model) -> None:
    for core in make_core(model, drafters="ngram,model"):
        assert core.stats().drafters == ("ngram", "model")
        assert core.propose(round_(drafter="")).token_ids == ()  # no earlier occurrence: prompt lookup proposes nothing
        assert len(core.propose(round_(seq=2, drafter="model")).token_ids) == 4


def test_a_service_without_model_drafters_loads_no_model() -> None:
    config = DraftConfig(drafters="suffix,ngram", model="/no/such/model")  # never looked at
    core, loop = build_core(config)
    assert loop is None and core.vocab_size == 0 and core.stats().drafters == ("suffix", "ngram")
    proposal = core.propose(round_(append=(1, 2, 3, 1, 2, 3, 1, 2), drafter="ngram", k=3))
    assert proposal.token_ids == (3, 1, 2) and proposal.q is None


def test_unknown_sequence_and_capacity(model) -> None:
    for core in make_core(model, max_sequences=1, max_num_draft_tokens=4):
        with pytest.raises(SequenceNotFoundError):
            core.propose(round_(seq=7, keep=3, append=[1]))
        core.propose(round_(seq=1))
        with pytest.raises(CapacityError, match="capacity is 1"):
            core.propose(round_(seq=2))
        core.propose(round_(seq=1, seed=1))  # restarting the live one needs no new slot
        assert core.stats().live_sequences == 1 and core.stats().max_sequences == 1
        assert core.stats().kv_bytes > 0  # the model drafter's cache of the live sequence
        assert core.release(1) is True and core.release(1) is False
        assert core.stats().live_sequences == 0 and core.stats().kv_bytes == 0
        core.propose(round_(seq=2))
