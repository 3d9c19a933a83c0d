"""The Triton adapter's reachability behaviour against a fake KServe v2 server on 127.0.0.1 (no Triton).

Proves: an unreachable Triton fails a request with UNAVAILABLE "target (Triton at HOST:PORT) is
unavailable: ..." after the bounded connect timeout, not the caller's whole deadline; once something
listens there again the same client (channel) serves without being rebuilt; the caller's deadline reaches
the stream as a gRPC deadline; a stream that breaks under a live sequence (UNAVAILABLE, or INTERNAL for a
reset HTTP/2 stream) is TargetConnectionLost (the loop then re-sends the prefix); the release is END on the
stream or, if the stream broke (before or under the release), on a stream of its own, with START + END if
Triton forgot the sequence, and waits for a Triton unreachable for a moment; a slow release is finished in
the background, never cancelled; Triton's "not serving" messages are UNAVAILABLE; the answer check (a
readmission after a stalled round) is a release of its own that the model must answer in time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from orchestrator import target_triton
from orchestrator.clients import TargetConnectionLost, TargetError, TargetUnavailable
from orchestrator.target_triton import TritonTargetClient
from specdec import target_contract as contract
from specdec.procs import free_port
from specdec.sampling import SamplingParams
from tests.fakes import asyncio_test

V = 8
GREEDY = SamplingParams(temperature=0.0)


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers ModelStreamInfer with packed one-hot rows at token V - 1 (PROBS, PROBS_INDEX [1, NUM_LOGITS, 1],
    FORWARD_SEQUENCES) and a release with LOGITS [1, 0, V]; records each stream's deadline."""

    def __init__(self, break_after: int | None = None, release_delay_s: float = 0.0, delay_s: float = 0.0,
                 forget: bool = False, forward_sequences: int = 3,
                 break_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, breaks: int = 1) -> None:
        self.deadlines: list[float | None] = []
        self.forward_sequences = forward_sequences  # what every scoring answer says its forward ran
        self.forget = forget  # Triton forgot every sequence: an END without START is refused
        self.requests = 0
        self.break_after = break_after  # abort the stream with break_code after this many answers
        self.break_code = break_code
        self.breaks = breaks  # how many requests, from break_after on, break their stream
        self.release_delay_s = release_delay_s  # answer release requests (END, no tokens) this late
        self.delay_s = delay_s  # answer other requests this late
        self.flags: list[tuple[str, bool, bool]] = []  # (how, START, END) of every request
        self.released: list[int] = []  # sequence ids whose release was answered

    async def ModelStreamInfer(self, request_iterator, context):  # noqa: N802 - gRPC method name
        self.deadlines.append(context.time_remaining())
        async for request in request_iterator:
            self.requests += 1
            if self.break_after is not None and self.requests > self.break_after:
                self.breaks -= 1
                if not self.breaks:
                    self.break_after = None  # the streams that follow work
                await context.abort(self.break_code, "Socket closed")
            if self.forget and request.parameters["sequence_end"].bool_param and \
                    not request.parameters["sequence_start"].bool_param:
                self.flags.append(("stream", False, True))
                yield service_pb2.ModelStreamInferResponse(
                    error_message=f"inference request for sequence {request.parameters['sequence_id'].int64_param} "
                                  f"to model 'specdec_target' must specify the START flag on the first request")
                continue
            yield service_pb2.ModelStreamInferResponse(infer_response=await self._answer("stream", request))

    async def ModelInfer(self, request, context):  # noqa: N802 - gRPC method name
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is decoupled: streams only")

    async def _answer(self, how: str, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        params = request.parameters
        end = params["sequence_end"].bool_param
        self.flags.append((how, params["sequence_start"].bool_param, end))
        names = [t.name for t in request.inputs]
        num_logits = int(np.frombuffer(request.raw_input_contents[names.index(contract.NUM_LOGITS)], np.int32)[0])
        if end and num_logits == 0:
            await asyncio.sleep(self.release_delay_s)
            self.released.append(params["sequence_id"].int64_param)
        else:
            await asyncio.sleep(self.delay_s)
        if num_logits == 0:
            arrays = {contract.LOGITS: np.zeros((1, 0, V), dtype=np.float32)}
        else:
            assert contract.TEMPERATURE in names, "a scoring request carries the sampling settings"
            arrays = {
                contract.PROBS: np.ones((1, num_logits, 1), dtype=np.float32),
                contract.PROBS_INDEX: np.full((1, num_logits, 1), V - 1, dtype=np.int32),
                contract.FORWARD_SEQUENCES: np.array([[self.forward_sequences]], dtype=np.int32),
                contract.FORWARD_TOKENS: np.array([[self.forward_sequences * 5]], dtype=np.int32),
            }
        wanted = [o.name for o in request.outputs]
        assert set(wanted) == set(arrays), f"requested {wanted}, the model answers {sorted(arrays)}"
        outputs = [
            service_pb2.ModelInferResponse.InferOutputTensor(
                name=name, datatype="FP32" if a.dtype == np.float32 else "INT32", shape=list(a.shape)
            )
            for name, a in arrays.items()
        ]
        return service_pb2.ModelInferResponse(
            model_name=request.model_name, outputs=outputs, raw_output_contents=[a.tobytes() for a in arrays.values()]
        )


@contextlib.asynccontextmanager
async def fake_triton(port: int, servicer: FakeTriton) -> AsyncIterator[FakeTriton]:
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    try:
        yield servicer
    finally:
        await server.stop(None)


@asyncio_test
async def test_unreachable_triton_is_unavailable_within_the_connect_timeout_then_works_again():
    port = free_port()
    # Above the channel's 1 s reconnect backoff cap, as the default (3 s) is: then a Triton that is back is
    # always found within the connect timeout.
    client = TritonTargetClient(f"127.0.0.1:{port}", connect_timeout_s=1.5)
    try:
        for _ in range(2):  # a channel in reconnect backoff does not change the answer
            with pytest.raises(TargetUnavailable) as info:
                # The caller has a whole minute; the client gives up after its connect timeout.
                await asyncio.wait_for(client.open(1, timeout=60.0), 30.0)
            assert f"target (Triton at 127.0.0.1:{port}) is unavailable: no connection within 1.5 s" in str(info.value)
        async with fake_triton(port, FakeTriton()) as fake:  # Triton is back: same client, no restart
            session = await client.open(2, timeout=60.0)
            p = await session.score(0, [1, 2, 3], 2, GREEDY)
            assert p.dense().tolist() == [[0.0] * (V - 1) + [1.0]] * 2 and fake.requests == 1
            await session.close()
    finally:
        await client.close()


@asyncio_test
async def test_the_callers_deadline_reaches_the_stream():
    port = free_port()
    async with fake_triton(port, FakeTriton()) as fake:
        client = TritonTargetClient(f"127.0.0.1:{port}")
        try:
            session = await client.open(7, timeout=20.0)
            await session.score(0, [1, 2], 1, GREEDY)
            await session.close()
            session = await client.open(8)  # no deadline, none on the stream
            await session.score(0, [1, 2], 1, GREEDY)
            await session.close()
        finally:
            await client.close()
    with_deadline, without = fake.deadlines[0], fake.deadlines[-1]
    # The caller's 20 s plus the room left for the release (30 s), less the time on the wire (gRPC rounds the
    # header up).
    assert with_deadline is not None and 45.0 < with_deadline <= 51.0
    assert without is None or without > 1e6


@asyncio_test
async def test_a_stream_that_breaks_under_a_sequence_is_a_lost_connection():
    port = free_port()
    async with fake_triton(port, FakeTriton(break_after=1)):
        client = TritonTargetClient(f"127.0.0.1:{port}")
        try:
            session = await client.open(9, timeout=30.0)
            await session.score(0, [1, 2], 1, GREEDY)
            with pytest.raises(TargetConnectionLost, match="broke"):
                await session.score(3, [4], 1, GREEDY)
            with pytest.raises(TargetConnectionLost):  # and stays broken; close never raises
                await session.score(4, [5], 1, GREEDY)
            await session.close()
        finally:
            await client.close()


@pytest.mark.parametrize(
    "message, kind",
    [
        ("Server is stopping, scheduler for model has stopped accepting new inference requests", "UNAVAILABLE"),
        ("Request for unknown model: 'specdec_target' is not found", "UNAVAILABLE"),
        ("Request for unknown model: 'specdec_target' has no available versions", "UNAVAILABLE"),
        ("Stub process 'specdec_target_0_0' is not healthy.", "UNAVAILABLE"),  # seen: a frozen model stub
        ("no cache: sequence 5 has no cache here; resend the prefix with START", "SEQUENCE_LOST"),
        ("capacity: 64 live sequences", "CAPACITY"),
        ("invalid: keep_length 9 > cached 3", "INVALID_ARGUMENT"),
    ],
)
def test_triton_messages_on_a_stream_are_classified(message, kind):
    assert contract.classify_error(None, message) is contract.ErrorKind[kind]


def test_unavailable_is_a_target_error():
    assert issubclass(TargetUnavailable, TargetError)


@asyncio_test
async def test_the_release_is_end_on_the_stream():
    port = free_port()
    async with fake_triton(port, FakeTriton()) as fake:
        client = TritonTargetClient(f"127.0.0.1:{port}")
        try:
            session = await client.open(11, timeout=30.0)
            assert (session.forward_sequences, session.forward_tokens) == (1, 0)  # nothing scored yet
            await session.score(0, [1, 2], 1, GREEDY)
            assert (session.forward_sequences, session.forward_tokens) == (3, 15)  # what its forward ran
            await session.score(2, [3], 1, GREEDY)
            await session.close()
            await session.close()  # idempotent
        finally:
            await client.close()
    assert fake.flags == [("stream", True, False), ("stream", False, False), ("stream", False, True)]
    assert fake.released == [11]


async def break_then_close(fake: FakeTriton, sequence_id: int) -> None:
    """Score once, have the stream break under the second score, then close the session."""
    port = free_port()
    async with fake_triton(port, fake):
        client = TritonTargetClient(f"127.0.0.1:{port}")
        try:
            session = await client.open(sequence_id, timeout=30.0)
            await session.score(0, [1, 2], 1, GREEDY)
            with pytest.raises(TargetConnectionLost):
                await session.score(2, [3], 1, GREEDY)
            await session.close()
        finally:
            await client.close()


@asyncio_test
async def test_a_broken_stream_is_released_on_a_stream_of_its_own():
    fake = FakeTriton(break_after=1)
    await break_then_close(fake, 12)
    assert fake.flags[-1] == ("stream", False, True) and fake.released == [12]
    assert len(fake.deadlines) == 2  # the broken stream, then the release's own


@asyncio_test
async def test_a_stream_reset_reported_as_internal_is_a_lost_connection():
    """gRPC reports an HTTP/2 stream reset mid-call as INTERNAL ("Internal error from Core"): the stream is
    gone, not the request, so the loop re-sends the prefix (seen in the fault tests: connections reset)."""
    fake = FakeTriton(break_after=1, break_code=grpc.StatusCode.INTERNAL)
    await break_then_close(fake, 14)
    assert fake.flags[-1] == ("stream", False, True) and fake.released == [14]


@asyncio_test
async def test_a_stream_that_breaks_under_the_release_releases_on_a_stream_of_its_own():
    """The release was sent on the stream, which then broke before answering: it may never have reached
    Triton, so it goes again on a stream of its own (else the sequence stays live until the model's TTL)."""
    port = free_port()
    async with fake_triton(port, FakeTriton(break_after=2)) as fake:
        client = TritonTargetClient(f"127.0.0.1:{port}")
        try:
            session = await client.open(15, timeout=30.0)
            await session.score(0, [1, 2], 1, GREEDY)
            await session.score(2, [3], 1, GREEDY)
            await session.close()  # the release (the 3rd request) breaks the stream
        finally:
            await client.close()
    assert fake.flags == [("stream", True, False), ("stream", False, False), ("stream", False, True)]
    assert fake.released == [15] and len(fake.deadlines) == 2  # answered on the release's own stream


@asyncio_test
async def test_a_release_whose_own_stream_breaks_is_tried_again():
    fake = FakeTriton(break_after=1, breaks=2)  # the second score breaks its stream, then the release's own
    await break_then_close(fake, 17)
    assert fake.released == [17] and len(fake.deadlines) == 3


@asyncio_test
async def test_a_release_waits_for_a_triton_that_is_unreachable_for_a_moment():
    """The stream broke and Triton cannot be reached right then (connections reset, a blip): the release on a
    stream of its own waits for the channel to come back instead of failing at once, or the sequence would
    stay live on Triton until the model's idle TTL."""
    port = free_port()
    fake = FakeTriton()
    client = TritonTargetClient(f"127.0.0.1:{port}")
    try:
        async with fake_triton(port, fake):
            session = await client.open(16, timeout=30.0)
            await session.score(0, [1, 2], 1, GREEDY)
        with pytest.raises(TargetConnectionLost):  # the server went away under the stream
            await session.score(2, [3], 1, GREEDY)
        await session.close()  # the release waits in the background
        await asyncio.sleep(0.5)
        async with fake_triton(port, fake):  # back on the same port
            for _ in range(200):
                if fake.released:
                    break
                await asyncio.sleep(0.02)
    finally:
        await client.close()
    assert fake.released == [16] and fake.flags[-1] == ("stream", False, True)


@asyncio_test
async def test_a_release_triton_refuses_for_want_of_start_is_repeated_with_start_and_end():
    fake = FakeTriton(break_after=1, forget=True)
    await break_then_close(fake, 13)
    assert fake.flags[-2:] == [("stream", False, True), ("stream", True, True)] and fake.released == [13]


@asyncio_test
async def test_a_slow_release_is_finished_in_the_background_not_cancelled(monkeypatch):
    monkeypatch.setattr(target_triton, "_CLOSE_TIMEOUT_S", 0.05)
    port = free_port()
    async with fake_triton(port, FakeTriton(release_delay_s=0.5)) as fake:
        client = TritonTargetClient(f"127.0.0.1:{port}")
        try:
            session = await client.open(13, timeout=30.0)
            await session.score(0, [1, 2], 1, GREEDY)
            await session.close()  # returns before the release is answered
            assert fake.released == []
            for _ in range(100):
                if fake.released:
                    break
                await asyncio.sleep(0.02)
            assert fake.released == [13]  # the release went through all the same
        finally:
            await client.close()


@asyncio_test
async def test_a_caller_that_gives_up_mid_request_does_not_break_the_stream():
    """The release must follow the pending request on the same stream: were the stream cancelled, a START
    not yet flushed could reach Triton after a release sent on another call, and its cache would leak."""
    port = free_port()
    async with fake_triton(port, FakeTriton(delay_s=0.3)) as fake:
        client = TritonTargetClient(f"127.0.0.1:{port}")
        try:
            session = await client.open(14, timeout=30.0)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(session.score(0, [1, 2], 1, GREEDY), 0.05)  # the caller's deadline
            with pytest.raises(TargetConnectionLost):  # out of step with its answers: not reusable
                await session.score(2, [3], 1, GREEDY)
            await session.close()
        finally:
            await client.close()
    assert fake.flags == [("stream", True, False), ("stream", False, True)]  # START, then END on the stream
    assert fake.released == [14]


class UnhealthyStub(FakeTriton):
    """Triton's answer to every request once the model's stub froze or died."""

    async def ModelStreamInfer(self, request_iterator, context):  # noqa: N802 - gRPC method name
        async for _ in request_iterator:
            self.requests += 1
            yield service_pb2.ModelStreamInferResponse(
                error_message="Failed to process the request(s) for model 'specdec_target_0_0', message: "
                              "Stub process 'specdec_target_0_0' is not healthy.")  # fmt: skip


@asyncio_test
async def test_the_answer_check_asks_the_model_itself_with_a_release_of_its_own():
    port = free_port()
    client = TritonTargetClient(f"127.0.0.1:{port}", connect_timeout_s=1.5)
    try:
        async with fake_triton(port, FakeTriton()) as fake:
            await client.check_answers(5.0)
            assert fake.flags == [("stream", True, True)] and len(fake.released) == 1  # START + END, no tokens
        async with fake_triton(port, FakeTriton(release_delay_s=3.0)):  # a model that does not answer in time
            with pytest.raises(TargetUnavailable, match="the model did not answer within 0.5 s"):
                await client.check_answers(0.5)
        async with fake_triton(port, UnhealthyStub()):
            with pytest.raises(TargetUnavailable, match="the model answered: .* is not healthy"):
                await client.check_answers(5.0)
        with pytest.raises(TargetUnavailable):  # nothing listens
            await client.check_answers(0.5)
    finally:
        await client.close()
