"""Drive the running stack (orchestrator → draft service + Triton) over gRPC and time it from the client.

Why this module exists: the numbers that matter to a user of `specdec.v1.GenerationService` are the ones a
client sees: wall time per generated token, measured around each `Generate` call. To explain them, each
generation's GenerationStats (rounds, accepted tokens, time waiting on the draft and on Triton, time in the
orchestrator) is kept, and around each configuration the servers' own counters are read — Triton's model
statistics (`get_inference_statistics`: time inside the model) and the draft service's
``specdec_draft_round_seconds`` histogram (time inside the draft model worker) — so time on the wire can be
told apart from compute.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass

import grpc

from specdec.sampling import SamplingParams
from specdec.v1 import generation_pb2, generation_pb2_grpc, sampling_pb2

log = logging.getLogger(__name__)

TRITON_MODEL = "specdec_target"
DRAFT_ROUND_METRIC = "specdec_draft_round_seconds"


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
    draft_round_s: float = 0.0  # time of draft rounds in the draft's model worker

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
    """Reads Triton's model statistics and the draft service's Prometheus histogram."""

    def __init__(self, triton_url: str, draft_metrics_url: str | None) -> None:
        import tritonclient.grpc as triton_grpc

        self._triton = triton_grpc.InferenceServerClient(triton_url)
        self._draft_metrics_url = draft_metrics_url

    def read(self) -> ServerCounters:
        stats = self._triton.get_inference_statistics(model_name=TRITON_MODEL).model_stats
        s = stats[0].inference_stats if stats else None
        draft_count, draft_sum = self._draft_round_seconds()
        if s is None:
            return ServerCounters(draft_rounds=draft_count, draft_round_s=draft_sum)
        return ServerCounters(
            triton_requests=s.success.count,
            triton_success_ns=s.success.ns,
            triton_queue_ns=s.queue.ns,
            triton_compute_ns=s.compute_input.ns + s.compute_infer.ns + s.compute_output.ns,
            draft_rounds=draft_count,
            draft_round_s=draft_sum,
        )

    def _draft_round_seconds(self) -> tuple[float, float]:
        if not self._draft_metrics_url:
            return 0.0, 0.0
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(self._draft_metrics_url, timeout=5) as response:  # loopback only
                text = response.read().decode()
        except OSError as exc:
            log.warning("cannot read the draft service's metrics (%s); draft wire time unknown", exc)
            return 0.0, 0.0
        count = total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == f"{DRAFT_ROUND_METRIC}_count":
                    count += sample.value
                elif sample.name == f"{DRAFT_ROUND_METRIC}_sum":
                    total += sample.value
        return count, total

    def close(self) -> None:
        self._triton.close()


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


def run_stack(
    address: str,
    counters: CounterReader,
    prompts: Sequence[Sequence[int]],
    modes: Sequence[tuple[str, SamplingParams]],
    ks: Sequence[int],
    max_new_tokens: int,
    repeats: int,
    warmup: int,
    warmup_new_tokens: int,
    seed: int,
    progress: Callable[[int], None] = lambda n: None,
) -> list[ConfigRun]:
    """Measure every (mode, K) over all prompts, interleaved.

    First ``warmup`` short unmeasured generations per configuration (every code path of that K runs once);
    then ``repeats`` passes over the prompts in which each prompt is generated under every configuration
    in turn, so a burst of background load hits all configurations alike instead of wrecking one of them.
    The servers' counters are read around each measured generation and summed per configuration.
    ``progress`` is called with the number of generations just finished (warm-up included).
    """
    configs = [(mode, params, k) for mode, params in modes for k in ks]
    records: dict[tuple[str, int], list[GenerationRecord]] = {(m, k): [] for m, _, k in configs}
    servers: dict[tuple[str, int], ServerCounters] = {(m, k): ServerCounters() for m, _, k in configs}
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        for mode, params, k in configs:
            for w in range(warmup):
                generate_once(stub, prompts[w % len(prompts)], k, params, warmup_new_tokens, seed - 1 - w)
                progress(1)
        for r in range(repeats):
            for p, prompt in enumerate(prompts):
                for mode, params, k in configs:
                    before = counters.read()
                    response, wall_ms = generate_once(stub, prompt, k, params, max_new_tokens, seed + 1000 * r + p)
                    servers[(mode, k)] += counters.read() - before
                    records[(mode, k)].append(to_record(mode, k, p, r, response, wall_ms))
                    progress(1)
    return [ConfigRun(m, k, tuple(records[(m, k)]), servers[(m, k)]) for m, _, k in configs]
