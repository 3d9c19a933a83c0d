"""How logits become a sampling distribution: the settings shared by every part, free of torch.

Why it exists: the settings cross every boundary (the public API, the draft protocol, Triton's tensors)
and are validated once where they enter a process. Keeping the dataclass apart from the sampler lets the
protobuf and tensor conversions (`specdec.proto`, `specdec.target_contract`) import it without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SamplingParams"]


def _is_real_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How logits become a sampling distribution; applied identically to p (target) and q (draft).

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens; 0 disables.
    top_p: nucleus sampling threshold in (0, 1]; 1 disables.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t = self.temperature
        if not _is_real_number(t):
            raise ValueError(f"temperature must be a number, got {t!r}")
        if math.isnan(t) or math.isinf(t):
            raise ValueError(f"temperature must be finite, got {t!r}")
        if t < 0:
            raise ValueError(f"temperature must be >= 0, got {t!r}")
        k = self.top_k
        if not isinstance(k, int) or isinstance(k, bool):
            raise ValueError(f"top_k must be an integer, got {k!r}")
        if k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {k!r}")
        tp = self.top_p
        if not _is_real_number(tp):
            raise ValueError(f"top_p must be a number, got {tp!r}")
        if math.isnan(tp) or not 0 < tp <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {tp!r}")

    @property
    def greedy(self) -> bool:
        """True when temperature is 0: decoding is argmax and sampling is deterministic."""
        return self.temperature == 0

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if these parameters cannot apply to a vocabulary of `vocab_size` tokens."""
        if vocab_size < 1:
            raise ValueError(f"vocab size must be >= 1, got {vocab_size}")
        if self.top_k > vocab_size:
            raise ValueError(f"top_k must be <= vocab size {vocab_size}, got {self.top_k}")
