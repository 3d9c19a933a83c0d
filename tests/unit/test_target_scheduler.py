"""The target's own batching (`target_service.scheduler`): which requests go into one forward.

Observed through the batches the runner receives. A lone caller never waits; sequences of the last forward
that come back within ``max_wait_s`` go into one forward together (no convoy); one that came back late, or
ended, is not waited for; a failing runner does not stop the loop; stopping returns what was queued.
"""

from __future__ import annotations

import os
import queue
import threading
import time

import pytest

from specdec.procs import threads_named
from target_service.scheduler import Pending, StepScheduler

PATIENT = 30.0  # a wait no test can afford: a test that hangs this long means the scheduler waited wrongly


class Recorder:
    """A runner that records each batch's sequence ids and hands them to the test."""

    def __init__(self, fail_first: bool = False) -> None:
        self.batches: queue.Queue[list[int]] = queue.Queue()
        self.fail_first = fail_first

    def __call__(self, items: list[int]) -> None:
        self.batches.put(list(items))
        if self.fail_first:
            self.fail_first = False
            raise RuntimeError("boom")

    def next(self, timeout: float = 5.0) -> list[int]:
        return self.batches.get(timeout=timeout)


def send(scheduler: StepScheduler, *sids: int, ends: bool = False) -> None:
    scheduler.submit([Pending(sid, ends, sid) for sid in sids])


@pytest.fixture
def make():
    made: list[StepScheduler] = []

    def build(max_wait_s: float, runner: Recorder) -> StepScheduler:
        made.append(StepScheduler(runner, max_wait_s))
        return made[-1]

    yield build
    for scheduler in made:
        scheduler.stop()


def test_a_lone_caller_never_waits(make) -> None:
    runner = Recorder()
    scheduler = make(PATIENT, runner)
    for _ in range(3):
        send(scheduler, 7)
        assert runner.next() == [7]  # within 5 s, though max_wait is 30 s: nothing else is expected
    assert scheduler.stats.gave_up == 0


def test_sequences_of_the_last_forward_are_waited_for_and_go_together(make) -> None:
    runner = Recorder()
    scheduler = make(PATIENT, runner)
    send(scheduler, 1, 2, 3)
    assert sorted(runner.next()) == [1, 2, 3]
    for _ in range(3):  # each comes back at its own pace: still one forward for all three
        send(scheduler, 2)
        time.sleep(0.05)
        send(scheduler, 3)
        time.sleep(0.05)
        send(scheduler, 1)
        assert sorted(runner.next()) == [1, 2, 3]
    assert scheduler.stats.forwards == 4 and scheduler.stats.gave_up == 0


def test_a_late_sequence_is_not_waited_for_until_it_is_quick_again(make) -> None:
    runner = Recorder()
    scheduler = make(2.0, runner)
    send(scheduler, 1, 2)
    assert sorted(runner.next()) == [1, 2]
    send(scheduler, 1)
    assert runner.next() == [1]  # 2 did not come within 2 s: the forward went without it
    assert scheduler.stats.gave_up == 1
    send(scheduler, 2)  # late, so not waited for from now on; 1 is expected and comes
    time.sleep(0.1)
    send(scheduler, 1)
    assert sorted(runner.next()) == [1, 2]
    started = time.monotonic()
    send(scheduler, 1)  # 2 is slow: 1 does not wait for it
    assert runner.next() == [1]
    assert time.monotonic() - started < 1.0 and scheduler.stats.gave_up == 1
    send(scheduler, 2)
    assert runner.next() == [2]


def test_an_ended_sequence_is_not_expected(make) -> None:
    runner = Recorder()
    scheduler = make(PATIENT, runner)
    send(scheduler, 1, 2)
    assert sorted(runner.next()) == [1, 2]
    send(scheduler, 1, ends=True)  # 1 released; 2 is expected back
    send(scheduler, 2)
    assert sorted(runner.next()) == [1, 2]
    send(scheduler, 2)
    assert runner.next() == [2]  # within 5 s: 1 ended, nothing else is expected


def test_a_failing_batch_does_not_stop_the_loop_and_stop_returns_what_was_queued(make) -> None:
    runner = Recorder(fail_first=True)
    scheduler = make(PATIENT, runner)
    send(scheduler, 1)
    assert runner.next() == [1]
    send(scheduler, 1)
    assert runner.next() == [1]
    blocker = threading.Event()
    scheduler._run = lambda items: blocker.wait(5)  # a forward that takes a while
    send(scheduler, 1)
    time.sleep(0.1)
    send(scheduler, 9)  # queued behind the forward under way
    blocker.set()
    left = scheduler.stop()
    assert left in ([9], [])  # it never runs after stop, or it ran before stop took the lock


def test_max_wait_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="max_wait_s"):
        StepScheduler(lambda items: None, -1.0)


def test_on_start_runs_on_the_schedulers_thread_before_any_batch() -> None:
    events: list[tuple[str, int]] = []
    scheduler = StepScheduler(lambda items: events.append(("run", threading.get_ident())), PATIENT,
                              on_start=lambda: events.append(("start", threading.get_ident())))  # fmt: skip
    try:
        send(scheduler, 1)
        deadline = time.monotonic() + 5
        while len(events) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.stop()
    assert [what for what, _ in events] == ["start", "run"]
    assert events[0][1] == events[1][1] != threading.get_ident()


def test_the_schedulers_thread_carries_its_name_for_the_os() -> None:
    scheduler = StepScheduler(lambda items: None, PATIENT, name="specdec-forward")
    try:
        deadline = time.monotonic() + 5
        while not threads_named(os.getpid(), "specdec-forward") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert threads_named(os.getpid(), "specdec-forward") == [scheduler._thread.native_id]
    finally:
        scheduler.stop()


def test_a_continued_request_does_not_make_its_sequence_late(make) -> None:
    # A decode goes back to the scheduler at the end of a forward, later than max_wait after its last answer.
    # That says nothing about its caller: once the decode is answered, its next request is still waited for.
    continued: list[int] = []

    def runner(items: list[int]) -> None:
        recorder(items)
        if items == [1] and not continued:
            time.sleep(0.2)  # a forward longer than max_wait
            continued.append(1)
            scheduler.submit([Pending(1, False, 1)], continued=True)

    recorder = Recorder()
    scheduler = make(0.5, runner)
    send(scheduler, 1)
    assert recorder.next() == [1] and recorder.next() == [1]  # the continuation, at once
    send(scheduler, 2)  # 1 is expected back: the next forward waits for it
    time.sleep(0.05)
    send(scheduler, 1)
    assert sorted(recorder.next()) == [1, 2] and scheduler.stats.gave_up == 0


def test_what_a_forward_puts_back_goes_before_what_came_meanwhile(make) -> None:
    # The rest of a prompt, a decode's next step, a request its forward had no room for: they were first, and
    # a release that came for one of their sequences meanwhile must not run before them.
    gate = threading.Event()

    def runner(items: list[int]) -> None:
        recorder(items)
        if items == [1, 2]:
            gate.wait(PATIENT)  # 3 and 4 arrive during this forward
            scheduler.submit([Pending(2, False, 2), Pending(1, False, 1)], continued=True)

    recorder = Recorder()
    scheduler = make(0.0, runner)
    send(scheduler, 1, 2)
    assert recorder.next() == [1, 2]
    send(scheduler, 3, 4)
    gate.set()
    assert recorder.next() == [2, 1, 3, 4]
