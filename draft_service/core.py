"""The draft round, pure of gRPC: keep each sequence's context, hand the round to the drafter asked for.

Why it exists: this is the whole job of the draft service, written against plain dataclasses so it can be
unit-tested without a server, and so the servicer above it stays a thin translation layer. One round, for a
sequence whose context is L tokens: crop the context to ``keep_length`` (<= L; 0 starts or restarts the
sequence), append ``append_token_ids``, and ask the chosen drafter for up to K tokens. The answer's
``cache_length`` is the new context's length: drafts are never part of it (docs/architecture.md).

Errors: ValueError for a bad request, validated here, once (the message names the proto field);
SequenceNotFoundError (keep_length > 0 for a sequence with no state: the caller re-prefills) and
CapacityError (too many live sequences) from the store. When a sequence ends (released, its stream
closed, or evicted) every drafter hears of it (the suffix cache learns its output).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from draft_service.drafters.base import Drafter, DraftRequest, DraftSequence
from draft_service.drafters.suffix import SuffixCache
from specdec.proposal import Proposal
from specdec.sampling_params import SamplingParams
from specdec.sequences import SequenceStore

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
    drafter: str = ""  # "" = the service's default
    coupled: bool = False  # sample with the target's noise; no q rows


@dataclass(frozen=True)
class DraftStats:
    """The service's state for GetStats and the metrics."""

    live_sequences: int
    max_sequences: int
    vocab_size: int  # 0 when no model is loaded
    drafters: tuple[str, ...]  # offered, the default first
    suffix_cache_entries: int
    suffix_cache_bytes: int
    kv_bytes: int  # the model drafter's KV caches of live sequences


@dataclass(frozen=True)
class ModelLimits:
    """What a loaded draft model bounds: token ids and context length."""

    vocab_size: int
    max_length: int


class DraftCore:
    """Draft rounds over a store of sequence contexts. Safe to call from many threads (one per stream)."""

    def __init__(
        self,
        drafters: Mapping[str, Drafter],
        components: Sequence[Drafter],
        max_sequences: int,
        idle_ttl_s: float,
        max_num_draft_tokens: int,
        model: ModelLimits | None = None,
        suffix_cache: SuffixCache | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not drafters or max_num_draft_tokens < 1:
            raise ValueError("need at least one drafter and max_num_draft_tokens >= 1")
        self.drafters = dict(drafters)
        self.default = next(iter(self.drafters))
        self.components = tuple(components)  # every drafter object once (a hybrid is made of others)
        self.store: SequenceStore[DraftSequence] = SequenceStore(
            DraftSequence, max_sequences, idle_ttl_s, clock=clock, on_evict=self.finish
        )
        self.max_num_draft_tokens = max_num_draft_tokens
        self.model = model
        self.suffix_cache = suffix_cache

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size if self.model else 0

    def stats(self) -> DraftStats:
        cache = self.suffix_cache
        return DraftStats(
            live_sequences=len(self.store), max_sequences=self.store.max_sequences, vocab_size=self.vocab_size,
            drafters=tuple(self.drafters), suffix_cache_entries=len(cache) if cache else 0,
            suffix_cache_bytes=cache.approx_bytes if cache else 0,
            kv_bytes=sum(state.cache.nbytes for sequence in self.store.states()
                         if (state := sequence.states.get("model")) is not None),
        )

    def validate(self, request: ProposeRound) -> Drafter:
        """The drafter asked for; ValueError, naming the field, for anything wrong that needs no state."""
        drafter = self.drafters.get(request.drafter or self.default)
        if drafter is None:
            raise ValueError(f"drafter must be one of {list(self.drafters)} (or empty for {self.default!r}), got {request.drafter!r}")
        if request.sequence_id <= 0:
            raise ValueError(f"sequence_id must be non-zero, got {request.sequence_id}")
        if request.keep_length < 0:
            raise ValueError(f"keep_length must be >= 0, got {request.keep_length}")
        if not request.append_token_ids:
            raise ValueError("append_token_ids must hold at least one token")
        limit = self.vocab_size or 2**31
        bad = [t for t in request.append_token_ids if not 0 <= t < limit]
        if bad:
            where = "the vocabulary" if self.vocab_size else "token ids"
            raise ValueError(f"append_token_ids must be in [0, {limit}) ({where}), got {bad[:5]}")
        k = request.num_draft_tokens
        if not 1 <= k <= self.max_num_draft_tokens:
            raise ValueError(f"num_draft_tokens must be in [1, {self.max_num_draft_tokens}], got {k}")
        if self.model is not None:
            final_length = request.keep_length + len(request.append_token_ids) + k - 1
            if final_length > self.model.max_length:
                raise ValueError(
                    f"keep_length + len(append_token_ids) + num_draft_tokens - 1 = {final_length} exceeds the draft "
                    f"model's context length {self.model.max_length}"
                )
            try:
                request.sampling.validate_for_vocab(self.model.vocab_size)
            except ValueError as exc:
                raise ValueError(f"sampling.{exc}") from None
        return drafter

    def propose(self, request: ProposeRound, waiting: Callable[[], bool] = lambda: True) -> Proposal:
        """Run one round (module docstring). Raises ValueError, SequenceNotFoundError, CapacityError, and
        JobCancelled when ``waiting()`` turns False before a model forward (its caller has gone)."""
        drafter = self.validate(request)
        entry = self.store.checkout(request.sequence_id, start=request.keep_length == 0)
        try:
            sequence = entry.state
            sequence.apply(request.keep_length, list(request.append_token_ids))
            return drafter.propose(
                DraftRequest(sequence, request.num_draft_tokens, request.sampling, request.seed, request.coupled,
                             waiting)
            )
        finally:
            self.store.checkin(entry)

    def release(self, sequence_id: int) -> bool:
        """Drop a sequence (idempotent: False if it held nothing); every drafter hears of its end."""
        sequence = self.store.pop(sequence_id)
        if sequence is None:
            return False
        self.finish(sequence_id, sequence)
        return True

    def evict_idle(self) -> list[int]:
        """Drop sequences idle past the TTL (the store calls `finish` for each); returns their ids."""
        return self.store.evict_idle()

    def finish(self, sequence_id: int, sequence: DraftSequence) -> None:
        for drafter in self.components:
            try:
                drafter.finish(sequence)
            except Exception:  # noqa: BLE001 - one drafter's trouble must not keep the others from cleaning up
                log.exception("sequence_id=%d: drafter %s failed to finish", sequence_id, drafter.name)
