"""Load and faults against the real stack (real Triton, draft service, orchestrator) on a tiny random model.

Why it exists: the promises "keep serving, lose nothing" only mean something under concurrency and with
processes dying. A grpc.aio load generator (32 concurrent callers, loopback only, every run bounded in
requests and time) mixes unary calls, streams, streams the caller cancels mid-way and bad requests:

(a) steady load: no unexpected status, every answer valid, afterwards 0 live sequences on the draft
    service and on Triton, 0 live generations on the orchestrator, and memory back near where it was;
(b) the draft service is SIGKILLed under load: no request fails (they finish target-only and say so in
    their stats; the circuit breaker opens), and after the draft is restarted drafting resumes by itself;
(c) Triton is restarted under load: only requests in flight during the restart fail, only with
    UNAVAILABLE; every request started after Triton is ready again succeeds;
(d) Triton is down: a request fails fast with UNAVAILABLE and a clear message; once Triton is back it
    works again, with nothing restarted but Triton.

No timing asserts: the summaries (requests by outcome, p50/p95 latency) are printed (``-s`` shows them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import statistics
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable

import grpc
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cli.stack import LocalStack, StackConfig
from specdec.tiny import TINY_DRAFT_LAYERS, save_tiny_llama_with_tokenizer
from specdec.v1 import generation_pb2, generation_pb2_grpc, sampling_pb2
from tests.integration.live import draft_live_sequences, triton_live_sequences, wait_until

pytestmark = pytest.mark.integration

CONCURRENCY = 32
REQUEST_TIMEOUT_S = 120.0  # each call's deadline: generous, for a machine shared with other work
RUN_TIMEOUT_S = 300.0  # a whole load run
VOCAB = 272  # bench.tiny
CONTEXT = 1024  # the tiny model's max_position_embeddings
BREAKER_COOLDOWN_S = 2.0
CONNECT_TIMEOUT_S = 3.0
# RSS growth allowed per service (its whole process tree) from after the warm-up to after the main run.
# Honest scope: this catches gross leaks (hundreds of KiB per request: a leaked stream, tensor or task per
# request); a leaked KV cache of the tiny model is ~1 KiB per token, which only the live-sequence counters
# (exact: 0) can see. The allocator keeps freed memory, so the margin also absorbs arena growth.
RSS_MARGIN_MIB = 64.0

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
    if stats.emitted_tokens != stats.accepted_tokens + stats.rounds:
        problems.append(f"emitted {stats.emitted_tokens} != accepted {stats.accepted_tokens} + rounds {stats.rounds}")
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
) -> list[Result]:
    """``count`` requests (or more, while ``keep_going(results)``) from CONCURRENCY callers; bounded in time."""
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
        await asyncio.wait_for(asyncio.gather(*(caller(stub) for _ in range(CONCURRENCY))), RUN_TIMEOUT_S)
    return results


def summary(title: str, results: list[Result]) -> str:
    outcomes = Counter(f"{r.spec.kind}:{r.code.name}" for r in results)
    served = sorted(r.seconds for r in results if r.code == grpc.StatusCode.OK and r.spec.kind != "bad")
    p50 = statistics.median(served) if served else float("nan")
    p95 = served[min(len(served) - 1, int(0.95 * len(served)))] if served else float("nan")
    fallbacks = sum(1 for r in results if r.stats is not None and r.stats.draft_fallback_rounds)
    reprefills = sum(r.stats.target_reprefills for r in results if r.stats is not None)
    lines = [
        f"--- {title}: {len(results)} requests, {CONCURRENCY} concurrent callers",
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


# --- the stack, its counters and its memory --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory: pytest.TempPathFactory):
    folder = save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny-model") / "model")
    config = StackConfig(
        port=0, target_model=str(folder), draft_model=str(folder), draft_layers=TINY_DRAFT_LAYERS, threads=1,
        log_dir=str(tmp_path_factory.mktemp("load-stack-logs")), startup_timeout_s=180,
    )  # fmt: skip
    env = {
        "SPECDEC_ORCHESTRATOR_DRAFT_BREAKER_FAILURES": "3",
        "SPECDEC_ORCHESTRATOR_DRAFT_BREAKER_COOLDOWN_S": str(BREAKER_COOLDOWN_S),
        "SPECDEC_ORCHESTRATOR_TARGET_CONNECT_TIMEOUT_S": str(CONNECT_TIMEOUT_S),
    }
    with LocalStack(config, env=env) as stack:
        yield stack


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


def assert_nothing_live(stack: LocalStack) -> None:
    wait_until(lambda: draft_live_sequences(stack.draft_address) == 0, "0 live draft sequences", 30)
    wait_until(lambda: triton_live_sequences(stack.triton_metrics_url) == 0, "0 live Triton sequences", 30)
    live = metric(scrape(stack.orchestrator_metrics_url), "specdec_orchestrator_live_generations")
    assert live == 0, f"{live} generations still live on the orchestrator"


def rss_mib(stack: LocalStack) -> dict[str, float]:
    """Resident memory of each service's whole process tree (Triton: launcher, tritonserver, model stub)."""
    sizes = {}
    for name in ("triton", "draft", "orchestrator"):
        root = psutil.Process(stack.process(name).pid)
        tree = [root, *root.children(recursive=True)]
        sizes[name] = sum(p.memory_info().rss for p in tree) / 2**20
    return sizes


def pids(stack: LocalStack) -> dict[str, int]:
    return {name: stack.process(name).pid for name in ("triton", "draft", "orchestrator")}


MIX = {"unary": 0.4, "stream": 0.3, "cancel": 0.15, "bad": 0.15}
SERVING_MIX = {"unary": 0.5, "stream": 0.5}


# --- (a) steady load ----------------------------------------------------------------------------------------


def test_a_load_mix_loses_nothing_and_leaks_nothing(tiny_stack: LocalStack) -> None:
    warmup = asyncio.run(run_load(tiny_stack.address, 64, MIX, seed=1))
    assert unexpected(warmup) == []
    assert_nothing_live(tiny_stack)
    before = rss_mib(tiny_stack)

    results = asyncio.run(run_load(tiny_stack.address, 300, MIX, seed=2))
    print("\n" + summary("(a) steady load", results))
    assert unexpected(results) == []
    kinds = Counter(r.spec.kind for r in results)
    assert all(kinds[kind] > 10 for kind in MIX), kinds  # the mix really was a mix
    assert_nothing_live(tiny_stack)

    after = rss_mib(tiny_stack)
    print("    RSS MiB after warm-up -> after the run: " + ", ".join(
        f"{name} {before[name]:.0f} -> {after[name]:.0f}" for name in before
    ))  # fmt: skip
    for name in before:
        assert after[name] <= before[name] + RSS_MARGIN_MIB, f"{name}: {before[name]:.0f} -> {after[name]:.0f} MiB"
    text = scrape(tiny_stack.orchestrator_metrics_url)
    requests = "specdec_orchestrator_requests_total"
    assert metric(text, requests, {"code": "OK"}) >= kinds["unary"] + kinds["stream"]
    assert metric(text, requests, {"code": "INVALID_ARGUMENT"}) >= kinds["bad"]
    assert metric(text, requests, {"code": "CANCELLED", "method": "GenerateStream"}) >= 1
    assert metric(text, "specdec_orchestrator_acceptance_rate_count") > 0
    assert metric(text, "specdec_orchestrator_round_seconds_count", {"stage": "draft"}) > 0
    draft_text = scrape(tiny_stack.draft_metrics_url)
    assert metric(draft_text, "specdec_draft_requests_total", {"method": "Propose", "code": "OK"}) > 0


# --- (b) the draft service dies under load -------------------------------------------------------------------


def test_b_killing_the_draft_under_load_fails_no_request(tiny_stack: LocalStack) -> None:
    stack = tiny_stack
    killed_at: list[float] = []

    def kill_after_some(results: list[Result]) -> None:
        if len(results) == 24 and not killed_at:
            threading.Thread(target=lambda: (stack.kill("draft"), killed_at.append(time.monotonic()))).start()

    results = asyncio.run(run_load(stack.address, 160, SERVING_MIX, seed=3, on_result=kill_after_some))
    print("\n" + summary("(b) draft killed under load", results))
    assert killed_at, "the draft was never killed"
    assert unexpected(results) == []  # 0 failed requests
    fell_back = [r for r in results if r.stats.draft_fallback_rounds > 0]
    assert fell_back, "no answer shows a fallback to target-only"
    assert all(r.spec.k > 0 for r in fell_back)
    text = scrape(stack.orchestrator_metrics_url)
    assert metric(text, "specdec_orchestrator_draft_breaker_transitions_total", {"state": "open"}) >= 1
    assert metric(text, "specdec_orchestrator_draft_fallbacks_total", {"reason": "error"}) >= 1
    # While the breaker was open, generations skipped the draft without trying it.
    assert metric(text, "specdec_orchestrator_draft_fallbacks_total", {"reason": "breaker_open"}) >= 1
    assert metric(text, "specdec_orchestrator_draft_fallbacks_total") >= len(fell_back)
    wait_until(lambda: triton_live_sequences(stack.triton_metrics_url) == 0, "0 live Triton sequences", 30)

    stack.restart("draft")  # the breaker lets a trial through after its cooldown: drafting resumes by itself
    resumed = asyncio.run(wait_for_drafting(stack.address))
    assert resumed.stats.drafted_tokens > 0 and resumed.stats.draft_fallback_rounds == 0
    assert metric(scrape(stack.orchestrator_metrics_url), "specdec_orchestrator_draft_breaker_state") == 0
    assert_nothing_live(stack)


async def wait_for_drafting(address: str, attempts: int = 40) -> generation_pb2.GenerateResponse:
    request = generation_pb2.GenerateRequest(prompt="Hello again", max_new_tokens=8, num_draft_tokens=4)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        for _ in range(attempts):
            response = await stub.Generate(request, timeout=REQUEST_TIMEOUT_S)
            if response.stats.drafted_tokens > 0:
                return response
            await asyncio.sleep(BREAKER_COOLDOWN_S / 4)
    raise AssertionError(f"no request drafted again after {attempts} attempts")


# --- (c) Triton restarts under load ---------------------------------------------------------------------------


def test_c_restarting_triton_under_load_fails_only_requests_in_flight(tiny_stack: LocalStack) -> None:
    stack = tiny_stack
    before = pids(stack)
    window: dict[str, float] = {}

    def restart_after_some(results: list[Result]) -> None:
        if len(results) == 24 and "down" not in window:
            window["down"] = time.monotonic()

            def restart() -> None:
                stack.restart("triton")  # graceful: SIGTERM, then a new Triton on the same ports
                window["ready"] = time.monotonic()

            threading.Thread(target=restart).start()

    def until_enough_after_restart(results: list[Result]) -> bool:
        return "ready" not in window or sum(r.started > window["ready"] for r in results) < 64

    results = asyncio.run(
        run_load(stack.address, 96, SERVING_MIX, seed=4, keep_going=until_enough_after_restart,
                 on_result=restart_after_some)
    )  # fmt: skip
    print("\n" + summary("(c) Triton restarted under load", results))
    assert "ready" in window, "Triton never came back"
    failed = [r for r in results if r.code != grpc.StatusCode.OK]
    print(f"    restart took {window['ready'] - window['down']:.1f} s; {len(failed)} requests in flight failed")
    assert [r for r in results if r.problems] == []
    for r in failed:
        assert r.code == grpc.StatusCode.UNAVAILABLE, (r.code, r.details)
        assert r.started < window["ready"] and r.ended > window["down"], "a failure outside the restart"
    after_ready = [r for r in results if r.started > window["ready"]]
    assert len(after_ready) >= 64 and all(r.code == grpc.StatusCode.OK for r in after_ready)
    current = pids(stack)
    assert current["draft"] == before["draft"] and current["orchestrator"] == before["orchestrator"]
    assert_nothing_live(stack)


# --- (d) Triton is down ---------------------------------------------------------------------------------------


def test_d_triton_down_fails_fast_and_recovers_without_restarting_anything_else(tiny_stack: LocalStack) -> None:
    stack = tiny_stack
    before = pids(stack)
    host_port = stack.triton_url
    request = generation_pb2.GenerateRequest(prompt="Is anyone there?", max_new_tokens=6, num_draft_tokens=2)

    async def generate(timeout: float) -> generation_pb2.GenerateResponse:
        async with grpc.aio.insecure_channel(stack.address) as channel:
            return await generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=timeout)

    stack.kill("triton")
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            asyncio.run(generate(timeout=REQUEST_TIMEOUT_S))
        # UNAVAILABLE, not DEADLINE_EXCEEDED: the request gave up after the connect timeout, not the deadline.
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert f"target (Triton at {host_port}) is unavailable" in info.value.details()

    stack.restart("triton")
    response = asyncio.run(generate(timeout=REQUEST_TIMEOUT_S))
    assert len(response.token_ids) == 6 and response.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    current = pids(stack)
    assert current["draft"] == before["draft"] and current["orchestrator"] == before["orchestrator"]
    assert current["triton"] != before["triton"]
    text = scrape(stack.orchestrator_metrics_url)
    assert metric(text, "specdec_orchestrator_requests_total", {"code": "UNAVAILABLE", "method": "Generate"}) >= 2
    assert_nothing_live(stack)

