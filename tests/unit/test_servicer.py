"""The orchestrator's gRPC surface on 127.0.0.1 (port 0) with fake draft/target clients and the real tokenizer.

Covers: validation (INVALID_ARGUMENT naming the field), the error map, health, method-symbol reflection,
streaming == unary for a seed, stop strings / eos / context length, and releases on cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
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
from orchestrator.server import create_server
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


@contextlib.asynccontextmanager
async def serving(tokenizer, target: FakeTarget | None = None, draft=None) -> AsyncIterator[Running]:
    target = target or FakeTarget(model=big_target)
    draft = draft or FakeDraft(model=big_draft)
    config = OrchestratorConfig(port=0, context_length=CONTEXT)
    server, port = await create_server(config, draft_client=draft, target_client=target, tokenizer=tokenizer)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Running(generation_pb2_grpc.GenerationServiceStub(channel), channel, target, draft)
    finally:
        await channel.close()
        await server.stop(None)
    assert target.client_closed == 1  # the server's stop closes the clients


def req(**fields) -> generation_pb2.GenerateRequest:
    sampling = fields.pop("sampling", {})
    fields.setdefault("prompt", "Once upon a time")
    return generation_pb2.GenerateRequest(sampling=sampling_pb2.SamplingParams(**sampling), **fields)


BAD_REQUESTS = [
    ("neither prompt nor ids", dict(prompt=""), "prompt"),
    ("both prompt and ids", dict(prompt_token_ids=[1, 2]), "prompt"),
    ("token id past the vocabulary", dict(prompt="", prompt_token_ids=[5, VOCAB]), "prompt_token_ids[1]"),
    ("negative token id", dict(prompt="", prompt_token_ids=[-1]), "prompt_token_ids[0]"),
    ("negative temperature", dict(sampling=dict(temperature=-0.5)), "sampling.temperature"),
    ("NaN temperature", dict(sampling=dict(temperature=math.nan)), "sampling.temperature"),
    ("top_p 0", dict(sampling=dict(top_p=0.0)), "sampling.top_p"),
    ("top_p above 1", dict(sampling=dict(top_p=1.5)), "sampling.top_p"),
    ("top_k above the vocabulary", dict(sampling=dict(top_k=VOCAB + 1)), "sampling.top_k"),
    ("K above the maximum", dict(num_draft_tokens=9), "num_draft_tokens"),
    ("max_new_tokens 0", dict(max_new_tokens=0), "max_new_tokens"),
    ("max_new_tokens above the limit", dict(max_new_tokens=1025), "max_new_tokens"),
    ("prompt over the context", dict(prompt="word " * 100), "context length"),
    ("ids over the context", dict(prompt="", prompt_token_ids=[100] * CONTEXT), "prompt_token_ids"),
    ("too many stop strings", dict(stop=[f"s{i}" for i in range(9)]), "stop"),
    ("oversized stop string", dict(stop=["ok", "x" * 129]), "stop[1]"),
    ("empty stop string", dict(stop=[""]), "stop[0]"),
    ("oversized prompt", dict(prompt="x" * 32769), "prompt"),
]


@pytest.mark.parametrize("fields, field_name", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
@asyncio_test
async def test_bad_requests_are_invalid_argument(tokenizer, fields, field_name):
    async with serving(tokenizer) as running:
        for call in (running.stub.Generate, running.stub.GenerateStream):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                result = call(req(**fields))
                if hasattr(result, "__aiter__"):
                    [_ async for _ in result]
                else:
                    await result
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field_name in info.value.details()
        assert running.target.calls.opened == []


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
async def test_eos_and_context_length_finish(tokenizer):
    prompt_len = len(tokenizer.encode("Once upon a time"))
    async with serving(tokenizer, target=FakeTarget(model=eos_after(prompt_len + 5))) as running:
        response = await running.stub.Generate(req(max_new_tokens=30))
        assert response.finish_reason == generation_pb2.FINISH_REASON_EOS
        assert len(response.token_ids) == 5 and EOS not in response.token_ids
    async with serving(tokenizer) as running:
        response = await running.stub.Generate(req(max_new_tokens=100))
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
        assert running.target.calls.closed == running.target.calls.opened
        assert running.draft.calls.closed == running.draft.calls.opened


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
            await running.stub.Generate(req(max_new_tokens=200), timeout=1.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await _until(lambda: running.target.calls.closed == running.target.calls.opened != [])
        assert running.draft.calls.closed == running.draft.calls.opened


@asyncio_test
async def test_client_cancel_releases(tokenizer):
    async with serving(tokenizer, target=FakeTarget(model=big_target, delay_s=0.05)) as running:
        call = running.stub.GenerateStream(req(max_new_tokens=200))
        await call.read()
        call.cancel()
        await _until(lambda: running.target.calls.closed == running.target.calls.opened != [])
        assert running.draft.calls.closed == running.draft.calls.opened


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
                yield draft_pb2.ProposeResponse(
                    draft_token_ids=proposal.token_ids,
                    q_probs=b"" if proposal.q is None else encode_rows(proposal.q),
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
