"""A load generator for the real stack (tiny model): concurrent grpc.aio callers mixing unary calls, streams,
streams the caller cancels mid-way and bad requests, each answer checked; and the orchestrator's metrics.

Why it exists: the load tests (test_load.py) and the fleet tests (test_fleet.py, test_faults.py) drive
the stack the same way and judge answers by the same promises. Loopback only; every run is bounded in
requests and time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import statistics
import time
import urllib.request
from collections import Counter
from collections.abc import Callable

import grpc
from prometheus_client.parser import text_string_to_metric_families

from specdec.v1 import generation_pb2, generation_pb2_grpc, sampling_pb2

CONCURRENCY = 32
REQUEST_TIMEOUT_S = 120.0  # each call's deadline: generous, for a machine shared with other work
RUN_TIMEOUT_S = 300.0  # a whole load run
VOCAB = 272  # bench.tiny
CONTEXT = 1024  # the tiny model's max_position_embeddings

PROMPTS = ["Hello world", "The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 4,"]
BAD_REQUESTS: list[tuple[str, dict]] = [
    ("empty prompt", dict(prompt="")),
    ("token id outside the vocabulary", dict(prompt="", prompt_token_ids=[5, VOCAB + 10])),
    ("negative temperature", dict(sampling=dict(temperature=-1.0))),
    ("top_p 0", dict(sampling=dict(top_p=0.0))),
    ("top_k beyond the vocabulary", dict(sampling=dict(top_k=VOCAB + 1))),
    ("K out of range", dict(num_draft_tokens=100)),
    ("max_new_tokens 0", dict(max_new_tokens=0)),
    ("max_new_tokens beyond the context", dict(max_new_tokens=CONTEXT)),
    ("too many stop strings", dict(stop=[f"s{i}" for i in range(20)])),
]


# --- the load generator -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Spec:
    """One request of a run."""

    index: int
    kind: str  # unary | stream | cancel | bad
    request: generation_pb2.GenerateRequest
    max_new_tokens: int = 0
    k: int = 0


@dataclasses.dataclass
class Result:
    spec: Spec
    started: float
    ended: float
    code: grpc.StatusCode  # OK, the error's status, or CANCELLED for a caller that cancelled
    details: str = ""
    stats: generation_pb2.GenerationStats | None = None
    problems: list[str] = dataclasses.field(default_factory=list)  # a response that broke a promise

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def make_spec(index: int, rng: random.Random, mix: dict[str, float]) -> Spec:
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    if kind == "bad":
        _name, fields = rng.choice(BAD_REQUESTS)
        fields = dict(fields)
        sampling = sampling_pb2.SamplingParams(**fields.pop("sampling", {}))
        fields.setdefault("prompt", rng.choice(PROMPTS))
        fields.setdefault("max_new_tokens", 8)
        return Spec(index, kind, generation_pb2.GenerateRequest(sampling=sampling, **fields))
    k = rng.choice([0, 1, 2, 4, 6])
    max_new = 64 if kind == "cancel" else rng.randint(4, 24)
    sampling = rng.choice(
        [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9), dict(temperature=1.0, top_k=20), dict()]
    )
    request = generation_pb2.GenerateRequest(
        prompt=rng.choice(PROMPTS) + f" #{index}", max_new_tokens=max_new, num_draft_tokens=k,
        sampling=sampling_pb2.SamplingParams(**sampling, seed=index),
    )  # fmt: skip
    if kind != "cancel" and rng.random() < 0.2:
        request.stop.append(rng.choice(["\n", "e", "."]))
    return Spec(index, kind, request, max_new, k)


def check_stats(stats: generation_pb2.GenerationStats, k: int) -> list[str]:
    problems = []
    if stats.num_draft_tokens != k:
        problems.append(f"num_draft_tokens {stats.num_draft_tokens} != {k}")
    scored_rounds = stats.rounds - stats.decoded_rounds  # a scored round emits its accepted drafts and one more
    if stats.emitted_tokens != stats.accepted_tokens + scored_rounds + stats.decoded_tokens:
        problems.append(f"emitted {stats.emitted_tokens} != accepted {stats.accepted_tokens} + scored rounds "
                        f"{scored_rounds} + decoded {stats.decoded_tokens}")
    if not 0.0 <= stats.acceptance_rate <= 1.0:
        problems.append(f"acceptance rate {stats.acceptance_rate}")
    if not stats.accepted_tokens <= stats.drafted_tokens <= k * (stats.rounds - stats.draft_fallback_rounds):
        problems.append(f"accepted {stats.accepted_tokens} / drafted {stats.drafted_tokens} out of bounds")
    if len(stats.accepted_per_position) != k or sum(stats.accepted_per_position) != stats.accepted_tokens:
        problems.append(f"accepted_per_position {list(stats.accepted_per_position)}")
    return problems


def check_answer(spec: Spec, token_ids: list[int], finish: int, stats: generation_pb2.GenerationStats) -> list[str]:
    problems = check_stats(stats, spec.k)
    if not 0 < len(token_ids) <= spec.max_new_tokens and finish != generation_pb2.FINISH_REASON_STOP:
        problems.append(f"{len(token_ids)} tokens for max_new_tokens {spec.max_new_tokens}")
    if len(token_ids) > spec.max_new_tokens:
        problems.append(f"{len(token_ids)} tokens > max_new_tokens {spec.max_new_tokens}")
    if finish == generation_pb2.FINISH_REASON_UNSPECIFIED:
        problems.append("no finish reason")
    if finish == generation_pb2.FINISH_REASON_LENGTH and len(token_ids) != spec.max_new_tokens:
        problems.append(f"finish LENGTH with {len(token_ids)} of {spec.max_new_tokens} tokens")
    if any(not 0 <= t < VOCAB for t in token_ids):
        problems.append("a token id outside the vocabulary")
    return problems


async def call(stub: generation_pb2_grpc.GenerationServiceStub, spec: Spec) -> Result:
    started = time.monotonic()
    result = Result(spec, started, started, grpc.StatusCode.OK)
    try:
        if spec.kind in ("unary", "bad"):
            response = await stub.Generate(spec.request, timeout=REQUEST_TIMEOUT_S)
            result.stats = response.stats
            result.problems = check_answer(spec, list(response.token_ids), response.finish_reason, response.stats)
        elif spec.kind == "stream":
            chunks = [c async for c in stub.GenerateStream(spec.request, timeout=REQUEST_TIMEOUT_S)]
            last = chunks[-1]
            result.stats = last.stats
            tokens = [t for c in chunks for t in c.token_ids]
            result.problems = check_answer(spec, tokens, last.finish_reason, last.stats)
            if any(c.finish_reason or c.HasField("stats") for c in chunks[:-1]):
                result.problems.append("finish reason or stats before the last chunk")
        else:  # cancel: read the first chunk, then walk away
            stream = stub.GenerateStream(spec.request, timeout=REQUEST_TIMEOUT_S)
            first = await stream.read()
            stream.cancel()
            result.code = grpc.StatusCode.CANCELLED
            if first is grpc.aio.EOF or not first.token_ids:
                result.problems.append("the stream ended before its first tokens")
    except grpc.aio.AioRpcError as exc:
        result.code, result.details = exc.code(), exc.details() or ""
    result.ended = time.monotonic()
    return result


async def run_load(
    address: str,
    count: int,
    mix: dict[str, float],
    seed: int,
    *,
    keep_going: Callable[[list[Result]], bool] | None = None,
    on_result: Callable[[list[Result]], None] | None = None,
    concurrency: int = CONCURRENCY,
    drafter: str = "",
) -> list[Result]:
    """``count`` requests (or more, while ``keep_going(results)``) from ``concurrency`` callers; bounded in time.
    ``drafter``: what the requests ask for ('' = the deployment's default)."""
    rng = random.Random(seed)
    results: list[Result] = []
    next_index = 0

    async def caller(stub: generation_pb2_grpc.GenerationServiceStub) -> None:
        nonlocal next_index
        failures = 0  # in a row: back off like a real client, so an outage does not burn the request budget
        while next_index < count or (keep_going is not None and keep_going(results)):
            if next_index >= 20 * count:  # a hard bound, whatever keep_going says
                return
            spec = make_spec(next_index, rng, mix)
            if spec.kind != "bad":
                spec.request.drafter = drafter
            next_index += 1
            result = await call(stub, spec)
            results.append(result)
            if on_result is not None:
                on_result(results)
            failures = failures + 1 if result.code == grpc.StatusCode.UNAVAILABLE else 0
            if failures:
                await asyncio.sleep(min(2.0, 0.25 * 2**failures))

    assert address.startswith("127.0.0.1:"), "load only ever goes to loopback"
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        await asyncio.wait_for(asyncio.gather(*(caller(stub) for _ in range(concurrency))), RUN_TIMEOUT_S)
    return results


def summary(title: str, results: list[Result]) -> str:
    outcomes = Counter(f"{r.spec.kind}:{r.code.name}" for r in results)
    served = sorted(r.seconds for r in results if r.code == grpc.StatusCode.OK and r.spec.kind != "bad")
    p50 = statistics.median(served) if served else float("nan")
    p95 = served[min(len(served) - 1, int(0.95 * len(served)))] if served else float("nan")
    fallbacks = sum(1 for r in results if r.stats is not None and r.stats.draft_fallback_rounds)
    reprefills = sum(r.stats.target_reprefills for r in results if r.stats is not None)
    lines = [
        f"--- {title}: {len(results)} requests",
        "    outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
        f"    latency of served requests: p50 {p50 * 1e3:.0f} ms, p95 {p95 * 1e3:.0f} ms",
        f"    answers with draft fallback rounds: {fallbacks}; target re-prefills: {reprefills}",
    ]
    return "\n".join(lines)


def expected_code(result: Result) -> grpc.StatusCode:
    return {"bad": grpc.StatusCode.INVALID_ARGUMENT, "cancel": grpc.StatusCode.CANCELLED}.get(
        result.spec.kind, grpc.StatusCode.OK
    )


def unexpected(results: list[Result]) -> list[str]:
    """Every result that got another status than its kind expects, or an answer that broke a promise."""
    return [
        f"#{r.spec.index} {r.spec.kind}: {r.code.name} {r.details!r} {r.problems}"
        for r in results
        if r.code != expected_code(r) or r.problems
    ]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback only
        return response.read().decode()


def metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items())
    )
