"""The public API's edge: `GenerateRequest` -> a validated dataclass, and the loop's results -> protobuf.

Why it exists: the servicer (`orchestrator.servicer`) is the only code that sees protobuf, and this is the
part of it that converts; every refusal here is a ValueError naming the field, which the error boundary
turns into INVALID_ARGUMENT. Limits on a request, each refused that way: exactly one of prompt /
prompt_token_ids; the prompt's characters or token ids; token ids inside the vocabulary; sampling (finite
temperature >= 0, top_k <= vocabulary, top_p in (0, 1]); K <= the maximum; max_new_tokens >= 1, <= the
server's limit and below the context length (a prompt that leaves less room than max_new_tokens ends with
FINISH_REASON_CONTEXT_LENGTH instead); the number and length of stop strings.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from orchestrator.config import OrchestratorConfig
from orchestrator.generation import FinishReason, GenerationStats
from specdec.proto import sampling_from_pb
from specdec.sampling_params import SamplingParams
from specdec.v1 import generation_pb2

FINISH_TO_PB = {
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: generation_pb2.FINISH_REASON_EOS,
    FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    FinishReason.CONTEXT_LENGTH: generation_pb2.FINISH_REASON_CONTEXT_LENGTH,
}



@dataclass(frozen=True)
class Limits:
    """What a request may ask for, and the defaults of what it leaves unset."""

    vocab_size: int
    context_length: int | None  # None = unknown/unbounded
    default_num_draft_tokens: int | None  # None = auto
    max_num_draft_tokens: int
    default_max_new_tokens: int
    max_new_tokens_limit: int
    max_prompt_chars: int
    max_stop_strings: int
    max_stop_chars: int


@dataclass(frozen=True)
class ValidatedRequest:
    """A GenerateRequest that passed validation (before tokenization)."""

    prompt: str  # "" when prompt_token_ids is given
    prompt_token_ids: tuple[int, ...]  # () when prompt is given
    params: SamplingParams
    seed: int
    max_new_tokens: int
    num_draft_tokens: int | None  # None = auto
    stop: tuple[str, ...]
    drafter: str = ""
    reproducible: bool = False


def request_from_pb(request: generation_pb2.GenerateRequest, limits: Limits) -> ValidatedRequest:
    """Validate a GenerateRequest; ValueError with the offending field's name on any refusal."""
    has_text, has_ids = bool(request.prompt), len(request.prompt_token_ids) > 0
    if has_text == has_ids:
        which = "both were given" if has_text else "neither was given"
        raise ValueError(f"prompt: exactly one of prompt and prompt_token_ids must be non-empty ({which})")
    if len(request.prompt) > limits.max_prompt_chars:
        raise ValueError(f"prompt: {len(request.prompt)} characters exceed the limit of {limits.max_prompt_chars}")
    ids = tuple(request.prompt_token_ids)
    if len(ids) > limits.max_prompt_chars:
        raise ValueError(f"prompt_token_ids: {len(ids)} tokens exceed the limit of {limits.max_prompt_chars}")
    for i, token in enumerate(ids):
        if not 0 <= token < limits.vocab_size:
            raise ValueError(
                f"prompt_token_ids[{i}]: token id {token} is outside the vocabulary [0, {limits.vocab_size})"
            )
    params = sampling_from_pb(request.sampling)
    try:
        params.validate_for_vocab(limits.vocab_size)
    except ValueError as exc:
        raise ValueError(f"sampling.{exc}") from None

    num_draft_tokens = (
        request.num_draft_tokens if request.HasField("num_draft_tokens") else limits.default_num_draft_tokens
    )
    if num_draft_tokens is not None and num_draft_tokens > limits.max_num_draft_tokens:
        raise ValueError(f"num_draft_tokens: must be <= {limits.max_num_draft_tokens}, got {num_draft_tokens}")
    max_new_tokens = request.max_new_tokens if request.HasField("max_new_tokens") else limits.default_max_new_tokens
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1 (leave it unset for the default), got {max_new_tokens}")
    if max_new_tokens > limits.max_new_tokens_limit:
        raise ValueError(f"max_new_tokens: must be <= {limits.max_new_tokens_limit}, got {max_new_tokens}")
    context = limits.context_length
    if context is not None and max_new_tokens >= context:
        if request.HasField("max_new_tokens"):
            raise ValueError(
                f"max_new_tokens: {max_new_tokens} does not fit in the context length of {context} tokens "
                f"(prompt + output); must be <= {context - 1}"
            )
        max_new_tokens = context - 1  # the server's default, fitted to a small context

    stop = tuple(request.stop)
    if len(stop) > limits.max_stop_strings:
        raise ValueError(f"stop: at most {limits.max_stop_strings} stop strings, got {len(stop)}")
    for i, text in enumerate(stop):
        if not text:
            raise ValueError(f"stop[{i}]: must not be empty")
        if len(text) > limits.max_stop_chars:
            raise ValueError(f"stop[{i}]: {len(text)} characters exceed the limit of {limits.max_stop_chars}")

    if len(request.drafter) > 64:
        raise ValueError(f"drafter: {len(request.drafter)} characters, longer than any drafter's name")
    seeded = request.sampling.HasField("seed")
    seed = request.sampling.seed if seeded else secrets.randbits(64)
    reproducible = request.reproducible if request.HasField("reproducible") else seeded
    return ValidatedRequest(
        request.prompt, ids, params, seed, max_new_tokens, num_draft_tokens, stop, request.drafter, reproducible
    )


def stats_to_pb(stats: GenerationStats) -> generation_pb2.GenerationStats:
    return generation_pb2.GenerationStats(
        rounds=stats.rounds,
        drafted_tokens=stats.drafted_tokens,
        accepted_tokens=stats.accepted_tokens,
        acceptance_rate=stats.acceptance_rate,
        accepted_per_position=stats.accepted_per_position,
        draft_time_ms=stats.draft_time_s * 1e3,
        target_time_ms=stats.target_time_s * 1e3,
        orchestrator_time_ms=stats.orchestrator_time_s * 1e3,
        prompt_tokens=stats.prompt_tokens,
        emitted_tokens=stats.emitted_tokens,
        num_draft_tokens=stats.num_draft_tokens,
        draft_fallback_rounds=stats.draft_fallback_rounds,
        target_reprefills=stats.target_reprefills,
        total_time_ms=stats.total_time_s * 1e3,
        auto_num_draft_tokens=stats.auto_num_draft_tokens,
        rounds_by_k=stats.rounds_by_k,
        speculation_off_rounds=stats.speculation_off_rounds,
        probe_rounds=stats.probe_rounds,
        decoded_rounds=stats.decoded_rounds,
        decoded_tokens=stats.decoded_tokens,
        drafter=stats.drafter,
        seed=stats.seed,
        reproducible=stats.reproducible,
    )


def limits_from(config: OrchestratorConfig, vocab_size: int, context_length: int | None) -> Limits:
    """The request limits a server with ``config`` enforces."""
    return Limits(
        vocab_size=vocab_size,
        context_length=context_length,
        default_num_draft_tokens=config.default_k,
        max_num_draft_tokens=config.max_num_draft_tokens,
        default_max_new_tokens=config.default_max_new_tokens,
        max_new_tokens_limit=config.max_new_tokens_limit,
        max_prompt_chars=config.max_prompt_chars,
        max_stop_strings=config.max_stop_strings,
        max_stop_chars=config.max_stop_chars,
    )

