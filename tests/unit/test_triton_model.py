"""The Triton adapter of the target model (`target_service.triton_model`) against a fake ``pb_utils``.

``execute`` hands requests to the model's scheduler and each answer goes out through its response
sender as the final response (decoupled); `answer` reads each request's tensors, answers a batch (one bad
request never fails its neighbours), maps error codes to ``TritonError`` codes and keeps the custom metrics (live sequences, KV
bytes, requests by code, output bytes, forwards and the sequences in them) current.
"""

from __future__ import annotations

import ctypes
import json
import logging
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from specdec import target_contract as contract
from specdec.engine import CausalLMEngine
from specdec.rows import PackedRows
from specdec.sampling import SamplingParams, warp
from target_service.triton_model import TargetModel
from tests.fakes import FakeClock, tiny_llama

V = 64
PROMPT = [5, 17, 3, 42, 8, 11]
FINAL = 1  # pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama(V, max_positions=128)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@torch.inference_mode()
def full_forward(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


# --- TargetModel against a fake pb_utils -------------------------------------------------------------


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class FakeSender:
    """A decoupled request's response sender: keeps what was sent (and the flags)."""

    def __init__(self) -> None:
        self.sent: list[tuple[object, int]] = []
        self.done = threading.Event()

    def send(self, response: object = None, flags: int = 0) -> None:
        self.sent.append((response, flags))
        if flags & FINAL:
            self.done.set()


class FakeRequest:
    def __init__(self, sid: int, tensors: dict[str, np.ndarray]) -> None:
        self._sid, self.tensors = sid, tensors
        self.sender = FakeSender()

    def correlation_id(self) -> int:
        return self._sid

    def get_response_sender(self) -> FakeSender:
        return self.sender


class FakeTritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG = "UNKNOWN", "INTERNAL", "NOT_FOUND", "INVALID_ARG"
    UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = "UNAVAILABLE", "UNSUPPORTED", "ALREADY_EXISTS", "CANCELLED"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> str:
        return self._code


class FakeResponse:
    def __init__(self, output_tensors: list[FakeTensor], error: FakeTritonError | None = None) -> None:
        self.output_tensors, self.error = output_tensors, error


class FakeMetric:
    def __init__(self, labels: dict[str, str]) -> None:
        self.labels, self.value, self.updates = labels, 0.0, 0

    def set(self, value: float) -> None:
        self.value = value
        self.updates += 1

    def increment(self, value: float) -> None:
        self.value += value
        self.updates += 1


class FakeMetricFamily:
    GAUGE, COUNTER = "GAUGE", "COUNTER"
    created: list[FakeMetricFamily] = []

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.kind, self.metrics = name, kind, []
        FakeMetricFamily.created.append(self)

    def Metric(self, labels: dict[str, str]) -> FakeMetric:  # noqa: N802 - pb_utils' spelling
        metric = FakeMetric(labels)
        self.metrics.append(metric)
        return metric


def fake_pb_utils() -> types.SimpleNamespace:
    FakeMetricFamily.created = []
    return types.SimpleNamespace(
        Tensor=FakeTensor,
        InferenceResponse=FakeResponse,
        TritonError=FakeTritonError,
        MetricFamily=FakeMetricFamily,
        TRITONSERVER_RESPONSE_COMPLETE_FINAL=FINAL,
        get_input_tensor_by_name=lambda req, name: (
            FakeTensor(name, req.tensors[name]) if name in req.tensors else None
        ),
    )


def triton_request(
    sid: int, ids: list[int], keep: int, n: int, start: int = 0, end: int = 0, **sampling: np.ndarray
) -> FakeRequest:
    return FakeRequest(
        sid,
        {
            contract.INPUT_IDS: np.array(ids, np.int32).reshape(1, len(ids)),
            contract.KEEP_LENGTH: np.array([[keep]], np.int32),
            contract.NUM_LOGITS: np.array([[n]], np.int32),
            contract.START: np.array([[start]], np.int32),
            contract.END: np.array([[end]], np.int32),
            **sampling,
        },
    )


@pytest.fixture
def triton_model(model: torch.nn.Module, clock: FakeClock):
    target = TargetModel(fake_pb_utils(), engine=CausalLMEngine(model), clock=clock)
    parameters = {"max_sequences": {"string_value": "2"}, "idle_ttl_s": {"string_value": "60"}}
    target.initialize({
        "model_config": json.dumps({"parameters": parameters}), "model_name": "specdec_target",
        "model_instance_name": "i0",
    })
    yield target
    target.finalize()


def metric(name: str, **labels: str) -> float:
    family = next(f for f in FakeMetricFamily.created if f.name == name)
    return sum(m.value for m in family.metrics if labels.items() <= m.labels.items())


def settled(name: str, expected: float, timeout_s: float = 10.0) -> bool:
    """Whether the metric reaches ``expected``: the model's thread updates metrics after a batch's answers."""
    deadline = time.monotonic() + timeout_s
    while metric(name) != expected and time.monotonic() < deadline:
        time.sleep(0.005)
    return metric(name) == expected


def test_one_bad_request_does_not_fail_its_batch(triton_model, model):
    batch = [
        triton_request(1, PROMPT, 0, 2, start=1),
        triton_request(2, [V + 5], 0, 1, start=1),  # out of vocabulary
        triton_request(3, [1], 4, 1),  # unknown sequence
        triton_request(4, PROMPT[:3], 0, 1, start=1),
        FakeRequest(5, {contract.INPUT_IDS: np.zeros((1, 1), np.int32)}),  # missing inputs
    ]
    responses = triton_model.answer(batch)
    assert len(responses) == len(batch)
    assert responses[0].error is None
    outputs = {t.name(): t for t in responses[0].output_tensors}
    assert set(outputs) == {contract.LOGITS, contract.FORWARD_SEQUENCES, contract.FORWARD_TOKENS}
    assert outputs[contract.FORWARD_SEQUENCES].as_numpy().tolist() == [[2]]  # 1 and 4; the others were refused
    assert outputs[contract.FORWARD_TOKENS].as_numpy().tolist() == [[len(PROMPT) + 3]]
    tensor = outputs[contract.LOGITS]
    assert tensor.as_numpy().shape == (1, 2, V)
    np.testing.assert_allclose(tensor.as_numpy()[0], full_forward(model, PROMPT)[-2:], atol=1e-5)
    assert responses[1].error.code() == "INVALID_ARG"
    assert responses[2].error.code() == "NOT_FOUND" and "no cache" in responses[2].error.message()
    assert responses[3].error is None
    assert responses[4].error.code() == "INVALID_ARG"
    assert metric(contract.METRIC_LIVE_SEQUENCES) == 2.0
    assert metric(contract.METRIC_REQUESTS, code="OK") == 2.0
    assert metric(contract.METRIC_REQUESTS, code="INVALID_ARG") == 2.0
    assert metric(contract.METRIC_REQUESTS, code="NOT_FOUND") == 1.0


def test_metrics_cost_one_update_each_per_batch_and_gauges_only_when_they_change(triton_model):
    triton_model.answer([triton_request(1, PROMPT, 0, 1, start=1)])
    updates = {f.name: sum(m.updates for m in f.metrics) for f in FakeMetricFamily.created}
    triton_model.answer([triton_request(1, [3], len(PROMPT), 1)])  # a decode step: nothing held changes size
    after = {f.name: sum(m.updates for m in f.metrics) for f in FakeMetricFamily.created}
    changed = {name for name in after if after[name] != updates[name]}
    assert changed == {contract.METRIC_REQUESTS, contract.METRIC_OUTPUT_BYTES, contract.METRIC_FORWARDS,
                       contract.METRIC_FORWARD_SEQUENCES, contract.METRIC_FORWARD_SECONDS}
    assert all(after[name] - updates[name] == 1 for name in changed)
    triton_model.answer([triton_request(1, [], len(PROMPT) + 1, 0, end=1)])  # the release: the gauges drop
    assert metric(contract.METRIC_LIVE_SEQUENCES) == 0.0 and metric(contract.METRIC_KV_BYTES) == 0.0


def test_sampling_inputs_select_the_probs_outputs(triton_model, model):
    greedy = {contract.TEMPERATURE: np.array([[0.0]], np.float32)}  # TOP_K and TOP_P left out: off
    nucleus = {contract.TEMPERATURE: np.array([[0.8]], np.float32), contract.TOP_P: np.array([[0.9]], np.float32)}
    two_values = {contract.TEMPERATURE: np.array([[0.8]], np.float32), contract.TOP_K: np.array([[1, 2]], np.int32)}
    responses = triton_model.answer([
        triton_request(1, PROMPT, 0, 2, start=1, **greedy),
        triton_request(2, PROMPT, 0, 2, start=1, **nucleus),
        triton_request(3, PROMPT, 0, 2, start=1, **two_values),
    ])
    expected = torch.from_numpy(full_forward(model, PROMPT)[-2:])  # [2, V]
    for response, params in zip(responses[:2], (SamplingParams(0.0), SamplingParams(0.8, top_p=0.9))):
        assert response.error is None
        outputs = {t.name(): t.as_numpy() for t in response.output_tensors}
        assert set(outputs) == {contract.PROBS, contract.PROBS_INDEX, contract.FORWARD_SEQUENCES, contract.FORWARD_TOKENS}
        assert outputs[contract.FORWARD_SEQUENCES].tolist() == [[2]]  # the third was refused before the forward
        assert outputs[contract.FORWARD_TOKENS].tolist() == [[2 * len(PROMPT)]]
        rows = PackedRows.from_arrays(outputs[contract.PROBS][0], outputs[contract.PROBS_INDEX][0], V).dense()
        torch.testing.assert_close(rows, warp(expected, params), atol=1e-5, rtol=1e-4)
    assert responses[0].output_tensors[0].as_numpy().shape == (1, 2, 1)  # greedy: one entry per row
    sent = sum(t.as_numpy().nbytes for r in responses[:2] for t in r.output_tensors)
    assert metric(contract.METRIC_OUTPUT_BYTES) == sent
    assert responses[2].error.code() == "INVALID_ARG" and "TOP_K must hold one value" in responses[2].error.message()


def test_capacity_maps_to_unavailable(triton_model):
    responses = triton_model.answer([triton_request(s, [1], 0, 1, start=1) for s in (1, 2, 3)])
    assert [r.error is None for r in responses] == [True, True, False]
    assert responses[2].error.code() == "UNAVAILABLE"
    assert responses[2].error.message().startswith("capacity:")


def test_release_request_updates_the_live_gauge(triton_model):
    triton_model.answer([triton_request(1, PROMPT, 0, 1, start=1), triton_request(2, PROMPT, 0, 1, start=1)])
    assert metric(contract.METRIC_LIVE_SEQUENCES) == 2.0
    (released,) = triton_model.answer([triton_request(1, [], 0, 0, end=1)])
    assert released.error is None and released.output_tensors[0].as_numpy().shape == (1, 0, V)
    assert metric(contract.METRIC_LIVE_SEQUENCES) == 1.0
    triton_model.answer([triton_request(2, [3], len(PROMPT), 1, end=1)])
    assert metric(contract.METRIC_LIVE_SEQUENCES) == 0.0


def test_execute_evicts_idle_sequences(triton_model, clock):
    triton_model.answer([triton_request(1, PROMPT, 0, 1, start=1)])
    clock.now += 61.0
    triton_model.answer([triton_request(2, PROMPT, 0, 1, start=1)])
    assert metric(contract.METRIC_LIVE_SEQUENCES) == 1.0


def test_a_batch_is_one_forward_and_the_kv_gauge_follows_the_caches(triton_model):
    triton_model.answer([triton_request(s, PROMPT, 0, 1, start=1) for s in (1, 2)])
    assert (metric(contract.METRIC_FORWARDS), metric(contract.METRIC_FORWARD_SEQUENCES)) == (1.0, 2.0)
    held = metric(contract.METRIC_KV_BYTES)
    assert held == sum(cache.nbytes for cache in triton_model.store.states()) > 0
    triton_model.answer([triton_request(s, [], 0, 0, end=1) for s in (1, 2)])
    assert metric(contract.METRIC_KV_BYTES) == 0.0 and metric(contract.METRIC_FORWARDS) == 1.0  # releases: none


def test_execute_queues_and_every_request_gets_one_final_response(triton_model, model):
    good = [triton_request(s, PROMPT, 0, 1, start=1) for s in (1, 2)]
    bad = FakeRequest(3, {contract.INPUT_IDS: np.zeros((1, 1), np.int32)})  # missing inputs: refused at once
    assert triton_model.execute([*good, bad]) is None
    assert bad.sender.done.is_set() and bad.sender.sent[0][0].error.code() == "INVALID_ARG"
    for request in good:
        assert request.sender.done.wait(10)
        ((response, flags),) = request.sender.sent
        assert flags == FINAL and response.error is None
        np.testing.assert_allclose(response.output_tensors[0].as_numpy()[0], full_forward(model, PROMPT)[-1:],
                                   atol=1e-5)
    follow_up = [triton_request(s, [3], len(PROMPT), 1) for s in (1, 2)]
    triton_model.execute(follow_up)
    assert all(r.sender.done.wait(10) for r in follow_up)
    releases = [triton_request(s, [], 0, 0, end=1) for s in (1, 2)]
    triton_model.execute(releases)
    assert all(r.sender.done.wait(10) for r in releases)
    assert settled(contract.METRIC_LIVE_SEQUENCES, 0.0)
    assert metric(contract.METRIC_FORWARDS) >= 2 and metric(contract.METRIC_FORWARD_SECONDS) > 0


def test_a_batch_that_fails_as_a_whole_answers_every_request_internal_and_the_model_goes_on(triton_model, caplog):
    # A bug outside any one request (here: the store's idle sweep) must not leave the batch unanswered: its
    # callers would wait until their deadlines, and the scheduler goes on with the next batch.
    sweep = triton_model.store.evict_idle

    def broken() -> list[int]:
        raise RuntimeError("boom")

    triton_model.store.evict_idle = broken
    batch = [triton_request(s, PROMPT, 0, 1, start=1) for s in (1, 2)]
    with caplog.at_level(logging.ERROR):
        triton_model.execute(batch)
        assert all(r.sender.done.wait(10) for r in batch)
    for request in batch:
        ((response, flags),) = request.sender.sent
        assert flags == FINAL and response.error.code() == "INTERNAL"
        assert "boom" not in response.error.message() and "Traceback" not in response.error.message()
    assert "a batch of 2 request(s) failed" in caplog.text and "boom" in caplog.text
    triton_model.store.evict_idle = sweep
    again = triton_request(3, PROMPT, 0, 1, start=1)
    triton_model.execute([again])
    assert again.sender.done.wait(10) and again.sender.sent[0][0].error is None


def test_the_answers_go_out_before_the_metrics_are_updated(triton_model):
    # Each metric update is a round trip to the Triton server: none may stand between a forward and its answers.
    request = triton_request(1, PROMPT, 0, 1, start=1)
    seen, send = [], request.sender.send

    def recording_send(response: object = None, flags: int = 0) -> None:
        seen.append((metric(contract.METRIC_FORWARDS), metric(contract.METRIC_REQUESTS, code="OK")))
        send(response, flags)

    request.sender.send = recording_send
    triton_model.execute([request])
    assert request.sender.done.wait(10)
    assert settled(contract.METRIC_FORWARDS, 1.0) and metric(contract.METRIC_REQUESTS, code="OK") == 1.0
    assert seen == [(0.0, 0.0)]


def _openmp_threads_here() -> int:
    """The OpenMP team size a parallel region started on the calling thread gets (torch's own libgomp)."""
    return ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libgomp.so.1")).omp_get_max_threads()


def test_the_threads_parameter_holds_on_the_thread_that_runs_the_forwards(model, clock):
    """OpenMP's thread count is per thread: set on the main thread only, a forward on the scheduler's thread
    would run on every core (torch.get_num_threads() would still report the setting)."""
    before = torch.get_num_threads()
    target = TargetModel(fake_pb_utils(), engine=CausalLMEngine(model), clock=clock)
    parameters = {"threads": {"string_value": "1"}}
    target.initialize({"model_config": json.dumps({"parameters": parameters}), "model_name": "specdec_target"})
    assert target.engine is not None
    seen: list[int] = []
    step = target.engine.step

    def recording_step(items):
        seen.append(_openmp_threads_here())
        return step(items)

    target.engine.step = recording_step  # type: ignore[method-assign]
    try:
        request = triton_request(1, PROMPT, 0, 1, start=1)
        target.execute([request])
        assert request.sender.done.wait(10)
    finally:
        target.finalize()
        torch.set_num_threads(before)  # initialize() set the main thread's too
    assert seen == [1]


def test_a_decode_goes_back_to_the_scheduler_until_done_and_gets_one_response(triton_model, model):
    sampling = dict(zip((contract.TEMPERATURE, contract.TOP_K, contract.TOP_P),
                        (np.array([[0.0]], np.float32), np.array([[0]], np.int32), np.array([[1.0]], np.float32))))
    decode = dict(contract.decode_tensors(contract.Decode(steps=5, seed=3)))
    request = triton_request(1, PROMPT, 0, 1, start=1, **sampling, **decode)
    other = triton_request(2, PROMPT[:3], 0, 1, start=1)
    triton_model.execute([request, other])
    assert request.sender.done.wait(10) and other.sender.done.wait(10)
    ((response, flags),) = request.sender.sent  # one final response, after the fifth forward
    assert flags == FINAL and response.error is None
    tokens = {t.name(): t.as_numpy() for t in response.output_tensors}[contract.TOKENS]
    greedy = list(PROMPT)
    for _ in range(5):
        greedy.append(int(np.argmax(full_forward(model, greedy)[-1])))
    assert tokens.tolist() == [greedy[len(PROMPT):]]
    assert settled(contract.METRIC_FORWARDS, 5.0)  # the other sequence rode along in the first
    assert metric(contract.METRIC_REQUESTS, code="OK") == 2.0


def test_a_decode_with_lookup_counts_its_drafted_and_accepted_tokens(triton_model, model):
    sampling = dict(zip((contract.TEMPERATURE, contract.TOP_K, contract.TOP_P),
                        (np.array([[0.0]], np.float32), np.array([[0]], np.int32), np.array([[1.0]], np.float32))))
    looping = [1, 2, 3, 1, 2, 3, 1, 2]  # the tiny model's greedy text from here repeats itself
    decode = dict(contract.decode_tensors(contract.Decode(steps=12, seed=3, lookup=8)))
    request = triton_request(1, looping, 0, 1, start=1, **sampling, **decode)
    triton_model.execute([request])
    assert request.sender.done.wait(10)
    ((response, _),) = request.sender.sent
    tokens = {t.name(): t.as_numpy() for t in response.output_tensors}[contract.TOKENS]
    greedy = list(looping)
    for _ in range(12):
        greedy.append(int(np.argmax(full_forward(model, greedy)[-1])))
    assert tokens.tolist() == [greedy[len(looping):]]
    forwards = metric(contract.METRIC_FORWARDS)
    drafted = metric(contract.METRIC_LOOKUP_TOKENS, kind="drafted")
    accepted = metric(contract.METRIC_LOOKUP_TOKENS, kind="accepted")
    assert 0 < accepted <= drafted and forwards == 12 - accepted  # each accepted draft saved a forward


def test_a_prompt_over_max_forward_tokens_is_prefilled_over_several_forwards_and_answered_once(model, clock):
    target = TargetModel(fake_pb_utils(), engine=CausalLMEngine(model), clock=clock)
    parameters = {"max_forward_tokens": {"string_value": "4"}}
    target.initialize({"model_config": json.dumps({"parameters": parameters}), "model_name": "specdec_target"})
    try:
        long, short = triton_request(1, PROMPT * 2, 0, 2, start=1, end=1), triton_request(2, PROMPT[:3], 0, 1, start=1)
        target.execute([long, short])
        assert long.sender.done.wait(10) and short.sender.done.wait(10)
        for request, ids, n in ((long, PROMPT * 2, 2), (short, PROMPT[:3], 1)):
            ((response, flags),) = request.sender.sent
            assert flags == FINAL and response.error is None
            np.testing.assert_allclose(response.output_tensors[0].as_numpy()[0], full_forward(model, ids)[-n:],
                                       atol=1e-5)
        # 4 tokens a forward, first come first: 4, 4, the last 4 with its 2 rows, then the short prompt's 3
        assert settled(contract.METRIC_FORWARDS, 4.0) and settled(contract.METRIC_LIVE_SEQUENCES, 1.0)
    finally:
        target.finalize()


@pytest.mark.parametrize("megabytes", ["64", "0"])
def test_prompts_that_share_a_head_report_its_tokens_reused_and_its_bytes(model, clock, megabytes):
    target = TargetModel(fake_pb_utils(), engine=CausalLMEngine(model), clock=clock)
    parameters = {"prefix_cache_mb": {"string_value": megabytes}}
    target.initialize({"model_config": json.dumps({"parameters": parameters}), "model_name": "specdec_target"})
    try:
        head = [(5 * i + 1) % V for i in range(20)]
        prompts = [head + [tail] * 4 for tail in (1, 2, 3)]
        for sid, ids in enumerate(prompts, start=1):
            [response] = target.answer([triton_request(sid, ids, 0, 1, start=1, end=1)])
            logits = {t.name(): t.as_numpy() for t in response.output_tensors}[contract.LOGITS]
            np.testing.assert_allclose(logits[0], full_forward(model, ids)[-1:], atol=2e-5)
        reused = 20 if megabytes != "0" else 0
        assert metric(contract.METRIC_PROMPT_TOKENS, kind="all") == (72 if reused else 0)
        assert metric(contract.METRIC_PROMPT_TOKENS, kind="reused") == reused
        assert metric(contract.METRIC_PREFIX_BYTES) == reused * target.engine.layout.bytes_per_token
        assert (target.prefix is None) == (megabytes == "0")
    finally:
        target.finalize()
