"""Keys and values of the prompt heads different prompts share, copied into a new sequence, not recomputed.

Why it exists: prompts that reach one service share their first tokens: the chat template's system turn,
an instruction, a few-shot preamble (SmolLM2's template alone: the first 24 tokens of every chat prompt;
our ``code-edit`` prompts share 31). Every prefill recomputes them, and under load prefills take a large
share of the model (at 8 in flight on ``code-edit``, about a third of the target's time: bench/README.md,
"Load"). Serving systems keep such keys and values instead (vLLM's automatic prefix caching, SGLang's
RadixAttention, TensorRT-LLM's KV cache reuse): a prompt starts from the longest head held, and its
prefill runs the rest, as a chunk run after another does.

What is kept: vLLM and SGLang keep every block of every prompt, since their caches are paged and a block
in use can simply stay. Here each sequence owns its buffer (`specdec.kv_cache`), so a head is a copy, and
only what two *different* recent prompts had in common is copied: memory grows with the shared heads, not
with the prompts, and a load test replaying one request does not turn into a measurement of this cache.
Heads are kept up to ``max_bytes`` (least recently used first out) and reported (`nbytes`, `stats`).

Exactness: a head's keys and values are those its first prompt's forward computed, and a row of a forward
does not depend on the other rows (`specdec.cpu_linear`); the rest of a prompt then attends to them as a
prefill chunk does (``max_forward_tokens``), which changes the logits by float rounding only (~6e-5 on
SmolLM2, as chunking does; tested to tolerance against a full forward).

Thread-safe; holds no model: the Triton target (`target_service.steps.run_batch`) matches, fills and
learns, and unit tests drive it with a tiny model.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from specdec.kv_cache import KVCache

MIN_TOKENS = 16  # a shorter common head is not worth a copy
REMEMBER = 64  # recent distinct prompts a new one is compared with


@dataclass(frozen=True)
class Head:
    """The first tokens of a prompt and their keys and values ``[layers, 2, kv_heads, len(ids), head_dim]``."""

    ids: np.ndarray  # int64 [n]
    kv: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass(frozen=True)
class Hit:
    """A new prompt's first ``tokens`` are ``head``'s."""

    head: Head
    tokens: int


@dataclass
class PrefixStats:
    """Cumulative figures, for the model's metrics."""

    prompts: int = 0  # prompts learnt (the first forward of each ran)
    prompt_tokens: int = 0  # their tokens
    reused_tokens: int = 0  # of those, copied from a head instead of computed
    heads_kept: int = 0  # heads copied in


def common_length(a: np.ndarray, b: np.ndarray) -> int:
    """How many first tokens ``a`` and ``b`` share."""
    size = min(a.size, b.size)
    differ = np.flatnonzero(a[:size] != b[:size])
    return int(differ[0]) if differ.size else size


class PrefixCache:
    """Shared prompt heads, at most ``max_bytes`` of keys and values, each at least ``min_tokens`` long."""

    def __init__(self, max_bytes: int, min_tokens: int = MIN_TOKENS, remember: int = REMEMBER) -> None:
        if max_bytes < 0 or min_tokens < 1 or remember < 1:
            raise ValueError(f"need max_bytes >= 0, min_tokens >= 1 and remember >= 1, got {max_bytes}, "
                             f"{min_tokens} and {remember}")
        self.max_bytes, self.min_tokens, self.remember = max_bytes, min_tokens, remember
        self._heads: OrderedDict[bytes, Head] = OrderedDict()  # by its ids' bytes, least recently used first
        self._recent: OrderedDict[bytes, np.ndarray] = OrderedDict()  # recent distinct prompts, oldest first
        self._lock = threading.Lock()
        self.nbytes = 0
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._heads)

    def match(self, token_ids: Sequence[int], most: int) -> Hit | None:
        """The longest held head of a new prompt, at most ``most`` of its tokens (its prefill must still run
        the positions whose rows it returns), or None."""
        ids = np.asarray(token_ids, dtype=np.int64)
        with self._lock:
            best: Hit | None = None
            for head in self._heads.values():
                tokens = min(common_length(ids, head.ids), most)
                if tokens >= self.min_tokens and (best is None or tokens > best.tokens):
                    best = Hit(head, tokens)
            if best is None:
                return None
            self._heads.move_to_end(best.head.ids.tobytes())
            return best

    def fill(self, cache: KVCache, hit: Hit, reserve: int) -> None:
        """Copy ``hit`` into ``cache``, which holds nothing yet, with room for ``reserve`` positions."""
        if cache.length:
            raise ValueError(f"a head goes into an empty cache, this one holds {cache.length} positions")
        cache.reserve(max(reserve, hit.tokens))
        assert cache.buffer is not None
        cache.buffer[:, :, :, : hit.tokens] = hit.head.kv[:, :, :, : hit.tokens]
        cache.length = hit.tokens
        cache.ids[:] = hit.head.ids[: hit.tokens].tolist()
        with self._lock:
            self.stats.reused_tokens += hit.tokens

    def learn(self, token_ids: Sequence[int], cache: KVCache) -> None:
        """A prompt's first forward has run: ``cache`` holds its first tokens. Keep the head it shares with a
        different recent prompt (the longest, as far as the cache holds it) unless a held head covers it.
        Counts the prompt in `stats`."""
        ids = np.asarray(token_ids, dtype=np.int64)
        key = ids.tobytes()
        with self._lock:
            self.stats.prompts += 1
            self.stats.prompt_tokens += ids.size
            shared = max((common_length(ids, other) for k, other in self._recent.items() if k != key), default=0)
            self._recent[key] = ids
            self._recent.move_to_end(key)
            while len(self._recent) > self.remember:
                self._recent.popitem(last=False)
            shared = min(shared, cache.length, len(cache.ids))
            if shared < self.min_tokens or not np.array_equal(ids[:shared], cache.ids[:shared]):
                return
            if any(common_length(ids, head.ids) >= shared for head in self._heads.values()):
                return
            assert cache.buffer is not None
            head = Head(ids[:shared].copy(), cache.buffer[:, :, :, :shared].clone())
            if head.nbytes > self.max_bytes:
                return
            for old in [k for k, h in self._heads.items() if common_length(head.ids, h.ids) == h.ids.size]:
                self.nbytes -= self._heads.pop(old).nbytes  # a shorter head of this one: this one serves its prompts
            self._heads[head.ids.tobytes()] = head
            self.nbytes += head.nbytes
            self.stats.heads_kept += 1
            while self.nbytes > self.max_bytes:
                _, dropped = self._heads.popitem(last=False)
                self.nbytes -= dropped.nbytes
