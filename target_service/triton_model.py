"""The logic of the Triton target model, importable and testable without Triton.

``model_repository/specdec_target/1/model.py`` is three lines that hand Triton's calls to ``TargetModel``;
everything else lives here so unit tests can drive it with a tiny model and a fake ``pb_utils``:

* ``read_request`` - one request's tensors decoded (and validated) at the edge into a ``StepRequest``.
* ``run_step`` - one request, output arrays or a ``StepError`` out: the contract of
  ``specdec.target_contract`` applied to a ``specdec.engine.CausalLMEngine``. It never raises.
* ``TargetModel`` - the Triton adapter: reads tensors and the correlation id off each request, answers
  every request of an ``execute`` batch independently (one bad request never fails its neighbours), maps
  ``StepError`` codes to ``pb_utils.TritonError`` codes and keeps the custom metrics current.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdec import target_contract as contract
from specdec.engine import CapacityError, CausalLMEngine, SequenceNotFoundError, SequenceStore
from specdec.models import load_model, parse_layers
from specdec.rows import pack_rows
from specdec.sampling import SamplingParams, warp
from target_service.config import TargetModelParams

log = logging.getLogger(__name__)


class ErrorCode(enum.Enum):
    """What went wrong with one request; ``TargetModel`` maps these to ``pb_utils.TritonError`` codes."""

    INVALID_ARG = "INVALID_ARG"  # the request is malformed or inconsistent with the cache
    NOT_FOUND = "NOT_FOUND"  # the sequence holds no cache here: re-send the prefix with START
    UNAVAILABLE = "UNAVAILABLE"  # capacity: too many live sequences, back off or go elsewhere
    INTERNAL = "INTERNAL"  # a bug or a failed forward; the traceback is in the Triton log only


@dataclass(frozen=True)
class StepError:
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class StepRequest:
    """One Triton request, decoded from its tensors at the edge (`read_request`)."""

    sequence_id: int  # the Triton correlation id (uint64)
    token_ids: tuple[int, ...]  # tokens to append
    keep_length: int  # cache length to keep before appending
    num_logits: int  # how many last positions to return rows for
    start: bool  # CONTROL_SEQUENCE_START
    end: bool  # CONTROL_SEQUENCE_END
    params: SamplingParams | None = None  # with TEMPERATURE: answer PROBS warped by these, else LOGITS


Outputs = dict[str, np.ndarray]
Read = Callable[[str], "np.ndarray | None"]


def _one_value(name: str, array: np.ndarray) -> int:
    if array.size != 1:
        raise ValueError(f"{name} must hold one value per request, got shape {list(array.shape)}")
    return int(array.reshape(-1)[0])


def read_request(sequence_id: int, read: Read) -> StepRequest:
    """A request's input tensors (``read(name)``: the array, or None if absent) -> StepRequest.

    ValueError, naming the tensor, for a malformed request."""
    arrays = {}
    for name in (contract.INPUT_IDS, contract.KEEP_LENGTH, contract.NUM_LOGITS):
        array = read(name)
        if array is None:
            raise ValueError(f"missing input {name}")
        arrays[name] = array
    ids = arrays[contract.INPUT_IDS]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"{contract.INPUT_IDS} must have shape [1, T], got {list(ids.shape)}")

    def flag(name: str) -> bool:
        array = read(name)
        return array is not None and bool(array.reshape(-1)[0])

    return StepRequest(
        sequence_id=sequence_id,
        token_ids=tuple(ids[0].tolist()),
        keep_length=_one_value(contract.KEEP_LENGTH, arrays[contract.KEEP_LENGTH]),
        num_logits=_one_value(contract.NUM_LOGITS, arrays[contract.NUM_LOGITS]),
        start=flag(contract.START),
        end=flag(contract.END),
        params=contract.sampling_from_tensors(read),
    )


def _outputs(logits: torch.Tensor, params: SamplingParams | None) -> Outputs:
    """logits [N, V] -> LOGITS, or PROBS and PROBS_INDEX (warped, packed) when sampling settings came."""
    if params is None:
        return {contract.LOGITS: logits.cpu().numpy()[None]}  # [1, N, V]
    if logits.shape[0] == 0:
        values, index = logits.cpu().numpy(), None
    else:
        values, index = pack_rows(warp(logits, params))  # [N, M] each, or [N, V] and None when dense
    if index is None:
        index = np.zeros((values.shape[0], 0), dtype=np.int32)
    return {contract.PROBS: values[None], contract.PROBS_INDEX: index[None]}  # [1, N, M], [1, N, M | 0]


def run_step(engine: CausalLMEngine, request: StepRequest) -> Outputs | StepError:
    """Apply one request to the engine: its output arrays (`specdec.target_contract`), or the error to send back.

    A *release request* (no tokens, NUM_LOGITS 0, END) drops the cache and returns [1, 0, V]; here it is
    idempotent (Triton itself wants START too for a sequence it no longer knows, see the contract). END on a
    normal request returns the logits and then drops the cache; END always drops it, even when the step
    itself fails.
    """
    sid = request.sequence_id
    try:
        try:
            keep_length, num_logits, params, tokens = request.keep_length, request.num_logits, request.params, request.token_ids
            if params is not None:
                params.validate_for_vocab(engine.vocab_size)
            if keep_length < 0:
                raise ValueError(f"keep_length must be >= 0, got {keep_length}")
            if not tokens and num_logits == 0:
                if not request.end:
                    raise ValueError(
                        f"a request without tokens is a release request and must set END "
                        f"(sequence {sid}, {contract.NUM_LOGITS} 0)"
                    )
                return _outputs(torch.zeros(0, engine.vocab_size), params)  # released below
            logits = engine.extend(sid, keep_length, tokens, num_logits, start=request.start)  # [N, V]
            return _outputs(logits, params)
        finally:
            if request.end:
                engine.store.release(sid)
    except ValueError as exc:
        return StepError(ErrorCode.INVALID_ARG, f"{contract.INVALID_PREFIX} {exc}")
    except SequenceNotFoundError as exc:
        return StepError(ErrorCode.NOT_FOUND, f"{contract.NOT_FOUND_PREFIX} {exc}; resend the prefix with START")
    except CapacityError as exc:
        return StepError(ErrorCode.UNAVAILABLE, f"{contract.CAPACITY_PREFIX} {exc}")
    except Exception:
        log.exception("sequence_id=%d step failed", sid)
        message = f"{contract.INTERNAL_PREFIX} step failed in sequence {sid} (see the Triton log)"
        return StepError(ErrorCode.INTERNAL, message)


def device_for(args: Mapping[str, str]) -> str:
    """Torch device of a model instance from Triton's ``initialize`` args."""
    if args.get("model_instance_kind", "CPU").upper() == "GPU":
        return f"cuda:{int(args.get('model_instance_device_id', '0'))}"
    return "cpu"


class TargetModel:
    """``TritonPythonModel`` minus the Triton imports: ``pb_utils`` is passed in (or a fake, in tests)."""

    def __init__(self, pb_utils: Any, engine: CausalLMEngine | None = None) -> None:
        self._pb = pb_utils
        self.engine = engine
        # Triton requires a MetricFamily to outlive its Metrics: keep both, drop metrics first.
        self._gauge_family: Any = None
        self._gauge: Any = None
        self._counter_family: Any = None
        self._counters: dict[str, Any] = {}
        self._bytes_family: Any = None
        self._bytes: Any = None
        self._labels: dict[str, str] = {}

    def initialize(self, args: Mapping[str, str]) -> None:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        model_config = json.loads(args["model_config"])
        params = TargetModelParams.from_model_config(model_config)
        device = device_for(args)
        if params.threads > 0:
            torch.set_num_threads(params.threads)
        if self.engine is None:
            started = time.perf_counter()
            model = load_model(
                params.model,
                device=device,
                dtype=params.dtype,
                keep_layers=parse_layers(params.keep_layers),
                cache_dir=Path(params.cache_dir) if params.cache_dir else None,
            )
            store = SequenceStore(params.max_sequences, params.idle_ttl_s)
            self.engine = CausalLMEngine(model, store)
            log.info(
                "loaded %s (%s, layers %s) on %s in %.1f s; torch threads %d, capacity %d, idle TTL %.0f s",
                params.model, params.dtype, params.keep_layers or "all", device,
                time.perf_counter() - started, torch.get_num_threads(), params.max_sequences, params.idle_ttl_s,
            )  # fmt: skip
        self._labels = {
            "model": args.get("model_name", contract.MODEL_NAME),
            "instance": args.get("model_instance_name", "0"),
        }
        pb = self._pb
        self._gauge_family = pb.MetricFamily(
            name=contract.METRIC_LIVE_SEQUENCES,
            description="Live per-sequence KV caches in this model instance",
            kind=pb.MetricFamily.GAUGE,
        )
        self._gauge = self._gauge_family.Metric(labels=self._labels)
        self._counter_family = pb.MetricFamily(
            name=contract.METRIC_REQUESTS,
            description="Requests answered by this model instance, by result code",
            kind=pb.MetricFamily.COUNTER,
        )
        self._bytes_family = pb.MetricFamily(
            name=contract.METRIC_OUTPUT_BYTES,
            description="Bytes of output tensors (logits or packed probability rows) answered by this instance",
            kind=pb.MetricFamily.COUNTER,
        )
        self._bytes = self._bytes_family.Metric(labels=self._labels)
        self._gauge.set(0.0)

    def execute(self, requests: list[Any]) -> list[Any]:
        assert self.engine is not None, "initialize() first"
        self.engine.store.evict_idle()
        responses = []
        for request in requests:
            result = self._step(request)
            responses.append(self._respond(result))
        try:
            self._gauge.set(float(len(self.engine.store)))
        except Exception:  # metrics must never cost a response
            log.exception("updating metrics failed")
        return responses

    def finalize(self) -> None:
        if self.engine is not None:
            log.info("unloading with %d live sequence(s)", len(self.engine.store))
        self.engine = None
        self._gauge = self._bytes = None
        self._counters.clear()
        self._gauge_family = self._counter_family = self._bytes_family = None

    def _step(self, request: Any) -> Outputs | StepError:
        def read(name: str) -> np.ndarray | None:
            tensor = self._pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        try:
            step = read_request(int(request.correlation_id()), read)
        except ValueError as exc:
            return StepError(ErrorCode.INVALID_ARG, f"{contract.INVALID_PREFIX} {exc}")
        except Exception:
            log.exception("reading a request failed")
            message = f"{contract.INTERNAL_PREFIX} reading the request failed (see the Triton log)"
            return StepError(ErrorCode.INTERNAL, message)
        return run_step(self.engine, step)

    def _respond(self, result: Outputs | StepError) -> Any:
        pb = self._pb
        code = result.code.value if isinstance(result, StepError) else "OK"
        try:
            if code not in self._counters:
                self._counters[code] = self._counter_family.Metric(labels={**self._labels, "code": code})
            self._counters[code].increment(1.0)
            if not isinstance(result, StepError):
                self._bytes.increment(float(sum(array.nbytes for array in result.values())))
        except Exception:
            log.exception("updating metrics failed")
        if not isinstance(result, StepError):
            return pb.InferenceResponse(output_tensors=[pb.Tensor(name, array) for name, array in result.items()])
        return pb.InferenceResponse(
            output_tensors=[], error=pb.TritonError(result.message, getattr(pb.TritonError, result.code.value))
        )
