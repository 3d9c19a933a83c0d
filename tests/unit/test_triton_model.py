"""The Triton target model's logic without Triton: a tiny random Llama, a fake ``pb_utils``.

Covers the contract of ``specdec.target_contract`` as ``read_request``, ``run_step`` and ``TargetModel``
implement it:
cached logits equal a full forward (start, append, rollback), release and END drop the cache, and each
failure maps to its code (INVALID_ARG, NOT_FOUND "no cache:", UNAVAILABLE "capacity:", INTERNAL without
a traceback on the wire). Also checks that the checked-in config.pbtxt agrees with ``TargetModelParams`` and
that the launcher renders it.
"""

from __future__ import annotations

import json
import logging
import types
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec import target_contract as contract
from specdec.engine import CausalLMEngine, SequenceStore
from specdec.rows import PackedRows
from specdec.sampling import SamplingParams, warp
from target_service.triton_model import ErrorCode, StepError, StepRequest, TargetModel, read_request, run_step

V = 64


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(model: torch.nn.Module, clock: FakeClock) -> CausalLMEngine:
    return CausalLMEngine(model, SequenceStore(max_sequences=2, idle_ttl_s=60.0, clock=clock))


def request(
    sid: int, ids: list[int], keep: int, n: int, *, start: bool = False, end: bool = False,
    sampling: tuple[float, float, float] | None = None,
) -> StepRequest:
    params = None if sampling is None else SamplingParams(sampling[0], int(sampling[1]), sampling[2])
    return StepRequest(sid, tuple(ids), keep, n, start, end, params)


def ok(result: dict[str, np.ndarray] | StepError) -> np.ndarray:
    """The LOGITS of a request sent without sampling settings."""
    assert isinstance(result, dict) and set(result) == {contract.LOGITS}, result
    assert result[contract.LOGITS].dtype == np.float32
    return result[contract.LOGITS]


def probs(result: dict[str, np.ndarray] | StepError, vocab_size: int = V) -> torch.Tensor:
    """PROBS and PROBS_INDEX of a request sent with sampling settings, unpacked to dense [N, V] rows."""
    assert isinstance(result, dict) and set(result) == {contract.PROBS, contract.PROBS_INDEX}, result
    values, index = result[contract.PROBS], result[contract.PROBS_INDEX]
    assert values.dtype == np.float32 and index.dtype == np.int32 and values.shape[:2] == index.shape[:2]
    return PackedRows.from_arrays(values[0], index[0], vocab_size).dense()


def err(result: dict[str, np.ndarray] | StepError, code: ErrorCode) -> str:
    assert isinstance(result, StepError), f"expected {code}, got logits {getattr(result, 'shape', result)}"
    assert result.code == code, result
    return result.message


@torch.inference_mode()
def full_forward(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    """Logits of every position without a cache: [T, V]."""
    return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


PROMPT = [5, 17, 3, 42, 8, 11]
DRAFTS = [60, 2, 33, 7]


@pytest.mark.parametrize(
    ("sampling", "packed"),
    [((0.0, 0, 1.0), True), ((0.7, 0, 0.5), True), ((1.2, 5, 1.0), True), ((0.9, 0, 1.0), False)],
)
def test_sampling_settings_return_the_warped_rows_packed(engine, model, sampling, packed):
    # The same step without settings gives the logits; warping them must give exactly PROBS, bit for bit.
    logits = ok(run_step(engine, request(1, PROMPT, 0, 3, start=True)))
    result = run_step(engine, request(2, PROMPT, 0, 3, start=True, sampling=sampling))
    temperature, top_k, top_p = sampling
    expected = warp(torch.from_numpy(logits[0]), SamplingParams(temperature, int(top_k), top_p))  # [3, V]
    assert torch.equal(probs(result), expected)
    index = result[contract.PROBS_INDEX]
    if packed:  # only the support travels
        assert index.shape[-1] == int(torch.count_nonzero(expected, dim=-1).max()) < V / 2
    else:  # plain temperature: every token is possible, the rows travel dense
        assert index.shape == (1, 3, 0) and result[contract.PROBS].shape == (1, 3, V)
    assert torch.equal(probs(run_step(engine, request(2, [9], len(PROMPT), 1, sampling=sampling))), warp(
        torch.from_numpy(ok(run_step(engine, request(1, [9], len(PROMPT), 1)))[0]),
        SamplingParams(temperature, int(top_k), top_p),
    ))


@pytest.mark.parametrize(
    ("sampling", "field"),
    [((-1.0, 0, 1.0), "temperature"), ((float("nan"), 0, 1.0), "temperature"), ((1.0, -2, 1.0), "top_k"),
     ((1.0, 1.5, 1.0), "TOP_K"), ((1.0, 0, 0.0), "top_p"), ((1.0, 0, 1.5), "top_p")],
)
def test_bad_sampling_settings_are_refused_where_the_request_is_read(sampling, field):
    temperature, top_k, top_p = sampling
    arrays = {
        contract.INPUT_IDS: np.array([[9]], np.int32), contract.KEEP_LENGTH: np.array([[5]], np.int32),
        contract.NUM_LOGITS: np.array([[1]], np.int32), contract.TEMPERATURE: np.array([[temperature]], np.float32),
        contract.TOP_K: np.array([[top_k]], np.float64), contract.TOP_P: np.array([[top_p]], np.float32),
    }
    with pytest.raises(ValueError, match=field):
        read_request(1, arrays.get)


def test_top_k_above_the_vocabulary_is_invalid_and_keeps_the_cache(engine):
    ok(run_step(engine, request(1, PROMPT, 0, 1, start=True)))
    message = err(run_step(engine, request(1, [9], len(PROMPT), 1, sampling=(1.0, V + 1, 1.0))), ErrorCode.INVALID_ARG)
    assert message.startswith(contract.INVALID_PREFIX) and "top_k" in message
    ok(run_step(engine, request(1, [9], len(PROMPT), 1)))  # the cache was not touched


def test_release_with_sampling_settings_returns_empty_rows(engine):
    ok(run_step(engine, request(1, PROMPT, 0, 1, start=True)))
    result = run_step(engine, request(1, [], 0, 0, end=True, sampling=(0.0, 0, 1.0)))
    assert probs(result).shape == (0, V) and 1 not in engine.store


def test_start_returns_the_last_logits_of_a_full_forward(engine, model):
    logits = ok(run_step(engine, request(1, PROMPT, 0, 3, start=True)))
    assert logits.shape == (1, 3, V)
    np.testing.assert_allclose(logits[0], full_forward(model, PROMPT)[-3:], atol=1e-5)


def test_appending_drafts_matches_a_full_forward(engine, model):
    ok(run_step(engine, request(1, PROMPT, 0, 1, start=True)))
    logits = ok(run_step(engine, request(1, DRAFTS, len(PROMPT), len(DRAFTS) + 0)))
    assert logits.shape == (1, len(DRAFTS), V)
    np.testing.assert_allclose(logits[0], full_forward(model, PROMPT + DRAFTS)[-len(DRAFTS):], atol=1e-5)


def test_rollback_gives_the_logits_of_a_fresh_sequence(engine, model):
    ok(run_step(engine, request(1, PROMPT, 0, 1, start=True)))
    ok(run_step(engine, request(1, DRAFTS, len(PROMPT), len(DRAFTS))))
    keep = len(PROMPT) + 2  # two drafts accepted, then a new token
    rolled = ok(run_step(engine, request(1, [9, 10], keep, 2)))
    fresh = ok(run_step(engine, request(2, PROMPT + DRAFTS[:2] + [9, 10], 0, 2, start=True)))
    np.testing.assert_allclose(rolled, fresh, atol=1e-5)
    np.testing.assert_allclose(rolled[0], full_forward(model, PROMPT + DRAFTS[:2] + [9, 10])[-2:], atol=1e-5)


def test_start_resets_an_existing_sequence(engine, model):
    ok(run_step(engine, request(1, PROMPT, 0, 1, start=True)))
    again = ok(run_step(engine, request(1, [4, 4], 0, 1, start=True)))
    np.testing.assert_allclose(again[0], full_forward(model, [4, 4])[-1:], atol=1e-5)


def test_release_request_drops_the_cache_and_returns_no_rows(engine):
    ok(run_step(engine, request(1, PROMPT, 0, 1, start=True)))
    released = ok(run_step(engine, request(1, [], 0, 0, end=True)))
    assert released.shape == (1, 0, V)
    assert 1 not in engine.store
    assert "no cache" in err(run_step(engine, request(1, [1], 0, 1)), ErrorCode.NOT_FOUND)


def test_release_is_idempotent_and_may_carry_start(engine):
    assert ok(run_step(engine, request(7, [], 0, 0, end=True))).shape == (1, 0, V)
    assert ok(run_step(engine, request(7, [], 0, 0, start=True, end=True))).shape == (1, 0, V)
    assert len(engine.store) == 0


def test_an_empty_request_without_end_is_invalid(engine):
    ok(run_step(engine, request(1, PROMPT, 0, 1, start=True)))
    assert "release" in err(run_step(engine, request(1, [], 6, 0)), ErrorCode.INVALID_ARG)
    assert 1 in engine.store


def test_end_on_a_normal_request_returns_logits_then_drops_the_cache(engine, model):
    ok(run_step(engine, request(1, PROMPT, 0, 1, start=True)))
    logits = ok(run_step(engine, request(1, [9], len(PROMPT), 1, end=True)))
    np.testing.assert_allclose(logits[0], full_forward(model, PROMPT + [9])[-1:], atol=1e-5)
    assert 1 not in engine.store


def test_end_drops_the_cache_even_when_the_step_fails(engine):
    ok(run_step(engine, request(1, PROMPT, 0, 1, start=True)))
    err(run_step(engine, request(1, [9], 99, 1, end=True)), ErrorCode.INVALID_ARG)
    assert 1 not in engine.store


def test_unknown_sequence_is_not_found_with_a_recognisable_message(engine):
    message = err(run_step(engine, request(12345, [1, 2], 0, 1)), ErrorCode.NOT_FOUND)
    assert message.startswith(contract.NOT_FOUND_PREFIX)
    assert "sequence" in message and "no cache" in message and "12345" in message
    assert contract.classify_error(None, message) is contract.ErrorKind.SEQUENCE_LOST


def test_idle_sequences_are_evicted_after_the_ttl(engine, clock):
    ok(run_step(engine, request(1, PROMPT, 0, 1, start=True)))
    clock.now += 61.0
    err(run_step(engine, request(1, [3], len(PROMPT), 1)), ErrorCode.NOT_FOUND)


def test_capacity_is_unavailable_with_a_capacity_prefix(engine):
    ok(run_step(engine, request(1, [1], 0, 1, start=True)))
    ok(run_step(engine, request(2, [1], 0, 1, start=True)))
    message = err(run_step(engine, request(3, [1], 0, 1, start=True)), ErrorCode.UNAVAILABLE)
    assert message.startswith("capacity:")
    assert contract.classify_error("StatusCode.UNAVAILABLE", message) is contract.ErrorKind.CAPACITY
    ok(run_step(engine, request(1, [], 0, 0, end=True)))
    ok(run_step(engine, request(3, [1], 0, 1, start=True)))  # room again


@pytest.mark.parametrize(
    ("ids", "keep", "n", "start", "needle"),
    [
        ([V], 6, 1, False, "vocabulary"),  # token id out of the vocabulary
        ([-1], 6, 1, False, "vocabulary"),
        ([1], 7, 1, False, "exceeds the cached length"),  # keep_length > cached
        ([1], -1, 1, False, "keep_length"),
        ([1, 2], 6, 0, False, "num_logits"),  # tokens but no logits
        ([1, 2], 6, 3, False, "num_logits"),  # more logits than tokens appended
        ([1], 3, 1, True, "keep_length 0"),  # START must keep nothing
        ([1] * 123, 6, 1, False, "context length"),  # 6 + 123 > 128 positions
    ],
)
def test_invalid_arguments(engine, model, ids, keep, n, start, needle):
    ok(run_step(engine, request(1, PROMPT, 0, 1, start=True)))
    message = err(run_step(engine, request(1, ids, keep, n, start=start)), ErrorCode.INVALID_ARG)
    assert needle in message
    # the cache survives a refused request intact
    logits = ok(run_step(engine, request(1, [9], len(PROMPT), 1)))
    np.testing.assert_allclose(logits[0], full_forward(model, PROMPT + [9])[-1:], atol=1e-5)


@pytest.mark.parametrize(
    ("ids", "keep", "n"),
    [
        (np.array([1, 2], dtype=np.int32), np.array([[0]], np.int32), np.array([[1]], np.int32)),  # 1-D ids
        (np.array([[1, 2]], np.int32), np.array([[0, 0]], np.int32), np.array([[1]], np.int32)),
        (np.array([[1, 2]], np.int32), np.array([[0]], np.int32), np.zeros((1, 0), np.int32)),
    ],
)
def test_malformed_shapes_are_invalid(ids, keep, n):
    arrays = {contract.INPUT_IDS: ids, contract.KEEP_LENGTH: keep, contract.NUM_LOGITS: n}
    with pytest.raises(ValueError, match="shape"):
        read_request(1, arrays.get)


def test_sequence_id_zero_is_invalid(engine):
    err(run_step(engine, request(0, [1], 0, 1, start=True)), ErrorCode.INVALID_ARG)


def test_unexpected_errors_are_internal_without_details_on_the_wire(engine, caplog):
    class Broken(torch.nn.Module):
        config = engine.model.config

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **_: Any) -> Any:
            raise RuntimeError("secret detail")

    broken = CausalLMEngine(Broken(), SequenceStore(2, 60.0))
    with caplog.at_level(logging.ERROR):
        message = err(run_step(broken, request(1, [1], 0, 1, start=True)), ErrorCode.INTERNAL)
    assert "secret" not in message and "Traceback" not in message
    assert "secret detail" in caplog.text  # the traceback goes to the (Triton) log


# --- TargetModel against a fake pb_utils -------------------------------------------------------------


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class FakeRequest:
    def __init__(self, sid: int, tensors: dict[str, np.ndarray]) -> None:
        self._sid, self.tensors = sid, tensors

    def correlation_id(self) -> int:
        return self._sid


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
        self.labels, self.value = labels, 0.0

    def set(self, value: float) -> None:
        self.value = value

    def increment(self, value: float) -> None:
        self.value += value


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
def triton_model(engine: CausalLMEngine) -> TargetModel:
    target = TargetModel(fake_pb_utils(), engine=engine)
    target.initialize(
        {"model_config": json.dumps({"parameters": {}}), "model_name": "specdec_target", "model_instance_name": "i0"}
    )
    return target


def metric(name: str, **labels: str) -> float:
    family = next(f for f in FakeMetricFamily.created if f.name == name)
    return sum(m.value for m in family.metrics if labels.items() <= m.labels.items())


def test_one_bad_request_does_not_fail_its_batch(triton_model, model):
    batch = [
        triton_request(1, PROMPT, 0, 2, start=1),
        triton_request(2, [V + 5], 0, 1, start=1),  # out of vocabulary
        triton_request(3, [1], 4, 1),  # unknown sequence
        triton_request(4, PROMPT[:3], 0, 1, start=1),
        FakeRequest(5, {contract.INPUT_IDS: np.zeros((1, 1), np.int32)}),  # missing inputs
    ]
    responses = triton_model.execute(batch)
    assert len(responses) == len(batch)
    assert responses[0].error is None
    (tensor,) = responses[0].output_tensors
    assert tensor.name() == contract.LOGITS and tensor.as_numpy().shape == (1, 2, V)
    np.testing.assert_allclose(tensor.as_numpy()[0], full_forward(model, PROMPT)[-2:], atol=1e-5)
    assert responses[1].error.code() == "INVALID_ARG"
    assert responses[2].error.code() == "NOT_FOUND" and "no cache" in responses[2].error.message()
    assert responses[3].error is None
    assert responses[4].error.code() == "INVALID_ARG"
    assert metric(contract.METRIC_LIVE_SEQUENCES) == 2.0
    assert metric(contract.METRIC_REQUESTS, code="OK") == 2.0
    assert metric(contract.METRIC_REQUESTS, code="INVALID_ARG") == 2.0
    assert metric(contract.METRIC_REQUESTS, code="NOT_FOUND") == 1.0


def test_sampling_inputs_select_the_probs_outputs(triton_model, model):
    greedy = {contract.TEMPERATURE: np.array([[0.0]], np.float32)}  # TOP_K and TOP_P left out: off
    nucleus = {contract.TEMPERATURE: np.array([[0.8]], np.float32), contract.TOP_P: np.array([[0.9]], np.float32)}
    two_values = {contract.TEMPERATURE: np.array([[0.8]], np.float32), contract.TOP_K: np.array([[1, 2]], np.int32)}
    responses = triton_model.execute([
        triton_request(1, PROMPT, 0, 2, start=1, **greedy),
        triton_request(2, PROMPT, 0, 2, start=1, **nucleus),
        triton_request(3, PROMPT, 0, 2, start=1, **two_values),
    ])
    expected = torch.from_numpy(full_forward(model, PROMPT)[-2:])  # [2, V]
    for response, params in zip(responses[:2], (SamplingParams(0.0), SamplingParams(0.8, top_p=0.9))):
        assert response.error is None
        outputs = {t.name(): t.as_numpy() for t in response.output_tensors}
        assert set(outputs) == {contract.PROBS, contract.PROBS_INDEX}
        rows = PackedRows.from_arrays(outputs[contract.PROBS][0], outputs[contract.PROBS_INDEX][0], V).dense()
        torch.testing.assert_close(rows, warp(expected, params), atol=1e-5, rtol=1e-4)
    assert responses[0].output_tensors[0].as_numpy().shape == (1, 2, 1)  # greedy: one entry per row
    sent = sum(t.as_numpy().nbytes for r in responses[:2] for t in r.output_tensors)
    assert metric(contract.METRIC_OUTPUT_BYTES) == sent
    assert responses[2].error.code() == "INVALID_ARG" and "TOP_K must hold one value" in responses[2].error.message()


def test_capacity_maps_to_unavailable(triton_model):
    responses = triton_model.execute([triton_request(s, [1], 0, 1, start=1) for s in (1, 2, 3)])
    assert [r.error is None for r in responses] == [True, True, False]
    assert responses[2].error.code() == "UNAVAILABLE"
    assert responses[2].error.message().startswith("capacity:")


def test_release_request_updates_the_live_gauge(triton_model):
    triton_model.execute([triton_request(1, PROMPT, 0, 1, start=1), triton_request(2, PROMPT, 0, 1, start=1)])
    assert metric(contract.METRIC_LIVE_SEQUENCES) == 2.0
    (released,) = triton_model.execute([triton_request(1, [], 0, 0, end=1)])
    assert released.error is None and released.output_tensors[0].as_numpy().shape == (1, 0, V)
    assert metric(contract.METRIC_LIVE_SEQUENCES) == 1.0
    triton_model.execute([triton_request(2, [3], len(PROMPT), 1, end=1)])
    assert metric(contract.METRIC_LIVE_SEQUENCES) == 0.0


def test_execute_evicts_idle_sequences(triton_model, clock):
    triton_model.execute([triton_request(1, PROMPT, 0, 1, start=1)])
    clock.now += 61.0
    triton_model.execute([triton_request(2, PROMPT, 0, 1, start=1)])
    assert metric(contract.METRIC_LIVE_SEQUENCES) == 1.0
