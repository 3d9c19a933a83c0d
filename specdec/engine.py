"""A causal LM with one rollback-able KV cache per sequence id: the engine under both model servers.

The draft service and the Triton target model do the same thing each round: roll a sequence's cache back
to ``keep_length`` tokens (a crop, never a recompute), feed the tokens appended since, and hand back the
logits of the last few positions. This module is that, plus the bookkeeping a long-running server needs:
an idle TTL, a capacity, and distinct errors for "no such sequence" (the caller re-sends the prefix) and
"full" (the caller backs off). It knows nothing of gRPC or Triton; the servers map its errors to statuses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

log = logging.getLogger(__name__)


class SequenceNotFoundError(LookupError):
    """The sequence holds no cache here (never started, released, evicted, or the server restarted)."""


class CapacityError(RuntimeError):
    """Starting another sequence would exceed the configured capacity."""


@dataclass
class _Sequence:
    cache: DynamicCache
    last_used: float
    length: int = 0
    busy: bool = field(default=False)


class SequenceStore:
    """Per-sequence KV caches with an idle TTL and a capacity. Thread-safe."""

    def __init__(
        self, max_sequences: int, idle_ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_sequences < 1:
            raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
        if idle_ttl_s <= 0:
            raise ValueError(f"idle_ttl_s must be > 0, got {idle_ttl_s}")
        self.max_sequences = max_sequences
        self.idle_ttl_s = idle_ttl_s
        self._clock = clock
        self._sequences: dict[int, _Sequence] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sequences)

    def __contains__(self, sequence_id: int) -> bool:
        with self._lock:
            return sequence_id in self._sequences

    def checkout(self, sequence_id: int, *, start: bool) -> _Sequence:
        """Take a sequence for one step; ``start`` creates it (or resets it) instead of requiring it."""
        now = self._clock()
        with self._lock:
            self._evict_idle_locked(now)
            entry = self._sequences.get(sequence_id)
            if entry is not None and entry.busy:
                raise ValueError(f"sequence {sequence_id} is already running a step")
            if start:
                if entry is None and len(self._sequences) >= self.max_sequences:
                    raise CapacityError(
                        f"{len(self._sequences)} sequences are live, the capacity is {self.max_sequences}"
                    )
                entry = _Sequence(cache=DynamicCache(), last_used=now)
                self._sequences[sequence_id] = entry
            elif entry is None:
                raise SequenceNotFoundError(f"sequence {sequence_id} has no cache here (released, evicted or restarted)")
            entry.busy = True
            entry.last_used = now
            return entry

    def checkin(self, entry: _Sequence) -> None:
        with self._lock:
            entry.busy = False
            entry.last_used = self._clock()

    def release(self, sequence_id: int) -> bool:
        """Drop a sequence's cache; False if it held none."""
        with self._lock:
            return self._sequences.pop(sequence_id, None) is not None

    def evict_idle(self) -> list[int]:
        """Drop caches idle for longer than the TTL; returns their ids."""
        with self._lock:
            return self._evict_idle_locked(self._clock())

    def _evict_idle_locked(self, now: float) -> list[int]:
        expired = [
            sid for sid, e in self._sequences.items() if not e.busy and now - e.last_used > self.idle_ttl_s
        ]
        for sid in expired:
            del self._sequences[sid]
            log.info("sequence_id=%d evicted: idle for more than %.0f s", sid, self.idle_ttl_s)
        return expired


class CausalLMEngine:
    """Runs ``extend`` steps of one causal LM over the caches of a SequenceStore."""

    def __init__(self, model: torch.nn.Module, store: SequenceStore) -> None:
        self.model = model
        self.store = store
        self.device = next(model.parameters()).device
        self.vocab_size: int = int(model.config.vocab_size)
        self.max_length: int = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)

    @torch.inference_mode()
    def extend(
        self, sequence_id: int, keep_length: int, token_ids: Sequence[int], num_logits: int, *, start: bool
    ) -> torch.Tensor:
        """Crop the cache to ``keep_length``, feed ``token_ids``, return logits [num_logits, V] float32.

        ``start`` begins a fresh sequence (``keep_length`` must be 0). Raises ValueError for bad
        arguments, SequenceNotFoundError and CapacityError as documented on SequenceStore.
        """
        if sequence_id == 0:
            raise ValueError("sequence_id must be non-zero")
        if not token_ids:
            raise ValueError("at least one token must be appended")
        if not 1 <= num_logits <= len(token_ids):
            raise ValueError(f"num_logits must be in [1, {len(token_ids)}] (tokens appended), got {num_logits}")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if keep_length < 0:
            raise ValueError(f"keep_length must be >= 0, got {keep_length}")
        if start and keep_length != 0:
            raise ValueError(f"a sequence starts with keep_length 0, got {keep_length}")
        entry = self.store.checkout(sequence_id, start=start)
        try:
            if keep_length > entry.length:
                raise ValueError(f"keep_length {keep_length} exceeds the cached length {entry.length}")
            if keep_length + len(token_ids) > self.max_length:
                raise ValueError(
                    f"{keep_length + len(token_ids)} tokens exceed the context length {self.max_length}"
                )
            if keep_length < entry.length:
                entry.cache.crop(keep_length - entry.length)
            entry.length = keep_length  # stays consistent if the forward below fails
            ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)  # [1, T]
            out = self.model(input_ids=ids, cache=entry.cache, use_cache=True, logits_to_keep=num_logits)
            entry.length = keep_length + len(token_ids)
            return out.logits[0, -num_logits:].float()  # [num_logits, V]
        except BaseException:
            # A failed forward may leave the cache half-appended: drop it so nothing stale is reused.
            if entry.cache.get_seq_length() != entry.length:
                self.store.release(sequence_id)
            raise
        finally:
            self.store.checkin(entry)
