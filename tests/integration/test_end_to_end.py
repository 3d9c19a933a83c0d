"""The whole system on real parts: the real Triton server, SmolLM2-135M as target, every drafter the draft
service offers (a SmolLM2 self-draft, prompt lookup, suffix drafting, the hybrid).

Greedy speculative output must equal greedy target-only output token for token, for every drafter, fixed
K and auto K, alone and 8 at once; a seed must reproduce sampled text; the statistics must add up; every exit path (done, cancelled stream, bad request) must leave
zero live sequences on both the draft service and the Triton model; bad requests are refused precisely.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from specdec.v1 import draft_pb2, draft_pb2_grpc, generation_pb2, generation_pb2_grpc, sampling_pb2
from tests.integration.live import draft_live_sequences, frozen_objects, triton_live_sequences, wait_until

pytestmark = pytest.mark.integration

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]


DRAFTERS = ["model", "ngram", "suffix", "hybrid"]


def generate(
    stub, prompt: str, k: int | None, max_new: int = 24, drafter: str = "model", **sampling
) -> generation_pb2.GenerateResponse:
    request = generation_pb2.GenerateRequest(
        prompt=prompt, max_new_tokens=max_new, sampling=sampling_pb2.SamplingParams(**sampling), drafter=drafter
    )
    if k is not None:
        request.num_draft_tokens = k
    return stub.Generate(request, timeout=300)


def check_stats(response: generation_pb2.GenerateResponse, k: int | None, drafter: str = "model") -> None:
    stats = response.stats
    assert stats.auto_num_draft_tokens == (k is None) and stats.drafter == drafter
    k = stats.num_draft_tokens if k is None else k
    assert stats.num_draft_tokens == k
    assert stats.emitted_tokens == stats.accepted_tokens + stats.rounds - stats.decoded_rounds + stats.decoded_tokens
    assert stats.decoded_rounds <= stats.decoded_tokens <= 8 * stats.decoded_rounds  # --target-steps 8
    assert sum(stats.rounds_by_k) == stats.rounds and len(stats.rounds_by_k) == k + 1
    # A round proposes at most its K tokens, fewer near the end (never past max_new_tokens) or when a lookup's
    # match runs out, none in fallback.
    asked = sum(i * n for i, n in enumerate(stats.rounds_by_k))
    assert stats.accepted_tokens <= stats.drafted_tokens <= asked
    if k and drafter == "model" and not stats.auto_num_draft_tokens:
        assert stats.drafted_tokens > 0
    assert 0.0 <= stats.acceptance_rate <= 1.0
    if stats.drafted_tokens:
        assert math.isclose(stats.acceptance_rate, stats.accepted_tokens / stats.drafted_tokens, rel_tol=1e-6)
    per_position = list(stats.accepted_per_position)
    assert len(per_position) == k
    assert sum(per_position) == stats.accepted_tokens
    # A draft token is accepted only if every earlier one was: counts never grow with the position.
    assert all(a >= b for a, b in zip(per_position, per_position[1:]))
    assert len(response.token_ids) <= stats.emitted_tokens
    assert stats.total_time_ms >= stats.draft_time_ms + stats.target_time_ms - 1e-6


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculative_equals_greedy_target_only(stub, prompt: str) -> None:
    baseline = generate(stub, prompt, k=0, temperature=0.0)
    check_stats(baseline, 0)
    # the target decodes 8 tokens per call (--target-steps), the last call to the limit or the end of sequence
    assert baseline.stats.decoded_rounds == baseline.stats.rounds == math.ceil(baseline.stats.emitted_tokens / 8)
    assert len(baseline.token_ids) > 0
    for drafter, k in [("model", 1), *((d, k) for d in DRAFTERS for k in (4, None))]:
        speculative = generate(stub, prompt, k=k, drafter=drafter, temperature=0.0)
        check_stats(speculative, k, drafter)
        where = f"{drafter} with K={'auto' if k is None else k}"
        assert list(speculative.token_ids) == list(baseline.token_ids), f"{where} diverged from target-only"
        assert speculative.text == baseline.text


def test_greedy_under_8_way_concurrency_equals_greedy_target_only(stub) -> None:
    """Eight generations at once (batched with each other in Triton and the draft's step loop), each with
    another drafter or K, give each prompt's single-stream target-only tokens."""
    baselines = {p: list(generate(stub, p, k=0, temperature=0.0).token_ids) for p in PROMPTS}
    jobs = [(PROMPTS[i % len(PROMPTS)], DRAFTERS[i % len(DRAFTERS)], (2, None)[i % 2]) for i in range(8)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: generate(stub, job[0], k=job[2], drafter=job[1], temperature=0.0), jobs))
    for (prompt, drafter, k), answer in zip(jobs, answers):
        check_stats(answer, k, drafter)
        assert list(answer.token_ids) == baselines[prompt], f"{drafter} K={k} on {prompt!r} diverged under load"


def test_the_same_seed_gives_the_same_sampled_text(stub) -> None:
    params = dict(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    first = generate(stub, PROMPTS[2], k=4, max_new=32, **params)
    second = generate(stub, PROMPTS[2], k=4, max_new=32, **params)
    check_stats(first, 4)
    assert list(first.token_ids) == list(second.token_ids)
    assert first.text == second.text
    others = {tuple(generate(stub, PROMPTS[2], k=4, max_new=32, **{**params, "seed": s}).token_ids) for s in (1, 2, 3)}
    assert len(others | {tuple(first.token_ids)}) > 1, "different seeds all gave the same sample"


def test_stream_chunks_add_up_to_the_unary_response(stub) -> None:
    request = generation_pb2.GenerateRequest(
        prompt=PROMPTS[0], max_new_tokens=20, num_draft_tokens=3, drafter="model",
        sampling=sampling_pb2.SamplingParams(temperature=0.7, seed=7),
    )
    unary = stub.Generate(request, timeout=300)
    chunks = list(stub.GenerateStream(request, timeout=300))
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert chunks[-1].finish_reason == unary.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
    assert chunks[-1].stats.emitted_tokens == unary.stats.emitted_tokens


def test_stop_strings_end_the_text(stub) -> None:
    full = generate(stub, PROMPTS[1], k=4, max_new=40, temperature=0.0)
    assert len(full.text) > 4
    stop = full.text[2:4]
    request = generation_pb2.GenerateRequest(
        prompt=PROMPTS[1], max_new_tokens=40, num_draft_tokens=4, stop=[stop],
        sampling=sampling_pb2.SamplingParams(temperature=0.0),
    )
    stopped = stub.Generate(request, timeout=300)
    assert stopped.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert stopped.text == full.text[: full.text.index(stop)]


def test_no_sequence_outlives_its_generation_even_when_cancelled(stack, stub) -> None:
    for i in range(4):
        generate(stub, PROMPTS[i % 3], k=2, max_new=8, temperature=0.8, seed=i)
    for i in range(4):
        call = stub.GenerateStream(
            generation_pb2.GenerateRequest(prompt=PROMPTS[i % 3], max_new_tokens=200, num_draft_tokens=4), timeout=300
        )
        next(iter(call))  # the generation is under way on both services
        call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(generation_pb2.GenerateRequest(prompt="Hello", max_new_tokens=30), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: draft_live_sequences(stack.draft_address) == 0, what="draft sequences released")
    wait_until(lambda: triton_live_sequences(stack.triton_metrics_url) == 0, what="Triton sequences released")


BAD_REQUESTS = [
    ("empty prompt", dict(prompt=""), "prompt"),
    ("negative temperature", dict(sampling=sampling_pb2.SamplingParams(temperature=-1.0)), "temperature"),
    ("top_p zero", dict(sampling=sampling_pb2.SamplingParams(top_p=0.0)), "top_p"),
    ("top_p above one", dict(sampling=sampling_pb2.SamplingParams(top_p=1.5)), "top_p"),
    ("K over the maximum", dict(num_draft_tokens=1000), "num_draft_tokens"),
    ("prompt over the context", dict(prompt="", prompt_token_ids=[504] * 9000), "context"),
    ("max_new_tokens zero", dict(max_new_tokens=0), "max_new_tokens"),
]


@pytest.mark.parametrize(("name", "fields", "word"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_are_invalid_argument_and_the_service_stays_up(stub, channel, name, fields, word) -> None:
    request = generation_pb2.GenerateRequest(prompt="Hello", max_new_tokens=4)
    for key, value in fields.items():
        if key == "sampling":
            request.sampling.CopyFrom(value)
        elif key == "prompt_token_ids":
            request.prompt_token_ids.extend(value)
        else:
            setattr(request, key, value)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert word in err.value.details(), err.value.details()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_health_and_reflection_with_grpc_clients(channel, stack) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="specdec.v1.GenerationService"), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="specdec.v1.GenerationService.Generate"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="specdec.v1.GenerationService.NoSuchMethod"),
    ]
    listed, method, missing = list(reflection.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert {"specdec.v1.GenerationService", "grpc.health.v1.Health"} <= names
    assert method.file_descriptor_response.file_descriptor_proto, method
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    with grpc.insecure_channel(stack.draft_address) as draft_channel:
        stats = draft_pb2_grpc.DraftServiceStub(draft_channel).GetStats(draft_pb2.GetStatsRequest(), timeout=5)
    assert stats.vocab_size == 49152


@pytest.fixture(scope="module")
def channel(stack):
    with grpc.insecure_channel(stack.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return generation_pb2_grpc.GenerationServiceStub(channel)



def test_the_draft_service_and_the_orchestrator_freeze_what_startup_left(stack) -> None:
    """Once, after startup: torch, transformers and the tokenizer (~300,000 objects) are out of every later full
    garbage collection, which would otherwise stall a round for ~200 ms (specdec.gc_freeze)."""
    logs = {process.name: process.log_path.read_text(errors="replace") for process in stack.processes}
    for name in ("draft", "orchestrator"):
        assert frozen_objects(logs[name]) > 100_000, name  # after the heavy imports, not before
