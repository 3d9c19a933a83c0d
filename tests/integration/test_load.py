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
import threading
import time
from collections import Counter

import grpc
import psutil
import pytest

from cli.stack import LocalStack, StackConfig
from specdec.tiny import TINY_DRAFT_LAYERS, save_tiny_llama_with_tokenizer
from specdec.v1 import generation_pb2, generation_pb2_grpc
from tests.integration.live import draft_live_sequences, triton_live_sequences, wait_until
from tests.integration.loadgen import REQUEST_TIMEOUT_S, Result, metric, run_load, scrape, summary, unexpected

pytestmark = pytest.mark.integration

BREAKER_COOLDOWN_S = 2.0
CONNECT_TIMEOUT_S = 3.0
# RSS growth allowed per service (its whole process tree) from after the warm-up to after the main run.
# Honest scope: this catches gross leaks (hundreds of KiB per request: a leaked stream, tensor or task per
# request); a leaked KV cache of the tiny model is ~1 KiB per token, which only the live-sequence counters
# (exact: 0) can see. The allocator keeps freed memory, so the margin also absorbs arena growth.
RSS_MARGIN_MIB = 64.0

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
        assert r.started < window["ready"] and r.ended > window["down"], (
            f"a failure outside the restart: started {r.started - window['down']:+.2f} s and ended "
            f"{r.ended - window['down']:+.2f} s from its start, which took {window['ready'] - window['down']:.2f} s: "
            f"{r.code} {r.details}"
        )
    after_ready = [r for r in results if r.started > window["ready"]]
    assert len(after_ready) >= 64, f"only {len(after_ready)} requests started after Triton was back"
    late = [(round(r.started - window["ready"], 2), r.code, r.details)
            for r in after_ready if r.code != grpc.StatusCode.OK]
    assert late == [], f"failed after Triton was back (seconds after, status, details): {late}"
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

