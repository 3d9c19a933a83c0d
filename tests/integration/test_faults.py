"""Network faults between the orchestrator and each service, through a userspace TCP proxy (tests/faultproxy.py).

A local fleet (two drafts, two Tritons, one orchestrator; tiny model) where every replica is reached
through its own `FaultProxy` on 127.0.0.1. Each fault is injected mid-run under 16 concurrent callers:

* latency (both pools): every generation finishes;
* a draft slower than the per-round limit: every generation finishes, target-only rounds say so;
* connections reset mid-stream (one draft, one Triton): every generation finishes (re-prefilled on a
  Triton, moved to a draft or target-only);
* a black hole (accepts, never answers) on one draft and one Triton: every generation finishes (the
  health checks eject both and abandon the sessions stuck there, which re-prefill elsewhere);
* a black hole on every Triton: a request fails with DEADLINE_EXCEEDED by its deadline (streams that
  were open hang), and once the connections are reset too, with UNAVAILABLE naming the pool and each
  replica tried, within the connect timeouts.

After each case the faults are lifted and nothing leaks: every draft and Triton reports zero live
sequences, the orchestrator zero live generations. Outcomes and times are printed (``-s``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from cli.stack import LocalStack, replica_name
from specdec.v1 import generation_pb2, generation_pb2_grpc
from tests.faultproxy import FaultProxy
from tests.integration.live import (
    draft_live_sequences,
    orchestrator_live_generations,
    replica_counts,
    tiny_stack_config,
    triton_live_sequences,
    wait_until,
)
from tests.integration.loadgen import Result, run_load, summary, unexpected

pytestmark = pytest.mark.integration

CONCURRENCY = 16
MIX = {"unary": 0.5, "stream": 0.5}
CONNECT_TIMEOUT_S = 2.0
DRAFT_ROUND_TIMEOUT_S = 1.5
ENV = {
    "SPECDEC_ORCHESTRATOR_HEALTH_CHECK_INTERVAL_S": "0.5",
    "SPECDEC_ORCHESTRATOR_HEALTH_CHECK_TIMEOUT_S": "1",
    "SPECDEC_ORCHESTRATOR_TARGET_CONNECT_TIMEOUT_S": str(CONNECT_TIMEOUT_S),
    "SPECDEC_ORCHESTRATOR_DRAFT_ROUND_TIMEOUT_S": str(DRAFT_ROUND_TIMEOUT_S),
    "SPECDEC_ORCHESTRATOR_DRAFT_BREAKER_COOLDOWN_S": "2",
}
DRAFTS = [replica_name("draft", i) for i in range(2)]
TRITONS = [replica_name("triton", i) for i in range(2)]


class Fleet:
    """The stack and the proxy in front of each replica."""

    def __init__(self, stack: LocalStack, proxies: dict[str, FaultProxy]) -> None:
        self.stack, self.proxies = stack, proxies

    def lift_all(self) -> None:
        for proxy in self.proxies.values():
            proxy.set_blackhole(False)
            proxy.set_latency(0.0)

    def settle(self) -> None:
        """Faults lifted: every replica readmitted, nothing live anywhere."""
        self.lift_all()
        url = self.stack.orchestrator_metrics_url
        for pool in ("draft", "target"):
            wait_until(lambda p=pool: set(replica_counts(url, "healthy", p).values()) == {1.0}, f"{pool}s readmitted", 30)
        for address in self.stack.draft_addresses:
            wait_until(lambda a=address: draft_live_sequences(a) == 0, f"0 live sequences on draft {address}", 40)
        for metrics in self.stack.triton_metrics_urls:
            wait_until(lambda u=metrics: triton_live_sequences(u) == 0, f"0 live sequences on Triton {metrics}", 40)
        wait_until(lambda: orchestrator_live_generations(url) == 0, "0 live generations on the orchestrator", 30)


@pytest.fixture(scope="module")
def fleet(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    proxies: dict[str, FaultProxy] = {}

    def through_a_proxy(name: str, address: str) -> str:
        proxies[name] = FaultProxy(address).start()
        return proxies[name].address

    config = tiny_stack_config(tiny_model, tmp_path_factory.mktemp("faults-logs"), draft_replicas=2, target_replicas=2)
    try:
        with LocalStack(config, env=ENV, route=through_a_proxy) as stack:
            yield Fleet(stack, proxies)
    finally:
        for proxy in proxies.values():
            proxy.stop()


def run_with_fault(fleet: Fleet, title: str, inject, count: int = 48, seed: int = 0) -> list[Result]:
    """``count`` requests from 16 callers; ``inject()`` runs (on a thread) once 8 have finished."""
    fired: list[bool] = []

    def after_some(results: list[Result]) -> None:
        if len(results) == 8 and not fired:
            fired.append(True)
            threading.Thread(target=inject).start()

    results = asyncio.run(run_load(fleet.stack.address, count, MIX, seed=seed, on_result=after_some,
                                   concurrency=CONCURRENCY))  # fmt: skip
    print("\n" + summary(title, results) + f"\n    slowest request: {max(r.seconds for r in results):.1f} s")
    assert fired, "the fault was never injected"
    return results


def test_a_latency_on_every_link_slows_generations_but_all_finish(fleet: Fleet) -> None:
    def slow_down() -> None:
        for proxy in fleet.proxies.values():
            proxy.set_latency(0.05)

    results = run_with_fault(fleet, "(a) +50 ms each way on every link", slow_down, seed=1)
    assert unexpected(results) == []
    fleet.settle()


def test_b_a_draft_slower_than_the_round_limit_falls_back_to_target_only(fleet: Fleet) -> None:
    def slow_drafts() -> None:
        for name in DRAFTS:
            fleet.proxies[name].set_latency(DRAFT_ROUND_TIMEOUT_S)

    results = run_with_fault(fleet, "(b) drafts slower than the per-round limit", slow_drafts, seed=2)
    assert unexpected(results) == []
    assert any(r.stats.draft_fallback_rounds > 0 for r in results), "no generation fell back to target-only"
    fleet.settle()


def test_c_connections_reset_mid_stream_lose_no_generation(fleet: Fleet) -> None:
    reset: list[int] = []

    def reset_links() -> None:
        reset.append(fleet.proxies[DRAFTS[0]].reset() + fleet.proxies[TRITONS[0]].reset())

    results = run_with_fault(fleet, "(c) draft and Triton connections reset mid-stream", reset_links, seed=3)
    print(f"    connections reset: {reset}")
    assert reset and reset[0] >= 2, "no open connection was reset"
    assert unexpected(results) == []
    assert sum(r.stats.target_reprefills for r in results) > 0, "no generation was re-prefilled"
    fleet.settle()


def test_d_a_black_hole_on_one_draft_and_one_triton_loses_no_generation(fleet: Fleet) -> None:
    def black_hole() -> None:
        fleet.proxies[DRAFTS[0]].set_blackhole(True)
        fleet.proxies[TRITONS[0]].set_blackhole(True)

    results = run_with_fault(fleet, "(d) black hole on one draft and one Triton", black_hole, count=64, seed=4)
    assert unexpected(results) == []
    url = fleet.stack.orchestrator_metrics_url
    ejected = {pool: [a for a, h in replica_counts(url, "healthy", pool).items() if h == 0] for pool in ("draft", "target")}
    print(f"    ejected while black-holed: {ejected}")
    assert ejected["draft"] == [fleet.proxies[DRAFTS[0]].address]
    assert ejected["target"] == [fleet.proxies[TRITONS[0]].address]
    assert sum(r.stats.target_reprefills for r in results) > 0, "no stuck generation moved to the other Triton"
    fleet.settle()  # the held releases reach the services once the hole closes


def test_e_every_triton_black_holed_fails_by_the_deadline_then_unavailable_within_the_connect_timeouts(
    fleet: Fleet,
) -> None:
    request = generation_pb2.GenerateRequest(prompt="Is anyone there?", max_new_tokens=8, num_draft_tokens=2)

    async def generate(timeout: float) -> tuple[grpc.StatusCode, str, float]:
        started = time.monotonic()
        async with grpc.aio.insecure_channel(fleet.stack.address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            try:
                await stub.Generate(request, timeout=timeout)
                return grpc.StatusCode.OK, "", time.monotonic() - started
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details() or "", time.monotonic() - started

    asyncio.run(generate(30.0))  # connections to both Tritons are open
    for name in TRITONS:
        fleet.proxies[name].set_blackhole(True)
    deadline_s = 6.0
    async def four() -> list[tuple[grpc.StatusCode, str, float]]:
        return await asyncio.gather(*(generate(deadline_s) for _ in range(4)))

    outcomes = asyncio.run(four())
    print(f"\n--- (e) every Triton black-holed, open connections: {[(c.name, round(s, 1)) for c, _, s in outcomes]}")
    for code, details, seconds in outcomes:
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, details)
        assert seconds < deadline_s + 1.0

    for name in TRITONS:  # new connections now: accepted, never answered
        fleet.proxies[name].reset()
    code, details, seconds = asyncio.run(generate(60.0))
    print(f"    every Triton black-holed, new connections: {code.name} in {seconds:.1f} s: {details}")
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    assert details.startswith("no target replica is available (pool ")
    for name in TRITONS:
        assert f"target (Triton at {fleet.proxies[name].address}) is unavailable: no connection within" in details
    assert seconds < 60.0
    codes = Counter(code.name for code, _, _ in outcomes)
    assert codes == {"DEADLINE_EXCEEDED": 4}
    fleet.settle()
    assert asyncio.run(generate(60.0))[0] == grpc.StatusCode.OK  # and it serves again
