"""`TargetClient` over Triton: one shared ``tritonclient.grpc.aio`` client, one ``stream_infer`` per generation.

Thin by design: it builds the tensors of the contract in ``target_service.wire`` (INPUT_IDS, KEEP_LENGTH,
NUM_LOGITS -> LOGITS; sequence id = Triton correlation id, START on the first request, END on the release),
and maps Triton's errors onto ``orchestrator.clients`` exceptions. On a stream, Triton reports an error as
a response carrying only a message (no status code), so errors are classified by message via
``wire.classify_error``: "no cache" or Triton's "must specify the START flag" = cache lost, "capacity:" =
at capacity.

Closing sends the release request (no tokens, NUM_LOGITS 0, END) on the stream; if the stream is already
dead (cancelled by a deadline, Triton restarted) it sends it as a unary request instead, best effort.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import numpy as np
import torch
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from orchestrator.clients import (
    DeadlineExceeded,
    TargetCacheLost,
    TargetCapacityExhausted,
    TargetError,
    TargetUnavailable,
)
from target_service import wire

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 2.0


def _int32_input(name: str, values: np.ndarray) -> InferInput:
    tensor = InferInput(name, list(values.shape), "INT32")
    tensor.set_data_from_numpy(values.astype(np.int32, copy=False))
    return tensor


def _inputs(keep_length: int, token_ids: Sequence[int], num_logits: int) -> list[InferInput]:
    return [
        _int32_input(wire.INPUT_IDS, np.asarray(token_ids, dtype=np.int32).reshape(1, -1)),  # [1, T]
        _int32_input(wire.KEEP_LENGTH, np.array([[keep_length]], dtype=np.int32)),  # [1, 1]
        _int32_input(wire.NUM_LOGITS, np.array([[num_logits]], dtype=np.int32)),  # [1, 1]
    ]


def _server_error(exc: InferenceServerException) -> TargetError:
    message = exc.message() or str(exc)
    kind = wire.classify_error(exc.status(), message)
    text = f"target: {message}"
    if kind is wire.TargetError.SEQUENCE_LOST:
        return TargetCacheLost(text)
    if kind is wire.TargetError.CAPACITY:
        return TargetCapacityExhausted(text)
    if kind is wire.TargetError.UNAVAILABLE:
        return TargetUnavailable(text)
    return TargetError(text)


def _rpc_error(exc: grpc.aio.AioRpcError) -> Exception:
    text = f"target stream {exc.code().name}: {exc.details()}"
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(text)
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return TargetCapacityExhausted(text)
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return TargetUnavailable(text)
    return TargetError(text)


class TritonTargetSession:
    """One ``ModelStreamInfer`` stream (one Triton sequence)."""

    def __init__(self, client: InferenceServerClient, model: str, sequence_id: int) -> None:
        self._client = client
        self._model = model
        self._sequence_id = sequence_id
        self._requests: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._responses = client.stream_infer(self._request_iterator())
        self._started = False  # a request went out: Triton knows the sequence
        self._broken = False  # the stream cannot carry more requests
        self._closed = False

    async def _request_iterator(self) -> AsyncIterator[dict[str, Any]]:
        while (request := await self._requests.get()) is not None:
            yield request

    def _send(self, keep_length: int, token_ids: Sequence[int], num_logits: int, *, end: bool = False) -> None:
        self._requests.put_nowait(
            {
                "model_name": self._model,
                "inputs": _inputs(keep_length, token_ids, num_logits),
                "outputs": [InferRequestedOutput(wire.LOGITS)],
                "sequence_id": self._sequence_id,
                "sequence_start": not self._started,
                "sequence_end": end,
            }
        )
        self._started = True

    async def _receive(self) -> InferResult:
        try:
            result, error = await self._responses.__anext__()
        except StopAsyncIteration:
            self._broken = True
            raise TargetUnavailable("Triton ended the stream") from None
        except grpc.aio.AioRpcError as exc:
            self._broken = True
            raise _rpc_error(exc) from None
        except BaseException:  # cancelled while waiting: grpc cancels the whole call
            self._broken = True
            raise
        if error is not None:
            raise _server_error(error)
        return result

    async def score(self, keep_length: int, append_token_ids: Sequence[int], num_logits: int) -> torch.Tensor:
        if self._broken or self._closed:
            raise TargetUnavailable("the target stream is closed")
        self._send(keep_length, append_token_ids, num_logits)
        result = await self._receive()
        logits = result.as_numpy(wire.LOGITS)  # [1, num_logits, V] float32, a view of the response
        if logits is None or logits.ndim != 3 or logits.shape[0] != 1:
            raise TargetError(f"target returned LOGITS {None if logits is None else logits.shape}, expected [1, N, V]")
        return torch.from_numpy(np.array(logits[0], dtype=np.float32))  # [num_logits, V], a writable copy

    async def close(self) -> None:
        """Release the sequence (END with no tokens) and end the stream; never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._started and not self._broken:
                self._send(0, [], 0, end=True)
                self._requests.put_nowait(None)
                await asyncio.wait_for(self._drain(), _CLOSE_TIMEOUT_S)
            elif self._started:
                await self._client.infer(
                    self._model,
                    _inputs(0, [], 0),
                    sequence_id=self._sequence_id,
                    sequence_end=True,
                    client_timeout=_CLOSE_TIMEOUT_S,
                )
            else:
                self._requests.put_nowait(None)
        except (Exception, asyncio.TimeoutError) as exc:  # noqa: BLE001 - best effort; Triton's TTL is the backstop
            log.debug("releasing target sequence %d failed: %r", self._sequence_id, exc)
        finally:
            self._responses.cancel()

    async def _drain(self) -> None:
        """Read until the stream ends, logging an error the release may have got."""
        async for _result, error in self._responses:
            if error is not None:
                log.debug("target release of sequence %d: %s", self._sequence_id, error)


class TritonTargetClient:
    """The target on Triton over one shared aio client (one gRPC channel)."""

    def __init__(self, url: str, model: str = wire.MODEL_NAME) -> None:
        self._client = InferenceServerClient(url)
        self._model = model

    async def open(self, sequence_id: int, *, timeout: float | None = None) -> TritonTargetSession:
        """``timeout`` is not set on the stream: the loop bounds each call, so the stream outlives a missed
        deadline long enough to carry the release."""
        return TritonTargetSession(self._client, self._model, sequence_id)

    async def close(self) -> None:
        await self._client.close()
