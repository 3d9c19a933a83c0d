"""`TargetClient` over Triton: one shared ``grpc.aio`` channel, one ``ModelStreamInfer`` stream per generation.

Thin by design: ``orchestrator.triton_messages`` builds the requests of the contract in
``specdec.target_contract`` (INPUT_IDS, KEEP_LENGTH, NUM_LOGITS and the sampling settings -> the warped rows
PROBS + PROBS_INDEX; sequence id = Triton correlation id, START on the first request, END on the release)
with Triton's own protobuf, and this module maps Triton's errors onto ``orchestrator.clients``
exceptions. On a stream, Triton reports an error as a response carrying only a message (no status code),
so errors are classified by message via ``contract.classify_error``: "no cache" or Triton's "must specify the
START flag" = cache lost, "capacity:" = at capacity.

Closing sends the release request (no tokens, NUM_LOGITS 0, END) on the stream, in order after every
request already sent on it, even when the caller gave up mid-request (cancelled, deadline): a caller that
gives up never cancels the stream (see `TritonTargetSession`). After a request failed, or if the stream
itself broke (Triton restarted, the connection dropped), even with the release on its way, the release goes
on a stream of its own (the model is decoupled: Triton answers it only on streams); if Triton no longer
knows the sequence ("must specify the START flag"), it is repeated with START + END, which also clears a
cache the model may still hold (never START + END on a sequence Triton knows: a "conflict" to Triton). A
release is never cut short by our own impatience: ``close`` waits for its answer for ``_CLOSE_TIMEOUT_S``,
and a slower answer (Triton busy) is awaited in the background for up to ``_RELEASE_TIMEOUT_S``; cancelling
it would leave the cache to the model's idle TTL. A release on a stream of its own waits for the channel to
reconnect and is tried again if that stream breaks too, within the same bound, so a Triton that was
unreachable for a moment still gets it. A release that fails is logged (INFO when Triton was unreachable all
along: its caches went with it, or its TTL ends them).

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

For replica pools (``orchestrator.pools``): ``check_ready`` asks Triton's KServe ``ServerReady`` and
``ModelReady`` over the same channel, and ``TritonTargetSession.abandon`` fails a session whose replica
stopped answering, so the loop re-sends the prefix on another replica. The channel is TLS when
``credentials`` are given (``specdec.tls``), plaintext otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import grpc
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, service_pb2, service_pb2_grpc

from orchestrator import triton_messages
from orchestrator.clients import (
    DeadlineExceeded,
    TargetCacheLost,
    TargetCapacityExhausted,
    TargetConnectionLost,
    TargetError,
    TargetUnavailable,
)
from specdec import target_contract as contract
from specdec.logs import SequenceLogger
from specdec.rows import PackedRows
from specdec.sampling import SamplingParams

log = logging.getLogger(__name__)

T = TypeVar("T")

_CLOSE_TIMEOUT_S = 2.0  # how long close() waits for the release's answer before leaving it to the background
_RELEASE_TIMEOUT_S = 30.0  # how long a release may take at all
_RETRY_PAUSE_S = 0.2  # between attempts of a release whose own stream broke
# Triton answers its own errors on the stream, in a response; a whole stream failing UNAVAILABLE or INTERNAL is
# the transport: gRPC reports a reset HTTP/2 stream as INTERNAL ("Internal error from Core", seen when a
# connection is reset mid-stream).
_BROKEN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
_STREAM_DEADLINE_MARGIN_S = _RELEASE_TIMEOUT_S  # the stream outlives the caller's deadline by this
DEFAULT_CONNECT_TIMEOUT_S = 3.0
# tritonclient's own message sizes plus a short reconnect backoff; keepalive stays off, as in tritonclient:
# Triton's server refuses frequent pings, and a dead peer on a live host resets the connection.
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.min_reconnect_backoff_ms", 2000),  # gRPC also uses it as the shortest connect attempt
]


def unavailable(url: str, why: str) -> TargetUnavailable:
    """The one wording of "Triton cannot serve this" that reaches the caller as UNAVAILABLE."""
    return TargetUnavailable(f"target (Triton at {url}) is unavailable: {why}")


def _server_error(status: str | None, message: str, url: str) -> TargetError:
    """Triton's answer to one request: ``status`` as "StatusCode.NAME" (unary) or None (a stream response)."""
    kind = contract.classify_error(status, message)
    text = f"target: {message}"
    if kind is contract.ErrorKind.SEQUENCE_LOST:
        return TargetCacheLost(text)
    if kind is contract.ErrorKind.CAPACITY:
        return TargetCapacityExhausted(text)
    if kind is contract.ErrorKind.UNAVAILABLE:
        return unavailable(url, message)
    return TargetError(text)


def _describe(exc: BaseException | None) -> str:
    """An exception for the log."""
    if exc is None:
        return "the stream ended"
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TargetError):
        return str(exc)
    return repr(exc)


def _rpc_error(exc: grpc.aio.AioRpcError, url: str) -> Exception:
    """The stream failed as a whole: map its gRPC status."""
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"target stream DEADLINE_EXCEEDED: {exc.details()}")
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return TargetCapacityExhausted(f"target stream RESOURCE_EXHAUSTED: {exc.details()}")
    if exc.code() in (*_BROKEN, grpc.StatusCode.CANCELLED):  # the loop re-sends the prefix on a new stream
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
        stub: service_pb2_grpc.GRPCInferenceServiceStub,
        model: str,
        sequence_id: int,
        *,
        url: str = "",
        stream_timeout: float | None = None,
        in_background: Callable[[Coroutine[Any, Any, None]], asyncio.Task] = asyncio.ensure_future,
    ) -> None:
        self._stub = stub
        self._model = model
        self._sequence_id = sequence_id
        self._url = url
        self._in_background = in_background
        self._log = SequenceLogger(log, sequence_id)
        self._requests: asyncio.Queue[service_pb2.ModelInferRequest | None] = asyncio.Queue()
        self._answers: asyncio.Queue[tuple[service_pb2.ModelInferResponse | None, Exception | None]] = asyncio.Queue()
        self._call = stub.ModelStreamInfer(self._request_iterator(), timeout=stream_timeout)
        self._sent = 0  # requests handed to the stream
        self._answered = 0  # responses read from it
        self._last_error: Exception | None = None  # of the last response, or why the stream ended
        self._reader = in_background(self._read_responses())
        self._started = False  # a request went out: Triton knows (or will know) the sequence
        self._broken = False  # the stream cannot carry more requests
        self._out_of_step = False  # a caller gave up waiting: the next answer is not for the next request
        self._closed = False
        self.forward_sequences = 1  # sequences in the forward that answered the last score
        self.forward_tokens = 0  # and its tokens in all (0 before the first answer)

    async def _request_iterator(self) -> AsyncIterator[service_pb2.ModelInferRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def _read_responses(self) -> None:
        """Queue every (result, error) until the stream ends; the last item says why it ended."""
        ended: Exception
        try:
            async for response in self._call:
                self._answered += 1
                if response.error_message:
                    self._last_error = _server_error(None, response.error_message, self._url)
                    self._answers.put_nowait((None, self._last_error))
                else:
                    self._last_error = None
                    self._answers.put_nowait((response.infer_response, None))
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

    def _send(self, request: service_pb2.ModelInferRequest) -> None:
        self._requests.put_nowait(request)
        self._started = True
        self._sent += 1

    async def score(
        self, keep_length: int, append_token_ids: Sequence[int], num_logits: int, params: SamplingParams
    ) -> PackedRows:
        return await self._ask(
            lambda start: triton_messages.score_request(
                self._model, self._sequence_id, start=start,
                keep_length=keep_length, token_ids=append_token_ids, num_logits=num_logits, params=params,
            ),
            triton_messages.read_probs,
        )  # fmt: skip

    async def decode(
        self, keep_length: int, append_token_ids: Sequence[int], params: SamplingParams, decode: contract.Decode
    ) -> list[int]:
        return await self._ask(
            lambda start: triton_messages.decode_request(
                self._model, self._sequence_id, start=start,
                keep_length=keep_length, token_ids=append_token_ids, params=params, decode=decode,
            ),
            lambda answer: triton_messages.read_tokens(answer, decode.steps),
        )  # fmt: skip

    async def _ask(
        self,
        build: Callable[[bool], service_pb2.ModelInferRequest],
        read: Callable[[service_pb2.ModelInferResponse], T],
    ) -> T:
        """Send the request ``build(start)`` makes, wait for its answer (Triton's error raised) and ``read`` it."""
        if self._broken or self._closed or self._out_of_step:
            raise TargetConnectionLost("the target stream is closed")
        self._send(build(not self._started))
        try:
            result, error = await self._answers.get()
        except BaseException:  # the caller gave up (cancelled, deadline): its answer will come unread
            self._out_of_step = True
            raise
        if result is None:  # a failed request or the end of the stream: the session takes no more requests,
            self._broken = True  # and close releases on a new stream (START + END if Triton forgot the sequence)
        if error is not None:
            raise error
        assert result is not None
        try:
            answer = read(result)
            self.forward_sequences, self.forward_tokens = triton_messages.read_forward(result)
        except triton_messages.MalformedResponse as exc:
            raise TargetError(f"target returned a malformed answer: {exc}") from None
        return answer

    def abandon(self, reason: str) -> None:
        """Give up on this stream (its replica stopped answering health checks): the request under way,
        and any later one, raises TargetConnectionLost (the loop re-sends the prefix elsewhere); ``close``
        then releases on a new stream, which reaches Triton if it comes back."""
        if self._closed or self._broken:
            return
        self._broken = True
        self._answers.put_nowait((None, TargetConnectionLost(f"Triton at {self._url} stopped answering: {reason}")))

    async def close(self) -> None:
        """Release the sequence and end the stream; never raises, never cancels a release under way."""
        if self._closed:
            return
        self._closed = True
        if not self._started:  # Triton never heard of this sequence
            self._requests.put_nowait(None)
            self._call.cancel()
            return
        if self._broken or self._reader.done():
            self._call.cancel()
            release = self._in_background(self._release_alone())
        else:
            # The release: in order after every request already sent on this stream.
            self._send(triton_messages.release_request(self._model, self._sequence_id))
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
            self._call.cancel()
        # Triton going away takes its caches with it: worth an INFO line, not a WARNING.
        gone = isinstance(self._last_error, (TargetUnavailable, TargetConnectionLost))
        level = logging.INFO if gone else logging.WARNING
        if self._answered < self._sent:
            why = _describe(self._last_error)
            self._log.log(level, "the target stream ended before the release was answered (%s); "
                                 "releasing on a stream of its own", why)
            await self._release_alone()  # the release may never have reached Triton
        elif self._last_error is not None:
            self._log.log(level, "releasing the target sequence failed: %s", _describe(self._last_error))

    async def _release_alone(self) -> None:
        """The stream broke or a request on it failed: release on a stream of its own (the model is decoupled,
        so Triton answers it only on a stream). A stream that breaks under it (a connection reset) is tried
        again, all within ``_RELEASE_TIMEOUT_S``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _RELEASE_TIMEOUT_S
        start = False
        while True:
            request = triton_messages.release_request(self._model, self._sequence_id, start=start)
            try:
                error = await _one_request(self._stub, request, max(deadline - loop.time(), _RETRY_PAUSE_S))
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _BROKEN and loop.time() + _RETRY_PAUSE_S < deadline:
                    await asyncio.sleep(_RETRY_PAUSE_S)
                    continue
                error = exc.details() or str(exc.code())
                gone = exc.code() in (*_BROKEN, grpc.StatusCode.DEADLINE_EXCEEDED)  # unreachable all along
                kind = contract.ErrorKind.UNAVAILABLE if gone else contract.classify_error(str(exc.code()), error)
            except Exception as exc:  # noqa: BLE001 - logged; the model's TTL is the backstop
                self._log.warning("releasing the target sequence failed: %s", _describe(exc))
                return
            else:
                if not error:
                    return
                kind = contract.classify_error(None, error)
            if kind is contract.ErrorKind.SEQUENCE_LOST and not start:
                start = True  # Triton forgot the sequence: START + END clears what the model holds
                continue
            # Triton going away took its caches along: worth an INFO line, not a WARNING.
            level = logging.INFO if kind is contract.ErrorKind.UNAVAILABLE else logging.WARNING
            self._log.log(level, "releasing the target sequence failed: %s", error)
            return


async def _one_request(stub: service_pb2_grpc.GRPCInferenceServiceStub, request: service_pb2.ModelInferRequest,
                       timeout: float) -> str:
    """Send one request on a stream of its own; its error message ("" when it succeeded). The call waits for
    the channel to be ready (within ``timeout``): a release must reach a Triton that is unreachable for a
    moment (connections reset, a network blip), or its sequence stays live there until the model's idle TTL."""

    async def requests() -> AsyncIterator[service_pb2.ModelInferRequest]:
        yield request

    call = stub.ModelStreamInfer(requests(), timeout=timeout, wait_for_ready=True)
    try:
        async for response in call:
            return response.error_message
        return "Triton ended the stream without an answer"
    finally:
        call.cancel()


class TritonTargetClient:
    """The target on Triton over one shared ``grpc.aio`` channel."""

    def __init__(
        self,
        url: str,
        model: str = contract.MODEL_NAME,
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, str | int]] = (),
    ) -> None:
        self.url = url
        args = [*_CHANNEL_ARGS, *options]
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(url, options=args)
        else:
            self._channel = grpc.aio.secure_channel(url, credentials, options=args)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
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
            self._stub, self._model, sequence_id,
            url=self.url, stream_timeout=stream_timeout, in_background=self._track_release,
        )  # fmt: skip

    async def check_ready(self, timeout: float) -> None:
        """Return if Triton and the model are ready within ``timeout`` s, else raise TargetUnavailable."""
        try:
            server = await self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout)
            model = await self._stub.ModelReady(service_pb2.ModelReadyRequest(name=self._model), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise unavailable(self.url, f"readiness check {exc.code().name}: {exc.details()}") from None
        if not server.ready or not model.ready:
            raise unavailable(self.url, "server not ready" if not server.ready else f"model {self._model} not ready")

    async def check_answers(self, timeout: float) -> None:
        """Return if the model itself answers within ``timeout`` s, else raise TargetUnavailable. Triton
        answers `check_ready` without asking the model's Python stub; this sends the model a release request
        of its own (START and END, no tokens: answered without a forward), as ``target_service.liveness``
        does. For readmitting a quarantined replica (a round left unanswered, a stub reported not healthy)."""
        request = triton_messages.release_request(self._model, contract.probe_sequence_id(), start=True)
        try:
            error = await asyncio.wait_for(_one_request(self._stub, request, timeout), timeout)
        except asyncio.TimeoutError:
            raise unavailable(self.url, f"the model did not answer within {timeout:g} s") from None
        except grpc.aio.AioRpcError as exc:
            raise unavailable(self.url, f"the model's answer check {exc.code().name}: {exc.details()}") from None
        if error and contract.classify_error(None, error) is contract.ErrorKind.UNAVAILABLE:
            raise unavailable(self.url, f"the model answered: {error}")

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
            why = await self._last_connect_error()
            raise unavailable(
                self.url, f"no connection within {self._connect_timeout_s:g} s (gRPC channel {now.name.lower()}{why})"
            ) from None

    async def _last_connect_error(self) -> str:
        """gRPC's reason for the failed connection (a refused port, a TLS handshake), as a failing call reports it."""
        try:
            await self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=0.2)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and exc.details():
                return f": {exc.details()}"
        return ""

    async def close(self) -> None:
        """Give releases under way a moment to finish, then close the channel."""
        if self._releases:
            await asyncio.wait(set(self._releases), timeout=_CLOSE_TIMEOUT_S)
        await self._channel.close()
