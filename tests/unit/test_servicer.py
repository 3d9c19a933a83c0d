"""The orchestrator's gRPC surface on 127.0.0.1 (port 0) with fake draft/target clients and the real tokenizer.

Covers: validation (INVALID_ARGUMENT naming the field), the error map, health, method-symbol reflection,
streaming == unary for a seed, stop strings / eos / context length, and releases on cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from orchestrator.clients import DraftCacheLost, DraftError, TargetCapacityExhausted, TargetError, TargetUnavailable
from orchestrator.config import OrchestratorConfig
from orchestrator.draft_grpc import GrpcDraftClient
from orchestrator.server import OrchestratorServer, create_server
from specdec.rows import encode_rows
from specdec.sampling import SamplingParams
from specdec.v1 import draft_pb2, draft_pb2_grpc, generation_pb2, generation_pb2_grpc, sampling_pb2
from tests.unit.test_loop import FakeDraft, FakeTarget, asyncio_test

VOCAB = 49152
EOS = 2
CONTEXT = 64


def big_target(prefix: Sequence[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(tuple(prefix)) & 0x7FFF_FFFF)
    logits = torch.randn(VOCAB, generator=g) * 4
    logits[EOS] = -math.inf
    return logits


def big_draft(prefix: Sequence[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed((hash(tuple(prefix)) * 31 + 7) & 0x7FFF_FFFF)
    return big_target(prefix) + torch.randn(VOCAB, generator=g)


def eos_after(n: int):
    def model(prefix: Sequence[int]) -> torch.Tensor:
        logits = big_target(prefix)
        if len(prefix) >= n:
            logits[EOS] = 100.0
        return logits

    return model


@pytest.fixture(scope="module")
def tokenizer():
    from specdec.models import load_tokenizer

    return load_tokenizer("smollm2")


@dataclass
class Running:
    stub: generation_pb2_grpc.GenerationServiceStub
    channel: grpc.aio.Channel
    target: FakeTarget
    draft: FakeDraft
    server: OrchestratorServer


def sample(running: Running, name: str, labels: dict[str, str] | None = None) -> float:
    """A metric's current value in the server's registry (0 when the series does not exist yet)."""
    value = running.server.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def serving(tokenizer, target=None, draft=None, **config_fields) -> AsyncIterator[Running]:
    target = target or FakeTarget(model=big_target)
    draft = draft or FakeDraft(model=big_draft)
    config = OrchestratorConfig(port=0, context_length=CONTEXT, **config_fields)
    server, port = await create_server(config, draft_client=draft, target_client=target, tokenizer=tokenizer)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 << 20)])
    try:
        yield Running(generation_pb2_grpc.GenerationServiceStub(channel), channel, target, draft, server)
    finally:
        await channel.close()
        await server.stop(None)
    if isinstance(target, FakeTarget):
        assert target.client_closed == 1  # the server's stop closes the clients


def req(**fields) -> generation_pb2.GenerateRequest:
    sampling = fields.pop("sampling", {})
    fields.setdefault("prompt", "Once upon a time")
    return generation_pb2.GenerateRequest(sampling=sampling_pb2.SamplingParams(**sampling), **fields)


INVALID = grpc.StatusCode.INVALID_ARGUMENT
# Past OrchestratorConfig.max_request_bytes (1 MiB): refused by gRPC itself, before the servicer runs,
# with RESOURCE_EXHAUSTED "SERVER: Received message larger than max (<n> vs. 1048576)".
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED

# (name, request fields, status, text the message must contain: the field, or gRPC's own words)
BAD_REQUESTS = [
    ("neither prompt nor ids", dict(prompt=""), INVALID, "prompt"),
    ("both prompt and ids", dict(prompt_token_ids=[1, 2]), INVALID, "prompt"),
    ("oversized prompt", dict(prompt="x" * 32769), INVALID, "prompt: 32769 characters exceed"),
    ("token id past the vocabulary", dict(prompt="", prompt_token_ids=[5, VOCAB]), INVALID, "prompt_token_ids[1]"),
    ("negative token id", dict(prompt="", prompt_token_ids=[-1]), INVALID, "prompt_token_ids[0]"),
    ("negative temperature", dict(sampling=dict(temperature=-0.5)), INVALID, "sampling.temperature"),
    ("NaN temperature", dict(sampling=dict(temperature=math.nan)), INVALID, "sampling.temperature"),
    ("infinite temperature", dict(sampling=dict(temperature=math.inf)), INVALID, "sampling.temperature"),
    ("top_k above the vocabulary", dict(sampling=dict(top_k=VOCAB + 1)), INVALID, "sampling.top_k"),
    ("top_p 0", dict(sampling=dict(top_p=0.0)), INVALID, "sampling.top_p"),
    ("top_p above 1", dict(sampling=dict(top_p=1.5)), INVALID, "sampling.top_p"),
    ("NaN top_p", dict(sampling=dict(top_p=math.nan)), INVALID, "sampling.top_p"),
    ("K above the maximum", dict(num_draft_tokens=9), INVALID, "num_draft_tokens"),
    ("max_new_tokens 0", dict(max_new_tokens=0), INVALID, "max_new_tokens"),
    ("max_new_tokens above the limit", dict(max_new_tokens=1025), INVALID, "max_new_tokens: must be <= 1024"),
    ("max_new_tokens beyond the context", dict(max_new_tokens=CONTEXT), INVALID, "max_new_tokens: 64 does not fit"),
    ("prompt over the context", dict(prompt="word " * 100), INVALID, "context length"),
    ("ids over the context", dict(prompt="", prompt_token_ids=[100] * CONTEXT), INVALID, "prompt_token_ids"),
    ("too many stop strings", dict(stop=[f"s{i}" for i in range(9)]), INVALID, "stop: at most 8"),
    ("oversized stop string", dict(stop=["ok", "x" * 129]), INVALID, "stop[1]"),
    ("empty stop string", dict(stop=[""]), INVALID, "stop[0]"),
    ("oversized message (prompt)", dict(prompt="x" * (2 << 20)), TOO_BIG, "larger than max"),
    ("oversized message (ids)", dict(prompt="", prompt_token_ids=[VOCAB - 1] * 400_000), TOO_BIG, "larger than max"),
]


@pytest.mark.parametrize("fields, code, needle", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
@asyncio_test
async def test_bad_requests_are_refused_precisely(tokenizer, fields, code, needle):
    async with serving(tokenizer) as running:
        for call in (running.stub.Generate, running.stub.GenerateStream):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                result = call(req(**fields))
                if hasattr(result, "__aiter__"):
                    [_ async for _ in result]
                else:
                    await result
            assert info.value.code() == code, info.value.details()
            assert needle in info.value.details()
        # Nothing started, nothing leaked, and the server still serves.
        assert running.target.calls.opened == [] and running.draft.calls.opened == []
        assert sample(running, "specdec_orchestrator_live_generations") == 0
        response = await running.stub.Generate(req(max_new_tokens=3))
        assert len(response.token_ids) == 3
        if code == INVALID:  # counted by status; an oversized message never reaches the servicer
            for method in ("Generate", "GenerateStream"):
                labels = {"method": method, "code": "INVALID_ARGUMENT"}
                await _until(lambda labels=labels: sample(running, "specdec_orchestrator_requests_total", labels) == 1)


def test_the_table_covers_at_least_fifteen_cases():
    assert len(BAD_REQUESTS) >= 15


@asyncio_test
async def test_health_and_method_symbol_reflection(tokenizer):
    async with serving(tokenizer) as running:
        health = health_pb2_grpc.HealthStub(running.channel)
        for service in ("", "specdec.v1.GenerationService"):
            response = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(running.channel)
        ask = reflection_pb2.ServerReflectionRequest(file_containing_symbol="specdec.v1.GenerationService.Generate")
        responses = [r async for r in reflection.ServerReflectionInfo(iter([ask]))]
        assert responses[0].WhichOneof("message_response") == "file_descriptor_response"


@asyncio_test
async def test_stream_concatenates_to_the_unary_text(tokenizer):
    request = req(max_new_tokens=12, num_draft_tokens=3, sampling=dict(temperature=0.8, top_k=64, seed=42))
    async with serving(tokenizer) as running:
        unary = await running.stub.Generate(request)
        chunks = [c async for c in running.stub.GenerateStream(request)]
    assert unary.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert len(unary.token_ids) == 12 and unary.text
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert [c.finish_reason for c in chunks[:-1]] == [0] * (len(chunks) - 1)
    assert not any(c.HasField("stats") for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == generation_pb2.FINISH_REASON_LENGTH and last.HasField("stats")
    stats = unary.stats
    assert stats.rounds == len(chunks) and stats.num_draft_tokens == 3
    assert stats.emitted_tokens == stats.accepted_tokens + stats.rounds == 12
    assert stats.prompt_tokens == len(tokenizer.encode("Once upon a time"))
    assert len(stats.accepted_per_position) == 3
    assert stats.total_time_ms >= stats.draft_time_ms + stats.target_time_ms - 1e-6
    assert stats.orchestrator_time_ms >= 0


@asyncio_test
async def test_same_seed_same_text_and_target_only(tokenizer):
    async with serving(tokenizer) as running:
        greedy = dict(temperature=0.0)
        spec = await running.stub.Generate(req(max_new_tokens=16, num_draft_tokens=4, sampling=greedy))
        base = await running.stub.Generate(req(max_new_tokens=16, num_draft_tokens=0, sampling=greedy))
        assert spec.token_ids == base.token_ids and spec.text == base.text
        assert base.stats.drafted_tokens == 0 and base.stats.rounds == 16


@asyncio_test
async def test_stop_string_truncates_and_releases(tokenizer):
    request = req(max_new_tokens=30, sampling=dict(seed=7))
    async with serving(tokenizer) as running:
        full = await running.stub.Generate(request)
        stop = full.text[12:15]
        request.stop.append(stop)
        stopped = await running.stub.Generate(request)
        chunks = [c async for c in running.stub.GenerateStream(request)]
    assert stopped.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert stopped.text == full.text[: full.text.find(stop)]
    assert "".join(c.text for c in chunks) == stopped.text
    assert list(stopped.token_ids) == list(full.token_ids[: len(stopped.token_ids)])
    assert len(running.target.calls.closed) == len(running.target.calls.opened) == 3


@asyncio_test
async def test_the_answer_does_not_wait_for_the_releases_but_stop_does(tokenizer):
    target, draft = FakeTarget(model=big_target, close_delay_s=0.3), FakeDraft(model=big_draft, close_delay_s=0.3)
    async with serving(tokenizer, target=target, draft=draft) as running:
        response = await running.stub.Generate(req(max_new_tokens=6))
        assert response.finish_reason == generation_pb2.FINISH_REASON_LENGTH
        assert target.calls.opened and target.calls.closed == [] and draft.calls.closed == []  # under way
    assert target.calls.closed == target.calls.opened and draft.calls.closed == draft.calls.opened
    assert target.client_closed == 1


@asyncio_test
async def test_eos_and_context_length_finish(tokenizer):
    prompt_len = len(tokenizer.encode("Once upon a time"))
    async with serving(tokenizer, target=FakeTarget(model=eos_after(prompt_len + 5))) as running:
        response = await running.stub.Generate(req(max_new_tokens=30))
        assert response.finish_reason == generation_pb2.FINISH_REASON_EOS
        assert len(response.token_ids) == 5 and EOS not in response.token_ids
    async with serving(tokenizer) as running:
        response = await running.stub.Generate(req(max_new_tokens=CONTEXT - 2))  # fits, but not after the prompt
        assert response.finish_reason == generation_pb2.FINISH_REASON_CONTEXT_LENGTH
        assert len(response.token_ids) == CONTEXT - prompt_len


@asyncio_test
async def test_prompt_token_ids(tokenizer):
    async with serving(tokenizer) as running:
        response = await running.stub.Generate(req(prompt="", prompt_token_ids=[19556, 905], max_new_tokens=3))
        assert response.stats.prompt_tokens == 2 and len(response.token_ids) == 3
        assert running.target.calls.requests[0][2][:2] == [19556, 905]


@pytest.mark.parametrize(
    "error, code",
    [
        (TargetCapacityExhausted("capacity: 64 sequences"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (TargetUnavailable("Triton is down"), grpc.StatusCode.UNAVAILABLE),
        (TargetError("something odd"), grpc.StatusCode.INTERNAL),
    ],
)
@asyncio_test
async def test_target_errors_map_to_statuses(tokenizer, error, code):
    async with serving(tokenizer, target=FakeTarget(model=big_target, fail_at={1: error})) as running:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.Generate(req(max_new_tokens=20))
        assert info.value.code() == code
        if code == grpc.StatusCode.INTERNAL:
            assert "something odd" not in info.value.details() and "ref" in info.value.details()
        await _until(lambda: both_released(running))  # released after the answer


@asyncio_test
async def test_draft_failure_still_answers(tokenizer):
    draft = FakeDraft(model=big_draft, fail_at={0: DraftError("draft down")})
    async with serving(tokenizer, draft=draft) as running:
        response = await running.stub.Generate(req(max_new_tokens=6))
    assert len(response.token_ids) == 6
    assert response.stats.draft_fallback_rounds == 5 and response.stats.drafted_tokens == 0


@asyncio_test
async def test_deadline_exceeded_releases(tokenizer):
    async with serving(tokenizer, target=FakeTarget(model=big_target, delay_s=0.1)) as running:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.Generate(req(max_new_tokens=60, num_draft_tokens=0), timeout=1.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await _until(lambda: both_released(running) and running.target.calls.opened != [])


@asyncio_test
async def test_client_cancel_releases(tokenizer):
    async with serving(tokenizer, target=FakeTarget(model=big_target, delay_s=0.05)) as running:
        call = running.stub.GenerateStream(req(max_new_tokens=60))
        await call.read()
        call.cancel()
        await _until(lambda: both_released(running) and running.target.calls.opened != [])


def both_released(running: Running) -> bool:
    """Every session opened on both fakes has been closed (the loop releases after the answer)."""
    return all(fake.calls.closed == fake.calls.opened for fake in (running.target, running.draft))


async def _until(condition, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not reached within {timeout_s} s")


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
            await _until(lambda: fake.calls.closed == fake.calls.opened != [])  # the stream's end released it
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
            response = await running.stub.Generate(req(max_new_tokens=10, sampling=dict(temperature=0.0)))
            await _until(lambda: sorted(fake.calls.closed) == sorted(fake.calls.opened))
    assert len(fake.calls.opened) == 2 and fake.calls.requests[2][1] == 0  # keep 0 on the new stream
    assert response.stats.draft_fallback_rounds == 0


@asyncio_test
async def test_grpc_draft_unreachable_falls_back(tokenizer):
    async with serving(tokenizer, draft=GrpcDraftClient("127.0.0.1:1")) as running:
        response = await running.stub.Generate(req(max_new_tokens=4))
    assert len(response.token_ids) == 4 and response.stats.draft_fallback_rounds == 3


# --- metrics, fallbacks, an unreachable Triton, deadlines ------------------------------------------------


@asyncio_test
async def test_metrics_count_requests_tokens_rounds_and_stages(tokenizer):
    async with serving(tokenizer) as running:
        responses = [await running.stub.Generate(req(max_new_tokens=10, num_draft_tokens=3)) for _ in range(2)]
        chunks = [c async for c in running.stub.GenerateStream(req(max_new_tokens=10, num_draft_tokens=0))]
        with pytest.raises(grpc.aio.AioRpcError):
            await running.stub.Generate(req(max_new_tokens=0))
        assert sample(running, "specdec_orchestrator_requests_total", {"method": "Generate", "code": "OK"}) == 2
        assert sample(running, "specdec_orchestrator_requests_total", {"method": "GenerateStream", "code": "OK"}) == 1
        labels = {"method": "Generate", "code": "INVALID_ARGUMENT"}
        # An aborted call is counted as its handler unwinds, which can be just after the client has its
        # status: wait for the count rather than race it.
        await _until(lambda: sample(running, "specdec_orchestrator_requests_total", labels) == 1)
        assert sample(running, "specdec_orchestrator_live_generations") == 0
        assert sample(running, "specdec_orchestrator_generations_total", {"outcome": "length"}) == 3
        stats = [r.stats for r in responses] + [chunks[-1].stats]
        emitted = sum(s.emitted_tokens for s in stats)
        assert sample(running, "specdec_orchestrator_tokens_total", {"kind": "emitted"}) == emitted
        accepted = sum(s.accepted_tokens for s in stats)
        assert sample(running, "specdec_orchestrator_tokens_total", {"kind": "accepted"}) == accepted
        rounds = sum(s.rounds for s in stats)
        speculative = sample(running, "specdec_orchestrator_rounds_total", {"mode": "speculative"})
        target_only = sample(running, "specdec_orchestrator_rounds_total", {"mode": "target_only"})
        assert speculative + target_only == rounds  # a K > 0 run's last round may have room for no draft
        assert target_only >= stats[2].rounds and speculative > 0
        for stage in ("draft", "target", "orchestrator", "total"):
            assert sample(running, "specdec_orchestrator_round_seconds_count", {"stage": stage}) == rounds
        assert sample(running, "specdec_orchestrator_acceptance_rate_count") == 2  # generations that drafted
        first = sum(s.accepted_per_position[0] for s in stats[:2])
        assert sample(running, "specdec_orchestrator_accepted_per_position_total", {"position": "1"}) == first
        assert sample(running, "specdec_orchestrator_accepted_tokens_per_round_sum") == accepted
        assert sample(running, "specdec_orchestrator_draft_breaker_state") == 0


@asyncio_test
async def test_draft_failures_open_the_breaker_and_are_counted(tokenizer):
    draft = FakeDraft(model=big_draft, fail_at={i: DraftError("draft down") for i in range(100)})
    async with serving(tokenizer, draft=draft, draft_breaker_failures=2, draft_breaker_cooldown_s=600) as running:
        first = [await running.stub.Generate(req(max_new_tokens=5)) for _ in range(2)]
        opened = len(draft.calls.opened)
        later = await running.stub.Generate(req(max_new_tokens=5))
        assert len(draft.calls.opened) == opened  # the open breaker skips the draft: not even a stream
        assert all(len(r.token_ids) == 5 and r.stats.draft_fallback_rounds == 4 for r in [*first, later])
        assert sample(running, "specdec_orchestrator_draft_breaker_state") == 2  # open
        assert sample(running, "specdec_orchestrator_draft_breaker_transitions_total", {"state": "open"}) == 1
        assert sample(running, "specdec_orchestrator_draft_fallbacks_total", {"reason": "error"}) == 2
        assert sample(running, "specdec_orchestrator_draft_fallbacks_total", {"reason": "breaker_open"}) == 1
        assert sample(running, "specdec_orchestrator_draft_fallback_rounds_total") == 12
        assert sample(running, "specdec_orchestrator_rounds_total", {"mode": "draft_fallback"}) == 12
        assert sample(running, "specdec_orchestrator_requests_total", {"method": "Generate", "code": "OK"}) == 3


@asyncio_test
async def test_unreachable_triton_is_unavailable_with_a_clear_message_before_the_deadline(tokenizer):
    from orchestrator.target_triton import TritonTargetClient
    from tests.unit.test_target_triton import unused_port

    port = unused_port()
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
        await _until(lambda: running.draft.calls.closed == running.draft.calls.opened)  # the draft stream's release
        labels = {"method": "Generate", "code": "UNAVAILABLE"}
        assert sample(running, "specdec_orchestrator_requests_total", labels) == 1
        assert sample(running, "specdec_orchestrator_live_generations") == 0


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
    assert service.deadlines[0] is not None and 10 < service.deadlines[0] <= 20


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
