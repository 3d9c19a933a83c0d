"""The draft service's forward-loop watchdog: NOT_SERVING once the loop has been stuck past the limit (with
every thread's stack in the log, once), SERVING again once it moves; never flapping on each look."""

from __future__ import annotations

import logging
import threading

import pytest

from draft_service.watchdog import StepWatchdog


def test_not_serving_past_the_limit_once_with_the_stacks_and_serving_again_when_it_moves(caplog) -> None:
    stalled = [0.0]
    serving: list[bool] = []
    dumps: list[int] = []
    dog = StepWatchdog(lambda: stalled[0], 2.0, serving.append, dump_stacks=lambda: dumps.append(1))
    caplog.set_level(logging.WARNING, logger="draft_service.watchdog")
    looks = []
    for value in (0.0, 1.5, 2.0, 2.5, 7.0, 30.0, 0.0, 0.0, 0.4, 2.1):
        stalled[0] = value
        looks.append(dog.check())
    assert looks == [False, False, False, True, True, True, False, False, False, True]
    assert serving == [False, True, False]  # one call per change, not per look
    assert dumps == [1, 1]  # the stacks once per stall
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING", "ERROR"]
    assert "NOT_SERVING" in caplog.records[0].getMessage() and "2 s" in caplog.records[0].getMessage()


def test_the_thread_looks_until_stopped_and_never_reports_after_stop() -> None:
    looked = threading.Event()
    serving: list[bool] = []

    def stalled_s() -> float:
        looked.set()
        return 5.0

    dog = StepWatchdog(stalled_s, 1.0, serving.append, dump_stacks=lambda: None)
    dog.start(0.01)
    assert looked.wait(5)
    dog.stop()
    after = list(serving)
    looked.clear()
    assert not looked.wait(0.1) and serving == after == [False]


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit_s"):
        StepWatchdog(lambda: 0.0, 0.0, lambda serving: None)
