"""The target model's contract on Triton: tensor names, the sampling settings as tensors, and its errors.

Why it exists: three parts speak it (the Triton model in ``target_service``, the orchestrator's Triton
adapter and the benchmark's counters), so it lives in the ground floor, once. Both directions of the
sampling settings are here (`sampling_tensors` for the client, `sampling_from_tensors` for the model), so
the settings take exactly one tensor form between the two. Free of torch, Triton and grpc imports.

Model ``specdec_target`` (KServe v2 over gRPC). ``max_batch_size`` > 0, so every tensor carries a leading
batch dim of 1:

==================  =====  ============  ==========================================================
name                type   client shape  meaning
==================  =====  ============  ==========================================================
INPUT_IDS (in)      INT32  [1, T]        tokens to append; T = 0 only on a release request
KEEP_LENGTH (in)    INT32  [1, 1]        cache length to keep (roll back to) before appending
NUM_LOGITS (in)     INT32  [1, 1]        how many last appended positions to return; 0 only on release
TEMPERATURE (in)    FP32   [1, 1]        optional: sampling settings; present = return PROBS, not
TOP_K (in)          INT32  [1, 1]        LOGITS. Temperature 0 = greedy, top_k 0 and top_p 1 = off
TOP_P (in)          FP32   [1, 1]        (their defaults when absent); refused if out of range
DECODE_STEPS (in)   INT32  [1, 1]        optional, with TEMPERATURE and SEED: the model samples up to
                                         this many tokens itself (a forward each, fewer with LOOKUP)
                                         and answers TOKENS
                                         instead of PROBS (NUM_LOGITS must be 1)
SEED (in)           UINT64 [1, 1]        the generation's seed: each token's noise is (SEED, position)
REPRODUCIBLE (in)   INT32  [1, 1]        optional, 1 = the coupled mode's Gumbel noise
STOP_TOKEN (in)     INT32  [1, 1]        optional: stop decoding once this token is sampled (-1 = none)
LOOKUP (in)         INT32  [1, 1]        optional: each forward of the decode may also verify up to this
                                         many draft tokens looked up in the sequence's own tokens
                                         (``specdec.lookup``; 0 = none, one token per forward)
LOGITS (out)        FP32   [1, N, V]     without TEMPERATURE: raw logits of the last N = NUM_LOGITS
                                         positions
PROBS (out)         FP32   [1, N, M]     with TEMPERATURE: those rows warped (``specdec.sampling.warp``)
PROBS_INDEX (out)   INT32  [1, N, M|0]   and packed (``specdec.rows.pack_rows``): each row's support,
                                         PROBS[0, i, j] being the probability of token
                                         PROBS_INDEX[0, i, j] (zero-padded to the widest support M);
                                         or dense (M = V) when PROBS_INDEX has no columns
FORWARD_SEQUENCES   INT32  [1, 1]        how many sequences the forward that answered this request
  (out)                                  ran (1 = alone), and how many tokens in all (this
FORWARD_TOKENS      INT32  [1, 1]        request's included): what a longer request costs, and whom
  (out)                                  (of the last forward, for a decode, without its
                                         own looked-up drafts: it is learnt from per token)
TOKENS (out)        INT32  [1, n]        with DECODE_STEPS: the n (1..DECODE_STEPS) tokens sampled, the
                                         last possibly STOP_TOKEN. The cache then holds every input token
                                         and the first n - 1 sampled ones (the last is not fed yet),
                                         and with LOOKUP perhaps positions beyond them (crop them)
==================  =====  ============  ==========================================================

Why PROBS: the orchestrator needs the *warped* target distribution p, which under greedy, top-k or top-p
has a support of one to a few hundred tokens out of V (49,152 for SmolLM2). Warping next to the model
(on its GPU in production) and sending the support cuts a round's reply from (K+1)·V·4 bytes (≈ 1 MB at
K = 4) to a few KB, and the orchestrator does no softmax of its own. The rows come back bit for bit.

Why DECODE_STEPS: a round trip to the model costs about 2 ms on top of the forward (gRPC, Triton, the
Python backend's IPC), paid by every token of a target-only generation. When speculation is off, the
model runs several forwards per request and samples each token itself with ``specdec.round_draws``, the
orchestrator's own rule and noise, so the tokens are the ones the orchestrator would have drawn from the
same rows (vLLM's multi-step scheduling amortises its per-step overhead the same way). With LOOKUP, each
of those forwards also verifies what followed an earlier occurrence of the sequence's last tokens, with
the same rule (a one-hot q): prompt lookup next to the model, at the cost of a few rows and no hop.

The sequence id is Triton's correlation id (``sequence_id=``, uint64, non-zero). ``sequence_start=True``
on the first request (KEEP_LENGTH must be 0; on a live id it restarts the sequence), ``sequence_end=True``
on the last. A *release request* is INPUT_IDS [1, 0], NUM_LOGITS 0, ``sequence_end=True``: the cache is
dropped and LOGITS is [1, 0, V]. END on a normal request returns the logits, then drops the cache; END
always drops it, even when that request fails. Triton itself refuses any request without START for a
sequence it does not know (never started, already ENDed, Triton restarted or idle-timed-out), so a
release that must succeed whatever the state also sets ``sequence_start=True``.

Errors, as a tritonclient 2.73 caller receives them from Triton 2.51 (seen on this machine, asserted by
``tests/integration/test_triton_target.py``); ``exc.status()`` of a unary call, then ``exc.message()``.
Triton has no RESOURCE_EXHAUSTED, so capacity is UNAVAILABLE with a "capacity:" message.

* bad argument (token id outside the vocabulary, keep_length > cached length, NUM_LOGITS out of range,
  an empty request without END): ``StatusCode.INVALID_ARGUMENT``, ``"invalid: <reason>"``.
* Triton knows the sequence, the model holds no cache for it (evicted after idle_ttl_s, its START was
  refused, a failed forward): ``StatusCode.NOT_FOUND``,
  ``"no cache: sequence <id> has no cache here (...); resend the prefix with START"``.
* Triton's sequence batcher does not know the sequence (never started, already ENDed, Triton restarted
  or idle-timed-out it) and START is not set: ``StatusCode.INVALID_ARGUMENT``, Triton core's
  ``"inference request for sequence <id> to model 'specdec_target' must specify the START flag on the
  first request of the sequence"``.
* sequence id 0 or none: ``StatusCode.INVALID_ARGUMENT``, ``"... must specify a non-zero or non-empty
  correlation ID"`` (Triton core).
* too many live sequences (max_sequences per instance): ``StatusCode.UNAVAILABLE``, ``"capacity: ..."``.
  Triton has accepted that START all the same and holds a slot for the sequence until END or its own
  idle timeout, so release it (START+END) like any other failed sequence.
* anything else: ``StatusCode.INTERNAL``, ``"internal: ... (see the Triton log)"``; the traceback is
  in the Triton log only.
* Triton down: ``StatusCode.UNAVAILABLE`` with gRPC's connection message.
* Triton up but not serving the model (seen on a stream, status None): while it shuts down, a new
  sequence gets ``"Server is stopping, scheduler for model has stopped accepting new inference
  requests"``; before the model is loaded, ``"Request for unknown model: 'specdec_target' is not
  found"`` (or "... has no available versions" / "... is not ready"). These mean UNAVAILABLE: try later.

On a gRPC *stream* (``start_stream``/``async_stream_infer``, or ``grpc.aio`` ``stream_infer``) the same
errors arrive as per-response ``InferenceServerException`` objects whose ``status()`` is **None**
(Triton sends only ``error_message``); the message is identical and the stream stays open. Hence every
message of the model starts with a fixed prefix, and ``classify_error`` reads the prefix first. "no
cache:" and Triton's "must specify the START flag" mean the same to the orchestrator: the target lost
the sequence, re-send the whole prefix with START.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from specdec.sampling_params import SamplingParams

MODEL_NAME = "specdec_target"

INPUT_IDS = "INPUT_IDS"
KEEP_LENGTH = "KEEP_LENGTH"
NUM_LOGITS = "NUM_LOGITS"
START = "START"  # control input, CONTROL_SEQUENCE_START; clients set it via sequence_start=True
END = "END"  # control input, CONTROL_SEQUENCE_END; clients set it via sequence_end=True
TEMPERATURE = "TEMPERATURE"  # optional sampling inputs: present = PROBS + PROBS_INDEX instead of LOGITS
TOP_K = "TOP_K"
TOP_P = "TOP_P"
DECODE_STEPS = "DECODE_STEPS"  # optional decode inputs: present = the model samples, answers TOKENS
SEED = "SEED"
REPRODUCIBLE = "REPRODUCIBLE"
STOP_TOKEN = "STOP_TOKEN"
LOOKUP = "LOOKUP"
MAX_LOOKUP = 64  # the most draft tokens a decode's forward may verify
TOKENS = "TOKENS"
LOGITS = "LOGITS"
PROBS = "PROBS"
PROBS_INDEX = "PROBS_INDEX"
FORWARD_SEQUENCES = "FORWARD_SEQUENCES"
FORWARD_TOKENS = "FORWARD_TOKENS"

# Message prefixes of the model's errors (the only thing a stream response carries).
INVALID_PREFIX = "invalid:"  # INVALID_ARG
NOT_FOUND_PREFIX = "no cache:"  # NOT_FOUND
CAPACITY_PREFIX = "capacity:"  # UNAVAILABLE
INTERNAL_PREFIX = "internal:"  # INTERNAL
# Triton core, when its sequence batcher does not know the sequence and START is not set.
TRITON_NO_START = "must specify the START flag"
# Triton core, when it is not (or no longer) serving the model: stopping, or the model not loaded yet.
TRITON_NOT_SERVING = (
    "Server is stopping",
    "Request for unknown model",
    "has no available versions",
    "is not ready",
)
# Triton's Python backend, when the model's stub process stopped answering its health checks (frozen, dead).
TRITON_STUB_UNHEALTHY = "is not healthy"

METRIC_LIVE_SEQUENCES = "specdec_target_live_sequences"  # gauge; labels model, instance
METRIC_REQUESTS = "specdec_target_requests_total"  # counter; labels model, instance, code
METRIC_OUTPUT_BYTES = "specdec_target_output_bytes_total"  # counter of output tensor bytes; labels model, instance
METRIC_KV_BYTES = "specdec_target_kv_bytes"  # gauge: KV cache bytes held; labels model, instance
METRIC_FORWARDS = "specdec_target_forwards_total"  # counter: forward passes; labels model, instance
METRIC_FORWARD_SEQUENCES = "specdec_target_forward_sequences_total"  # counter: sequences in those forwards
METRIC_FORWARD_SECONDS = "specdec_target_forward_seconds_total"  # counter: seconds answering batches
METRIC_BATCH_WAIT_SECONDS = "specdec_target_batch_wait_seconds_total"  # counter: forwards held back for stragglers
METRIC_LOOKUP_TOKENS = "specdec_target_lookup_tokens_total"  # counter: decodes' looked-up drafts; label kind
METRIC_PROMPT_TOKENS = "specdec_target_prompt_tokens_total"  # counter: prompts' tokens; label kind (all, reused)
METRIC_PREFIX_BYTES = "specdec_target_prefix_cache_bytes"  # gauge: bytes of shared prompt heads held


class ErrorKind(enum.Enum):
    """What a failed target request means to the caller."""

    SEQUENCE_LOST = "SEQUENCE_LOST"  # re-send the whole prefix with START
    CAPACITY = "CAPACITY"  # target full: back off or go elsewhere (RESOURCE_EXHAUSTED upstream)
    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # a bug in the caller
    UNAVAILABLE = "UNAVAILABLE"  # Triton down or unreachable
    INTERNAL = "INTERNAL"  # anything else


def classify_error(status: str | None, message: str) -> ErrorKind:
    """Classify a tritonclient ``InferenceServerException`` by ``.status()`` and ``.message()``.

    Works for unary calls (status like "StatusCode.NOT_FOUND") and stream responses (status None).
    """
    if message.startswith(NOT_FOUND_PREFIX) or TRITON_NO_START in message:
        return ErrorKind.SEQUENCE_LOST
    if message.startswith(CAPACITY_PREFIX):
        return ErrorKind.CAPACITY
    if message.startswith(INVALID_PREFIX):
        return ErrorKind.INVALID_ARGUMENT
    if message.startswith(INTERNAL_PREFIX):
        return ErrorKind.INTERNAL
    if any(text in message for text in (*TRITON_NOT_SERVING, TRITON_STUB_UNHEALTHY)):
        return ErrorKind.UNAVAILABLE
    status = status or ""
    if status.endswith("INVALID_ARGUMENT"):
        return ErrorKind.INVALID_ARGUMENT
    if status.endswith("UNAVAILABLE"):
        return ErrorKind.UNAVAILABLE
    return ErrorKind.INTERNAL


def release_tensors() -> list[tuple[str, np.ndarray]]:
    """A release request's tensors: no INPUT_IDS ([1, 0]), KEEP_LENGTH 0 and NUM_LOGITS 0 ([1, 1] each); sent
    with END (and START too for a sequence Triton does not know)."""
    return [
        (INPUT_IDS, np.zeros((1, 0), dtype=np.int32)),
        (KEEP_LENGTH, np.zeros((1, 1), dtype=np.int32)),
        (NUM_LOGITS, np.zeros((1, 1), dtype=np.int32)),
    ]


def probe_sequence_id() -> int:
    """A sequence id for a probe's release request (START and END: a liveness probe, a readmission check):
    63 random bits, so it is never one a generation uses at the same time."""
    return random.getrandbits(63) | 1


def sampling_tensors(params: SamplingParams) -> list[tuple[str, np.ndarray]]:
    """The sampling settings as the request's TEMPERATURE, TOP_K and TOP_P tensors ([1, 1] each)."""
    return [
        (TEMPERATURE, np.array([[params.temperature]], dtype=np.float32)),
        (TOP_K, np.array([[params.top_k]], dtype=np.int32)),
        (TOP_P, np.array([[params.top_p]], dtype=np.float32)),
    ]


def sampling_from_tensors(read: Callable[[str], np.ndarray | None]) -> SamplingParams | None:
    """The settings a request carries (``read(name)`` gives an input tensor or None), or None without
    TEMPERATURE (the client asked for LOGITS). An absent TOP_K / TOP_P means off. ValueError, naming the
    tensor, for anything that is not one value in range."""
    values: dict[str, float] = {}
    for name, default in ((TEMPERATURE, None), (TOP_K, 0), (TOP_P, 1.0)):
        tensor = read(name)
        if tensor is None:
            if default is None:
                return None
            values[name] = default
            continue
        if tensor.size != 1:
            raise ValueError(f"{name} must hold one value, got shape {list(tensor.shape)}")
        values[name] = tensor.reshape(-1)[0].item()
    top_k = values[TOP_K]
    if top_k != int(top_k):
        raise ValueError(f"{TOP_K} must be an integer, got {top_k}")
    return SamplingParams(temperature=float(values[TEMPERATURE]), top_k=int(top_k), top_p=float(values[TOP_P]))


@dataclass(frozen=True)
class Decode:
    """A request's decode settings: sample up to ``steps`` tokens in the model (DECODE_STEPS)."""

    steps: int
    seed: int
    reproducible: bool = False
    stop_token: int = -1  # -1 = none
    lookup: int = 0  # draft tokens each forward may verify from the sequence's own tokens (0 = none)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"{DECODE_STEPS} must be >= 1, got {self.steps}")
        if not 0 <= self.seed < 1 << 64:
            raise ValueError(f"{SEED} must be an unsigned 64-bit integer, got {self.seed}")
        if self.stop_token < -1:
            raise ValueError(f"{STOP_TOKEN} must be a token id or -1, got {self.stop_token}")
        if not 0 <= self.lookup <= MAX_LOOKUP:
            raise ValueError(f"{LOOKUP} must be in [0, {MAX_LOOKUP}], got {self.lookup}")


def decode_tensors(decode: Decode) -> list[tuple[str, np.ndarray]]:
    """The decode settings as DECODE_STEPS, SEED, REPRODUCIBLE, STOP_TOKEN and LOOKUP tensors ([1, 1] each)."""
    return [
        (DECODE_STEPS, np.array([[decode.steps]], dtype=np.int32)),
        (SEED, np.array([[decode.seed]], dtype=np.uint64)),
        (REPRODUCIBLE, np.array([[int(decode.reproducible)]], dtype=np.int32)),
        (STOP_TOKEN, np.array([[decode.stop_token]], dtype=np.int32)),
        (LOOKUP, np.array([[decode.lookup]], dtype=np.int32)),
    ]


def decode_from_tensors(read: Callable[[str], np.ndarray | None]) -> Decode | None:
    """The decode settings a request carries, or None without DECODE_STEPS. ValueError, naming the tensor,
    for a missing SEED or anything that is not one value in range."""
    values: dict[str, int] = {}
    for name, default in ((DECODE_STEPS, None), (SEED, None), (REPRODUCIBLE, 0), (STOP_TOKEN, -1), (LOOKUP, 0)):
        tensor = read(name)
        if tensor is None:
            if name == DECODE_STEPS:
                return None
            if default is None:
                raise ValueError(f"{DECODE_STEPS} needs {name}")
            values[name] = default
            continue
        if tensor.size != 1:
            raise ValueError(f"{name} must hold one value, got shape {list(tensor.shape)}")
        values[name] = int(tensor.reshape(-1)[0])
    return Decode(values[DECODE_STEPS], values[SEED], bool(values[REPRODUCIBLE]), values[STOP_TOKEN], values[LOOKUP])
