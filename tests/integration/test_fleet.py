"""A local fleet on 127.0.0.1: two draft replicas, two Tritons and one orchestrator (tiny model), under load.

What it shows (issue "The fleet"): with 16 concurrent callers, generations spread over both replicas of
each pool (the orchestrator's per-replica counters, and each service's own request counters, agree); one
draft replica and one Triton replica SIGKILLed mid-run lose no request (the drafts' generations move to
the other draft or finish target-only; the Triton's are re-prefilled on the other Triton); the dead
replicas are ejected, the survivors end with zero live sequences; restarted, both are readmitted and
take generations again. A Triton whose model stops answering mid-run (its stub frozen: Triton itself still
reports ready) loses no request either: the generations it held are re-prefilled on the other Triton, and
its service's liveness probe notices and restarts it. Without that probe (a Triton run by others), the
orchestrator alone moves them (once Triton answers that the stub is not healthy, or a round goes
unanswered for its stall timeout), and keeps the replica out, though Triton reports itself ready, until its
model answers again (restarted). A model stuck in its forward thread alone (stopped with ptrace: Triton and
the stub answer everything else, nothing says "not healthy") is moved off by the stall timeout only, and
readmitted once resumed, holding no sequence. A draft replica stuck in its forward thread the same way
reports itself NOT_SERVING (its watchdog): it is taken out, new generations draft on the other replica,
and it is readmitted once resumed. The figures (counts per replica, outcomes) are printed (``-s``
shows them).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient

from cli.stack import LocalStack, replica_name
from draft_service.drafters.steps import FORWARD_THREAD as DRAFT_FORWARD_THREAD
from specdec import target_contract as contract
from specdec.procs import children_named, threads_named
from target_service.triton_model import FORWARD_THREAD as TARGET_FORWARD_THREAD
from tests.integration.live import (
    draft_live_sequences,
    orchestrator_live_generations,
    replica_counts,
    tiny_stack_config,
    triton_live_sequences,
    wait_until,
)
from tests.integration.loadgen import Result, metric, run_load, scrape, summary, unexpected
from tests.integration.threadstop import ThreadStopper

pytestmark = pytest.mark.integration

CONCURRENCY = 16
MIX = {"unary": 0.5, "stream": 0.5}
FLEET_ENV = {
    "SPECDEC_ORCHESTRATOR_HEALTH_CHECK_INTERVAL_S": "0.5",
    "SPECDEC_ORCHESTRATOR_TARGET_CONNECT_TIMEOUT_S": "2",
    "SPECDEC_ORCHESTRATOR_DRAFT_BREAKER_COOLDOWN_S": "2",
    "SPECDEC_TARGET_LIVENESS_INTERVAL_S": "1",  # a stuck model noticed within seconds, not half a minute
    "SPECDEC_TARGET_LIVENESS_TIMEOUT_S": "5",
    "SPECDEC_ORCHESTRATOR_TARGET_STALL_TIMEOUT_S": "15",  # after the liveness restart would have cut the streams
    "SPECDEC_DRAFT_STALL_TIMEOUT_S": "2",  # a draft whose forwards are stuck reports NOT_SERVING within seconds
}


@pytest.fixture(scope="module")
def fleet(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    config = tiny_stack_config(
        tiny_model, tmp_path_factory.mktemp("fleet-logs"), draft_replicas=2, target_replicas=2
    )
    with LocalStack(config, env=FLEET_ENV) as stack:
        yield stack


def counts(stack: LocalStack, series: str, pool: str) -> dict[str, float]:
    return replica_counts(stack.orchestrator_metrics_url, series, pool)


def fallbacks(stack: LocalStack, reason: str) -> float:
    """Generations that stopped drafting for ``reason`` so far (``breaker_open``: skipped for an open draft
    circuit breaker; ``timeout``: a draft round timed out with nowhere to move)."""
    text = scrape(stack.orchestrator_metrics_url)
    return metric(text, "specdec_orchestrator_draft_fallbacks_total", {"reason": reason})


def assert_nothing_live(stack: LocalStack, drafts: list[int], tritons: list[int]) -> None:
    for i in drafts:
        address = stack.draft_addresses[i]
        wait_until(lambda a=address: draft_live_sequences(a) == 0, f"0 live sequences on draft {address}", 30)
    for i in tritons:
        url = stack.triton_metrics_urls[i]
        wait_until(lambda u=url: triton_live_sequences(u) == 0, f"0 live sequences on Triton {url}", 30)
    wait_until(lambda: orchestrator_live_generations(stack.orchestrator_metrics_url) == 0, "0 live generations", 30)


def orchestrator_log_from_now(stack: LocalStack) -> Callable[[], str]:
    """What the orchestrator logs from now on (the module's tests share its log)."""
    path = stack.process("orchestrator").log_path
    start = len(path.read_text())
    return lambda: path.read_text()[start:]


def assert_kept_out_while_ready(stack: LocalStack, url: str) -> None:
    """For three seconds of health checks, Triton at ``url`` says it is ready and the replica stays out."""
    admin = grpcclient.InferenceServerClient(url)
    try:
        for _ in range(6):
            assert admin.is_server_ready() and admin.is_model_ready(contract.MODEL_NAME)
            assert counts(stack, "healthy", "target").get(url) == 0, "readmitted while its model was stuck"
            time.sleep(0.5)
    finally:
        admin.close()


def test_a_generations_spread_over_both_replicas_of_each_pool(fleet: LocalStack) -> None:
    results = asyncio.run(run_load(fleet.address, 64, MIX, seed=11, concurrency=CONCURRENCY))
    print("\n" + summary("(a) fleet, 16 concurrent callers", results))
    assert unexpected(results) == []
    drafts, targets = counts(fleet, "generations_total", "draft"), counts(fleet, "generations_total", "target")
    print(f"    generations per draft replica: {drafts}\n    generations per Triton replica: {targets}")
    assert sorted(drafts) == sorted(fleet.draft_addresses) and sorted(targets) == sorted(fleet.triton_urls)
    assert all(n > 0 for n in [*drafts.values(), *targets.values()]), (drafts, targets)
    # The services' own counters agree: every replica served requests (for a Triton: ran forwards, which its
    # service's liveness probes never do).
    for url in fleet.draft_metrics_urls:
        assert metric(scrape(url), "specdec_draft_requests_total", {"method": "Propose", "code": "OK"}) > 0, url
    for url in fleet.triton_metrics_urls:
        assert metric(scrape(url), "specdec_target_forwards_total", {}) > 0, url
    assert_nothing_live(fleet, [0, 1], [0, 1])


def test_b_killing_a_draft_and_a_triton_mid_run_loses_no_request(fleet: LocalStack) -> None:
    stack = fleet
    killed: list[str] = []
    killer: list[threading.Thread] = []

    def kill_after_some(results: list[Result]) -> None:
        if len(results) == 24 and not killer:

            def kill() -> None:
                for name in (replica_name("draft", 1), replica_name("triton", 1)):
                    stack.kill(name)  # returns once the process is gone (Triton's launcher cleans up first)
                    killed.append(name)

            killer.append(threading.Thread(target=kill))
            killer[0].start()

    results = asyncio.run(
        run_load(stack.address, 128, MIX, seed=12, on_result=kill_after_some, concurrency=CONCURRENCY)
    )
    print("\n" + summary("(b) draft-1 and triton-1 killed under load", results))
    assert killer, "the replicas were never killed"
    killer[0].join(90)  # the load may end before Triton's launcher has finished cleaning up
    assert killed == [replica_name("draft", 1), replica_name("triton", 1)]
    assert unexpected(results) == []  # no request lost
    # Killed mid-run: generations on the dead Triton were re-sent to the other one.
    assert sum(r.stats.target_reprefills for r in results) > 0, "no generation was re-prefilled"
    dead_draft, dead_triton = stack.draft_addresses[1], stack.triton_urls[1]
    wait_until(lambda: counts(stack, "healthy", "draft").get(dead_draft) == 0, "the dead draft ejected", 30)
    wait_until(lambda: counts(stack, "healthy", "target").get(dead_triton) == 0, "the dead Triton ejected", 30)
    print(f"    ejections: draft {counts(stack, 'ejections_total', 'draft')}, "
          f"target {counts(stack, 'ejections_total', 'target')}")  # fmt: skip
    assert_nothing_live(stack, [0], [0])  # the survivors hold nothing

    # Restarted, both are readmitted by the health checks and take new generations again.
    before_draft = counts(stack, "generations_total", "draft").get(dead_draft, 0)
    before_triton = counts(stack, "generations_total", "target").get(dead_triton, 0)
    stack.restart(replica_name("draft", 1))
    stack.restart(replica_name("triton", 1))
    wait_until(lambda: counts(stack, "healthy", "draft").get(dead_draft) == 1, "the draft readmitted", 30)
    wait_until(lambda: counts(stack, "healthy", "target").get(dead_triton) == 1, "the Triton readmitted", 30)
    again = asyncio.run(run_load(stack.address, 48, MIX, seed=13, concurrency=CONCURRENCY))
    assert unexpected(again) == []
    assert counts(stack, "generations_total", "draft")[dead_draft] > before_draft
    assert counts(stack, "generations_total", "target")[dead_triton] > before_triton
    assert_nothing_live(stack, [0, 1], [0, 1])
    assert grpc.StatusCode.OK in {r.code for r in again}


def test_c_a_triton_whose_model_stops_answering_mid_run_loses_no_request(fleet: LocalStack) -> None:
    stack, name = fleet, replica_name("triton", 0)
    service = stack.process(name)
    (triton,) = children_named(service.pid, "tritonserver")
    frozen: list[int] = []

    def freeze_after_some(results: list[Result]) -> None:
        if len(results) == 16 and not frozen:
            (stub,) = children_named(triton, "triton_python_b")
            os.kill(stub, signal.SIGSTOP)  # the model stops answering; Triton still reports itself ready
            frozen.append(stub)

    results = asyncio.run(
        run_load(stack.address, 64, MIX, seed=14, on_result=freeze_after_some, concurrency=CONCURRENCY)
    )
    print("\n" + summary("(c) triton-0's model frozen under load", results))
    assert frozen, "the model was never frozen"
    assert unexpected(results) == []  # no request lost, none waited for its deadline
    assert sum(r.stats.target_reprefills for r in results) > 0, "no generation was re-prefilled"
    # The load may end first: the orchestrator also moves generations off a stub Triton reports not healthy.
    wait_until(lambda: "stopped answering its liveness probes" in service.log_path.read_text(),
               "triton-0's service noticed its stuck model", 60)  # fmt: skip
    wait_until(lambda: "Triton restarted" in service.log_path.read_text(), "triton-0 restarted", 120)
    (again,) = children_named(service.pid, "tritonserver")
    assert again != triton
    url = stack.triton_urls[0]
    wait_until(lambda: counts(stack, "healthy", "target").get(url) == 1, "the restarted Triton admitted", 30)
    assert_nothing_live(stack, [0, 1], [0, 1])


def test_d_without_the_liveness_probe_the_orchestrator_moves_a_stuck_tritons_generations(fleet: LocalStack) -> None:
    stack, name, url = fleet, replica_name("triton", 0), fleet.triton_urls[0]
    stack.restart(name, env={"SPECDEC_TARGET_LIVENESS_INTERVAL_S": "0"})  # as a Triton run by others would be
    wait_until(lambda: counts(stack, "healthy", "target").get(url) == 1, "triton-0 admitted", 30)
    (triton,) = children_named(stack.process(name).pid, "tritonserver")
    (stub,) = children_named(triton, "triton_python_b")
    frozen: list[int] = []

    def freeze_after_some(results: list[Result]) -> None:
        if len(results) == 16 and not frozen:
            os.kill(stub, signal.SIGSTOP)
            frozen.append(stub)

    results = asyncio.run(
        run_load(stack.address, 64, MIX, seed=15, on_result=freeze_after_some, concurrency=CONCURRENCY)
    )
    print("\n" + summary("(d) triton-0's model frozen, no liveness probe", results))
    assert frozen, "the model was never frozen"
    assert unexpected(results) == []  # none waited for its deadline: the held rounds moved after 15 s
    assert sum(r.stats.target_reprefills for r in results) > 0, "no generation was re-prefilled"
    assert_kept_out_while_ready(stack, url)
    # Restarted (as a kubelet's liveness probe would have it), its model answers again: readmitted.
    stack.restart(name, env={"SPECDEC_TARGET_LIVENESS_INTERVAL_S": FLEET_ENV["SPECDEC_TARGET_LIVENESS_INTERVAL_S"]})
    wait_until(lambda: counts(stack, "healthy", "target").get(url) == 1, "readmitted once its model answers", 30)
    orchestrator_log = stack.process("orchestrator").log_path
    wait_until(lambda: "readmitted (its model answered again)" in orchestrator_log.read_text(), "readmitted so", 10)
    assert_nothing_live(stack, [0, 1], [0, 1])


def test_e_a_model_stuck_in_its_forward_thread_is_quarantined_until_it_answers_again(fleet: LocalStack) -> None:
    # Only the thread that runs the model's forwards stops (ptrace, while it waits for work: it holds no lock
    # and not the GIL, as a forward stuck in a kernel would not). Triton and the stub's other threads go on,
    # so Triton reports server and model ready and no stub "not healthy", and takes every request. Nothing
    # answers them: the orchestrator's stall timeout is all that moves the generations. Resumed, the model
    # answers again: readmitted.
    stack, name, url = fleet, replica_name("triton", 0), fleet.triton_urls[0]
    stack.restart(name, env={"SPECDEC_TARGET_LIVENESS_INTERVAL_S": "0"})  # or the service would restart it
    wait_until(lambda: counts(stack, "healthy", "target").get(url) == 1, "triton-0 admitted", 30)
    (triton,) = children_named(stack.process(name).pid, "tritonserver")
    (stub,) = children_named(triton, "triton_python_b")
    (forward,) = threads_named(stub, TARGET_FORWARD_THREAD)
    logged_since = orchestrator_log_from_now(stack)
    stopper = ThreadStopper(forward)
    stopper.stop()  # idle: just restarted, and no liveness probe asks it anything
    try:
        results = asyncio.run(run_load(stack.address, 64, MIX, seed=16, concurrency=CONCURRENCY))
        print("\n" + summary("(e) triton-0's forward thread stopped", results))
        assert unexpected(results) == []  # none waited for its deadline: the held rounds moved after 15 s
        assert sum(r.stats.target_reprefills for r in results) > 0, "no generation was re-prefilled"
        stall = f"a round got no answer within {FLEET_ENV['SPECDEC_ORCHESTRATOR_TARGET_STALL_TIMEOUT_S']} s"
        assert stall in logged_since(), "the stall timeout did not quarantine triton-0"
        assert_kept_out_while_ready(stack, url)
    finally:
        stopper.resume()
    wait_until(lambda: counts(stack, "healthy", "target").get(url) == 1, "readmitted once its model answers", 30)
    wait_until(lambda: "readmitted (its model answered again)" in logged_since(), "readmitted so", 10)
    # The sequences it held when it stopped were released by the orchestrator meanwhile; resumed, it holds none.
    assert_nothing_live(stack, [0, 1], [0, 1])


def test_f_a_draft_stuck_in_its_forward_thread_is_taken_out_and_new_generations_draft_elsewhere(
    fleet: LocalStack,
) -> None:
    # Only its forward loop stops (ptrace, while it waits for work: it holds no lock and not the GIL, as a
    # forward stuck in a kernel would not). Its gRPC threads go on answering, health checks included, so only
    # its watchdog, which sees the loop hold work without finishing a forward, turns it NOT_SERVING.
    stack, stuck, healthy = fleet, fleet.draft_addresses[1], fleet.draft_addresses[0]
    wait_until(lambda: set(counts(stack, "healthy", "draft").values()) == {1}, "both drafts admitted", 30)
    (forward,) = threads_named(stack.process(replica_name("draft", 1)).pid, DRAFT_FORWARD_THREAD)
    logged_since = orchestrator_log_from_now(stack)
    stopper = ThreadStopper(forward)
    stopper.stop()  # idle: the loads so far asked for the default drafter, which runs no forward
    try:
        assert draft_live_sequences(stuck) == 0  # the rest of the process answers (a Python RPC: the GIL is free)
        skipped, timed_out = fallbacks(stack, "breaker_open"), fallbacks(stack, "timeout")
        results = asyncio.run(run_load(stack.address, 48, MIX, seed=17, concurrency=CONCURRENCY, drafter="model"))
        print("\n" + summary("(f) draft-1's forward thread stopped", results))
        skips, stops = fallbacks(stack, "breaker_open") - skipped, fallbacks(stack, "timeout") - timed_out
        print(f"    generations that skipped drafting for an open breaker: {skips:g}; that timed out with nowhere "
              f"to move: {stops:g}")  # fmt: skip
        assert unexpected(results) == []
        wait_until(lambda: counts(stack, "healthy", "draft").get(stuck) == 0, "the stuck draft taken out", 30)
        assert f"{stuck} reports NOT_SERVING" in logged_since()  # its watchdog said so
        # The generations it took moved to draft-0 after their round timed out, rather than finishing target-only.
        assert f"on draft replica {stuck}; re-sending the prefix" in logged_since(), "no generation moved off it"
        assert fallbacks(stack, "timeout") == timed_out
        # The rounds that timed out on it counted on its own circuit breaker, not on draft-0's: at once, with
        # no cooldown to wait out, new generations draft on draft-0 and none skips drafting for a breaker.
        before, skipped = counts(stack, "generations_total", "draft"), fallbacks(stack, "breaker_open")
        again = asyncio.run(run_load(stack.address, 32, MIX, seed=18, concurrency=CONCURRENCY, drafter="model"))
        after = counts(stack, "generations_total", "draft")
        print(f"    generations per draft replica while draft-1 is out: "
              f"{ {a: after[a] - before.get(a, 0) for a in after} }")  # fmt: skip
        assert unexpected(again) == []
        assert after[stuck] == before[stuck] and after[healthy] > before[healthy]
        assert fallbacks(stack, "breaker_open") == skipped
    finally:
        stopper.resume()
    wait_until(lambda: counts(stack, "healthy", "draft").get(stuck) == 1, "readmitted once its forwards move", 30)
    assert_nothing_live(stack, [0, 1], [0, 1])
