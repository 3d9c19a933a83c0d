"""``specdec.v1.GenerationService``: the thin edge between protobuf and the speculative loop.

Requests are validated into a dataclass here (every refusal is a ValueError naming the field, which the
error boundary turns into INVALID_ARGUMENT), the prompt is tokenized with the target's tokenizer, the loop
runs, and its rounds become text through ``orchestrator.text``. Nothing below this file sees protobuf.
Generate and GenerateStream share one path (`GenerationServicer.chunks`), so the streamed chunks always
concatenate to the unary text.

Limits on a request, each refused with INVALID_ARGUMENT naming the field (see `request_from_pb`): exactly
one of prompt / prompt_token_ids; the prompt's characters or token ids; token ids inside the vocabulary;
sampling (finite temperature >= 0, top_k <= vocabulary, top_p in (0, 1]); K <= the maximum; max_new_tokens
>= 1, <= the server's limit and below the context length (a prompt that leaves less room than
max_new_tokens ends with FINISH_REASON_CONTEXT_LENGTH instead); the number and length of stop strings.
A message larger than the server's ``max_request_bytes`` (1 MiB by default; every valid request is far
smaller) never reaches this file: gRPC itself answers RESOURCE_EXHAUSTED "Received message larger than max".

Every generation ends with one log line ``sequence_id=<id> finished outcome=...`` and feeds the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import inspect
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from orchestrator.clients import (
    DeadlineExceeded,
    DraftError,
    TargetCacheLost,
    TargetCapacityExhausted,
    TargetUnavailable,
)
from orchestrator.config import OrchestratorConfig
from orchestrator.loop import FinishReason, GenerationRequest, GenerationStats, SpeculativeLoop
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.text import Decoder, TextDelta, TextStream
from specdec.grpc_server import ErrorTable, error_boundary
from specdec.logs import SequenceLogger, tag_sequence
from specdec.sampling import SamplingParams
from specdec.v1 import generation_pb2, generation_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name

ERRORS: ErrorTable = (
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (asyncio.TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (TargetCapacityExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TargetUnavailable, grpc.StatusCode.UNAVAILABLE),
    (TargetCacheLost, grpc.StatusCode.UNAVAILABLE),
    (DraftError, grpc.StatusCode.UNAVAILABLE),
)

_FINISH_TO_PB = {
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: generation_pb2.FINISH_REASON_EOS,
    FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    FinishReason.CONTEXT_LENGTH: generation_pb2.FINISH_REASON_CONTEXT_LENGTH,
}


class Tokenizer(Decoder, Protocol):
    """What we need of the target's Hugging Face tokenizer."""

    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Limits:
    """What a request may ask for, and the defaults of what it leaves unset."""

    vocab_size: int
    context_length: int | None  # None = unknown/unbounded
    default_num_draft_tokens: int
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
    num_draft_tokens: int
    stop: tuple[str, ...]


@dataclass(frozen=True)
class Chunk:
    """One piece of output: a round's text and tokens; the last one carries finish reason and stats."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stats: GenerationStats | None = None


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
    params = _sampling_from_pb(request, limits.vocab_size)

    num_draft_tokens = (
        request.num_draft_tokens if request.HasField("num_draft_tokens") else limits.default_num_draft_tokens
    )
    if num_draft_tokens > limits.max_num_draft_tokens:
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

    seed = request.sampling.seed if request.sampling.HasField("seed") else secrets.randbits(64)
    return ValidatedRequest(request.prompt, ids, params, seed, max_new_tokens, num_draft_tokens, stop)


def _sampling_from_pb(request: generation_pb2.GenerateRequest, vocab_size: int) -> SamplingParams:
    sampling = request.sampling
    try:
        params = SamplingParams(
            temperature=float(sampling.temperature) if sampling.HasField("temperature") else 1.0,
            top_k=int(sampling.top_k),
            top_p=float(sampling.top_p) if sampling.HasField("top_p") else 1.0,
        )
        params.validate_for_vocab(vocab_size)
    except ValueError as exc:
        raise ValueError(f"sampling.{exc}") from None  # SamplingParams' messages start with the field name
    return params


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
    )


class PromptEncoder:
    """Tokenizes prompts off the event loop, on one thread, with its own copy of the tokenizer.

    A Hugging Face fast tokenizer must not be used from two threads at once ("RuntimeError: Already
    borrowed": encode reconfigures the shared Rust object), so the event loop keeps the original for
    decoding and this single worker thread owns a copy for encoding.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = copy.deepcopy(tokenizer)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specdec-tokenize")

    async def encode(self, text: str) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._tokenizer.encode, text)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _counted(method: Callable) -> Callable:
    """Count each RPC by its final status in ``self._metrics`` (applied outside the error boundary)."""
    name = method.__name__

    def status(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
        if exc is None:
            return grpc.StatusCode.OK
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # the caller left, or gRPC's deadline
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
        return context.code() or grpc.StatusCode.UNKNOWN  # set by the boundary's abort

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: GenerationServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            error: BaseException | None = None
            try:
                async for item in method(self, request, context):
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._metrics.observe_request(name, status(context, error))

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self: GenerationServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        error: BaseException | None = None
        try:
            return await method(self, request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._metrics.observe_request(name, status(context, error))

    return unary_wrapper


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Generate / GenerateStream over a `SpeculativeLoop`."""

    def __init__(
        self,
        loop: SpeculativeLoop,
        tokenizer: Tokenizer,
        limits: Limits,
        metrics: OrchestratorMetrics | None = None,
    ) -> None:
        self._loop = loop
        self._tokenizer = tokenizer  # decoding, on the event loop thread only
        self._encoder = PromptEncoder(tokenizer)
        self._limits = limits
        self._metrics = metrics if metrics is not None else OrchestratorMetrics()

    def close(self) -> None:
        """Stop the tokenizer thread (after the server stopped)."""
        self._encoder.close()

    @_counted
    @error_boundary(ERRORS, log)
    async def Generate(  # noqa: N802 - gRPC method name
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.GenerateResponse:
        texts: list[str] = []
        token_ids: list[int] = []
        last = Chunk("", [])
        async with contextlib.aclosing(self.chunks(request, context.time_remaining())) as chunks:
            async for last in chunks:
                texts.append(last.text)
                token_ids.extend(last.token_ids)
        return generation_pb2.GenerateResponse(
            text="".join(texts),
            token_ids=token_ids,
            finish_reason=_FINISH_TO_PB[last.finish_reason] if last.finish_reason else 0,
            stats=stats_to_pb(last.stats) if last.stats else None,
        )

    @_counted
    @error_boundary(ERRORS, log)
    async def GenerateStream(  # noqa: N802 - gRPC method name
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        async with contextlib.aclosing(self.chunks(request, context.time_remaining())) as chunks:
            async for chunk in chunks:
                yield generation_pb2.GenerateStreamResponse(
                    text=chunk.text,
                    token_ids=chunk.token_ids,
                    finish_reason=_FINISH_TO_PB[chunk.finish_reason] if chunk.finish_reason else 0,
                    stats=stats_to_pb(chunk.stats) if chunk.stats else None,
                )

    async def chunks(
        self, request: generation_pb2.GenerateRequest, time_remaining: float | None
    ) -> AsyncIterator[Chunk]:
        """Validate, tokenize, run the loop: one chunk per round, the last with finish reason and stats."""
        stats = GenerationStats()  # the clock starts before tokenization
        deadline = None if time_remaining is None else time.monotonic() + time_remaining
        validated = request_from_pb(request, self._limits)
        generation = await self._to_generation_request(validated, deadline)
        text = TextStream(self._tokenizer, validated.stop)
        last, finish = TextDelta("", [], False), FinishReason.LENGTH
        outcome, error = "error", ""
        metrics = self._metrics
        metrics.live_generations.inc()
        rounds = self._loop.generate(generation, stats)  # sets stats.sequence_id
        seq_log = SequenceLogger(log, stats.sequence_id)
        try:
            async with contextlib.aclosing(rounds):
                async for round_ in rounds:
                    metrics.observe_round(round_)
                    delta = text.push(round_.token_ids)
                    if delta.stopped or round_.finish_reason is not None:
                        last = delta
                        finish = FinishReason.STOP if delta.stopped else round_.finish_reason
                        break
                    yield Chunk(delta.text, delta.token_ids)
            # The loop is closed here: the stats are final and both caches' release is under way.
            tail = text.finish()
            if tail.stopped:
                finish = FinishReason.STOP
            outcome = finish.value
            yield Chunk(last.text + tail.text, last.token_ids, finish, stats)
        except GeneratorExit:  # closed by the consumer: after the last chunk, that is a normal end
            if outcome == "error":
                outcome = "cancelled"
            raise
        except BaseException as exc:
            outcome, error = _outcome_of(exc), f" error={type(exc).__name__}: {exc}"
            tag_sequence(exc, stats.sequence_id)  # the error boundary's line names the sequence too
            raise
        finally:
            metrics.live_generations.dec()
            metrics.observe_generation(outcome, stats)
            seq_log.info(
                "finished outcome=%s prompt_tokens=%d emitted=%d rounds=%d k=%d accepted=%d/%d fallback_rounds=%d "
                "fallback_reason=%s target_reprefills=%d ms=%.1f%s",
                outcome, stats.prompt_tokens, stats.emitted_tokens, stats.rounds, stats.num_draft_tokens,
                stats.accepted_tokens, stats.drafted_tokens, stats.draft_fallback_rounds,
                stats.draft_fallback_reason or "-", stats.target_reprefills, stats.total_time_s * 1e3, error,
            )  # fmt: skip

    async def _to_generation_request(self, request: ValidatedRequest, deadline: float | None) -> GenerationRequest:
        field_name = "prompt" if request.prompt else "prompt_token_ids"
        ids = request.prompt_token_ids
        if request.prompt:
            ids = tuple(await self._encoder.encode(request.prompt))
            if not ids:
                raise ValueError("prompt: the text tokenizes to no tokens")
        context_length = self._limits.context_length
        if context_length is not None and len(ids) >= context_length:
            raise ValueError(
                f"{field_name}: {len(ids)} prompt tokens leave no room for output "
                f"in the context length of {context_length}"
            )
        return GenerationRequest(
            prompt_token_ids=ids,
            params=request.params,
            seed=request.seed,
            max_new_tokens=request.max_new_tokens,
            num_draft_tokens=request.num_draft_tokens,
            eos_token_id=self._tokenizer.eos_token_id,
            context_length=context_length,
            deadline=deadline,
        )


def _outcome_of(exc: BaseException) -> str:
    """The ``outcome`` label of a generation that ended with ``exc``."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, (DeadlineExceeded, asyncio.TimeoutError)):
        return "deadline_exceeded"
    if isinstance(exc, (TargetUnavailable, TargetCacheLost)):
        return "target_unavailable"
    if isinstance(exc, TargetCapacityExhausted):
        return "target_capacity"
    return "error"


def limits_from(config: OrchestratorConfig, vocab_size: int, context_length: int | None) -> Limits:
    """The request limits a server with ``config`` enforces."""
    return Limits(
        vocab_size=vocab_size,
        context_length=context_length,
        default_num_draft_tokens=config.default_num_draft_tokens,
        max_num_draft_tokens=config.max_num_draft_tokens,
        default_max_new_tokens=config.default_max_new_tokens,
        max_new_tokens_limit=config.max_new_tokens_limit,
        max_prompt_chars=config.max_prompt_chars,
        max_stop_strings=config.max_stop_strings,
        max_stop_chars=config.max_stop_chars,
    )

