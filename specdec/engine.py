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
attends its queries to a view of that cache, with a causal mask over the new tokens. The sequences that
decode one token each and hold a slot of the engine's `KVPool` attend together, in one call per layer over
the pool's slots (a view; each row masked to its own slot's length); the others (prompts, verifications,
caches outside the pool) attend one call each. A step's cost grows with its new tokens (and the attention
over each sequence's own history), never with copies of caches. Without a step plan (plain
``model(...)`` or ``generate``) the same model falls back to SDPA unchanged.

Supported: decoder-only models whose attention modules go through transformers' attention interface and
carry a ``layer_idx`` (Llama, Mistral without a sliding window, Qwen2, ... ; SmolLM2 is a Llama).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from specdec.kv_cache import KVCache, KVLayout, KVPool

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
    token_ids: Sequence[int]
    mask: torch.Tensor | None  # [count, start + count] bool (with history): token i sees positions <= start + i

    @property
    def end(self) -> int:
        return self.start + self.count

    @property
    def causal(self) -> bool:
        """Several tokens and no history: SDPA's own causal mask stands for ``mask`` (none to build and
        expand per layer)."""
        return self.count > 1 and self.start == 0


class _StepPlan:
    """What `ragged_attention` needs to know about the step in flight.

    A step of n sequences calls attention once per layer per sequence outside the pool, so beside the
    attention itself the batch pays each call's Python and dispatch overhead. The views a call needs (each
    sequence's new positions and its context, per layer) are therefore cut once per step rather than once
    per layer, and a layer runs two scatters of the new keys and values (``_foreach_copy_``), one SDPA for
    the pooled decodes, an SDPA per other sequence, and one assembly of the rows: a decode forward of 8
    SmolLM2 sequences ~4 % faster than with the slicing done per layer (bench/README.md, "Design
    measurements")."""

    def __init__(self, segments: list[_Segment], pool: KVPool | None) -> None:
        self.counts = [s.count for s in segments]
        self.offsets = list(itertools.accumulate(self.counts, initial=0))[:-1]  # each segment's first row
        layers = segments[0].cache.layout.layers
        self.new_keys: list[list[torch.Tensor]] = [[] for _ in range(layers)]  # per layer: each [Hkv, count, D]
        self.new_values: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        for s in segments:
            new = s.cache.buffer[:, :, :, s.start : s.end]  # [layers, 2, Hkv, count, D]
            for layer, (new_key, new_value) in enumerate(zip(new[:, 0].unbind(0), new[:, 1].unbind(0))):
                self.new_keys[layer].append(new_key)
                self.new_values[layer].append(new_value)
        self.pooled = _PooledDecodes.of(segments, self.offsets, pool)
        # The segments that attend on their own, with their index in the step.
        self.alone = [(i, s) for i, s in enumerate(segments) if self.pooled is None or not self.pooled.holds(s)]
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(layers)]  # per layer: each [1, Hkv, end, D]
        self.values: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        for _, s in self.alone:
            context = s.cache.buffer[:, :, :, : s.end]  # [layers, 2, Hkv, end, D]
            for layer, (key, value) in enumerate(zip(context[:, 0:1].unbind(0), context[:, 1:2].unbind(0))):
                self.keys[layer].append(key)
                self.values[layer].append(value)

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        """query [1, H, T, D], key/value [1, Hkv, T, D] for the packed new tokens -> output [1, T, H, D]."""
        torch._foreach_copy_(self.new_keys[layer], key[0].split(self.counts, dim=1))
        torch._foreach_copy_(self.new_values[layer], value[0].split(self.counts, dim=1))
        queries = query.split(self.counts, dim=2)
        attended = [
            F.scaled_dot_product_attention(  # [1, H, count, D]
                queries[i], k, v, attn_mask=s.mask, is_causal=s.causal, scale=scaling, enable_gqa=True
            )
            for (i, s), k, v in zip(self.alone, self.keys[layer], self.values[layer])
        ]
        if self.pooled is None:
            return (attended[0] if len(attended) == 1 else torch.cat(attended, dim=2)).transpose(1, 2)
        pooled = self.pooled.attend(layer, query, scaling)  # [n, H, D]
        if not attended:
            return pooled.unsqueeze(0)
        out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [T, H, D]
        out.index_copy_(0, self.pooled.rows, pooled)
        for (i, s), rows in zip(self.alone, attended):
            out[self.offsets[i] : self.offsets[i] + s.count] = rows[0].transpose(0, 1)
        return out.unsqueeze(0)


class _PooledDecodes:
    """The step's one-token decodes whose caches are slots of the engine's `KVPool`, attended in one call.

    Their queries attend to the pool's slots ``first..last`` at once (a view of the pool, no copy): row i
    masked to its own slot's first ``end`` positions (the mask holds -inf elsewhere; a slot of the span that
    decodes nothing in this step gets a zero query that sees its position 0, and its row is dropped). Grouped-
    query attention without repeating the keys: a KV head's query heads are rows of one query (head h reads
    KV head h // rep, as transformers' ``repeat_kv``). Built once per step, used by every layer."""

    def __init__(self, pool: KVPool, decodes: list[tuple[int, _Segment]]) -> None:
        slots = [s.cache.slot for _, s in decodes]
        first, last = min(slots), max(slots)
        width = max(s.end for _, s in decodes)
        device = pool.tensor.device
        self._held = {id(s) for _, s in decodes}
        self.count, self.span = len(decodes), last - first + 1
        self.rows = torch.tensor([offset for offset, _ in decodes], device=device)  # their rows in the step
        places = [slot - first for slot in slots]  # their places in the span
        self._places = torch.tensor(places, device=device)
        self.dense = places == list(range(self.span))  # the span is exactly these, in this order
        ends = torch.ones(self.span, dtype=torch.long, device=device)
        ends[self._places] = torch.tensor([s.end for _, s in decodes], device=device)
        hidden = torch.arange(width, device=device) >= ends[:, None]  # [span, width]
        self.mask = torch.zeros(self.span, 1, 1, width, dtype=pool.tensor.dtype, device=device)  # [span, 1, 1, width]
        self.mask.masked_fill_(hidden[:, None, None, :], float("-inf"))
        self.keys = pool.tensor[:, 0, first : last + 1, :, :width]  # [layers, span, Hkv, width, D]
        self.values = pool.tensor[:, 1, first : last + 1, :, :width]

    @classmethod
    def of(cls, segments: list[_Segment], offsets: list[int], pool: KVPool | None) -> _PooledDecodes | None:
        """The pooled decodes of a step, or None when fewer than two (one sequence attends as cheaply alone)."""
        if pool is None:
            return None
        decodes = [(offset, s) for offset, s in zip(offsets, segments)
                   if s.count == 1 and s.cache.pool is pool and s.cache.slot is not None]
        return cls(pool, decodes) if len(decodes) >= 2 else None

    def holds(self, segment: _Segment) -> bool:
        return id(segment) in self._held

    def attend(self, layer: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """query [1, H, T, D] of the whole step -> the pooled decodes' outputs [n, H, D], in step order."""
        heads, dim = query.shape[1], query.shape[3]
        kv_heads = self.keys.shape[2]
        q = query[0].index_select(1, self.rows).transpose(0, 1).reshape(self.count, kv_heads, heads // kv_heads, dim)
        if not self.dense:
            spread = q.new_zeros(self.span, *q.shape[1:])
            q = spread.index_copy_(0, self._places, q)
        keys, values = self.keys[layer], self.values[layer]  # [span, Hkv, width, D]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, scale=scaling)  # [span, Hkv, rep, D]
        if not self.dense:
            out = out.index_select(0, self._places)
        return out.reshape(self.count, heads, dim)


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

    def __init__(self, model: torch.nn.Module, slots: int = 0, slot_tokens: int = 0) -> None:
        """``slots`` x ``slot_tokens``: the `KVPool` its caches take slots of (0: none, each cache its own)."""
        self.model = model
        self.layout = KVLayout.of(model)
        self.pool = KVPool(self.layout, slots, slot_tokens) if slots and slot_tokens else None
        if self.pool is not None:
            log.info("KV pool: %d slots of %d positions, %.0f MB on %s (on a CPU resident as slots are used)",
                     slots, slot_tokens, slots * slot_tokens * self.layout.bytes_per_token / 2**20, self.layout.device)
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
        return KVCache(self.layout, self.pool)

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
            if count > 1 and start > 0:
                rows = torch.arange(count, device=self.device).unsqueeze(1)
                mask = torch.arange(start + count, device=self.device).unsqueeze(0) <= start + rows
            segments.append(_Segment(item.cache, start, count, item.token_ids, mask))
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
            **{_PLAN: _StepPlan(segments, self.pool)},
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
