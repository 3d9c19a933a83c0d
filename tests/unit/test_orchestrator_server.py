"""The orchestrator server with its real adapters: the gRPC draft client against a draft servicer, the
metrics, the draft circuit breaker, an unreachable Triton, the caller's deadline, and the logs.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator

import grpc
import pytest

from orchestrator.clients import DraftCacheLost, DraftError, TargetError, TargetUnavailable
from orchestrator.draft_grpc import GrpcDraftClient
from specdec.rows import encode_rows
from specdec.sampling import SamplingParams
from specdec.v1 import draft_pb2, draft_pb2_grpc
from tests.fakes import (
    VOCAB,
    FakeDraft,
    FakeTarget,
    asyncio_test,
    big_draft,
    big_target,
    metric_value,
    req,
    serving,
    until,
)

# --- the gRPC draft adapter, through the whole servicer path --------------------------------------------


class FakeDraftService(draft_pb2_grpc.DraftServiceServicer):
    """An in-process DraftService over a FakeDraft: each Propose stream is one FakeDraft session."""

    def __init__(self, fake: FakeDraft) -> None:
        self.fake = fake

    async def Propose(self, request_iterator, context):  # noqa: N802
        session = None
        try:
            async for request in request_iterator:
                if session is None:
                    session = await self.fake.open(request.sequence_id)
                s = request.sampling
                params = SamplingParams(
                    temperature=s.temperature if s.HasField("temperature") else 1.0,
                    top_k=s.top_k,
                    top_p=s.top_p if s.HasField("top_p") else 1.0,
                )
                try:
                    proposal = await session.propose(
                        request.keep_length,
                        list(request.append_token_ids),
                        request.num_draft_tokens,
                        params,
                        request.seed,
                        request.drafter,
                    )
                except DraftCacheLost as exc:
                    await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
                q_probs, q_index = (b"", b"") if proposal.q is None else encode_rows(proposal.q)
                yield draft_pb2.ProposeResponse(
                    draft_token_ids=proposal.token_ids,
                    q_probs=q_probs,
                    q_index=q_index,
                    vocab_size=VOCAB,
                    cache_length=proposal.cache_length,
                )
        finally:
            if session is not None:
                await session.close()

    async def GetStats(self, request, context):  # noqa: N802
        return draft_pb2.GetStatsResponse(drafters=await self.fake.drafters(), vocab_size=VOCAB)


@contextlib.asynccontextmanager
async def draft_server(fake: FakeDraft) -> AsyncIterator[str]:
    server = grpc.aio.server()
    draft_pb2_grpc.add_DraftServiceServicer_to_server(FakeDraftService(fake), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_k=32, seed=5)])
@asyncio_test
async def test_grpc_draft_adapter_end_to_end(tokenizer, sampling):
    fake = FakeDraft(model=big_draft)
    async with draft_server(fake) as address:
        async with serving(tokenizer, draft=GrpcDraftClient(address)) as running:
            spec = await running.stub.Generate(req(max_new_tokens=10, num_draft_tokens=3, sampling=sampling))
            await until(lambda: fake.calls.closed == fake.calls.opened != [])  # the stream's end released it
            if sampling["temperature"] == 0.0:
                base = await running.stub.Generate(req(max_new_tokens=10, num_draft_tokens=0, sampling=sampling))
                assert spec.token_ids == base.token_ids
    assert spec.stats.draft_fallback_rounds == 0 and spec.stats.drafted_tokens > 0
    assert len(spec.token_ids) == 10


@asyncio_test
async def test_grpc_draft_not_found_reprefills_on_a_new_stream(tokenizer):
    fake = FakeDraft(model=big_draft, fail_at={1: DraftCacheLost("no cache")})
    async with draft_server(fake) as address:
        async with serving(tokenizer, draft=GrpcDraftClient(address)) as running:
            request = req(max_new_tokens=10, num_draft_tokens=4, sampling=dict(temperature=0.0))
            response = await running.stub.Generate(request)
            await until(lambda: sorted(fake.calls.closed) == sorted(fake.calls.opened))
    assert len(fake.calls.opened) == 2 and fake.calls.requests[2][1] == 0  # keep 0 on the new stream
    assert response.stats.draft_fallback_rounds == 0


@asyncio_test
async def test_grpc_draft_unreachable_falls_back(tokenizer):
    async with serving(tokenizer, draft=GrpcDraftClient("127.0.0.1:1")) as running:
        response = await running.stub.Generate(req(max_new_tokens=4, num_draft_tokens=4))
    # The draft fails in the first round; the target decodes all four tokens in it (target_steps 8).
    assert len(response.token_ids) == 4 and response.stats.draft_fallback_rounds == response.stats.rounds == 1


# --- metrics, fallbacks, an unreachable Triton, deadlines ------------------------------------------------


@asyncio_test
async def test_metrics_count_requests_tokens_rounds_and_stages(tokenizer):
    async with serving(tokenizer) as running:
        responses = [await running.stub.Generate(req(max_new_tokens=10, num_draft_tokens=3)) for _ in range(2)]
        chunks = [c async for c in running.stub.GenerateStream(req(max_new_tokens=10, num_draft_tokens=0))]
        with pytest.raises(grpc.aio.AioRpcError):
            await running.stub.Generate(req(max_new_tokens=0))
        assert metric_value(running, "specdec_orchestrator_requests_total", {"method": "Generate", "code": "OK"}) == 2
        assert metric_value(running, "specdec_orchestrator_requests_total", {"method": "GenerateStream", "code": "OK"}) == 1
        labels = {"method": "Generate", "code": "INVALID_ARGUMENT"}
        # An aborted call is counted as its handler unwinds, which can be just after the client has its
        # status: wait for the count rather than race it.
        await until(lambda: metric_value(running, "specdec_orchestrator_requests_total", labels) == 1)
        assert metric_value(running, "specdec_orchestrator_live_generations") == 0
        assert metric_value(running, "specdec_orchestrator_generations_total", {"outcome": "length"}) == 3
        stats = [r.stats for r in responses] + [chunks[-1].stats]
        emitted = sum(s.emitted_tokens for s in stats)
        assert metric_value(running, "specdec_orchestrator_tokens_total", {"kind": "emitted"}) == emitted
        accepted = sum(s.accepted_tokens for s in stats)
        assert metric_value(running, "specdec_orchestrator_tokens_total", {"kind": "accepted"}) == accepted
        decoded = sum(s.decoded_tokens for s in stats)
        assert decoded >= 10 and metric_value(running, "specdec_orchestrator_tokens_total", {"kind": "decoded"}) == decoded
        rounds = sum(s.rounds for s in stats)
        speculative = metric_value(running, "specdec_orchestrator_rounds_total", {"mode": "speculative"})
        target_only = metric_value(running, "specdec_orchestrator_rounds_total", {"mode": "target_only"})
        assert speculative + target_only == rounds  # a K > 0 run's last round may have room for no draft
        assert target_only >= stats[2].rounds and speculative > 0
        for stage in ("draft", "target", "orchestrator", "total"):
            assert metric_value(running, "specdec_orchestrator_round_seconds_count", {"stage": stage}) == rounds
        assert metric_value(running, "specdec_orchestrator_acceptance_rate_count") == 2  # generations that drafted
        first = sum(s.accepted_per_position[0] for s in stats[:2])
        assert metric_value(running, "specdec_orchestrator_accepted_per_position_total", {"position": "1"}) == first
        assert metric_value(running, "specdec_orchestrator_accepted_tokens_per_round_sum") == accepted
        assert metric_value(running, "specdec_orchestrator_draft_breaker_state") == 0


@asyncio_test
async def test_draft_failures_open_the_breaker_and_are_counted(tokenizer):
    draft = FakeDraft(model=big_draft, fail_at={i: DraftError("draft down") for i in range(100)})
    async with serving(tokenizer, draft=draft, draft_breaker_failures=2, draft_breaker_cooldown_s=600) as running:
        first = [await running.stub.Generate(req(max_new_tokens=5)) for _ in range(2)]
        opened = len(draft.calls.opened)
        later = await running.stub.Generate(req(max_new_tokens=5))
        assert len(draft.calls.opened) == opened  # the open breaker skips the draft: not even a stream
        # Each falls back in its first round, which the target decodes alone to the end (target_steps 8).
        assert all(len(r.token_ids) == 5 and r.stats.draft_fallback_rounds == r.stats.rounds == 1 for r in [*first, later])
        assert metric_value(running, "specdec_orchestrator_draft_breaker_state") == 2  # open
        assert metric_value(running, "specdec_orchestrator_draft_breaker_transitions_total", {"state": "open"}) == 1
        assert metric_value(running, "specdec_orchestrator_draft_fallbacks_total", {"reason": "error"}) == 2
        assert metric_value(running, "specdec_orchestrator_draft_fallbacks_total", {"reason": "breaker_open"}) == 1
        assert metric_value(running, "specdec_orchestrator_draft_fallback_rounds_total") == 3
        assert metric_value(running, "specdec_orchestrator_rounds_total", {"mode": "draft_fallback"}) == 3
        assert metric_value(running, "specdec_orchestrator_requests_total", {"method": "Generate", "code": "OK"}) == 3


@asyncio_test
async def test_unreachable_triton_is_unavailable_with_a_clear_message_before_the_deadline(tokenizer):
    from orchestrator.target_triton import TritonTargetClient
    from specdec.procs import free_port

    port = free_port()
    target = TritonTargetClient(f"127.0.0.1:{port}", connect_timeout_s=0.5)
    async with serving(tokenizer, target=target) as running:
        for call in (running.stub.Generate, running.stub.GenerateStream):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                result = call(req(max_new_tokens=5), timeout=60)
                if hasattr(result, "__aiter__"):
                    [_ async for _ in result]
                else:
                    await result
            # UNAVAILABLE, not DEADLINE_EXCEEDED: the request gave up after the connect timeout.
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"target (Triton at 127.0.0.1:{port}) is unavailable" in info.value.details()
        await until(lambda: running.draft.calls.closed == running.draft.calls.opened)  # the draft stream's release
        labels = {"method": "Generate", "code": "UNAVAILABLE"}
        assert metric_value(running, "specdec_orchestrator_requests_total", labels) == 1
        assert metric_value(running, "specdec_orchestrator_live_generations") == 0


class DeadlineRecordingDraftService(FakeDraftService):
    """Records the gRPC deadline each Propose stream arrives with."""

    def __init__(self, fake: FakeDraft) -> None:
        super().__init__(fake)
        self.deadlines: list[float | None] = []

    async def Propose(self, request_iterator, context):  # noqa: N802
        self.deadlines.append(context.time_remaining())
        async for response in super().Propose(request_iterator, context):
            yield response


@asyncio_test
async def test_the_callers_deadline_reaches_the_draft_stream(tokenizer):
    service = DeadlineRecordingDraftService(FakeDraft(model=big_draft))
    server = grpc.aio.server()
    draft_pb2_grpc.add_DraftServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with serving(tokenizer, draft=GrpcDraftClient(f"127.0.0.1:{port}")) as running:
            await running.stub.Generate(req(max_new_tokens=4), timeout=20)
    finally:
        await server.stop(None)
    assert len(service.deadlines) == 1
    # gRPC rounds the wire timeout up to a short encoding (20 s arrives as up to ~20.1 s).
    assert service.deadlines[0] is not None and 10 < service.deadlines[0] <= 21


@asyncio_test
async def test_every_log_line_about_a_generation_names_its_sequence(tokenizer, caplog):
    draft = FakeDraft(model=big_draft, fail_at={1: DraftError("draft down")})
    target = FakeTarget(model=big_target, fail_at={3: TargetUnavailable("Triton is down"), 5: TargetError("odd")})
    caplog.set_level(logging.DEBUG)
    async with serving(tokenizer, target=target, draft=draft) as running:
        for _ in range(3):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await running.stub.Generate(req(max_new_tokens=6))
    about_generations = [
        r for r in caplog.records
        if r.name.startswith(("orchestrator.loop", "orchestrator.servicer", "orchestrator.draft_grpc"))
        or (r.name == "specdec.grpc_server" and r.levelno >= logging.INFO and "stopping" not in r.getMessage())
    ]  # fmt: skip
    assert len(about_generations) >= 6  # draft fallback, 3 "finished" lines, 2 error-boundary lines
    for record in about_generations:
        assert re.match(r"sequence_id=[1-9][0-9]* ", record.getMessage()), record.getMessage()
    ids = {re.match(r"sequence_id=([0-9]+)", r.getMessage())[1] for r in about_generations}
    assert len(ids) == 3 and {str(i) for i in target.calls.opened} == ids
