"""`TargetClient` over Triton: one shared ``tritonclient.grpc.aio`` client, one ``stream_infer`` per generation.

Thin by design: it builds the tensors of the contract in ``target_service.wire`` (INPUT_IDS, KEEP_LENGTH,
NUM_LOGITS and the sampling settings -> the warped rows PROBS + PROBS_INDEX, unpacked by ``specdec.rows``;
sequence id = Triton correlation id, START on the first request, END on the release),
and maps Triton's errors onto ``orchestrator.clients`` exceptions. On a stream, Triton reports an error as
a response carrying only a message (no status code), so errors are classified by message via
``wire.classify_error``: "no cache" or Triton's "must specify the START flag" = cache lost, "capacity:" =
at capacity.

Closing sends the release request (no tokens, NUM_LOGITS 0, END) on the stream, in order after every
request already sent on it, even when the caller gave up mid-request (cancelled, deadline): a caller that
gives up never cancels the stream (see `TritonTargetSession`). Only if the stream itself broke (Triton
restarted, the connection dropped) is the release sent as a unary request; if Triton no longer knows the
sequence ("must specify the START flag"), it is repeated with START + END, which also clears a cache the
model may still hold (never START + END on a sequence Triton knows: a "conflict" to Triton). A release is
never cut short by our own impatience: ``close`` waits for its answer for ``_CLOSE_TIMEOUT_S``, and a slower
answer (Triton busy) is awaited in the background for up to ``_RELEASE_TIMEOUT_S``; cancelling it would leave
the cache to the model's idle TTL. A release that fails is logged as a warning.

Reachability, so that a Triton that is down fails requests fast and a Triton that is back serves them at
once, with nothing restarted here:

* ``open`` waits for the shared channel to be READY for at most ``connect_timeout_s`` (a few seconds, not
  the caller's whole deadline), then raises TargetUnavailable "target (Triton at HOST:PORT) is
  unavailable: ...". Waiting (instead of failing while the channel sits in reconnect backoff) is what
  lets the first request after Triton's return succeed.
* The channel's reconnect backoff is capped at 1 s (gRPC's default grows to 120 s, which would keep the
  orchestrator failing for minutes after Triton is back).
* A stream that breaks under a live sequence (Triton restarted, the connection dropped) raises
  TargetConnectionLost, so the loop re-sends the prefix on a new stream, which waits as above.
* The caller's deadline goes to Triton as the stream's gRPC deadline, plus a margin that leaves room for
  the release request after the loop itself gave up at the deadline (the loop bounds every call by the
  deadline itself; the stream's deadline is Triton's bound if the orchestrator vanishes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, InferInput, InferRequestedOutput, InferResult
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from orchestrator.clients import (
    DeadlineExceeded,
    TargetCacheLost,
    TargetCapacityExhausted,
    TargetConnectionLost,
    TargetError,
    TargetUnavailable,
)
from specdec.logs import SequenceLogger
from specdec.rows import PackedRows
from specdec.sampling import SamplingParams
from target_service import wire

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 2.0  # how long close() waits for the release's answer before leaving it to the background
_RELEASE_TIMEOUT_S = 30.0  # how long a release may take at all
_STREAM_DEADLINE_MARGIN_S = _RELEASE_TIMEOUT_S  # the stream outlives the caller's deadline by this
DEFAULT_CONNECT_TIMEOUT_S = 3.0
# tritonclient's own defaults (message sizes) plus a short reconnect backoff; keepalive stays off, as in
# tritonclient: Triton's server refuses frequent pings, and a dead peer on a live host resets the connection.
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.min_reconnect_backoff_ms", 2000),  # gRPC also uses it as the shortest connect attempt
]


def _input(name: str, values: np.ndarray) -> InferInput:
    """An INT32 or FP32 input tensor, by the array's dtype."""
    tensor = InferInput(name, list(values.shape), "FP32" if values.dtype == np.float32 else "INT32")
    tensor.set_data_from_numpy(values)
    return tensor


def _inputs(
    keep_length: int, token_ids: Sequence[int], num_logits: int, params: SamplingParams | None
) -> list[InferInput]:
    inputs = [
        _input(wire.INPUT_IDS, np.asarray(token_ids, dtype=np.int32).reshape(1, -1)),  # [1, T]
        _input(wire.KEEP_LENGTH, np.array([[keep_length]], dtype=np.int32)),  # [1, 1]
        _input(wire.NUM_LOGITS, np.array([[num_logits]], dtype=np.int32)),  # [1, 1]
    ]
    if params is not None:  # the model returns the warped rows, packed
        inputs += [
            _input(wire.TEMPERATURE, np.array([[params.temperature]], dtype=np.float32)),
            _input(wire.TOP_K, np.array([[params.top_k]], dtype=np.int32)),
            _input(wire.TOP_P, np.array([[params.top_p]], dtype=np.float32)),
        ]
    return inputs


_PROBS_OUTPUTS = [wire.PROBS, wire.PROBS_INDEX]
_RELEASE_OUTPUTS = [wire.LOGITS]  # [1, 0, V]: a release asks for nothing, and LOGITS is the cheapest to name


def unavailable(url: str, why: str) -> TargetUnavailable:
    """The one wording of "Triton cannot serve this" that reaches the caller as UNAVAILABLE."""
    return TargetUnavailable(f"target (Triton at {url}) is unavailable: {why}")


def _server_error(exc: InferenceServerException, url: str) -> TargetError:
    message = exc.message() or str(exc)
    kind = wire.classify_error(exc.status(), message)
    text = f"target: {message}"
    if kind is wire.TargetError.SEQUENCE_LOST:
        return TargetCacheLost(text)
    if kind is wire.TargetError.CAPACITY:
        return TargetCapacityExhausted(text)
    if kind is wire.TargetError.UNAVAILABLE:
        return unavailable(url, message)
    return TargetError(text)


def _describe(exc: BaseException | None) -> str:
    """An exception for the log; tritonclient's InferenceServerException has an empty repr."""
    if exc is None:
        return "the stream ended"
    if isinstance(exc, InferenceServerException):
        return f"{exc.status() or 'stream error'}: {exc.message()}"
    return repr(exc)


def _rpc_error(exc: grpc.aio.AioRpcError, url: str) -> Exception:
    """The stream failed as a whole: map its gRPC status."""
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"target stream DEADLINE_EXCEEDED: {exc.details()}")
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return TargetCapacityExhausted(f"target stream RESOURCE_EXHAUSTED: {exc.details()}")
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return TargetConnectionLost(f"the stream to Triton at {url} broke: {exc.code().name}: {exc.details()}")
    return TargetError(f"target stream {exc.code().name}: {exc.details()}")


class TritonTargetSession:
    """One ``ModelStreamInfer`` stream (one Triton sequence).

    A reader task owns the stream's responses and queues them; ``score`` waits on that queue. So a caller
    that gives up (cancelled, deadline) never cancels the stream: a request already sent stays in order
    ahead of the release, which ``close`` sends on the same stream. (Cancelling the stream instead would
    race a still-unflushed START against a release sent on another call, and leak the cache it creates.)
    """

    def __init__(
        self,
        client: InferenceServerClient,
        model: str,
        sequence_id: int,
        *,
        url: str = "",
        stream_timeout: float | None = None,
        in_background: Callable[[Coroutine[Any, Any, None]], asyncio.Task] = asyncio.ensure_future,
    ) -> None:
        self._client = client
        self._model = model
        self._sequence_id = sequence_id
        self._url = url
        self._in_background = in_background
        self._log = SequenceLogger(log, sequence_id)
        self._requests: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._answers: asyncio.Queue[tuple[InferResult | None, Exception | None]] = asyncio.Queue()
        self._responses = client.stream_infer(self._request_iterator(), stream_timeout=stream_timeout)
        self._sent = 0  # requests handed to the stream
        self._answered = 0  # responses read from it
        self._last_error: Exception | None = None  # of the last response, or why the stream ended
        self._reader = in_background(self._read_responses())
        self._started = False  # a request went out: Triton knows (or will know) the sequence
        self._broken = False  # the stream cannot carry more requests
        self._out_of_step = False  # a caller gave up waiting: the next answer is not for the next request
        self._closed = False

    async def _request_iterator(self) -> AsyncIterator[dict[str, Any]]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def _read_responses(self) -> None:
        """Queue every (result, error) until the stream ends; the last item says why it ended."""
        ended: Exception
        try:
            async for result, error in self._responses:
                self._answered += 1
                self._last_error = None if error is None else _server_error(error, self._url)
                self._answers.put_nowait((result, self._last_error))
            ended = TargetConnectionLost(f"Triton at {self._url} ended the stream")
        except grpc.aio.AioRpcError as exc:
            ended = _rpc_error(exc, self._url)
            self._last_error = ended
        except asyncio.CancelledError:
            ended = TargetConnectionLost("the target stream was cancelled")
            self._last_error = ended
        except Exception as exc:  # noqa: BLE001 - whatever ends the stream, say so to the waiting caller
            ended = TargetError(f"reading the target stream failed: {exc!r}")
            self._last_error = ended
        self._answers.put_nowait((None, ended))

    def _send(
        self, keep_length: int, token_ids: Sequence[int], num_logits: int, params: SamplingParams | None
    ) -> None:
        end = params is None  # every request but the release carries sampling settings
        self._requests.put_nowait(
            {
                "model_name": self._model,
                "inputs": _inputs(keep_length, token_ids, num_logits, params),
                "outputs": [InferRequestedOutput(name) for name in (_RELEASE_OUTPUTS if end else _PROBS_OUTPUTS)],
                "sequence_id": self._sequence_id,
                "sequence_start": not self._started,
                "sequence_end": end,
            }
        )
        self._started = True
        self._sent += 1

    async def score(
        self, keep_length: int, append_token_ids: Sequence[int], num_logits: int, params: SamplingParams
    ) -> PackedRows:
        if self._broken or self._closed or self._out_of_step:
            raise TargetConnectionLost("the target stream is closed")
        self._send(keep_length, append_token_ids, num_logits, params)
        try:
            result, error = await self._answers.get()
        except BaseException:  # the caller gave up (cancelled, deadline): its answer will come unread
            self._out_of_step = True
            raise
        if result is None:  # the stream ended
            self._broken = True
        if error is not None:
            raise error
        assert result is not None
        values, index = result.as_numpy(wire.PROBS), result.as_numpy(wire.PROBS_INDEX)  # [1, N, M], [1, N, M | 0]
        if values is None or index is None or values.ndim != 3 or index.ndim != 3 or values.shape[0] != 1:
            shapes = [None if a is None else list(a.shape) for a in (values, index)]
            raise TargetError(f"target returned PROBS, PROBS_INDEX of shapes {shapes}, expected [1, N, M] each")
        # Packed rows say nothing of V: call them just wide enough for every token they hold (a token beyond
        # a row's width has probability 0, which leaves the sampler exact).
        width = values.shape[-1] if index.shape[-1] == 0 else int(index.max(initial=0)) + 1
        try:
            return PackedRows.from_arrays(values[0], index[0], width)  # [N, width], kept packed
        except ValueError as exc:
            raise TargetError(f"target returned malformed PROBS: {exc}") from None

    async def close(self) -> None:
        """Release the sequence and end the stream; never raises, never cancels a release under way."""
        if self._closed:
            return
        self._closed = True
        if not self._started:  # Triton never heard of this sequence
            self._requests.put_nowait(None)
            self._responses.cancel()
            return
        if self._broken or self._reader.done():
            self._responses.cancel()
            release = self._in_background(self._release_unary())
        else:
            self._send(0, [], 0, None)  # the release: in order after every request already sent on this stream
            self._requests.put_nowait(None)  # half-close: Triton ends the stream after its last answer
            release = self._in_background(self._release_on_stream())
        try:
            await asyncio.wait_for(asyncio.shield(release), _CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._log.info("the target release is slow; awaiting it in the background")

    async def _release_on_stream(self) -> None:
        """Wait until Triton has answered every request, the release last, and ended the stream."""
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), _RELEASE_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._log.warning("the target release got no answer within %.0f s", _RELEASE_TIMEOUT_S)
        finally:
            self._responses.cancel()
        # Triton going away takes its caches with it: worth an INFO line, not a WARNING.
        gone = isinstance(self._last_error, (TargetUnavailable, TargetConnectionLost))
        level = logging.INFO if gone else logging.WARNING
        if self._answered < self._sent:
            why = _describe(self._last_error)
            self._log.log(level, "the target stream ended before the release was answered: %s", why)
        elif self._last_error is not None:
            self._log.log(level, "releasing the target sequence failed: %s", _describe(self._last_error))

    async def _release_unary(self) -> None:
        """The stream broke (Triton restarted, the connection dropped): release with a unary request."""
        start = False
        while True:
            try:
                await self._client.infer(
                    self._model,
                    _inputs(0, [], 0, None),
                    outputs=[InferRequestedOutput(name) for name in _RELEASE_OUTPUTS],
                    sequence_id=self._sequence_id,
                    sequence_start=start,
                    sequence_end=True,
                    client_timeout=_RELEASE_TIMEOUT_S,
                )
                return
            except InferenceServerException as exc:
                lost = wire.classify_error(exc.status(), exc.message() or "") is wire.TargetError.SEQUENCE_LOST
                if lost and not start:  # Triton forgot the sequence: START + END clears what the model holds
                    start = True
                    continue
                gone = wire.classify_error(exc.status(), exc.message() or "") is wire.TargetError.UNAVAILABLE
                level = logging.INFO if gone else logging.WARNING  # Triton going away took its caches along
                self._log.log(level, "releasing the target sequence failed: %s", _describe(exc))
                return
            except Exception as exc:  # noqa: BLE001 - logged; the model's TTL is the backstop
                self._log.warning("releasing the target sequence failed: %s", _describe(exc))
                return


class TritonTargetClient:
    """The target on Triton over one shared aio client (one gRPC channel)."""

    def __init__(
        self, url: str, model: str = wire.MODEL_NAME, *, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    ) -> None:
        self.url = url
        self._client = InferenceServerClient(url, channel_args=_CHANNEL_ARGS)
        # tritonclient has no public accessor for its channel; its connectivity is what open() waits on.
        self._channel: grpc.aio.Channel = self._client._channel
        self._model = model
        self._connect_timeout_s = connect_timeout_s
        self._releases: set[asyncio.Task] = set()  # releases still under way (strong references)

    async def open(self, sequence_id: int, *, timeout: float | None = None) -> TritonTargetSession:
        """A stream for ``sequence_id`` once the channel is READY (TargetUnavailable after
        ``connect_timeout_s``). Its gRPC deadline is the caller's ``timeout`` plus a margin: the loop
        bounds each call by the deadline itself, so the stream outlives it long enough to carry the release."""
        await self._wait_connected()
        stream_timeout = None if timeout is None else timeout + _STREAM_DEADLINE_MARGIN_S
        return TritonTargetSession(
            self._client, self._model, sequence_id,
            url=self.url, stream_timeout=stream_timeout, in_background=self._track_release,
        )  # fmt: skip

    def _track_release(self, release: Coroutine[Any, Any, None]) -> asyncio.Task:
        task = asyncio.ensure_future(release)
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        return task

    async def _wait_connected(self) -> None:
        state = self._channel.get_state(try_to_connect=True)
        if state is grpc.ChannelConnectivity.READY:
            return
        try:
            await asyncio.wait_for(self._channel.channel_ready(), self._connect_timeout_s)
        except asyncio.TimeoutError:
            now = self._channel.get_state(try_to_connect=False)
            raise unavailable(
                self.url, f"no connection within {self._connect_timeout_s:g} s (gRPC channel {now.name.lower()})"
            ) from None

    async def close(self) -> None:
        """Give releases under way a moment to finish, then close the channel."""
        if self._releases:
            await asyncio.wait(set(self._releases), timeout=_CLOSE_TIMEOUT_S)
        await self._client.close()
