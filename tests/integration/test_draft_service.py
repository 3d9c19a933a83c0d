"""The draft gRPC server for real: on 127.0.0.1 port 0, a tiny random Llama (and once SmolLM2).

Each server is started and stopped by a fixture or the test that needs it; the tests talk to it with
blocking grpc clients, exactly as a foreign client would.
"""

from __future__ import annotations

import math
import queue
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from draft_service.build import build_core
from draft_service.config import DraftConfig
from draft_service.core import DraftCore
from draft_service.drafters.base import Drafter, DraftRequest, DraftSequence
from draft_service.drafters.steps import StepLoop
from draft_service.server import SERVICE_NAME, create_server
from specdec.procs import free_port
from specdec.proposal import Proposal
from specdec.rows import decode_packed
from specdec.tiny import TINY_VOCAB_SIZE, save_tiny_llama
from specdec.v1 import draft_pb2, draft_pb2_grpc, sampling_pb2

pytestmark = pytest.mark.integration

PROMPT = [5, 17, 3, 42, 8]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
SAMPLING = sampling_pb2.SamplingParams
Stub = draft_pb2_grpc.DraftServiceStub


class RunningServer:
    """A started draft server and a blocking channel to it."""

    def __init__(self, config: DraftConfig, core: tuple[DraftCore, StepLoop | None] | None = None) -> None:
        self.handle = create_server(config, core=core)
        self.port = self.handle.port
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = draft_pb2_grpc.DraftServiceStub(self.channel)

    def live_sequences(self) -> int:
        return self.stub.GetStats(draft_pb2.GetStatsRequest(), timeout=5).live_sequences

    def stop(self) -> None:
        self.channel.close()
        self.handle.stop(0)


class Stream:
    """One Propose stream driven a request at a time."""

    def __init__(self, stub: Stub, timeout: float | None = None) -> None:
        self._requests: queue.Queue = queue.Queue()
        self.responses = stub.Propose(iter(self._requests.get, None), timeout=timeout)

    def round(self, **fields: Any) -> draft_pb2.ProposeResponse:
        fields.setdefault("sequence_id", 1)
        fields.setdefault("num_draft_tokens", 4)
        self._requests.put(draft_pb2.ProposeRequest(**fields))
        return next(self.responses)

    def close(self) -> None:
        self._requests.put(None)
        assert list(self.responses) == []

    def cancel(self) -> None:
        self.responses.cancel()
        self._requests.put(None)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}")
        time.sleep(0.02)


def tiny_config(folder: Path, **overrides: Any) -> DraftConfig:
    settings = dict(
        host="127.0.0.1", port=0, model=str(folder), keep_layers="", max_sequences=8, max_num_draft_tokens=8,
        threads=1,  # torch threads per round; a tiny model gains nothing from more
    )
    settings.update(overrides)
    return DraftConfig(**settings)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(tiny_folder: Path, metrics_port: int) -> Iterator[RunningServer]:
    running = RunningServer(tiny_config(tiny_folder, metrics_port=metrics_port))
    yield running
    running.stop()


@pytest.fixture()
def stub(server: RunningServer) -> Iterator[Stub]:
    assert server.live_sequences() == 0, "a previous test leaked a sequence"
    yield server.stub
    wait_until(lambda: server.live_sequences() == 0, "every test's sequences to be released")


def test_a_stream_of_rounds_then_release_on_completion(server: RunningServer, stub: Stub) -> None:
    stream = Stream(stub)
    first = stream.round(append_token_ids=PROMPT, num_draft_tokens=4, seed=1)
    assert len(first.draft_token_ids) == 4 and first.vocab_size == TINY_VOCAB_SIZE
    assert first.cache_length == len(PROMPT)  # the context; drafts are never part of it
    q = decode_packed(first.q_probs, first.q_index, 4, first.vocab_size).dense()
    torch.testing.assert_close(q.sum(-1), torch.ones(4), atol=1e-5, rtol=0)
    assert all(q[i, t] > 0 for i, t in enumerate(first.draft_token_ids))
    assert server.live_sequences() == 1
    # The target accepted 2 drafts and produced token 9: keep the context, append those three.
    sampling = sampling_pb2.SamplingParams(temperature=0.5, top_k=10, top_p=0.9)
    second = stream.round(
        keep_length=first.cache_length, append_token_ids=[*first.draft_token_ids[:2], 9], num_draft_tokens=3,
        sampling=sampling, seed=2,
    )
    q2 = decode_packed(second.q_probs, second.q_index, 3, TINY_VOCAB_SIZE).dense()
    assert ((q2 > 0).sum(-1) <= 10).all()
    assert 0 < len(second.q_index) <= 3 * 10 * 4  # top-k 10: only the support travels
    assert second.cache_length == len(PROMPT) + 3
    greedy = stream.round(
        keep_length=second.cache_length, append_token_ids=[*second.draft_token_ids], num_draft_tokens=2,
        sampling=sampling_pb2.SamplingParams(temperature=0.0),
    )
    assert greedy.q_probs == b"" and len(greedy.draft_token_ids) == 2
    stream.close()
    wait_until(lambda: server.live_sequences() == 0, "the completed stream's cache to be released")


def test_same_request_same_proposal_over_the_wire(stub: Stub) -> None:
    proposals = []
    for sequence_id in (11, 12):
        stream = Stream(stub)
        proposals.append(stream.round(sequence_id=sequence_id, append_token_ids=PROMPT, num_draft_tokens=6, seed=77))
        stream.close()
    assert proposals[0] == proposals[1]


def test_client_cancel_releases_the_cache(server: RunningServer, stub: Stub) -> None:
    stream = Stream(stub)
    stream.round(sequence_id=21, append_token_ids=PROMPT)
    assert server.live_sequences() == 1
    stream.cancel()
    wait_until(lambda: server.live_sequences() == 0, "the cancelled stream's cache to be released")


def test_deadline_releases_the_cache(server: RunningServer, stub: Stub) -> None:
    stream = Stream(stub, timeout=1.0)
    stream.round(sequence_id=22, append_token_ids=PROMPT)
    assert server.live_sequences() == 1
    with pytest.raises(grpc.RpcError) as error:
        next(stream.responses)  # no more requests: the deadline ends the stream
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: server.live_sequences() == 0, "the expired stream's cache to be released")
    stream.cancel()


def test_release_is_idempotent_and_the_stream_then_sees_not_found(server: RunningServer, stub: Stub) -> None:
    stream = Stream(stub)
    first = stream.round(sequence_id=31, append_token_ids=PROMPT)
    assert stub.Release(draft_pb2.ReleaseRequest(sequence_id=31), timeout=5).released is True
    assert stub.Release(draft_pb2.ReleaseRequest(sequence_id=31), timeout=5).released is False
    assert stub.Release(draft_pb2.ReleaseRequest(sequence_id=999), timeout=5).released is False
    assert server.live_sequences() == 0
    with pytest.raises(grpc.RpcError) as error:
        stream.round(sequence_id=31, keep_length=first.cache_length, append_token_ids=[1])
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_unknown_sequence_with_keep_length_is_not_found(stub: Stub) -> None:
    with pytest.raises(grpc.RpcError) as error:
        Stream(stub).round(sequence_id=41, keep_length=3, append_token_ids=[1])
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "41" in error.value.details()


def test_after_not_found_a_new_stream_re_prefills(stub: Stub) -> None:
    stream = Stream(stub)
    stream.round(sequence_id=42, append_token_ids=PROMPT)
    stub.Release(draft_pb2.ReleaseRequest(sequence_id=42), timeout=5)  # as if evicted
    with pytest.raises(grpc.RpcError):
        stream.round(sequence_id=42, keep_length=len(PROMPT), append_token_ids=[1])
    # The status ended that stream; the orchestrator opens a new one and re-sends the prefix.
    retry = Stream(stub)
    assert retry.round(sequence_id=42, append_token_ids=[*PROMPT, 1]).cache_length == len(PROMPT) + 1
    retry.close()


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        (dict(sequence_id=0, append_token_ids=PROMPT), "sequence_id must be non-zero"),
        (dict(append_token_ids=[]), "append_token_ids must hold at least one token"),
        (dict(append_token_ids=[1, TINY_VOCAB_SIZE]), r"append_token_ids must be in \[0, 64\)"),
        (dict(append_token_ids=PROMPT, num_draft_tokens=0), r"num_draft_tokens must be in \[1, 8\]"),
        (dict(append_token_ids=PROMPT, num_draft_tokens=9), r"num_draft_tokens must be in \[1, 8\]"),
        (dict(append_token_ids=[1] * 255, num_draft_tokens=4), "context length 256"),
        (dict(append_token_ids=PROMPT, sampling=SAMPLING(temperature=-1.0)), "sampling.temperature"),
        (dict(append_token_ids=PROMPT, sampling=SAMPLING(temperature=math.nan)), "sampling.temperature"),
        (dict(append_token_ids=PROMPT, sampling=SAMPLING(top_p=0.0)), "sampling.top_p"),
        (dict(append_token_ids=PROMPT, sampling=SAMPLING(top_p=1.5)), "sampling.top_p"),
        (dict(append_token_ids=PROMPT, sampling=SAMPLING(top_k=65)), "sampling.top_k must be <= vocab size 64"),
        (dict(append_token_ids=PROMPT, drafter="magic"), "drafter must be one of"),
    ],
)
def test_invalid_requests_and_the_server_stays_up(server: RunningServer, stub: Stub, fields: dict, pattern: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        Stream(stub).round(**fields)
    assert error.value.code() == INVALID, error.value.details()
    assert re.search(pattern, error.value.details()), error.value.details()
    assert server.live_sequences() == 0
    stream = Stream(stub)
    stream.round(sequence_id=50, append_token_ids=PROMPT)
    stream.close()


def test_in_stream_validation(stub: Stub) -> None:
    stream = Stream(stub)
    first = stream.round(sequence_id=61, append_token_ids=PROMPT)
    with pytest.raises(grpc.RpcError) as error:
        stream.round(sequence_id=61, keep_length=first.cache_length + 1, append_token_ids=[1])
    assert error.value.code() == INVALID and "keep_length" in error.value.details()

    stream = Stream(stub)
    stream.round(sequence_id=62, append_token_ids=PROMPT)
    with pytest.raises(grpc.RpcError) as error:
        stream.round(sequence_id=63, append_token_ids=PROMPT)
    assert error.value.code() == INVALID and "same on every request" in error.value.details()

    owner = Stream(stub)
    owner.round(sequence_id=64, append_token_ids=PROMPT)
    with pytest.raises(grpc.RpcError) as error:
        Stream(stub).round(sequence_id=64, append_token_ids=PROMPT)
    assert error.value.code() == INVALID and "another open Propose stream" in error.value.details()
    owner.round(sequence_id=64, keep_length=len(PROMPT), append_token_ids=[2])  # the owner is unaffected
    owner.close()


def test_resource_exhausted_past_capacity(tiny_folder: Path) -> None:
    running = RunningServer(tiny_config(tiny_folder, max_sequences=1))
    try:
        holder = Stream(running.stub)
        holder.round(sequence_id=1, append_token_ids=PROMPT)
        with pytest.raises(grpc.RpcError) as error:
            Stream(running.stub).round(sequence_id=2, append_token_ids=PROMPT)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "capacity" in error.value.details()
        stats = running.stub.GetStats(draft_pb2.GetStatsRequest(), timeout=5)
        assert (stats.live_sequences, stats.max_sequences, stats.vocab_size) == (1, 1, TINY_VOCAB_SIZE)
        assert list(stats.drafters) == ["model", "ngram", "suffix", "hybrid"]
        holder.close()
        wait_until(lambda: running.live_sequences() == 0, "the holder's release")
        Stream(running.stub).round(sequence_id=2, append_token_ids=PROMPT)  # room again
    finally:
        running.stop()


def test_at_most_max_sequences_streams_and_the_rest_of_the_api_still_answers(tiny_folder: Path) -> None:
    """Each open stream holds a server thread; the threads kept spare serve everything else."""
    running = RunningServer(tiny_config(tiny_folder, max_sequences=2))
    try:
        holders = [Stream(running.stub) for _ in range(2)]
        holders[0].round(sequence_id=1, append_token_ids=PROMPT)  # one stream has a cache, one has none yet
        refused = Stream(running.stub, timeout=10)
        with pytest.raises(grpc.RpcError) as error:
            next(refused.responses)  # refused before it sends anything
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 Propose streams are open" in error.value.details()
        health = health_pb2_grpc.HealthStub(running.channel)
        for _ in range(3):  # more calls than spare threads, one after the other
            request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            assert health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            assert running.live_sequences() == 1
        reflection = reflection_pb2_grpc.ServerReflectionStub(running.channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        assert list(reflection.ServerReflectionInfo(iter([listing]), timeout=5))
        assert running.stub.Release(draft_pb2.ReleaseRequest(sequence_id=99), timeout=5).released is False
        holders[1].close()
        retry = Stream(running.stub)  # a stream ended: room again
        assert len(retry.round(sequence_id=2, append_token_ids=PROMPT).draft_token_ids) == 4
        for stream in (retry, holders[0]):
            stream.close()
        wait_until(lambda: running.live_sequences() == 0, "both streams' release")
    finally:
        running.stop()


def test_idle_sequences_are_evicted_in_the_background(tiny_folder: Path) -> None:
    running = RunningServer(tiny_config(tiny_folder, idle_ttl_s=0.3))
    try:
        stream = Stream(running.stub)
        first = stream.round(sequence_id=8, append_token_ids=PROMPT)
        wait_until(lambda: running.live_sequences() == 0, "the idle sequence's eviction (no request arrived)")
        with pytest.raises(grpc.RpcError) as error:
            stream.round(sequence_id=8, keep_length=first.cache_length, append_token_ids=[1])
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        running.stop()


def test_a_taken_port_is_refused(server: RunningServer, tiny_folder: Path) -> None:
    with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{server.port}"):
        RunningServer(tiny_config(tiny_folder, port=server.port))


class _Wrapped:
    """The model drafter, wrapped to fail or to block on cue."""

    name = "model"

    def __init__(self, inner: Drafter, fail: bool = False) -> None:
        self.inner, self.fail = inner, fail
        self.entered, self.proceed = threading.Event(), threading.Event()

    def propose(self, request: DraftRequest) -> Proposal:
        self.entered.set()
        assert self.proceed.wait(30)
        proposal = self.inner.propose(request)  # the sequence now holds a KV cache
        if self.fail:
            raise RuntimeError("secret internal detail")
        return proposal

    def finish(self, sequence: DraftSequence) -> None:
        self.inner.finish(sequence)


def wrapped_core(folder: Path, fail: bool = False) -> tuple[tuple[DraftCore, StepLoop | None], _Wrapped]:
    core, loop = build_core(tiny_config(folder, drafters="model"))
    wrapper = _Wrapped(core.drafters["model"], fail)
    core.drafters["model"] = wrapper
    core.components = (wrapper,)
    return (core, loop), wrapper


def test_unexpected_errors_are_internal_without_details_and_release(tiny_folder: Path) -> None:
    core, wrapper = wrapped_core(tiny_folder, fail=True)
    wrapper.proceed.set()
    running = RunningServer(tiny_config(tiny_folder), core)
    try:
        with pytest.raises(grpc.RpcError) as error:
            Stream(running.stub).round(sequence_id=5, append_token_ids=PROMPT)
        assert error.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in error.value.details() and "ref" in error.value.details()
        wait_until(lambda: running.live_sequences() == 0, "the failed stream's release")
    finally:
        running.stop()


def test_health_and_stats_answer_while_a_round_runs(tiny_folder: Path) -> None:
    core, drafter = wrapped_core(tiny_folder)
    running = RunningServer(tiny_config(tiny_folder), core)
    try:
        requests: queue.Queue = queue.Queue()
        responses = running.stub.Propose(iter(requests.get, None), timeout=30)
        requests.put(draft_pb2.ProposeRequest(sequence_id=3, append_token_ids=PROMPT, num_draft_tokens=2))
        assert drafter.entered.wait(10)
        health = health_pb2_grpc.HealthStub(running.channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        running.live_sequences()  # answers while a round holds the model
        drafter.proceed.set()
        assert len(next(responses).draft_token_ids) == 2
        requests.put(None)
        assert list(responses) == []
    finally:
        drafter.proceed.set()
        running.stop()


def test_a_stuck_forward_turns_health_not_serving_until_it_moves_again(tiny_folder: Path) -> None:
    """A model forward that does not return (a hung kernel, a deadlock) must not leave the replica SERVING:
    the orchestrator's health checks take it out and a liveness probe restarts it. Model-free rounds, which
    do not use the forward loop, answer meanwhile; the gauge shows how long it has been stuck."""
    config = tiny_config(tiny_folder, drafters="model,ngram", stall_timeout_s=0.5)
    core, loop = build_core(config)
    assert loop is not None
    entered, proceed = threading.Event(), threading.Event()
    forward = loop.engine.step

    def stuck_step(items: Any) -> Any:
        entered.set()
        proceed.wait(60)
        return forward(items)

    loop.engine.step = stuck_step  # type: ignore[method-assign]
    running = RunningServer(config, (core, loop))
    health = health_pb2_grpc.HealthStub(running.channel)

    def statuses() -> set[int]:
        return {health.Check(health_pb2.HealthCheckRequest(service=s), timeout=5).status for s in ("", SERVICE_NAME)}

    def stalled_s() -> float:
        return running.handle.metrics.registry.get_sample_value("specdec_draft_forward_stalled_seconds")

    answers: list[draft_pb2.ProposeResponse] = []
    try:
        assert statuses() == {health_pb2.HealthCheckResponse.SERVING} and stalled_s() == 0
        stuck = Stream(running.stub, timeout=60)
        rounder = threading.Thread(target=lambda: answers.append(stuck.round(sequence_id=1, append_token_ids=PROMPT)))
        rounder.start()
        assert entered.wait(10)
        wait_until(lambda: statuses() == {health_pb2.HealthCheckResponse.NOT_SERVING}, "NOT_SERVING while stuck", 10)
        assert stalled_s() > 0.5
        lookup = Stream(running.stub, timeout=10)
        assert lookup.round(sequence_id=2, append_token_ids=PROMPT * 2, drafter="ngram").draft_token_ids
        lookup.close()
        proceed.set()  # the forward returns: the round is answered, the service SERVING again
        rounder.join(30)
        assert len(answers) == 1 and len(answers[0].draft_token_ids) == 4
        wait_until(lambda: statuses() == {health_pb2.HealthCheckResponse.SERVING}, "SERVING once it moves", 10)
        assert stalled_s() == 0
        stuck.close()
    finally:
        proceed.set()
        running.stop()


def test_stopping_the_server_ends_open_streams_and_releases_their_caches(tiny_folder: Path) -> None:
    """``stop`` returns only after every handler has finished, even one caught in the middle of a round."""
    core, drafter = wrapped_core(tiny_folder)
    drafter.proceed.set()
    running = RunningServer(tiny_config(tiny_folder), core)
    stopped = False
    try:
        idle, busy = Stream(running.stub), Stream(running.stub)
        idle.round(sequence_id=1, append_token_ids=PROMPT)
        first = busy.round(sequence_id=2, append_token_ids=PROMPT)
        assert core[0].stats().live_sequences == 2
        drafter.entered.clear()
        drafter.proceed.clear()
        busy._requests.put(
            draft_pb2.ProposeRequest(sequence_id=2, keep_length=first.cache_length, append_token_ids=[1], num_draft_tokens=2)
        )
        assert drafter.entered.wait(10)  # the busy stream's second round is in the model
        threading.Timer(0.5, drafter.proceed.set).start()  # it finishes after the server stopped
        running.handle.stop(0)
        stopped = True
        assert core[0].stats().live_sequences == 0
        for stream in (idle, busy):
            with pytest.raises(grpc.RpcError) as error:
                next(stream.responses)
            assert error.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
            stream.cancel()
    finally:
        drafter.proceed.set()
        if not stopped:
            running.stop()
        running.channel.close()


def test_health_serving(server: RunningServer) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", SERVICE_NAME):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service_and_resolves_a_method_symbol(server: RunningServer) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=f"{SERVICE_NAME}.Propose"),
    ]
    listed, by_method = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    assert SERVICE_NAME in {s.name for s in listed.list_services_response.service}
    assert by_method.WhichOneof("message_response") == "file_descriptor_response", by_method
    protos = by_method.file_descriptor_response.file_descriptor_proto
    assert any(b"specdec/v1/draft.proto" in proto for proto in protos)


def test_metrics_endpoint_serves_the_live_sequences_gauge(
    server: RunningServer, stub: Stub, metrics_port: int
) -> None:
    def scrape() -> str:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
            return response.read().decode()

    def tokens(text: str) -> float:
        return sum(float(v) for v in re.findall(r'^specdec_draft_tokens_total\{drafter="model"\} (\S+)$', text, re.MULTILINE))

    assert server.handle.metrics_port == metrics_port
    before = tokens(scrape())
    stream = Stream(stub)
    stream.round(sequence_id=71, append_token_ids=PROMPT, num_draft_tokens=3)
    text = scrape()
    assert re.search(r"^specdec_draft_live_sequences 1\.0$", text, re.MULTILINE), text
    assert tokens(text) - before == 3  # each proposed token counted once
    assert re.search(r"^specdec_draft_round_seconds_count [1-9]", text, re.MULTILINE)
    stream.close()
    with pytest.raises(grpc.RpcError):
        Stream(stub).round(sequence_id=72, keep_length=1, append_token_ids=[1])
    wait_until(lambda: "specdec_draft_live_sequences 0.0" in scrape(), "the gauge to drop to 0")
    text = scrape()
    assert re.search(r'^specdec_draft_errors_total\{code="NOT_FOUND"\} [1-9]', text, re.MULTILINE)
    # Every RPC is counted by method and final status, a Propose stream once, when it ends.
    assert re.search(r'^specdec_draft_requests_total\{code="OK",method="Propose"\} [1-9]', text, re.MULTILINE), text
    assert re.search(r'^specdec_draft_requests_total\{code="NOT_FOUND",method="Propose"\} [1-9]', text, re.MULTILINE)


def test_smollm2_self_draft_proposes_over_grpc() -> None:
    """The real SmolLM2 with the default layer-skip self-draft (first use converts the GGUF, ~20 s)."""
    from specdec.models import load_tokenizer

    prompt = load_tokenizer("smollm2")("The capital of France is")["input_ids"]
    running = RunningServer(DraftConfig(host="127.0.0.1", port=0, max_sequences=2))
    try:
        stream = Stream(running.stub)
        sampled = stream.round(sequence_id=1, append_token_ids=prompt, num_draft_tokens=3, seed=5)
        assert sampled.vocab_size == 49152 and sampled.cache_length == len(prompt)
        q = decode_packed(sampled.q_probs, sampled.q_index, 3, 49152).dense()
        torch.testing.assert_close(q.sum(-1), torch.ones(3), atol=1e-4, rtol=0)
        greedy = stream.round(
            sequence_id=1, keep_length=len(prompt), append_token_ids=[sampled.draft_token_ids[0]],
            num_draft_tokens=3, sampling=sampling_pb2.SamplingParams(temperature=0.0),
        )
        assert greedy.q_probs == greedy.q_index == b"" and all(0 <= t < 49152 for t in greedy.draft_token_ids)
        stream.close()
        wait_until(lambda: running.live_sequences() == 0, "release")
    finally:
        running.stop()


def test_a_model_free_replica_loads_no_model_and_proposes_from_its_context() -> None:
    """``--drafters ngram,suffix``: no model folder is read (this one does not exist), no GPU is needed."""
    running = RunningServer(DraftConfig(host="127.0.0.1", port=0, drafters="suffix,ngram", model="/no/such/model"))
    try:
        stats = running.stub.GetStats(draft_pb2.GetStatsRequest(), timeout=5)
        assert list(stats.drafters) == ["suffix", "ngram"] and stats.vocab_size == 0
        stream = Stream(running.stub)
        repeated = [7, 8, 9, 10, 11, 3, 7, 8, 9]
        lookup = stream.round(sequence_id=5, append_token_ids=repeated, num_draft_tokens=2, drafter="ngram")
        assert list(lookup.draft_token_ids) == [10, 11] and lookup.q_probs == b"" and lookup.cache_length == 9
        nothing = stream.round(sequence_id=5, keep_length=9, append_token_ids=[99], num_draft_tokens=4)
        assert list(nothing.draft_token_ids) == [] and nothing.cache_length == 10  # no match: an empty proposal
        stream.close()
        wait_until(lambda: running.live_sequences() == 0, "release")
        # The finished sequence taught the suffix cache: another sequence gets its continuation.
        assert running.stub.GetStats(draft_pb2.GetStatsRequest(), timeout=5).suffix_cache_entries > 0
    finally:
        running.stop()
