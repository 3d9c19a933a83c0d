"""Drive the running stack (orchestrator → draft service + Triton) over gRPC and time it from the client.

Why this module exists: the numbers that matter to a user of `specdec.v1.GenerationService` are the ones a
client sees: wall time per generated token, measured around each `Generate` call. To explain them, each
generation's GenerationStats (rounds, accepted tokens, time waiting on the draft and on Triton, time in the
orchestrator) is kept, and around each measured generation the servers' own counters are read — Triton's model
statistics (`get_inference_statistics`: time inside the model), the draft service's
``specdec_draft_round_seconds`` histogram (time of a round under the draft's model lock) and both servers' counters of
the probability-row bytes they sent — so time on the wire can be told apart from compute, and the bytes per
round are measured, not computed.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import astuple, dataclass, replace

from specdec import target_contract as contract
from specdec.sampling import SamplingParams
from specdec.v1 import generation_pb2, generation_pb2_grpc, sampling_pb2

log = logging.getLogger(__name__)

TRITON_MODEL = "specdec_target"
DRAFT_ROUND_METRIC = "specdec_draft_round_seconds"
DRAFT_Q_BYTES_METRIC = "specdec_draft_q_bytes"
TRITON_BYTES_METRIC = contract.METRIC_OUTPUT_BYTES


@dataclass(frozen=True)
class GenerationRecord:
    """One measured generation through the stack (times in ms)."""

    mode: str
    k: int
    prompt_index: int
    repeat: int
    wall_ms: float  # client-side, around the Generate call
    tokens: int  # generated tokens, counting an end-of-sequence token (as HF does)
    output_ids: tuple[int, ...]  # the generated token ids (without end-of-sequence)
    rounds: int
    drafted: int
    accepted: int
    draft_ms: float
    target_ms: float
    orchestrator_ms: float
    total_ms: float  # the orchestrator's own wall time for the generation
    fallback_rounds: int
    reprefills: int


@dataclass(frozen=True)
class ServerCounters:
    """Cumulative server-side counters; subtract two readings to get one configuration's share."""

    triton_requests: int = 0
    triton_success_ns: int = 0  # request received -> response ready, inside Triton
    triton_queue_ns: int = 0
    triton_compute_ns: int = 0  # compute_input + compute_infer + compute_output (the Python model)
    draft_rounds: float = 0.0
    draft_round_s: float = 0.0  # time of draft rounds under the draft's model lock
    draft_q_bytes: float = 0.0  # q rows the draft service sent
    triton_output_bytes: float = 0.0  # output tensors (probability rows) the Triton model answered

    def __sub__(self, other: ServerCounters) -> ServerCounters:
        return ServerCounters(*(a - b for a, b in zip(astuple(self), astuple(other))))

    def __add__(self, other: ServerCounters) -> ServerCounters:
        return ServerCounters(*(a + b for a, b in zip(astuple(self), astuple(other))))


@dataclass(frozen=True)
class ConfigRun:
    """All measured generations of one (mode, K), with the server counters accumulated over them."""

    mode: str
    k: int
    records: tuple[GenerationRecord, ...]
    servers: ServerCounters


class CounterReader:
    """Reads Triton's model statistics and the Prometheus counters of Triton's model and the draft service."""

    def __init__(self, triton_url: str, triton_metrics_url: str, draft_metrics_url: str | None) -> None:
        import tritonclient.grpc as triton_grpc

        self._triton = triton_grpc.InferenceServerClient(triton_url)
        self._triton_metrics_url = triton_metrics_url
        self._draft_metrics_url = draft_metrics_url

    def read(self) -> ServerCounters:
        stats = self._triton.get_inference_statistics(model_name=TRITON_MODEL).model_stats
        s = stats[0].inference_stats if stats else None
        draft = _scrape(self._draft_metrics_url, f"{DRAFT_ROUND_METRIC}_count", f"{DRAFT_ROUND_METRIC}_sum",
                        f"{DRAFT_Q_BYTES_METRIC}_total")
        (triton_bytes,) = _scrape(self._triton_metrics_url, TRITON_BYTES_METRIC)
        counters = ServerCounters(draft_rounds=draft[0], draft_round_s=draft[1], draft_q_bytes=draft[2],
                                  triton_output_bytes=triton_bytes)
        if s is None:
            return counters
        return replace(
            counters,
            triton_requests=s.success.count,
            triton_success_ns=s.success.ns,
            triton_queue_ns=s.queue.ns,
            triton_compute_ns=s.compute_input.ns + s.compute_infer.ns + s.compute_output.ns,
        )

    def close(self) -> None:
        self._triton.close()


def _scrape(url: str | None, *names: str) -> tuple[float, ...]:
    """The sums over labels of the named Prometheus samples at ``url`` (zeros if there is no url)."""
    totals = dict.fromkeys(names, 0.0)
    if not url:
        return tuple(totals.values())
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # loopback only
            text = response.read().decode()
    except OSError as exc:
        log.warning("cannot read metrics at %s (%s); their figures are unknown", url, exc)
        return tuple(totals.values())
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return tuple(totals.values())


def _request(
    prompt_ids: Sequence[int], k: int, params: SamplingParams, max_new_tokens: int, seed: int
) -> generation_pb2.GenerateRequest:
    sampling = sampling_pb2.SamplingParams(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=seed
    )
    return generation_pb2.GenerateRequest(
        prompt_token_ids=list(prompt_ids), max_new_tokens=max_new_tokens, sampling=sampling, num_draft_tokens=k
    )


def generate_once(
    stub: generation_pb2_grpc.GenerationServiceStub,
    prompt_ids: Sequence[int],
    k: int,
    params: SamplingParams,
    max_new_tokens: int,
    seed: int,
    timeout_s: float = 600.0,
) -> tuple[generation_pb2.GenerateResponse, float]:
    """One Generate call: (response, client wall ms)."""
    request = _request(prompt_ids, k, params, max_new_tokens, seed)
    start = time.perf_counter()
    response = stub.Generate(request, timeout=timeout_s)
    return response, (time.perf_counter() - start) * 1e3


def to_record(
    mode: str, k: int, prompt_index: int, repeat: int, response: generation_pb2.GenerateResponse, wall_ms: float
) -> GenerationRecord:
    s = response.stats
    eos = 1 if response.finish_reason == generation_pb2.FINISH_REASON_EOS else 0
    return GenerationRecord(
        mode=mode, k=k, prompt_index=prompt_index, repeat=repeat, wall_ms=wall_ms,
        tokens=len(response.token_ids) + eos, output_ids=tuple(response.token_ids), rounds=s.rounds,
        drafted=s.drafted_tokens, accepted=s.accepted_tokens, draft_ms=s.draft_time_ms, target_ms=s.target_time_ms,
        orchestrator_ms=s.orchestrator_time_ms, total_ms=s.total_time_ms,
        fallback_rounds=s.draft_fallback_rounds, reprefills=s.target_reprefills,
    )


class StackRuns:
    """Generations through the running stack (a `bench.schedule.Timed`), with the servers'
    counters read around each measured one and summed per configuration."""

    def __init__(
        self, stub: generation_pb2_grpc.GenerationServiceStub, counters: CounterReader, max_new_tokens: int,
        warmup_new_tokens: int, seed: int,
    ) -> None:
        self._stub, self._counters = stub, counters
        self._max_new_tokens, self._warmup_new_tokens, self._seed = max_new_tokens, warmup_new_tokens, seed
        self._records: dict[tuple[str, int], list[GenerationRecord]] = {}
        self._servers: dict[tuple[str, int], ServerCounters] = {}

    def warm(self, mode: str, params: SamplingParams, k: int, prompt: Sequence[int], w: int) -> None:
        generate_once(self._stub, prompt, k, params, self._warmup_new_tokens, self._seed - 1 - w)

    def measure(self, mode: str, params: SamplingParams, k: int, prompt: Sequence[int], p: int, r: int) -> None:
        before = self._counters.read()
        response, wall_ms = generate_once(self._stub, prompt, k, params, self._max_new_tokens, self._seed + 1000 * r + p)
        self._servers[(mode, k)] = self._servers.get((mode, k), ServerCounters()) + (self._counters.read() - before)
        self._records.setdefault((mode, k), []).append(to_record(mode, k, p, r, response, wall_ms))

    def runs(self) -> list[ConfigRun]:
        """One ConfigRun per measured (mode, K), in the order they were first measured."""
        return [ConfigRun(m, k, tuple(recs), self._servers[(m, k)]) for (m, k), recs in self._records.items()]
