"""specdec.v1.DraftService over grpc.aio: protobuf <-> dataclasses at the edge, the model off the event loop.

Why it exists: it is the only place that sees protobuf types. Each RPC converts its request into the
drafter's dataclasses, runs the model in the server's single model worker (one forward at a time, so the
event loop keeps answering health checks and GetStats while a round runs), and converts the result back.
Errors go through one table (``ERROR_TABLE``) via ``specdec.grpc_server.error_boundary``.

A Propose stream owns its sequence: every request must carry the stream's sequence_id, a second open
stream on the same id is refused, and the cache is released however the stream ends (completion, client
cancel, deadline, error, server shutdown).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from draft_service.drafter import Drafter, Proposal, ProposeRound
from draft_service.metrics import DraftMetrics
from specdec import sampling
from specdec.engine import CapacityError, SequenceNotFoundError
from specdec.grpc_server import ErrorTable, error_boundary
from specdec.logs import SequenceLogger, tag_sequence
from specdec.rows import encode_rows
from specdec.v1 import draft_pb2, draft_pb2_grpc, sampling_pb2

log = logging.getLogger(__name__)

ERROR_TABLE: ErrorTable = (
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (SequenceNotFoundError, grpc.StatusCode.NOT_FOUND),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
)

T = TypeVar("T")


def sampling_from_pb(pb: sampling_pb2.SamplingParams) -> sampling.SamplingParams:
    """Unset temperature/top_p mean 1.0, top_k 0 means off; the seed field is not used by the draft."""
    try:
        return sampling.SamplingParams(
            temperature=pb.temperature if pb.HasField("temperature") else 1.0,
            top_k=pb.top_k,
            top_p=pb.top_p if pb.HasField("top_p") else 1.0,
        )
    except ValueError as exc:
        raise ValueError(f"sampling: {exc}") from None


def round_from_pb(pb: draft_pb2.ProposeRequest) -> ProposeRound:
    return ProposeRound(
        sequence_id=pb.sequence_id,
        keep_length=pb.keep_length,
        append_token_ids=tuple(pb.append_token_ids),
        num_draft_tokens=pb.num_draft_tokens,
        sampling=sampling_from_pb(pb.sampling),
        seed=pb.seed,
    )


def proposal_to_pb(proposal: Proposal) -> draft_pb2.ProposeResponse:
    q_probs, q_index = (b"", b"") if proposal.q_probs is None else encode_rows(proposal.q_probs)
    return draft_pb2.ProposeResponse(
        draft_token_ids=proposal.draft_token_ids,
        q_probs=q_probs,
        q_index=q_index,
        vocab_size=proposal.vocab_size,
        cache_length=proposal.cache_length,
    )


def _status_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return next((code for exc_type, code in ERROR_TABLE if isinstance(exc, exc_type)), grpc.StatusCode.INTERNAL)


def _counted(method: Callable) -> Callable:
    """Count every call by the status ERROR_TABLE gives its outcome (applied inside error_boundary)."""

    @functools.wraps(method)
    async def wrapper(self: DraftServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            result = await method(self, request, context)
        except grpc.aio.AbortError:
            self._metrics.count_request(method.__name__, context.code() or grpc.StatusCode.UNKNOWN)
            raise
        except BaseException as exc:
            self._metrics.count_request(method.__name__, _status_of(exc))
            raise
        self._metrics.count_request(method.__name__, grpc.StatusCode.OK)
        return result

    return wrapper


class DraftServicer(draft_pb2_grpc.DraftServiceServicer):
    """The DraftService RPCs over a Drafter whose model steps run in ``executor`` (one worker)."""

    def __init__(self, drafter: Drafter, executor: Executor, metrics: DraftMetrics) -> None:
        self._drafter = drafter
        self._executor = executor
        self._metrics = metrics
        self._streaming: set[int] = set()  # sequence ids owned by an open Propose stream

    @error_boundary(ERROR_TABLE, log)
    @_counted
    async def Propose(
        self, request_iterator: AsyncIterator[draft_pb2.ProposeRequest], context: grpc.aio.ServicerContext
    ) -> None:
        sequence_id: int | None = None
        self._metrics.open_streams.inc()
        try:
            async for request in request_iterator:
                round_ = round_from_pb(request)
                if sequence_id is None:
                    self._claim(round_.sequence_id)
                    sequence_id = round_.sequence_id
                elif round_.sequence_id != sequence_id:
                    raise ValueError(
                        f"sequence_id must be the same on every request of a stream: "
                        f"this stream is {sequence_id}, got {round_.sequence_id}"
                    )
                response, seconds = await self._in_worker(self._propose, round_)
                self._metrics.observe_round(
                    seconds, round_.num_draft_tokens, len(response.q_probs) + len(response.q_index)
                )
                await context.write(response)
        except BaseException as exc:
            tag_sequence(exc, sequence_id)  # the error boundary's line names the sequence
            raise
        finally:
            self._metrics.open_streams.dec()
            if sequence_id is not None:
                self._streaming.discard(sequence_id)
                if self._drafter.release(sequence_id):
                    SequenceLogger(log, sequence_id).debug("the Propose stream ended: cache released")

    @error_boundary(ERROR_TABLE, log)
    @_counted
    async def Release(
        self, request: draft_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> draft_pb2.ReleaseResponse:
        if request.sequence_id == 0:
            raise ValueError("sequence_id must be non-zero")
        return draft_pb2.ReleaseResponse(released=self._drafter.release(request.sequence_id))

    @error_boundary(ERROR_TABLE, log)
    @_counted
    async def GetStats(
        self, request: draft_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> draft_pb2.GetStatsResponse:
        stats = self._drafter.stats()
        return draft_pb2.GetStatsResponse(
            live_sequences=stats.live_sequences, max_sequences=stats.max_sequences, vocab_size=stats.vocab_size
        )

    def _claim(self, sequence_id: int) -> None:
        if sequence_id == 0:
            raise ValueError("sequence_id must be non-zero")
        if sequence_id in self._streaming:
            raise ValueError(f"sequence_id {sequence_id} is already used by another open Propose stream")
        self._streaming.add(sequence_id)

    def _propose(self, round_: ProposeRound) -> tuple[draft_pb2.ProposeResponse, float]:
        """Runs in the model worker: the round and the encoding of q (up to K*V*4 bytes)."""
        start = time.perf_counter()
        response = proposal_to_pb(self._drafter.propose(round_))
        return response, time.perf_counter() - start

    async def _in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
