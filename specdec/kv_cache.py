"""One sequence's keys and values, kept so that a step costs what its new tokens cost, not its history.

Why it exists: the engine (`specdec.engine`) runs the new tokens of many sequences in one forward, each
against its own cache. Each cache is one buffer ``[layers, 2, kv_heads, capacity, head_dim]`` that only
grows (by doubling, so a sequence copies its history O(log n) times in its life); appending writes the new
positions in place, rolling back is setting ``length`` (a crop, never a recompute), and attention reads a
view of the first ``length`` positions. Nothing is copied into a batch.
"""

from __future__ import annotations

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


class KVCache:
    """The keys and values of one sequence's first ``length`` tokens (positions beyond are scratch)."""

    def __init__(self, layout: KVLayout) -> None:
        self.layout = layout
        self.length = 0
        self.buffer: torch.Tensor | None = None  # [layers, 2, kv_heads, capacity, head_dim]
        self.ids: list[int] = []  # ids[:length]: the token ids of the cached positions (for prompt lookup)
        self.lookup = Acceptance()  # whether its looked-up drafts pay

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
        layout = self.layout
        capacity = min(max(_MIN_CAPACITY, 1 << (tokens - 1).bit_length()), max(tokens, layout.max_length))
        grown = torch.empty(
            layout.layers, 2, layout.kv_heads, capacity, layout.head_dim, dtype=layout.dtype, device=layout.device
        )
        if self.buffer is not None and self.length:
            grown[:, :, :, : self.length] = self.buffer[:, :, :, : self.length]
        self.buffer = grown
