"""What the benchmark compares: an *arm* is one system with one setting, and a *record* one generation by it.

Why this module exists: every phase (single stream, load, the suffix cache's two passes, the model draft)
times the same kinds of things — our stack with a drafter at a fixed K or auto, with or without the coupled
(reproducible) mode, and Hugging Face `generate` plain or with prompt lookup — and every table is computed
from the same flat records, so the arms and the records are defined once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPECDEC, HF = "specdec", "hf"
PROMPT_LOOKUP = "prompt-lookup"  # HF generate(prompt_lookup_num_tokens=K)


@dataclass(frozen=True)
class Arm:
    """One system and setting: specdec target-only (K = 0), specdec with a drafter at K (None = auto),
    HF plain generate (drafter "") or HF prompt lookup (drafter "prompt-lookup", K tokens)."""

    system: str
    drafter: str = ""
    k: int | None = 0
    coupled: bool = False  # specdec: the reproducible (coupled) mode instead of the modified rejection sampling

    def __post_init__(self) -> None:
        if self.system not in (SPECDEC, HF):
            raise ValueError(f"unknown system {self.system!r}")
        if self.system == HF and (self.coupled or self.k is None or (self.drafter == PROMPT_LOOKUP) != (self.k > 0)):
            raise ValueError(f"HF runs plain (K = 0) or prompt lookup with K > 0, not {self}")
        if self.system == SPECDEC and not self.drafter and self.k != 0:
            raise ValueError("specdec without a drafter is target-only (K = 0)")

    @property
    def auto(self) -> bool:
        return self.k is None

    @property
    def label(self) -> str:
        if self.system == HF:
            return "HF generate" if not self.k else f"HF prompt lookup {self.k}"
        if self.k == 0:
            return "target-only"
        return f"{self.drafter} {'auto' if self.k is None else f'K={self.k}'}{' coupled' if self.coupled else ''}"


TARGET_ONLY = Arm(SPECDEC)
HF_PLAIN = Arm(HF)


@dataclass(frozen=True)
class Record:
    """One measured generation (times in ms). HF records leave the stack's statistics at zero, except
    ``rounds`` (its target forwards)."""

    phase: str
    workload: str
    mode: str
    arm: str  # Arm.label
    item: int  # which prompt (and repeat) of the workload: records of one item are paired across arms
    wall_ms: float  # client wall time of the generation
    tokens: int  # generated tokens, counting an end-of-sequence token
    output_ids: tuple[int, ...] = ()
    concurrency: int = 1
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    off_rounds: int = 0  # auto: rounds with speculation off
    probe_rounds: int = 0
    rounds_by_k: tuple[int, ...] = ()
    draft_ms: float = 0.0  # the orchestrator waiting on the draft service
    target_ms: float = 0.0  # the orchestrator waiting on Triton
    orchestrator_ms: float = 0.0
    total_ms: float = 0.0  # the orchestrator's wall time for the generation
    fallback_rounds: int = 0
    reprefills: int = 0
    extra: dict[str, float] = field(default_factory=dict, compare=False)  # phase-specific figures (e.g. Triton time)
