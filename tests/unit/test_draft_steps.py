"""The model drafter's step loop: concurrent streams' steps share forwards, and each gets its own answer;
a job whose caller stopped waiting (a cancelled stream) runs no further forward.

Streams run on threads, as in the server. Batching must not change a proposal: each stream's tokens and q
rows equal those of the same round run alone.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from draft_service.build import build_core
from draft_service.config import DraftConfig
from draft_service.core import DraftCore, ProposeRound
from draft_service.drafters.steps import FORWARD_THREAD, JobCancelled, StepLoop
from specdec.engine import CausalLMEngine, StepItem
from specdec.procs import threads_named
from specdec.sampling import SamplingParams
from tests.fakes import tiny_llama

SAMPLED = SamplingParams(temperature=0.9, top_k=20)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama(64, max_positions=256, seed=1)


@pytest.fixture()
def core_and_forwards(model) -> Iterator[tuple[DraftCore, list[int]]]:
    forwards: list[int] = []
    core, loop = build_core(DraftConfig(drafters="model", max_num_draft_tokens=8, threads=1), model, forwards.append)
    yield core, forwards
    loop.stop()


def run_concurrently(core: DraftCore, rounds: list[ProposeRound], gate: threading.Barrier | None = None):
    results: list = [None] * len(rounds)

    def one(i: int) -> None:
        if gate is not None:
            gate.wait()
        results[i] = core.propose(rounds[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(rounds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_streams_share_forwards_and_get_their_own_proposals(core_and_forwards, model) -> None:
    core, forwards = core_and_forwards
    prompts = [[1 + i, 2, 3 + i, 4] for i in range(6)]
    rounds = [ProposeRound(100 + i, 0, tuple(p), 5, SAMPLED, seed=i) for i, p in enumerate(prompts)]
    batched = run_concurrently(core, rounds, threading.Barrier(len(rounds)))
    assert sum(forwards) == 6 * 5  # every stream's 5 steps ran ...
    assert len(forwards) < 6 * 5  # ... in fewer forwards than 30: steps were shared
    assert max(forwards) > 1
    for sequence_id in range(100, 106):
        core.release(sequence_id)
    for r, together in zip(rounds, batched):
        alone = core.propose(r)
        assert alone.token_ids == together.token_ids
        torch.testing.assert_close(alone.q, together.q, atol=2e-5, rtol=1e-4)


def test_a_failing_job_fails_alone_and_the_loop_goes_on(model) -> None:
    loop = StepLoop(CausalLMEngine(model), threads=1)
    try:
        engine = loop.engine
        good, bad = engine.new_cache(), engine.new_cache()

        def job(cache, keep):
            logits = yield StepItem(cache, keep, [1, 2, 3], 1)
            if isinstance(logits, BaseException):
                raise logits
            return logits.shape

        with pytest.raises(ValueError, match="exceeds the cached length"):
            loop.run(job(bad, 5))
        assert loop.run(job(good, 0)) == (1, 64)
        assert loop._thread.native_id in threads_named(os.getpid(), FORWARD_THREAD)  # `top -H` shows it so
    finally:
        loop.stop()
    with pytest.raises(RuntimeError, match="stopping"):
        loop.run(job(good, 0))


def test_a_long_prompt_is_caught_up_in_chunks_beside_the_other_streams_steps(model) -> None:
    loop = StepLoop(CausalLMEngine(model), threads=1, budget=8)
    engine, step = loop.engine, loop.engine.step
    prompt = [(5 * i + 1) % 64 for i in range(30)]
    expected = engine.extend(engine.new_cache(), 0, prompt, 2)
    forwards: list[list[tuple[int, int]]] = []  # per forward: (tokens, logits) of each item
    engine.step = lambda items: forwards.append([(len(i.token_ids), i.num_logits) for i in items]) or step(items)
    try:
        chunked = engine.new_cache()
        held, go = threading.Event(), threading.Event()

        def blocker():  # holds the loop until both jobs below are queued, so they start in the same forward
            yield StepItem(engine.new_cache(), 0, [1], 1)
            held.set()
            go.wait(10)

        def stepper():  # another stream, drafting one token a forward
            cache = engine.new_cache()
            for i in range(10):
                yield StepItem(cache, i, [1 + i], 1)
            return cache.length

        def catch_up():
            return (yield StepItem(chunked, 0, prompt, 2))

        results: dict[str, object] = {}
        threads = [threading.Thread(target=lambda: loop.run(blocker()))]
        threads += [threading.Thread(target=lambda n=n, job=job: results.__setitem__(n, loop.run(job())))
                    for n, job in (("stepper", stepper), ("catch_up", catch_up))]
        threads[0].start()
        assert held.wait(10)
        for thread in threads[1:]:
            thread.start()
        time.sleep(0.2)  # both queued while the loop is held
        go.set()
        for thread in threads:
            thread.join(10)
        torch.testing.assert_close(results["catch_up"], expected, atol=2e-5, rtol=1e-4)
        assert results["stepper"] == 10 and chunked.length == 30
        assert forwards[1:6] == [[(1, 1), (7, 0)]] * 4 + [[(1, 1), (2, 2)]]  # 7 + 7 + 7 + 7, then 2 with its rows
        assert all(sum(tokens for tokens, _ in forward) <= 8 for forward in forwards)
    finally:
        loop.stop()


def test_a_job_whose_caller_stopped_waiting_runs_no_further_forward(model) -> None:
    loop = StepLoop(CausalLMEngine(model), threads=1)
    engine, step = loop.engine, loop.engine.step
    forwards: list[int] = []
    engine.step = lambda items: forwards.append(len(items)) or step(items)
    try:
        ran: list[int] = []
        closed: list[bool] = []
        caller_waits = [True]

        def job(cache):
            try:
                for i in range(10):
                    yield StepItem(cache, i, [1 + i], 1)
                    ran.append(i)
                    caller_waits[0] = i < 2  # the caller goes away after the third step
            finally:
                closed.append(True)
            return cache.length

        with pytest.raises(JobCancelled):
            loop.run(job(engine.new_cache()), lambda: caller_waits[0])
        assert ran == [0, 1, 2] and closed == [True] and len(forwards) == 3
        # control: the same job whose caller waits throughout runs all its steps
        forwards.clear(), ran.clear()
        assert loop.run(job(engine.new_cache())) == 10 and len(forwards) == 10
    finally:
        loop.stop()


def test_a_round_cancelled_before_its_forward_leaves_the_sequence_as_a_fresh_one(core_and_forwards) -> None:
    core, forwards = core_and_forwards
    first = ProposeRound(7, 0, (1, 2, 3, 4), 4, SAMPLED, seed=3)
    with pytest.raises(JobCancelled):
        core.propose(first, lambda: False)
    assert forwards == []
    again = core.propose(first)  # the orchestrator re-sends the prefix
    core.release(7)
    fresh = core.propose(first)
    assert again.token_ids == fresh.token_ids
    torch.testing.assert_close(again.q, fresh.q)


def test_stalled_seconds_grow_with_a_forward_that_does_not_return_and_are_zero_while_idle(model) -> None:
    entered, proceed = threading.Event(), threading.Event()
    loop = StepLoop(CausalLMEngine(model), threads=1)
    forward = loop.engine.step

    def stuck_step(items):
        entered.set()
        proceed.wait(30)
        return forward(items)

    loop.engine.step = stuck_step
    cache = loop.engine.new_cache()

    def job():
        logits = yield StepItem(cache, 0, [1, 2, 3], 1)
        return logits.shape

    results: list = []
    try:
        time.sleep(0.3)
        assert loop.stalled_s() == 0.0  # idle for 0.3 s is no stall
        runner = threading.Thread(target=lambda: results.append(loop.run(job())))
        runner.start()
        assert entered.wait(10)
        time.sleep(0.3)
        assert loop.stalled_s() >= 0.3  # counted from when the work came, not from the loop's start
        assert loop.stalled_s() < 10
        proceed.set()
        runner.join(10)
        assert results == [(1, 64)]
        deadline = time.monotonic() + 5
        while loop.stalled_s() != 0.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loop.stalled_s() == 0.0
    finally:
        proceed.set()
        loop.stop()
