"""The draft round, pure of gRPC: roll a sequence's cache back, append tokens, sample K tokens from q.

Why it exists: this is the whole job of the draft service, written against plain dataclasses so it can be
unit-tested on a tiny model without a server, and so the servicer above it stays a thin translation layer.

One round (docs/architecture.md, "One round"), for a sequence with a KV cache of length L:

1. crop the cache to ``keep_length`` (<= L; 0 starts or restarts the sequence), feed ``append_token_ids``
   and take the logits of the last position;
2. K times: ``q_i = warp(logits, sampling)``, ``x_i ~ q_i`` with a generator seeded with ``seed``; feed
   x_i to get the next logits, except the last one: it is sampled but never fed, so the cache ends at
   ``keep_length + len(append_token_ids) + K - 1`` tokens. The next round appends whatever the target
   decided after the accepted prefix, which covers x_{K-1} if it was accepted.

Errors: ValueError for a bad request (the message names the proto field), and the engine's
SequenceNotFoundError (keep_length > 0 for a sequence with no cache: the caller re-prefills) and
CapacityError (too many live sequences).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from specdec.engine import CausalLMEngine
from specdec.proposal import Proposal
from specdec.sampling import SamplingParams, sample, warp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProposeRound:
    """One round of drafting for one sequence (the fields of ProposeRequest)."""

    sequence_id: int
    keep_length: int
    append_token_ids: tuple[int, ...]
    num_draft_tokens: int
    sampling: SamplingParams
    seed: int


@dataclass(frozen=True)
class DraftStats:
    """The drafter's state for GetStats."""

    live_sequences: int
    max_sequences: int
    vocab_size: int


class Drafter:
    """Runs draft rounds over a CausalLMEngine. Not concurrent: call it from one thread at a time."""

    def __init__(self, engine: CausalLMEngine, max_num_draft_tokens: int) -> None:
        if max_num_draft_tokens < 1:
            raise ValueError(f"max_num_draft_tokens must be >= 1, got {max_num_draft_tokens}")
        self.engine = engine
        self.max_num_draft_tokens = max_num_draft_tokens

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    def stats(self) -> DraftStats:
        store = self.engine.store
        return DraftStats(live_sequences=len(store), max_sequences=store.max_sequences, vocab_size=self.vocab_size)

    def release(self, sequence_id: int) -> bool:
        """Drop a sequence's cache; False if it held none (idempotent)."""
        return self.engine.store.release(sequence_id)

    def evict_idle(self) -> list[int]:
        """Drop caches idle past the TTL; returns their ids."""
        return self.engine.store.evict_idle()

    def validate(self, request: ProposeRound) -> None:
        """Raise ValueError, naming the field, for anything wrong that needs no cache to detect."""
        vocab_size = self.vocab_size
        if request.sequence_id <= 0:
            raise ValueError(f"sequence_id must be non-zero, got {request.sequence_id}")
        if request.keep_length < 0:
            raise ValueError(f"keep_length must be >= 0, got {request.keep_length}")
        if not request.append_token_ids:
            raise ValueError("append_token_ids must hold at least one token")
        bad = [t for t in request.append_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"append_token_ids must be in [0, {vocab_size}) (the vocabulary), got {bad[:5]}")
        k = request.num_draft_tokens
        if not 1 <= k <= self.max_num_draft_tokens:
            raise ValueError(f"num_draft_tokens must be in [1, {self.max_num_draft_tokens}], got {k}")
        final_length = request.keep_length + len(request.append_token_ids) + k - 1
        if final_length > self.engine.max_length:
            raise ValueError(
                f"keep_length + len(append_token_ids) + num_draft_tokens - 1 = {final_length} exceeds the draft "
                f"model's context length {self.engine.max_length}"
            )
        try:
            request.sampling.validate_for_vocab(vocab_size)
        except ValueError as exc:
            raise ValueError(f"sampling.{exc}") from None

    @torch.inference_mode()
    def propose(self, request: ProposeRound) -> Proposal:
        """Run one round (module docstring). Raises ValueError, SequenceNotFoundError, CapacityError."""
        self.validate(request)
        seq, params, k = request.sequence_id, request.sampling, request.num_draft_tokens
        generator = torch.Generator(device=self.engine.device).manual_seed(request.seed)
        logits = self.engine.extend(  # [1, V]
            seq, request.keep_length, request.append_token_ids, 1, start=request.keep_length == 0
        )
        length = request.keep_length + len(request.append_token_ids)
        tokens: list[int] = []
        rows: list[torch.Tensor] = []  # K x [1, V]
        for i in range(k):
            q = warp(logits, params)  # [1, V]
            token = int(sample(q, generator)[0])
            tokens.append(token)
            rows.append(q)
            if i < k - 1:
                logits = self.engine.extend(seq, length, [token], 1, start=False)  # [1, V]
                length += 1
        q_probs = None if params.greedy else torch.cat(rows)  # [K, V] float32, packed for the wire on the device
        return Proposal(token_ids=tuple(tokens), q=q_probs, cache_length=length)
