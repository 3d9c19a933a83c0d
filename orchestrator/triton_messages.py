"""The target contract's KServe v2 messages, built and read with Triton's own protobuf (``service_pb2``).

Why this module exists: the orchestrator talks to Triton with the generated ``GRPCInferenceService`` stub
and these messages, not through tritonclient's ``InferInput`` / ``InferResult`` objects and its stream
wrapper, which cost a measurable share of every round (bench/README.md, "Design measurements").
The tensors and their meaning are ``specdec.target_contract``'s; this module only encodes and decodes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from tritonclient.grpc import service_pb2

from specdec import target_contract as contract
from specdec.rows import PackedRows
from specdec.sampling import SamplingParams

_DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32", np.dtype(np.uint64): "UINT64"}
_DTYPES = {name: dtype for dtype, name in _DATATYPES.items()}
_SCORE_OUTPUTS = [
    service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=n)
    for n in (contract.PROBS, contract.PROBS_INDEX, contract.FORWARD_SEQUENCES, contract.FORWARD_TOKENS)
]
_DECODE_OUTPUTS = [
    service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=n)
    for n in (contract.TOKENS, contract.FORWARD_SEQUENCES, contract.FORWARD_TOKENS)
]
# A release asks for nothing; LOGITS ([1, 0, V]) is the cheapest output to name.
_RELEASE_OUTPUTS = [service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=contract.LOGITS)]


class MalformedResponse(ValueError):
    """Triton answered tensors that do not fit the contract."""


def _request(
    model: str,
    sequence_id: int,
    start: bool,
    end: bool,
    tensors: Sequence[tuple[str, np.ndarray]],
    outputs: Sequence[service_pb2.ModelInferRequest.InferRequestedOutputTensor],
) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(
        model_name=model,
        inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(
                name=name, datatype=_DATATYPES[values.dtype], shape=values.shape
            )
            for name, values in tensors
        ],
        raw_input_contents=[values.tobytes() for _, values in tensors],
        outputs=outputs,
    )
    # Triton's sequence batcher reads these three (what tritonclient sends for sequence_id=...).
    request.parameters["sequence_id"].int64_param = sequence_id
    request.parameters["sequence_start"].bool_param = start
    request.parameters["sequence_end"].bool_param = end
    return request


def _scalar(value: float, dtype: type[np.generic]) -> np.ndarray:
    return np.array([[value]], dtype=dtype)  # [1, 1]: the batch dim and one value


def score_request(
    model: str,
    sequence_id: int,
    *,
    start: bool,
    keep_length: int,
    token_ids: Sequence[int],
    num_logits: int,
    params: SamplingParams,
) -> service_pb2.ModelInferRequest:
    """Roll the cache back to ``keep_length``, append ``token_ids``, answer the last ``num_logits`` rows of
    p warped by ``params``, packed (PROBS + PROBS_INDEX), and how many sequences shared the forward."""
    tensors = [
        (contract.INPUT_IDS, np.asarray(token_ids, dtype=np.int32).reshape(1, -1)),  # [1, T]
        (contract.KEEP_LENGTH, _scalar(keep_length, np.int32)),
        (contract.NUM_LOGITS, _scalar(num_logits, np.int32)),
        *contract.sampling_tensors(params),
    ]
    return _request(model, sequence_id, start, False, tensors, _SCORE_OUTPUTS)


def decode_request(
    model: str,
    sequence_id: int,
    *,
    start: bool,
    keep_length: int,
    token_ids: Sequence[int],
    params: SamplingParams,
    decode: contract.Decode,
) -> service_pb2.ModelInferRequest:
    """Roll the cache back to ``keep_length``, append ``token_ids``, and let the model sample up to
    ``decode.steps`` tokens itself (TOKENS): a forward each, or fewer when ``decode.lookup``
    drafts are accepted."""
    tensors = [
        (contract.INPUT_IDS, np.asarray(token_ids, dtype=np.int32).reshape(1, -1)),  # [1, T]
        (contract.KEEP_LENGTH, _scalar(keep_length, np.int32)),
        (contract.NUM_LOGITS, _scalar(1, np.int32)),
        *contract.sampling_tensors(params),
        *contract.decode_tensors(decode),
    ]
    return _request(model, sequence_id, start, False, tensors, _DECODE_OUTPUTS)


def release_request(model: str, sequence_id: int, *, start: bool = False) -> service_pb2.ModelInferRequest:
    """END with no tokens: drop the sequence's cache. ``start`` also for a sequence Triton no longer knows."""
    return _request(model, sequence_id, start, True, contract.release_tensors(), _RELEASE_OUTPUTS)


def _output(response: service_pb2.ModelInferResponse, name: str, position: int) -> np.ndarray:
    """The output tensor ``name`` ([1, N, M]), a read-only view of the received bytes."""
    tensor = response.outputs[position]
    dtype = _DTYPES.get(tensor.datatype)
    shape = tuple(tensor.shape)
    if dtype is None or len(shape) != 3 or shape[0] != 1:
        raise MalformedResponse(f"{name} is {tensor.datatype} {list(shape)}, expected FP32 or INT32 [1, N, M]")
    if position >= len(response.raw_output_contents):
        raise MalformedResponse(f"{name} has no contents")
    raw = response.raw_output_contents[position]
    if len(raw) != dtype.itemsize * math.prod(shape):
        raise MalformedResponse(f"{name} holds {len(raw)} bytes, not the {dtype.itemsize} × {list(shape)} it claims")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def read_probs(response: service_pb2.ModelInferResponse) -> PackedRows:
    """The rows of a score answer: PROBS [1, N, M] + PROBS_INDEX [1, N, M | 0], kept packed."""
    positions = {tensor.name: i for i, tensor in enumerate(response.outputs)}
    missing = [name for name in (contract.PROBS, contract.PROBS_INDEX) if name not in positions]
    if missing:
        raise MalformedResponse(f"no {' or '.join(missing)} among the outputs {sorted(positions)}")
    values = _output(response, contract.PROBS, positions[contract.PROBS])
    index = _output(response, contract.PROBS_INDEX, positions[contract.PROBS_INDEX])
    if values.dtype != np.float32 or index.dtype != np.int32:
        raise MalformedResponse(f"PROBS, PROBS_INDEX are {values.dtype}, {index.dtype}; expected float32, int32")
    # Packed rows say nothing of V: call them just wide enough for every token they hold (a token beyond
    # a row's width has probability 0, which leaves the sampler exact).
    width = values.shape[-1] if index.shape[-1] == 0 else int(index.max(initial=0)) + 1
    try:
        return PackedRows.from_arrays(values[0], index[0], width)  # [N, width]
    except ValueError as exc:
        raise MalformedResponse(str(exc)) from None


def read_tokens(response: service_pb2.ModelInferResponse, steps: int) -> list[int]:
    """The TOKENS of a decode answer: 1..``steps`` token ids."""
    position = next((i for i, t in enumerate(response.outputs) if t.name == contract.TOKENS), None)
    if position is None:
        raise MalformedResponse(f"no {contract.TOKENS} among the outputs {sorted(t.name for t in response.outputs)}")
    tensor = response.outputs[position]
    raw = response.raw_output_contents[position] if position < len(response.raw_output_contents) else b""
    shape = list(tensor.shape)
    if tensor.datatype != "INT32" or len(shape) != 2 or shape[0] != 1 or not 1 <= shape[1] <= steps:
        raise MalformedResponse(f"{contract.TOKENS} is {tensor.datatype} {shape}, expected INT32 [1, 1..{steps}]")
    if len(raw) != 4 * shape[1]:
        raise MalformedResponse(f"{contract.TOKENS} holds {len(raw)} bytes, not the 4 × {shape} it claims")
    tokens = np.frombuffer(raw, dtype=np.int32).tolist()
    if min(tokens) < 0:
        raise MalformedResponse(f"{contract.TOKENS} holds negative token ids: {tokens}")
    return tokens


def read_forward(response: service_pb2.ModelInferResponse) -> tuple[int, int]:
    """FORWARD_SEQUENCES and FORWARD_TOKENS of a score or decode answer: the sequences and tokens its forward ran."""
    values = []
    for name in (contract.FORWARD_SEQUENCES, contract.FORWARD_TOKENS):
        position = next((i for i, t in enumerate(response.outputs) if t.name == name), None)
        if position is None:
            raise MalformedResponse(f"no {name} among the outputs {sorted(t.name for t in response.outputs)}")
        tensor = response.outputs[position]
        raw = response.raw_output_contents[position] if position < len(response.raw_output_contents) else b""
        if tensor.datatype != "INT32" or len(raw) != 4:
            raise MalformedResponse(f"{name} is {tensor.datatype} of {len(raw)} bytes, expected one INT32")
        values.append(max(1, int(np.frombuffer(raw, dtype=np.int32)[0])))
    return values[0], values[1]
