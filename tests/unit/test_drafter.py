"""Unit tests of the draft round (draft_service.drafter) on a tiny random Llama: no gRPC.

The oracle is the plain model run without any cache: every q row the drafter returns must equal ``warp``
of the model's logits for the same prefix, so cache cropping, appending and the never-fed last token are
all checked against a recompute from scratch.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from draft_service.drafter import Drafter, ProposeRound
from specdec.engine import CapacityError, CausalLMEngine, SequenceNotFoundError, SequenceStore
from specdec.models import load_model
from specdec.sampling import SamplingParams, warp
from specdec.tiny import TINY_MAX_POSITIONS, TINY_VOCAB_SIZE, save_tiny_llama

PROMPT = (5, 17, 3, 42, 8)
SAMPLED = SamplingParams(temperature=1.0)
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """A tiny model gains nothing from intra-op threads, and 2 OpenMP threads on a 2-core machine that is
    busy elsewhere stall at every barrier (measured: 250 ms vs 1.3 ms per tiny forward)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return load_model(str(save_tiny_llama(folder, seed=0)))


@pytest.fixture()
def drafter(model: torch.nn.Module) -> Drafter:
    return Drafter(CausalLMEngine(model, SequenceStore(max_sequences=4, idle_ttl_s=300)), max_num_draft_tokens=8)


def round_(seq: int = 1, keep: int = 0, append=PROMPT, k: int = 4, sampling=SAMPLED, seed: int = 0) -> ProposeRound:
    return ProposeRound(
        sequence_id=seq, keep_length=keep, append_token_ids=tuple(append), num_draft_tokens=k, sampling=sampling,
        seed=seed,
    )


@torch.inference_mode()
def reference_logits(model: torch.nn.Module, prefix: list[int]) -> torch.Tensor:
    """Next-token logits [V] after ``prefix``, computed from scratch (no cache)."""
    return model(input_ids=torch.tensor([prefix])).logits[0, -1].float()


def test_tokens_and_cache_length_bookkeeping(drafter: Drafter) -> None:
    first = drafter.propose(round_(k=4))
    assert len(first.token_ids) == 4
    assert all(0 <= t < TINY_VOCAB_SIZE for t in first.token_ids)
    assert drafter.vocab_size == TINY_VOCAB_SIZE
    assert first.cache_length == len(PROMPT) + 4 - 1  # the last draft is sampled, never fed
    # The cache holds exactly cache_length tokens: keeping all of it works, one more is refused.
    with pytest.raises(ValueError, match="keep_length 9 exceeds the cached length 8"):
        drafter.propose(round_(keep=first.cache_length + 1, append=[1]))
    second = drafter.propose(round_(keep=first.cache_length, append=[first.token_ids[-1]], k=3))
    assert second.cache_length == first.cache_length + 1 + 3 - 1
    third = drafter.propose(round_(keep=len(PROMPT) + 1, append=[7, 9], k=2))  # roll back into the first drafts
    assert third.cache_length == len(PROMPT) + 1 + 2 + 2 - 1


def test_q_rows_are_distributions_containing_their_token(drafter: Drafter) -> None:
    for params in (SAMPLED, SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.3, top_p=0.5)):
        proposal = drafter.propose(round_(k=6, sampling=params, seed=3))
        q = proposal.q
        assert q is not None and q.shape == (6, TINY_VOCAB_SIZE) and q.dtype == torch.float32
        torch.testing.assert_close(q.sum(-1), torch.ones(6), atol=1e-5, rtol=0)
        tokens = torch.tensor(proposal.token_ids)
        assert (q[torch.arange(6), tokens] > 0).all()
        if params.top_k:
            assert ((q > 0).sum(-1) <= params.top_k).all()


def test_q_rows_equal_the_uncached_model_across_rounds_and_rollback(drafter: Drafter, model: torch.nn.Module) -> None:
    params = SamplingParams(temperature=0.8, top_k=20)
    first = drafter.propose(round_(k=4, sampling=params, seed=1))
    # Roll back to keep the prompt + the first draft, append a different token, propose again.
    keep = len(PROMPT) + 1
    second = drafter.propose(round_(keep=keep, append=[11], k=4, sampling=params, seed=2))
    for proposal, prefix in ((first, list(PROMPT)), (second, [*PROMPT, first.token_ids[0], 11])):
        for i, token in enumerate(proposal.token_ids):
            expected = warp(reference_logits(model, prefix), params)
            torch.testing.assert_close(proposal.q[i], expected, atol=1e-5, rtol=1e-4)
            prefix.append(token)


def test_greedy_sends_no_q_and_follows_the_argmax_chain(drafter: Drafter, model: torch.nn.Module) -> None:
    def greedy_reference(prefix: list[int], k: int) -> list[int]:
        prefix, out = list(prefix), []
        for _ in range(k):
            out.append(int(reference_logits(model, prefix).argmax()))
            prefix.append(out[-1])
        return out

    first = drafter.propose(round_(k=6, sampling=GREEDY))
    assert first.q is None
    assert list(first.token_ids) == greedy_reference(list(PROMPT), 6)
    # After a rollback that replaces the third draft, the chain continues from the new prefix.
    prefix = [*PROMPT, *first.token_ids[:2], 40]
    second = drafter.propose(round_(keep=len(PROMPT) + 2, append=[40], k=5, sampling=GREEDY))
    assert list(second.token_ids) == greedy_reference(prefix, 5)


def test_rollback_then_propose_equals_a_fresh_sequence(drafter: Drafter) -> None:
    first = drafter.propose(round_(seq=1, k=6, seed=10))
    keep = len(PROMPT) + 2
    rolled = drafter.propose(round_(seq=1, keep=keep, append=[33, 2], k=5, seed=99))
    fresh = drafter.propose(round_(seq=2, append=[*PROMPT, *first.token_ids[:2], 33, 2], k=5, seed=99))
    assert rolled.token_ids == fresh.token_ids
    assert rolled.cache_length == fresh.cache_length
    torch.testing.assert_close(rolled.q, fresh.q, atol=1e-5, rtol=1e-4)


def test_same_seed_same_tokens_and_the_seed_matters(drafter: Drafter) -> None:
    params = SamplingParams(temperature=2.0)
    a = drafter.propose(round_(seq=1, k=8, sampling=params, seed=123))
    b = drafter.propose(round_(seq=2, k=8, sampling=params, seed=123))
    assert a.token_ids == b.token_ids
    others = {drafter.propose(round_(seq=3, k=8, sampling=params, seed=s)).token_ids for s in range(5)}
    assert len(others) > 1


def test_restart_with_keep_length_zero_resets_the_sequence(drafter: Drafter) -> None:
    drafter.propose(round_(seq=1, append=[1, 2, 3, 4, 5, 6, 7], k=3))
    again = drafter.propose(round_(seq=1, append=PROMPT, k=2, seed=4))
    fresh = drafter.propose(round_(seq=2, append=PROMPT, k=2, seed=4))
    assert again.token_ids == fresh.token_ids and again.cache_length == len(PROMPT) + 1


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
    ],
)
def test_invalid_requests_are_value_errors_naming_the_field(
    drafter: Drafter, request_: ProposeRound, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        drafter.propose(request_)
    assert drafter.stats().live_sequences == 0  # nothing was created


def test_context_limit_is_exact(drafter: Drafter) -> None:
    proposal = drafter.propose(round_(append=[1] * (TINY_MAX_POSITIONS - 3), k=4))
    assert proposal.cache_length == TINY_MAX_POSITIONS


def test_a_refused_round_leaves_the_sequence_usable(drafter: Drafter) -> None:
    first = drafter.propose(round_(k=4, seed=5))
    with pytest.raises(ValueError, match="context length"):
        drafter.propose(round_(keep=first.cache_length, append=[1] * TINY_MAX_POSITIONS))
    with pytest.raises(ValueError, match="exceeds the cached length"):
        drafter.propose(round_(keep=first.cache_length + 3, append=[1]))
    again = drafter.propose(round_(keep=first.cache_length, append=[2], k=2))
    assert again.cache_length == first.cache_length + 2


def test_unknown_sequence_and_capacity(model: torch.nn.Module) -> None:
    drafter = Drafter(CausalLMEngine(model, SequenceStore(max_sequences=1, idle_ttl_s=300)), max_num_draft_tokens=4)
    with pytest.raises(SequenceNotFoundError):
        drafter.propose(round_(seq=7, keep=3, append=[1]))
    drafter.propose(round_(seq=1))
    with pytest.raises(CapacityError, match="capacity is 1"):
        drafter.propose(round_(seq=2))
    drafter.propose(round_(seq=1, seed=1))  # restarting the live one needs no new slot
    assert drafter.stats().live_sequences == 1 and drafter.stats().max_sequences == 1
    assert drafter.release(1) is True and drafter.release(1) is False
    assert drafter.stats().live_sequences == 0
    drafter.propose(round_(seq=2))
