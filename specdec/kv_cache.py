"""One sequence's keys and values, kept so that a step costs what its new tokens cost, not its history.

Why it exists: the engine (`specdec.engine`) runs the new tokens of many sequences in one forward, each
against its own cache. Each cache is one buffer ``[layers, 2, kv_heads, capacity, head_dim]``; appending
writes the new positions in place, rolling back is setting ``length`` (a crop, never a recompute), and
attention reads a view of the first ``length`` positions. Nothing is copied into a batch.

Where the buffer lives: a cache takes a slot of its engine's `KVPool` when one is free and the sequence
fits in it (``slot_tokens`` positions): the slots of all sequences are one tensor, so the engine can attend
every decoding sequence's token to its own slot in **one** attention call per layer, through a view (a
decode step of 8 SmolLM2 sequences on this project's CPU: 240 attention calls become 30). A sequence that
outgrows its slot, or finds none free, moves to a buffer of its own that grows by doubling (its history is
copied O(log n) times in its life) and attends on its own. A slot goes back to the pool when its cache is
dropped (released, evicted, or grown out of it).
"""

from __future__ import annotations

import heapq
import threading
import weakref
from dataclasses import dataclass

import torch

from specdec.lookup import Acceptance

_MIN_CAPACITY = 64


@dataclass(frozen=True)
class KVLayout:
    """The shape of a model's per-token keys and values."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    max_length: int  # positions the model supports

    @classmethod
    def of(cls, model: torch.nn.Module) -> KVLayout:
        config = model.config
        heads = int(config.num_attention_heads)
        param = next(model.parameters())
        return cls(
            layers=int(config.num_hidden_layers),
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            dtype=param.dtype,
            device=param.device,
            max_length=int(getattr(config, "max_position_embeddings", 0) or 1 << 30),
        )

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()


class KVPool:
    """``slots`` buffers of ``slot_tokens`` positions in one tensor ``[layers, 2, slots, kv_heads, slot_tokens,
    head_dim]``, handed out lowest first (so the slots in use stay few and close together). Thread-safe.

    Memory: the tensor is allocated once, untouched (on a CPU, pages become resident as slots are first
    used); a slot is zeroed when taken, so the positions an attention mask hides are never NaN garbage."""

    def __init__(self, layout: KVLayout, slots: int, slot_tokens: int) -> None:
        if slots < 1 or slot_tokens < 1:
            raise ValueError(f"a pool needs slots >= 1 and slot_tokens >= 1, got {slots} and {slot_tokens}")
        self.slot_tokens = slot_tokens
        self.tensor = torch.empty(layout.layers, 2, slots, layout.kv_heads, slot_tokens, layout.head_dim,
                                  dtype=layout.dtype, device=layout.device)
        self._free = list(range(slots))  # a heap
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        with self._lock:
            return len(self._free)

    def take(self) -> int | None:
        """The lowest free slot, zeroed, or None when all are in use."""
        with self._lock:
            if not self._free:
                return None
            slot = heapq.heappop(self._free)
        self.tensor[:, :, slot].zero_()
        return slot

    def give(self, slot: int) -> None:
        with self._lock:
            heapq.heappush(self._free, slot)


class KVCache:
    """The keys and values of one sequence's first ``length`` tokens (positions beyond are scratch)."""

    def __init__(self, layout: KVLayout, pool: KVPool | None = None) -> None:
        self.layout = layout
        self.length = 0
        self.buffer: torch.Tensor | None = None  # [layers, 2, kv_heads, capacity, head_dim]
        self.ids: list[int] = []  # ids[:length]: the token ids of the cached positions (for prompt lookup)
        self.lookup = Acceptance()  # whether its looked-up drafts pay
        self.pool = pool
        self.slot: int | None = None  # its slot in ``pool`` while its buffer is that slot
        self._give_back: weakref.finalize | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.buffer is None else self.buffer.shape[3]

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` positions, keeping the first ``length``."""
        if tokens <= self.capacity:
            return
        if self.buffer is None and self.pool is not None and tokens <= self.pool.slot_tokens:
            slot = self.pool.take()
            if slot is not None:
                self.slot, self.buffer = slot, self.pool.tensor[:, :, slot]
                self._give_back = weakref.finalize(self, self.pool.give, slot)
                return
        layout = self.layout
        capacity = min(max(_MIN_CAPACITY, 1 << (tokens - 1).bit_length()), max(tokens, layout.max_length))
        grown = torch.empty(
            layout.layers, 2, layout.kv_heads, capacity, layout.head_dim, dtype=layout.dtype, device=layout.device
        )
        if self.buffer is not None and self.length:
            grown[:, :, :, : self.length] = self.buffer[:, :, :, : self.length]
        self.buffer = grown
        if self._give_back is not None:  # out of its slot
            self.slot = None
            self._give_back()
            self._give_back = None
