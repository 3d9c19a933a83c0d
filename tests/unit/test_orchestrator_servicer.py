"""The orchestrator's gRPC surface on 127.0.0.1 (port 0) with fake draft/target clients and the real tokenizer.

Covers: validation (INVALID_ARGUMENT naming the field), the error map, health, method-symbol reflection,
streaming == unary for a seed, stop strings / eos / context length, and releases on cancel.
"""

from __future__ import annotations

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from orchestrator.clients import DraftError, TargetCapacityExhausted, TargetError, TargetUnavailable
from specdec.v1 import generation_pb2
from tests.fakes import (
    CONTEXT,
    EOS,
    VOCAB,
    FakeDraft,
    FakeTarget,
    Running,
    asyncio_test,
    big_draft,
    big_target,
    eos_after,
    metric_value,
    req,
    serving,
    until,
)

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
    ("K above the maximum", dict(num_draft_tokens=17), INVALID, "num_draft_tokens"),
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
        assert metric_value(running, "specdec_orchestrator_live_generations") == 0
        response = await running.stub.Generate(req(max_new_tokens=3))
        assert len(response.token_ids) == 3
        if code == INVALID:  # counted by status; an oversized message never reaches the servicer
            for method in ("Generate", "GenerateStream"):
                labels = {"method": method, "code": "INVALID_ARGUMENT"}
                await until(lambda labels=labels: metric_value(running, "specdec_orchestrator_requests_total", labels) == 1)


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
        assert base.stats.drafted_tokens == 0 and base.stats.rounds == 2  # the target decodes 8 tokens a round
        assert (base.stats.decoded_rounds, base.stats.decoded_tokens) == (2, 16)
        assert spec.stats.decoded_tokens <= 1  # only a last round with no room left to draft


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
        await until(lambda: both_released(running))  # released after the answer


@asyncio_test
async def test_draft_failure_still_answers(tokenizer):
    draft = FakeDraft(model=big_draft, fail_at={0: DraftError("draft down")})
    async with serving(tokenizer, draft=draft) as running:
        response = await running.stub.Generate(req(max_new_tokens=6))
    assert len(response.token_ids) == 6
    # The draft fails in the first round, which the target then decodes alone (up to target_steps tokens).
    assert response.stats.draft_fallback_rounds == response.stats.rounds == 1 and response.stats.drafted_tokens == 0


@asyncio_test
async def test_deadline_exceeded_releases(tokenizer):
    async with serving(tokenizer, target=FakeTarget(model=big_target, delay_s=0.1)) as running:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.Generate(req(max_new_tokens=60, num_draft_tokens=0), timeout=1.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await until(lambda: both_released(running) and running.target.calls.opened != [])


@asyncio_test
async def test_client_cancel_releases(tokenizer):
    async with serving(tokenizer, target=FakeTarget(model=big_target, delay_s=0.05)) as running:
        call = running.stub.GenerateStream(req(max_new_tokens=60))
        await call.read()
        call.cancel()
        await until(lambda: both_released(running) and running.target.calls.opened != [])


def both_released(running: Running) -> bool:
    """Every session opened on both fakes has been closed (the loop releases after the answer)."""
    return all(fake.calls.closed == fake.calls.opened for fake in (running.target, running.draft))




@asyncio_test
async def test_a_seed_is_reported_and_makes_the_text_reproducible_by_default(tokenizer):
    async with serving(tokenizer) as running:
        seeded = await running.stub.Generate(req(max_new_tokens=4, sampling=dict(temperature=0.8, seed=2**63 + 5)))
        assert seeded.stats.seed == 2**63 + 5 and seeded.stats.reproducible
        unseeded = await running.stub.Generate(req(max_new_tokens=4, sampling=dict(temperature=0.8)))
        assert not unseeded.stats.reproducible and unseeded.stats.seed != 0
        chosen = await running.stub.Generate(
            req(max_new_tokens=4, reproducible=False, sampling=dict(temperature=0.8, seed=9))
        )
        assert not chosen.stats.reproducible and chosen.stats.seed == 9
