"""The Triton adapter of the target model: tensors in, batched steps, tensors and errors out.

``model_repository/specdec_target/1/model.py`` hands Triton's calls to ``TargetModel``. The model is
*decoupled* (its config.pbtxt): ``execute()`` only reads each request's tensors and correlation id and
queues it with its response sender on a `StepScheduler`, which decides what goes into each forward (the
sequences of the last forward that are on their way back go in together: target_service/scheduler.py).
The scheduler's thread answers a batch with `steps.run_batch` (the contract applied to the batched engine,
one forward; a decode that needs more forwards goes back to the scheduler for the next one), sends each response as the request's final one, maps `StepError` codes to
``pb_utils.TritonError`` codes and keeps the custom metrics current. ``pb_utils`` is passed in, so unit
tests drive it with a fake; `answer` is the synchronous core they call.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import signal
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdec import target_contract as contract
from specdec.engine import CausalLMEngine
from specdec.kv_cache import KVCache
from specdec.lookup import ROW_COST
from specdec.models import load_model, parse_layers
from specdec.openmp import use_threads_here
from specdec.prefix_cache import PrefixCache
from specdec.sequences import SequenceStore
from target_service.config import TargetModelParams
from target_service.scheduler import Pending, StepScheduler
from target_service.steps import ErrorCode, Outputs, StepError, StepRequest, read_request, run_batch, run_to_completion

log = logging.getLogger(__name__)

FORWARD_THREAD = "specdec-forward"  # the scheduler's thread, which runs every forward; its OS-level name too
# (which the OpenMP workers it starts inherit)


def device_for(args: Mapping[str, str]) -> str:
    """Torch device of a model instance from Triton's ``initialize`` args."""
    if args.get("model_instance_kind", "CPU").upper() == "GPU":
        return f"cuda:{int(args.get('model_instance_device_id', '0'))}"
    return "cpu"


class _Metrics:
    """The model's custom Triton metrics (Triton requires a MetricFamily to outlive its Metrics)."""

    def __init__(self, pb: Any, labels: dict[str, str]) -> None:
        self._labels = labels

        def family(name: str, description: str, kind: Any) -> Any:
            return pb.MetricFamily(name=name, description=description, kind=kind)

        self._families = {
            "live": family(contract.METRIC_LIVE_SEQUENCES, "Live per-sequence KV caches in this model instance",
                           pb.MetricFamily.GAUGE),
            "kv": family(contract.METRIC_KV_BYTES, "Bytes of KV cache held by this model instance",
                         pb.MetricFamily.GAUGE),
            "requests": family(contract.METRIC_REQUESTS, "Requests answered by this model instance, by result code",
                               pb.MetricFamily.COUNTER),
            "bytes": family(contract.METRIC_OUTPUT_BYTES,
                            "Bytes of output tensors (logits or packed probability rows) answered by this instance",
                            pb.MetricFamily.COUNTER),
            "forwards": family(contract.METRIC_FORWARDS, "Forward passes run by this model instance",
                               pb.MetricFamily.COUNTER),
            "forward_sequences": family(contract.METRIC_FORWARD_SEQUENCES,
                                        "Sequences in those forward passes (divide by the forwards for the mean batch)",
                                        pb.MetricFamily.COUNTER),
            "forward_seconds": family(contract.METRIC_FORWARD_SECONDS,
                                      "Seconds spent answering batches (forward, warping, packing)",
                                      pb.MetricFamily.COUNTER),
            "lookup": family(contract.METRIC_LOOKUP_TOKENS,
                             "Draft tokens decodes looked up in their own text (kind=drafted) and kept (kind=accepted)",
                             pb.MetricFamily.COUNTER),
            "wait_seconds": family(contract.METRIC_BATCH_WAIT_SECONDS,
                                   "Seconds forwards were held back for sequences on their way back",
                                   pb.MetricFamily.COUNTER),
            "prompt_tokens": family(contract.METRIC_PROMPT_TOKENS,
                                    "Tokens of the prompts that started sequences (kind=all) and of those copied "
                                    "from a shared prompt head instead of computed (kind=reused)",
                                    pb.MetricFamily.COUNTER),
            "prefix_bytes": family(contract.METRIC_PREFIX_BYTES, "Bytes of shared prompt heads held (prefix_cache_mb)",
                                   pb.MetricFamily.GAUGE),
        }
        self.live = self._families["live"].Metric(labels=labels)
        self.kv_bytes = self._families["kv"].Metric(labels=labels)
        self.output_bytes = self._families["bytes"].Metric(labels=labels)
        self.forwards = self._families["forwards"].Metric(labels=labels)
        self.forward_sequences = self._families["forward_sequences"].Metric(labels=labels)
        self.forward_seconds = self._families["forward_seconds"].Metric(labels=labels)
        self.wait_seconds = self._families["wait_seconds"].Metric(labels=labels)
        self.lookup = {kind: self._families["lookup"].Metric(labels={**labels, "kind": kind})
                       for kind in ("drafted", "accepted")}
        self.prompt_tokens = {kind: self._families["prompt_tokens"].Metric(labels={**labels, "kind": kind})
                              for kind in ("all", "reused")}
        self.prefix_bytes = self._families["prefix_bytes"].Metric(labels=labels)
        self._prompts = (0, 0, 0)  # the prefix cache's prompt tokens, reused tokens and bytes, as last reported
        self._lookup = [0, 0]  # drafted and accepted since the last update
        self._waited = 0.0  # the scheduler's cumulative wait, as last reported
        self._forwards = [0, 0]  # forwards and their sequences since the last update
        self._by_code: dict[str, Any] = {}
        self._gauges = (0.0, 0.0)  # (live, kv bytes) as last set
        self.live.set(0.0)
        self.kv_bytes.set(0.0)

    def executed(
        self, codes: Counter[str], output_bytes: int, live: int, kv_bytes: int, seconds: float, waited: float
    ) -> None:
        """One update per batch: every metric update is a round trip to the Triton server, so counters get one
        increment each and the gauges are set only when they change (~0.1 ms per update saved from every
        round's latency), after the batch's answers went out. ``waited`` is the scheduler's cumulative wait."""
        if self._forwards[0]:
            self.forwards.increment(float(self._forwards[0]))
            self.forward_sequences.increment(float(self._forwards[1]))
            self._forwards = [0, 0]
        self.forward_seconds.increment(seconds)
        if self._lookup[0]:
            self.lookup["drafted"].increment(float(self._lookup[0]))
            self.lookup["accepted"].increment(float(self._lookup[1]))
            self._lookup = [0, 0]
        if waited > self._waited:
            self.wait_seconds.increment(waited - self._waited)
            self._waited = waited
        for code, count in codes.items():
            if code not in self._by_code:
                self._by_code[code] = self._families["requests"].Metric(labels={**self._labels, "code": code})
            self._by_code[code].increment(float(count))
        if output_bytes:
            self.output_bytes.increment(float(output_bytes))
        if (float(live), float(kv_bytes)) != self._gauges:
            if float(live) != self._gauges[0]:
                self.live.set(float(live))
            if float(kv_bytes) != self._gauges[1]:
                self.kv_bytes.set(float(kv_bytes))
            self._gauges = (float(live), float(kv_bytes))

    def prompts(self, prefix: PrefixCache | None) -> None:
        """The prefix cache's figures, when they moved (at most three round trips, after a batch's answers)."""
        if prefix is None:
            return
        now = (prefix.stats.prompt_tokens, prefix.stats.reused_tokens, prefix.nbytes)
        if now[0] > self._prompts[0]:
            self.prompt_tokens["all"].increment(float(now[0] - self._prompts[0]))
        if now[1] > self._prompts[1]:
            self.prompt_tokens["reused"].increment(float(now[1] - self._prompts[1]))
        if now[2] != self._prompts[2]:
            self.prefix_bytes.set(float(now[2]))
        self._prompts = now

    def looked_up(self, drafted: int, accepted: int) -> None:
        """A decode's forward verified looked-up drafts: counted now, reported with the batch's update."""
        self._lookup[0] += drafted
        self._lookup[1] += accepted

    def forward(self, sequences: int) -> None:
        """A forward is starting: counted now, reported with the batch's update (no round trip here)."""
        self._forwards[0] += 1
        self._forwards[1] += sequences


class TargetModel:
    """``TritonPythonModel`` minus the Triton imports: ``pb_utils`` is passed in (or a fake, in tests)."""

    def __init__(
        self, pb_utils: Any, engine: CausalLMEngine | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._pb = pb_utils
        self.engine = engine
        self._clock = clock
        self.store: SequenceStore[KVCache] | None = None
        self._metrics: _Metrics | None = None
        self._scheduler: StepScheduler[tuple[StepRequest, Any]] | None = None
        self._unreported_s = 0.0  # seconds of forwards not in the metrics yet
        self._row_cost = ROW_COST  # until initialize() reads the model parameters
        self._budget = 0
        self.prefix: PrefixCache | None = None

    def initialize(self, args: Mapping[str, str]) -> None:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # SIGUSR1 writes every thread's stack to the Triton log: how the service shows where a model that stopped
        # answering is stuck (`target_service.liveness`), even with a thread holding the GIL.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        params = TargetModelParams.from_model_config(json.loads(args["model_config"]))
        self._row_cost = params.lookup_row_cost
        self._budget = params.max_forward_tokens
        device = device_for(args)
        if params.threads > 0:
            torch.set_num_threads(params.threads)
        if self.engine is None:
            started = time.perf_counter()
            model = load_model(
                params.model, device=device, dtype=params.dtype, keep_layers=parse_layers(params.keep_layers),
                cache_dir=Path(params.cache_dir) if params.cache_dir else None,
            )
            self.engine = CausalLMEngine(model, params.max_sequences, params.kv_slot_tokens)
            log.info(
                "loaded %s (%s, layers %s) on %s in %.1f s; torch threads %d, capacity %d, idle TTL %.0f s",
                params.model, params.dtype, params.keep_layers or "all", device,
                time.perf_counter() - started, torch.get_num_threads(), params.max_sequences, params.idle_ttl_s,
            )  # fmt: skip
        self.store = SequenceStore(self.engine.new_cache, params.max_sequences, params.idle_ttl_s, clock=self._clock)
        if params.prefix_cache_mb > 0:
            self.prefix = PrefixCache(int(params.prefix_cache_mb * 2**20))
        labels = {"model": args.get("model_name", contract.MODEL_NAME), "instance": args.get("model_instance_name", "0")}
        self._metrics = _Metrics(self._pb, labels)
        self._scheduler = StepScheduler(self._answer_batch, params.batch_wait_ms / 1e3, name=FORWARD_THREAD,
                                        on_start=lambda: use_threads_here(params.threads))

    def execute(self, requests: list[Any]) -> None:
        """Decoupled: queue every request with its response sender; a malformed one is refused at once."""
        assert self._scheduler is not None, "initialize() first"
        queued = []
        for request in requests:
            sender = request.get_response_sender()
            decoded = self._read(request)
            if isinstance(decoded, StepError):
                self._send(sender, decoded)
                self._count([decoded])
                continue
            queued.append(Pending(decoded.sequence_id, decoded.end, (decoded, sender)))
        self._scheduler.submit(queued)
        return None

    def answer(self, requests: list[Any]) -> list[Any]:
        """Synchronously: answer one batch of Triton requests (one forward, more for decodes); the responses,
        in order."""
        answers, seconds = self._run([self._read(r) for r in requests], run_to_completion)
        self._count(answers, seconds)  # type: ignore[arg-type] - run to completion: no continuations
        return [self._respond(answer) for answer in answers]

    def finalize(self) -> None:
        if self._scheduler is not None:
            for _, sender in self._scheduler.stop():
                self._send(sender, StepError(ErrorCode.UNAVAILABLE, f"{contract.CAPACITY_PREFIX} the model is unloading"))
        if self.store is not None:
            log.info("unloading with %d live sequence(s)", len(self.store))
        self.engine = self.store = self._metrics = self._scheduler = None

    def _answer_batch(self, batch: list[tuple[StepRequest, Any]]) -> None:
        """The scheduler's runner: one forward for the batch, each response sent as its request's last; the
        metrics after the answers (each update is a round trip to the Triton server). Every request gets its
        answer: a batch that fails as a whole (a bug outside any one request) answers each one INTERNAL, for
        a request left unanswered would hold its caller until its deadline."""
        try:
            answers, seconds = self._run([request for request, _ in batch])
        except Exception:  # noqa: BLE001 - logged here; the callers get INTERNAL without the traceback
            log.exception("a batch of %d request(s) failed", len(batch))
            failed = StepError(ErrorCode.INTERNAL, f"{contract.INTERNAL_PREFIX} the batch failed (see the Triton log)")
            answers, seconds = [failed] * len(batch), 0.0
        again = [
            Pending(answer.sequence_id, answer.end, (answer, sender))
            for (_, sender), answer in zip(batch, answers) if isinstance(answer, StepRequest)
        ]  # fmt: skip
        if again:  # decodes that need another forward: the next one, with whoever else is ready
            assert self._scheduler is not None
            self._scheduler.submit(again, continued=True)
        done = [(sender, answer) for (_, sender), answer in zip(batch, answers) if not isinstance(answer, StepRequest)]
        for sender, answer in done:
            self._send(sender, answer)
        self._unreported_s += seconds
        if done:  # a forward that only continued decodes answers nobody: its metrics wait for one that does
            self._count([answer for _, answer in done], self._unreported_s)
            self._unreported_s = 0.0

    def _run(
        self, requests: list[StepRequest | StepError], run: Callable[..., list[Any]] = run_batch
    ) -> tuple[list[Outputs | StepError | StepRequest], float]:
        """The answers of one batch (``run``: one forward, or `run_to_completion`) and the seconds it took."""
        assert self.engine is not None and self.store is not None and self._metrics is not None, "initialize() first"
        started = time.perf_counter()
        self.store.evict_idle()
        answers = run(self.engine, self.store, requests, self._metrics.forward, self._metrics.looked_up, self._row_cost,
                      self._budget, self.prefix)
        return answers, time.perf_counter() - started

    def _count(self, answers: list[Outputs | StepError], seconds: float = 0.0) -> None:
        try:
            assert self.store is not None and self._metrics is not None
            self._metrics.executed(
                Counter(a.code.value if isinstance(a, StepError) else "OK" for a in answers),
                sum(array.nbytes for a in answers if not isinstance(a, StepError) for array in a.values()),
                len(self.store), sum(cache.nbytes for cache in self.store.states()), seconds,
                self._scheduler.stats.waited_s if self._scheduler is not None else 0.0,
            )
            self._metrics.prompts(self.prefix)
        except Exception:  # metrics must never cost a response
            log.exception("updating metrics failed")

    def _send(self, sender: Any, answer: Outputs | StepError) -> None:
        try:
            sender.send(self._respond(answer), flags=self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # noqa: BLE001 - the caller went away (cancelled): nobody to answer
            log.info("a response could not be sent (%s)", exc)

    def _read(self, request: Any) -> StepRequest | StepError:
        def read(name: str) -> np.ndarray | None:
            tensor = self._pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        try:
            return read_request(int(request.correlation_id()), read)
        except ValueError as exc:
            return StepError(ErrorCode.INVALID_ARG, f"{contract.INVALID_PREFIX} {exc}")
        except Exception:
            log.exception("reading a request failed")
            return StepError(ErrorCode.INTERNAL, f"{contract.INTERNAL_PREFIX} reading the request failed (see the Triton log)")

    def _respond(self, result: Outputs | StepError) -> Any:
        pb = self._pb
        if not isinstance(result, StepError):
            return pb.InferenceResponse(output_tensors=[pb.Tensor(name, array) for name, array in result.items()])
        return pb.InferenceResponse(
            output_tensors=[], error=pb.TritonError(result.message, getattr(pb.TritonError, result.code.value))
        )
