"""What a generation is made of: the request the loop runs, the rounds it yields, the statistics it keeps.

Why it exists: the speculative loop (`orchestrator.loop`), the servicer, the metrics and the tests all
speak these types; keeping them apart from the loop keeps the loop file about the loop. No grpc, protobuf
or transport code here (docs/architecture.md, "The orchestrator").
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from specdec.sampling_params import SamplingParams


class FinishReason(enum.Enum):
    """Why a generation ended."""

    LENGTH = "length"  # max_new_tokens generated
    EOS = "eos"  # the target emitted the end-of-sequence token (not part of the output)
    STOP = "stop"  # a stop string appeared (decided by the text layer, not by the loop)
    CONTEXT_LENGTH = "context_length"  # prompt + output filled the model's context


@dataclass(frozen=True)
class GenerationRequest:
    """A generation request in tokens, validated where it entered (`orchestrator.convert`): trusted here."""

    prompt_token_ids: tuple[int, ...]  # non-empty
    params: SamplingParams
    seed: int  # 64-bit: every random draw of the generation derives from (seed, position) (specdec.noise)
    max_new_tokens: int  # >= 1
    num_draft_tokens: int | None  # a fixed K >= 0 (0 = target-only), or None: chosen per round (auto)
    drafter: str = ""  # the draft service's drafter to use; "" = its default
    reproducible: bool = False  # the coupled mode: the text is the target-only sample for the seed, whatever K
    eos_token_id: int | None = None
    context_length: int | None = None  # prompt + output at most; None = unbounded
    deadline: float | None = None  # time.monotonic() by which the generation must be done; None = none


@dataclass
class GenerationStats:
    """Per-generation statistics, accumulated in place while the loop runs (times in seconds)."""

    num_draft_tokens: int = 0  # the fixed K, or under auto the largest K the policy may choose
    auto_num_draft_tokens: bool = False  # K was chosen per round
    drafter: str = ""  # the drafter asked for ("" = the draft service's default)
    seed: int = 0  # the seed the generation ran with (the request's, or a random one)
    reproducible: bool = False  # the coupled mode ran: the seed reproduces the text whatever K
    prompt_tokens: int = 0
    rounds: int = 0
    rounds_by_k: list[int] = field(default_factory=list)  # element k counts the rounds run with K = k asked
    speculation_off_rounds: int = 0  # rounds the policy ran target-only because drafting did not pay
    probe_rounds: int = 0  # rounds the policy drafted while speculation was off, to see whether it pays again
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # rounds accepting draft position i+1
    emitted_tokens: int = 0  # accepted + one per scored round + decoded, before truncation at eos / the limit
    decoded_rounds: int = 0  # target-only rounds the target decoded on its own (several tokens per request)
    decoded_tokens: int = 0  # the tokens they emitted
    draft_fallback_rounds: int = 0  # rounds that wanted drafts but ran target-only
    draft_fallback_reason: str = ""  # why the first of them did: "error" | "timeout" | "breaker_open" | "no_draft"
    target_reprefills: int = 0
    sequence_id: int = 0  # the generation's (first) sequence id, as in the logs
    draft_time_s: float = 0.0
    target_time_s: float = 0.0
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None  # when the last round ended (the caches' release runs after it)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def total_time_s(self) -> float:
        end = self.finished_at if self.finished_at is not None else time.monotonic()
        return end - self.started_at

    @property
    def orchestrator_time_s(self) -> float:
        return max(0.0, self.total_time_s - self.draft_time_s - self.target_time_s)


@dataclass(frozen=True)
class Round:
    """What one round adds to the output."""

    token_ids: list[int]  # emitted tokens, without the eos token and anything past the length limit
    num_draft_tokens: int  # K asked of the draft this round (0 = target-only)
    accepted: int  # drafts accepted this round
    finish_reason: FinishReason | None  # set on the last round only
    stats: GenerationStats  # the generation's live statistics
    draft_fallback: bool = False  # the round wanted drafts but ran target-only
    proposed: int = 0  # drafts the draft proposed (<= K; a lookup drafter may propose fewer)
    speculation_off: bool = False  # the policy chose K = 0 because drafting did not pay
    probe: bool = False  # the policy drafted to see whether drafting pays again
    seconds: float = 0.0  # wall time of the round
    draft_s: float = 0.0  # of which waiting on the draft
    target_s: float = 0.0  # of which waiting on the target


@dataclass(frozen=True)
class LoopSettings:
    """How the loop reacts to slow or failing dependencies."""

    draft_round_timeout_s: float = 0.0  # a slower draft round falls back to target-only; 0 = no limit
    target_steps: int = 1  # tokens the target decodes on its own in a round without drafts (1 = scored rounds)
    target_lookup: int = 0  # draft tokens each forward of such a decode may verify (specdec.lookup); 0 = none
    max_target_reprefills: int = 2  # lost target caches re-sent per generation before failing UNAVAILABLE
    max_draft_reprefills: int = 1  # draft prefixes re-sent per generation (a lost cache, a move) before falling back
    breaker_failures: int = 3  # consecutive draft failures that open the circuit breaker; 0 = never
    breaker_cooldown_s: float = 10.0  # how long an open breaker skips the draft before one trial round
