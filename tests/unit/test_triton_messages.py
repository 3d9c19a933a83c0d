"""The target contract's KServe messages: what a score or release request carries, and how an answer is read.

The real Triton reads these requests in tests/integration/test_triton_target.py; here each field is
checked against ``target_service.wire``, and malformed answers must be refused with a reason, not read.
"""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from orchestrator.triton_messages import (
    MalformedResponse,
    decode_request,
    read_forward,
    read_probs,
    read_tokens,
    release_request,
    score_request,
)
from specdec import target_contract as contract
from specdec.sampling import SamplingParams

Tensor = service_pb2.ModelInferResponse.InferOutputTensor


def inputs_of(request: service_pb2.ModelInferRequest) -> dict[str, np.ndarray]:
    dtypes = {"FP32": np.float32, "INT32": np.int32, "UINT64": np.uint64}
    return {
        t.name: np.frombuffer(raw, dtype=dtypes[t.datatype]).reshape(tuple(t.shape))
        for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
    }


def flags_of(request: service_pb2.ModelInferRequest) -> tuple[int, bool, bool]:
    p = request.parameters
    return p["sequence_id"].int64_param, p["sequence_start"].bool_param, p["sequence_end"].bool_param


def test_a_score_request_carries_the_tokens_the_settings_and_start_on_the_first_request_only():
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95)
    first = score_request("m", 2**40, start=True, keep_length=0, token_ids=[5, 6, 7], num_logits=1, params=params)
    later = score_request("m", 2**40, start=False, keep_length=3, token_ids=[8], num_logits=1, params=params)
    assert first.model_name == "m" and flags_of(first) == (2**40, True, False) and flags_of(later)[1:] == (False, False)
    x = inputs_of(first)
    assert x[contract.INPUT_IDS].tolist() == [[5, 6, 7]] and x[contract.INPUT_IDS].dtype == np.int32
    assert x[contract.KEEP_LENGTH].tolist() == [[0]] and inputs_of(later)[contract.KEEP_LENGTH].tolist() == [[3]]
    assert x[contract.NUM_LOGITS].tolist() == [[1]]
    assert x[contract.TEMPERATURE].dtype == np.float32 and x[contract.TEMPERATURE][0, 0] == np.float32(0.8)
    assert x[contract.TOP_K].tolist() == [[40]] and x[contract.TOP_P][0, 0] == np.float32(0.95)
    assert [o.name for o in first.outputs] == [
        contract.PROBS, contract.PROBS_INDEX, contract.FORWARD_SEQUENCES, contract.FORWARD_TOKENS]


@pytest.mark.parametrize("start", [False, True])
def test_a_release_is_end_with_no_tokens_and_no_rows(start):
    request = release_request("m", 9, start=start)
    assert flags_of(request) == (9, start, True)
    x = inputs_of(request)
    assert x[contract.INPUT_IDS].shape == (1, 0) and x[contract.NUM_LOGITS].tolist() == [[0]]
    assert contract.TEMPERATURE not in x and [o.name for o in request.outputs] == [contract.LOGITS]


def answer(*tensors: tuple[str, np.ndarray], raw: list[bytes] | None = None) -> service_pb2.ModelInferResponse:
    names = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32", np.dtype(np.float64): "FP64"}
    return service_pb2.ModelInferResponse(
        outputs=[Tensor(name=n, datatype=names[a.dtype], shape=a.shape) for n, a in tensors],
        raw_output_contents=[a.tobytes() for _, a in tensors] if raw is None else raw,
    )


def test_packed_rows_are_read_as_sent_and_as_wide_as_their_highest_token():
    values = np.array([[[0.75, 0.25], [1.0, 0.0]]], dtype=np.float32)  # [1, 2, 2]; row 1 padded
    index = np.array([[[7, 3], [2, 0]]], dtype=np.int32)
    rows = read_probs(answer((contract.PROBS_INDEX, index), (contract.PROBS, values)))  # any order of outputs
    assert rows.width == 8
    dense = rows.dense()
    assert dense[0, 7] == 0.75 and dense[0, 3] == 0.25 and dense[1, 2] == 1.0 and float(dense.sum()) == 2.0


def scalar(value: int, dtype: type = np.int32) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


def test_the_forward_is_read_from_its_two_int32s():
    values = np.ones((1, 1, 1), dtype=np.float32)
    sent = answer(
        (contract.PROBS, values), (contract.FORWARD_TOKENS, scalar(19)), (contract.FORWARD_SEQUENCES, scalar(7))
    )
    assert read_forward(sent) == (7, 19)


@pytest.mark.parametrize(
    ("response", "needle"),
    [
        (answer((contract.FORWARD_TOKENS, scalar(7))), "no FORWARD_SEQUENCES among the outputs"),
        (answer((contract.FORWARD_SEQUENCES, scalar(7))), "no FORWARD_TOKENS among the outputs"),
        (answer((contract.FORWARD_SEQUENCES, scalar(7, np.float32)), (contract.FORWARD_TOKENS, scalar(7))),
         "FORWARD_SEQUENCES is FP32 of 4 bytes, expected one INT32"),
        (answer((contract.FORWARD_SEQUENCES, scalar(7)), (contract.FORWARD_TOKENS, np.array([[7, 8]], np.int32))),
         "FORWARD_TOKENS is INT32 of 8 bytes"),
    ],
)
def test_a_missing_or_malformed_forward_is_malformed(response, needle):
    with pytest.raises(MalformedResponse, match=needle):
        read_forward(response)


def test_dense_rows_come_without_index_columns():
    values = np.full((1, 3, 5), 0.2, dtype=np.float32)
    rows = read_probs(answer((contract.PROBS, values), (contract.PROBS_INDEX, np.zeros((1, 3, 0), dtype=np.int32))))
    assert rows.width == 5 and rows.dense().shape == (3, 5)


GOOD_VALUES = np.ones((1, 1, 1), dtype=np.float32)
GOOD_INDEX = np.zeros((1, 1, 1), dtype=np.int32)


@pytest.mark.parametrize(
    "response, reason",
    [
        (answer((contract.PROBS, GOOD_VALUES)), "no PROBS_INDEX among the outputs"),
        (answer((contract.LOGITS, GOOD_VALUES)), "no PROBS or PROBS_INDEX"),
        (answer((contract.PROBS, GOOD_VALUES.astype(np.float64)), (contract.PROBS_INDEX, GOOD_INDEX)), "PROBS is FP64"),
        (answer((contract.PROBS, GOOD_VALUES[0]), (contract.PROBS_INDEX, GOOD_INDEX)), r"expected FP32 or INT32 \[1, N, M\]"),
        (
            answer((contract.PROBS, GOOD_VALUES), (contract.PROBS_INDEX, GOOD_INDEX), raw=[b"\0" * 3, b"\0" * 4]),
            "holds 3 bytes",
        ),
        (
            answer((contract.PROBS, GOOD_VALUES), (contract.PROBS_INDEX, GOOD_INDEX), raw=[b"\0" * 4]),
            "PROBS_INDEX has no contents",
        ),
        (answer((contract.PROBS, GOOD_INDEX), (contract.PROBS_INDEX, GOOD_INDEX)), "expected float32, int32"),
        (
            answer((contract.PROBS, np.ones((1, 1, 2), np.float32)), (contract.PROBS_INDEX, np.full((1, 1, 2), 4, np.int32))),
            "repeats a token id",
        ),
        (
            answer((contract.PROBS, GOOD_VALUES), (contract.PROBS_INDEX, np.full((1, 1, 1), -1, np.int32))),
            "must hold token ids",
        ),
    ],
)
def test_a_malformed_answer_is_refused_with_its_reason(response, reason):
    with pytest.raises(MalformedResponse, match=reason):
        read_probs(response)


def test_a_decode_request_carries_the_settings_seed_and_stop_token_and_asks_for_tokens():
    params = SamplingParams(temperature=0.7, top_k=0, top_p=0.9)
    decode = contract.Decode(steps=8, seed=2**64 - 1, reproducible=True, stop_token=2)
    request = decode_request("m", 5, start=False, keep_length=10, token_ids=[4], params=params, decode=decode)
    x = inputs_of(request)
    assert flags_of(request) == (5, False, False) and x[contract.NUM_LOGITS].tolist() == [[1]]
    assert x[contract.DECODE_STEPS].tolist() == [[8]] and x[contract.SEED].dtype == np.uint64
    assert x[contract.SEED].tolist() == [[2**64 - 1]] and x[contract.REPRODUCIBLE].tolist() == [[1]]
    assert x[contract.STOP_TOKEN].tolist() == [[2]] and x[contract.TOP_P][0, 0] == np.float32(0.9)
    assert contract.decode_from_tensors(x.get) == decode  # what the model reads back
    assert [o.name for o in request.outputs] == [contract.TOKENS, contract.FORWARD_SEQUENCES, contract.FORWARD_TOKENS]


def test_decoded_tokens_are_read_and_a_malformed_answer_refused():
    assert read_tokens(answer((contract.TOKENS, np.array([[7, 0, 9]], np.int32))), 3) == [7, 0, 9]
    for tensors, needle in [
        ((contract.TOKENS, np.array([[7, 0, 9]], np.int32)), r"expected INT32 \[1, 1..2\]"),
        ((contract.TOKENS, np.zeros((1, 0), np.int32)), r"expected INT32 \[1, 1..2\]"),
        ((contract.TOKENS, np.array([[1.0]], np.float32)), "is FP32"),
        ((contract.TOKENS, np.array([[-1]], np.int32)), "negative token ids"),
        ((contract.PROBS, np.ones((1, 1, 1), np.float32)), "no TOKENS among the outputs"),
    ]:
        with pytest.raises(MalformedResponse, match=needle):
            read_tokens(answer(tensors), 2)
