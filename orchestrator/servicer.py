"""``specdec.v1.GenerationService``: the thin edge between protobuf and the speculative loop.

Each request is validated into a dataclass (`orchestrator.convert`: every refusal is a ValueError naming
the field, which the error boundary turns into INVALID_ARGUMENT), the prompt is tokenized with the target's
tokenizer, the loop runs, and its rounds become text through ``orchestrator.text``. Nothing below this file
sees protobuf. Generate and GenerateStream share one path (`GenerationServicer.chunks`), so the streamed
chunks always concatenate to the unary text. A message larger than the server's ``max_request_bytes``
(1 MiB by default; every valid request is far smaller) never reaches this file: gRPC itself answers
RESOURCE_EXHAUSTED "Received message larger than max".

Every generation ends with one log line ``sequence_id=<id> finished outcome=...`` and feeds the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import grpc

from orchestrator.catalog import DrafterCatalog
from orchestrator.clients import (
    DeadlineExceeded,
    DraftError,
    TargetCacheLost,
    TargetCapacityExhausted,
    TargetUnavailable,
)
from orchestrator.convert import FINISH_TO_PB, Limits, ValidatedRequest, request_from_pb, stats_to_pb
from orchestrator.generation import FinishReason, GenerationRequest, GenerationStats
from orchestrator.loop import SpeculativeLoop
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.text import Decoder, TextDelta, TextStream
from specdec.grpc_server import ErrorTable, error_boundary
from specdec.logs import SequenceLogger, tag_sequence
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


class Tokenizer(Decoder, Protocol):
    """What we need of the target's Hugging Face tokenizer."""

    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Chunk:
    """One piece of output: a round's text and tokens; the last one carries finish reason and stats."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stats: GenerationStats | None = None


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


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Generate / GenerateStream over a `SpeculativeLoop`."""

    def __init__(
        self,
        loop: SpeculativeLoop,
        tokenizer: Tokenizer,
        limits: Limits,
        metrics: OrchestratorMetrics | None = None,
        catalog: DrafterCatalog | None = None,
    ) -> None:
        self._loop = loop
        self._catalog = catalog or DrafterCatalog(loop.draft)
        self._tokenizer = tokenizer  # decoding, on the event loop thread only
        self._encoder = PromptEncoder(tokenizer)
        self._limits = limits
        self._metrics = metrics if metrics is not None else OrchestratorMetrics()

    def close(self) -> None:
        """Stop the tokenizer thread (after the server stopped)."""
        self._encoder.close()

    def observe_rpc(self, method: str, code: grpc.StatusCode) -> None:
        """Every RPC's final status (called by the error boundary)."""
        self._metrics.observe_request(method, code)

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
            finish_reason=FINISH_TO_PB[last.finish_reason] if last.finish_reason else 0,
            stats=stats_to_pb(last.stats) if last.stats else None,
        )

    @error_boundary(ERRORS, log)
    async def GenerateStream(  # noqa: N802 - gRPC method name
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        async with contextlib.aclosing(self.chunks(request, context.time_remaining())) as chunks:
            async for chunk in chunks:
                yield generation_pb2.GenerateStreamResponse(
                    text=chunk.text,
                    token_ids=chunk.token_ids,
                    finish_reason=FINISH_TO_PB[chunk.finish_reason] if chunk.finish_reason else 0,
                    stats=stats_to_pb(chunk.stats) if chunk.stats else None,
                )

    async def chunks(
        self, request: generation_pb2.GenerateRequest, time_remaining: float | None
    ) -> AsyncIterator[Chunk]:
        """Validate, tokenize, run the loop: one chunk per round, the last with finish reason and stats."""
        stats = GenerationStats()  # the clock starts before tokenization
        deadline = None if time_remaining is None else time.monotonic() + time_remaining
        validated = request_from_pb(request, self._limits)
        self._catalog.check(validated.drafter)
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
                "finished outcome=%s prompt_tokens=%d emitted=%d rounds=%d k=%s rounds_by_k=%s off_rounds=%d "
                "accepted=%d/%d fallback_rounds=%d fallback_reason=%s target_reprefills=%d ms=%.1f%s",
                outcome, stats.prompt_tokens, stats.emitted_tokens, stats.rounds,
                f"auto<={stats.num_draft_tokens}" if stats.auto_num_draft_tokens else stats.num_draft_tokens,
                stats.rounds_by_k, stats.speculation_off_rounds, stats.accepted_tokens, stats.drafted_tokens,
                stats.draft_fallback_rounds,
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
            drafter=request.drafter,
            reproducible=request.reproducible,
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
