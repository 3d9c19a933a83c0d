"""A causal LM that runs the new tokens of many sequences in one forward pass, each against its own KV cache.

Why it exists: the Triton target and the draft service's model drafter do the same thing each step, for
every sequence that is ready: roll the sequence's cache back to ``keep_length`` tokens (a crop, never a
recompute), feed the tokens appended since, and hand back the logits of the last few positions. Doing it
for all ready sequences in **one** forward is where a server's capacity comes from: the weights are read
once per step instead of once per sequence (docs/architecture.md, "Batching").

How: the step's tokens are packed into one row ``[1, T]`` with each token's own position (``position_ids``),
so every linear layer runs once over all of them. Attention is the only per-sequence part: the model's
attention calls `ragged_attention` (registered with transformers' ``AttentionInterface`` under
``specdec_ragged``), which writes each sequence's new keys and values into its `KVCache` in place and
attends its queries to a view of that cache, with a causal mask over the new tokens. A step's cost grows
with its new tokens (and the attention over each sequence's own history), never with copies of caches.
Without a step plan (plain ``model(...)`` or ``generate``) the same model falls back to SDPA unchanged.

Supported: decoder-only models whose attention modules go through transformers' attention interface and
carry a ``layer_idx`` (Llama, Mistral without a sliding window, Qwen2, ... ; SmolLM2 is a Llama).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from specdec.kv_cache import KVCache, KVLayout

log = logging.getLogger(__name__)

ATTENTION = "specdec_ragged"
_PLAN = "specdec_step_plan"


@dataclass(frozen=True)
class StepItem:
    """One sequence's part of a step: crop ``cache`` to ``keep_length``, feed ``token_ids``, return the
    logits of the last ``num_logits`` of them (0: none, a chunk of a longer prompt)."""

    cache: KVCache
    keep_length: int
    token_ids: Sequence[int]
    num_logits: int


@dataclass
class _Segment:
    cache: KVCache
    start: int  # cached positions before this step (= keep_length)
    count: int  # new tokens
    offset: int  # where its tokens sit in the packed row
    token_ids: Sequence[int]
    mask: torch.Tensor | None  # [count, start + count] bool: new token i sees positions <= start + i

    @property
    def end(self) -> int:
        return self.start + self.count


class _StepPlan:
    """What `ragged_attention` needs to know about the step in flight."""

    def __init__(self, segments: list[_Segment]) -> None:
        self.segments = segments

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        """query [1, H, T, D], key/value [1, Hkv, T, D] for the packed new tokens -> output [1, T, H, D]."""
        _, heads, _, head_dim = query.shape
        out = query.new_empty(1, query.shape[2], heads, head_dim)  # [1, T, H, D]
        for s in self.segments:
            kv = s.cache.buffer[layer]  # [2, Hkv, capacity, D]
            new = slice(s.offset, s.offset + s.count)
            kv[0, :, s.start : s.end] = key[0, :, new]
            kv[1, :, s.start : s.end] = value[0, :, new]
            attended = F.scaled_dot_product_attention(  # [1, H, count, D]
                query[:, :, new],
                kv[0, :, : s.end].unsqueeze(0),
                kv[1, :, : s.end].unsqueeze(0),
                attn_mask=s.mask,
                scale=scaling,
                enable_gqa=True,
            )
            out[:, new] = attended.transpose(1, 2)
        return out


def ragged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: a step of `CausalLMEngine` (its plan rides in the kwargs), or SDPA."""
    plan: _StepPlan | None = kwargs.pop(_PLAN, None)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return plan.attend(module.layer_idx, query, key, value, scaling), None


AttentionInterface.register(ATTENTION, ragged_attention)


class CausalLMEngine:
    """Runs steps of one causal LM over per-sequence `KVCache`s. Not thread-safe: one step at a time."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.layout = KVLayout.of(model)
        self.device = self.layout.device
        self.vocab_size: int = int(model.config.vocab_size)
        self.max_length: int = self.layout.max_length
        layers = [m for m in model.modules() if hasattr(m, "layer_idx") and "Attention" in type(m).__name__]
        if sorted(m.layer_idx for m in layers) != list(range(self.layout.layers)):
            raise ValueError(f"{type(model).__name__}: its attention layers are not numbered 0..{self.layout.layers - 1}")
        if getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", True):
            log.warning("%s declares a sliding window; specdec attends to the whole context", type(model).__name__)
        model.config._attn_implementation = ATTENTION

    def new_cache(self) -> KVCache:
        return KVCache(self.layout)

    @torch.inference_mode()
    def step(self, items: Sequence[StepItem]) -> list[torch.Tensor | ValueError]:
        """One forward for every item; per item, its logits [num_logits, V] float32 or the ValueError that
        refused it (keep_length beyond its cache, the context length, a cache given twice). A failed forward
        raises for all; every cache then still holds its first ``keep_length`` tokens intact."""
        results: list[torch.Tensor | ValueError] = [ValueError("not run")] * len(items)
        segments, ids, positions, keep_rows, owners = [], [], [], [], []
        seen: set[int] = set()
        offset = 0
        for index, item in enumerate(items):
            try:
                self._check(item, seen)
            except ValueError as exc:
                results[index] = exc
                continue
            count = len(item.token_ids)
            start = item.keep_length
            item.cache.reserve(start + count)
            mask = None
            if count > 1:
                rows = torch.arange(count, device=self.device).unsqueeze(1)
                mask = torch.arange(start + count, device=self.device).unsqueeze(0) <= start + rows
            segments.append(_Segment(item.cache, start, count, offset, item.token_ids, mask))
            ids.extend(item.token_ids)
            positions.extend(range(start, start + count))
            keep_rows.extend(range(offset + count - item.num_logits, offset + count))
            owners.append((index, len(keep_rows) - item.num_logits, item.num_logits))
            offset += count
        if not segments:
            return results
        for segment in segments:
            segment.cache.length = min(segment.cache.length, segment.start)  # a failed forward leaves this
        out = self.model(
            input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),  # [1, T]
            position_ids=torch.tensor([positions], dtype=torch.long, device=self.device),  # [1, T]
            use_cache=False,
            logits_to_keep=torch.tensor(keep_rows, dtype=torch.long, device=self.device),  # [R]
            **{_PLAN: _StepPlan(segments)},
        )
        logits = out.logits[0].float()  # [R, V]
        for segment in segments:
            segment.cache.length = segment.end
            del segment.cache.ids[segment.start :]
            segment.cache.ids.extend(segment.token_ids)
        for index, first, count in owners:
            results[index] = logits[first : first + count]
        return results

    def extend(self, cache: KVCache, keep_length: int, token_ids: Sequence[int], num_logits: int) -> torch.Tensor:
        """A step of one sequence: its logits [num_logits, V] float32 (ValueError as `step` refuses)."""
        (result,) = self.step([StepItem(cache, keep_length, token_ids, num_logits)])
        if isinstance(result, ValueError):
            raise result
        return result

    def _check(self, item: StepItem, seen: set[int]) -> None:
        cache, count = item.cache, len(item.token_ids)
        if id(cache) in seen:
            raise ValueError("a sequence appears twice in one step")
        if count < 1:
            raise ValueError("at least one token must be appended")
        if not 0 <= item.num_logits <= count:
            raise ValueError(f"num_logits must be in [0, {count}] (tokens appended), got {item.num_logits}")
        if not 0 <= item.keep_length <= cache.length:
            raise ValueError(f"keep_length {item.keep_length} exceeds the cached length {cache.length}")
        if item.keep_length + count > self.max_length:
            raise ValueError(f"{item.keep_length + count} tokens exceed the context length {self.max_length}")
        seen.add(id(cache))
