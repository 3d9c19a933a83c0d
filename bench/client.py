"""Drive the running stack over its public gRPC API, as a backend service would, and read its servers' figures.

Why this module exists: the numbers that matter to a user of `specdec.v1.GenerationService` are the ones a
client sees — wall time per generated token around each `Generate` call, and tokens per second with many
calls in flight. Each generation's GenerationStats (rounds, drafts accepted, the Ks auto chose, time
waiting on the draft and on Triton) explains them; the servers' own counters (the Triton model's metrics:
forwards, sequences per forward, time answering batches, live sequences, KV bytes; the draft service's
GetStats) say what happened inside and whether anything leaked.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import astuple, dataclass

import grpc

from bench.arms import Arm, Record
from specdec import target_contract as contract
from specdec.sampling import SamplingParams
from specdec.v1 import draft_pb2, draft_pb2_grpc, generation_pb2, generation_pb2_grpc, sampling_pb2

log = logging.getLogger(__name__)

TIMEOUT_S = 600.0


def request(arm: Arm, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int,
            seed: int) -> generation_pb2.GenerateRequest:
    """The GenerateRequest of one specdec arm: its drafter, its K (unset = auto) and its sampling mode."""
    sampling = sampling_pb2.SamplingParams(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=seed
    )
    message = generation_pb2.GenerateRequest(
        prompt_token_ids=list(prompt_ids), max_new_tokens=max_new_tokens, sampling=sampling, drafter=arm.drafter,
        reproducible=arm.coupled,
    )
    if arm.k is not None:
        message.num_draft_tokens = arm.k
    return message


def to_record(response: generation_pb2.GenerateResponse, wall_ms: float, **labels: object) -> Record:
    """A Record from a finished generation; ``labels`` fill phase, workload, mode, arm, item, concurrency."""
    s = response.stats
    eos = 1 if response.finish_reason == generation_pb2.FINISH_REASON_EOS else 0
    return Record(
        wall_ms=wall_ms, tokens=len(response.token_ids) + eos, output_ids=tuple(response.token_ids), rounds=s.rounds,
        drafted=s.drafted_tokens, accepted=s.accepted_tokens, off_rounds=s.speculation_off_rounds,
        probe_rounds=s.probe_rounds, rounds_by_k=tuple(s.rounds_by_k), draft_ms=s.draft_time_ms,
        target_ms=s.target_time_ms, orchestrator_ms=s.orchestrator_time_ms, total_ms=s.total_time_ms,
        fallback_rounds=s.draft_fallback_rounds, reprefills=s.target_reprefills, **labels,
    )


def generate(stub: generation_pb2_grpc.GenerationServiceStub,
             message: generation_pb2.GenerateRequest) -> tuple[generation_pb2.GenerateResponse, float]:
    """One Generate call: (response, client wall ms)."""
    start = time.perf_counter()
    response = stub.Generate(message, timeout=TIMEOUT_S)
    return response, (time.perf_counter() - start) * 1e3


@dataclass(frozen=True)
class TritonCounters:
    """Cumulative figures of the Triton model; subtract two readings for what happened in between."""

    forwards: float = 0.0  # forward passes of the model
    forward_sequences: float = 0.0  # sequences in those forwards
    forward_s: float = 0.0  # the model answering batches (forward, warping, packing)
    wait_s: float = 0.0  # forwards held back for sequences on their way back
    lookup_drafted: float = 0.0  # draft tokens the target looked up for decodes (specdec.lookup)
    lookup_accepted: float = 0.0  # and of those, accepted
    prompt_tokens: float = 0.0  # tokens of the prompts that started sequences (with the prefix cache on)
    reused_tokens: float = 0.0  # and of those, copied from a shared prompt head (specdec.prefix_cache)

    def __sub__(self, other: TritonCounters) -> TritonCounters:
        return TritonCounters(*(a - b for a, b in zip(astuple(self), astuple(other))))


@dataclass(frozen=True)
class Occupancy:
    """What the servers hold right now: live sequences and KV cache bytes, Triton and the draft service."""

    triton_live: float
    triton_kv_bytes: float
    draft_live: int
    draft_kv_bytes: int
    suffix_cache_entries: int
    suffix_cache_bytes: int

    @property
    def idle(self) -> bool:
        return self.triton_live == 0 and self.draft_live == 0


class ServerReader:
    """Reads Triton's model statistics and metrics and the draft service's GetStats."""

    def __init__(self, triton_metrics_url: str, draft_address: str) -> None:
        self._metrics_url = triton_metrics_url
        self._draft_channel = grpc.insecure_channel(draft_address)
        self._draft = draft_pb2_grpc.DraftServiceStub(self._draft_channel)

    def triton(self, timeout_s: float = 5.0) -> TritonCounters:
        """The counters once two readings in a row agree: the model updates its metrics after a batch's answers
        went out, one counter at a time, so a reading taken right after the last answer can catch an update
        halfway (the forwards counted, their sequences not yet). Call it when no generation is running."""
        deadline = time.monotonic() + timeout_s
        reading = self._read_triton()
        while True:
            time.sleep(0.02)
            again = self._read_triton()
            if again == reading or time.monotonic() > deadline:
                return again
            reading = again

    def _read_triton(self) -> TritonCounters:
        return TritonCounters(*scrape(self._metrics_url, contract.METRIC_FORWARDS, contract.METRIC_FORWARD_SEQUENCES,
                                      contract.METRIC_FORWARD_SECONDS, contract.METRIC_BATCH_WAIT_SECONDS,
                                      f"{contract.METRIC_LOOKUP_TOKENS}{{kind=drafted}}",
                                      f"{contract.METRIC_LOOKUP_TOKENS}{{kind=accepted}}",
                                      f"{contract.METRIC_PROMPT_TOKENS}{{kind=all}}",
                                      f"{contract.METRIC_PROMPT_TOKENS}{{kind=reused}}"))

    def occupancy(self) -> Occupancy:
        live, kv = scrape(self._metrics_url, contract.METRIC_LIVE_SEQUENCES, contract.METRIC_KV_BYTES)
        draft = self._draft.GetStats(draft_pb2.GetStatsRequest(), timeout=10)
        return Occupancy(live, kv, draft.live_sequences, draft.kv_bytes, draft.suffix_cache_entries,
                         draft.suffix_cache_bytes)

    def wait_idle(self, timeout_s: float = 60.0) -> tuple[Occupancy, float]:
        """Poll until neither server holds a sequence (or ``timeout_s``): (the last reading, seconds waited)."""
        start = time.monotonic()
        while True:
            reading = self.occupancy()
            waited = time.monotonic() - start
            if reading.idle or waited > timeout_s:
                return reading, waited
            time.sleep(0.2)

    def reconnect_draft(self, draft_address: str) -> None:
        self._draft_channel.close()
        self._draft_channel = grpc.insecure_channel(draft_address)
        self._draft = draft_pb2_grpc.DraftServiceStub(self._draft_channel)

    def close(self) -> None:
        self._draft_channel.close()


def scrape(url: str, *names: str) -> tuple[float, ...]:
    """The sums over labels of the named Prometheus samples at ``url`` (counters: their ``_total`` sample); a
    name may end in ``{label=value}`` for the samples with that label only."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:  # loopback only
        text = response.read().decode()
    totals = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            keys = [sample.name, *(f"{sample.name}{{{label}={value}}}" for label, value in sample.labels.items())]
            for key in keys:
                if key in totals:
                    totals[key] += sample.value
    return tuple(totals.values())
