"""`DraftClient` over gRPC: one shared channel, one bidirectional ``DraftService.Propose`` stream per generation.

Thin by design: it converts between `orchestrator.clients` types and ``specdec.v1`` messages and maps
gRPC statuses onto the clients' exceptions (NOT_FOUND -> DraftCacheLost; DEADLINE_EXCEEDED, which only the
caller's own deadline on the stream can cause, -> DeadlineExceeded; UNAVAILABLE -> DraftUnavailable, which
a replica pool (``orchestrator.pools``) takes as "this replica is gone"; anything else -> DraftError, so the
loop falls back to target-only rounds). Ending the stream releases the draft's cache, however it ends.

The stream's gRPC deadline is the caller's remaining time, so the draft service stops working for a
caller that is gone. The channel's reconnect backoff is capped at 1 s, so a draft service that is back is
used again as soon as the circuit breaker lets a trial round through. ``check_health`` asks the draft's
grpc.health.v1 service over the same channel (the pool's health checks). The channel is TLS when
``credentials`` are given (``specdec.tls``), plaintext otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.clients import DeadlineExceeded, DraftCacheLost, DraftError, DraftUnavailable
from specdec.logs import SequenceLogger
from specdec.proposal import Proposal
from specdec.proto import sampling_to_pb
from specdec.rows import decode_packed
from specdec.sampling import SamplingParams
from specdec.v1 import draft_pb2, draft_pb2_grpc

log = logging.getLogger(__name__)

_MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # dense q rows: K x V x 4 bytes (8 x 128k x 4 = 4 MiB for Llama 3)
_CLOSE_TIMEOUT_S = 1.0
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),  # gRPC's default grows to 120 s
]


def _to_error(exc: grpc.aio.AioRpcError) -> DraftError | DeadlineExceeded:
    message = f"draft service {exc.code().name}: {exc.details()}"
    if exc.code() == grpc.StatusCode.NOT_FOUND:
        return DraftCacheLost(message)
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(message)
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return DraftUnavailable(message)
    return DraftError(message)


class GrpcDraftSession:
    """One ``Propose`` stream (one sequence id)."""

    replica = ""  # a pool's session names its replica (orchestrator.pools)

    def __init__(self, call: grpc.aio.StreamStreamCall, sequence_id: int) -> None:
        self._call = call
        self._sequence_id = sequence_id
        self._log = SequenceLogger(log, sequence_id)
        self._closed = False

    async def propose(
        self,
        keep_length: int,
        append_token_ids: Sequence[int],
        num_draft_tokens: int,
        params: SamplingParams,
        seed: int,
        drafter: str = "",
        coupled: bool = False,
    ) -> Proposal:
        request = draft_pb2.ProposeRequest(
            sequence_id=self._sequence_id,
            keep_length=keep_length,
            append_token_ids=append_token_ids,
            num_draft_tokens=num_draft_tokens,
            sampling=sampling_to_pb(params),
            seed=seed,
            drafter=drafter,
            coupled=coupled,
        )
        try:
            await self._call.write(request)
            response = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise _to_error(exc) from None
        except asyncio.InvalidStateError as exc:  # the stream already ended
            raise DraftError(f"draft stream is closed: {exc}") from None
        if response is grpc.aio.EOF:
            raise DraftError("draft service ended the stream without answering")
        return _to_proposal(response)

    def can_move(self) -> bool:
        return False  # one draft service: nowhere else to go

    async def close(self) -> None:
        """Half-close and wait briefly for the server to finish (it releases the cache), else cancel."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._call.done():
                await asyncio.wait_for(self._call.done_writing(), _CLOSE_TIMEOUT_S)
                await asyncio.wait_for(self._call.code(), _CLOSE_TIMEOUT_S)
        except (asyncio.TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            self._log.debug("the draft stream did not end cleanly: %r", exc)
        finally:
            self._call.cancel()  # no-op once the RPC has finished


def _to_proposal(response: draft_pb2.ProposeResponse) -> Proposal:
    tokens = list(response.draft_token_ids)
    vocab = response.vocab_size
    if vocab and any(not 0 <= t < vocab for t in tokens):
        raise DraftError(f"draft returned token ids outside its vocabulary of {vocab}")
    q = None
    if response.q_probs or response.q_index:
        try:
            q = decode_packed(response.q_probs, response.q_index, len(tokens), vocab)  # [K, V], kept packed
        except ValueError as exc:
            raise DraftError(f"draft returned malformed q rows: {exc}") from None
    return Proposal(token_ids=tuple(tokens), q=q, cache_length=response.cache_length)


DRAFT_SERVICE = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name


class GrpcDraftClient:
    """The draft service over one shared aio channel (TLS with ``credentials``; ``options`` add channel
    arguments, e.g. ``grpc.ssl_target_name_override``)."""

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, str | int]] = (),
    ) -> None:
        self.address = address
        args = [*_CHANNEL_OPTIONS, *options]
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=args)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=args)
        self._stub = draft_pb2_grpc.DraftServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def check_health(self, timeout: float) -> None:
        """Return if the draft reports SERVING within ``timeout`` s, else raise DraftUnavailable saying why."""
        try:
            response = await self._health.Check(health_pb2.HealthCheckRequest(service=DRAFT_SERVICE), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise DraftUnavailable(f"draft at {self.address}: health check {exc.code().name}: {exc.details()}") from None
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            raise DraftUnavailable(f"draft at {self.address} reports {status}")

    async def open(self, sequence_id: int, *, timeout: float | None = None, avoid: str = "") -> GrpcDraftSession:
        """A ``Propose`` stream for sequence_id (``avoid`` means nothing to one draft service)."""
        return GrpcDraftSession(self._stub.Propose(timeout=timeout), sequence_id)

    async def drafters(self) -> tuple[str, ...]:
        try:
            stats = await self._stub.GetStats(draft_pb2.GetStatsRequest(), timeout=_CLOSE_TIMEOUT_S * 5)
        except grpc.aio.AioRpcError as exc:
            raise _to_error(exc) from None
        return tuple(stats.drafters)

    async def close(self) -> None:
        await self._channel.close()
