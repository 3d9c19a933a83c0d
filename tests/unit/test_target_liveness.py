"""`target_service.liveness.Liveness` without Triton: which probe outcomes make a model "stuck" (the real
probe against a frozen model stub is tests/integration/test_target_liveness.py)."""

from __future__ import annotations

import threading

import pytest

from target_service import liveness
from target_service.config import TritonServerConfig
from tests.integration.live import wait_until


def scripted(monkeypatch: pytest.MonkeyPatch, outcomes: list[bool | None]) -> threading.Event:
    """Probes answer ``outcomes`` in turn, then True; the event is set once all were used."""
    used = threading.Event()

    def probe(url: str, model: str, timeout_s: float) -> bool | None:
        if not outcomes:
            used.set()
            return True
        return outcomes.pop(0)

    monkeypatch.setattr(liveness, "probe", probe)
    return used


def test_an_unanswered_probe_makes_it_stuck_until_reset(monkeypatch):
    used = scripted(monkeypatch, [True, False])
    watch = liveness.Liveness("127.0.0.1:1", "m", interval_s=0.01, timeout_s=1.0)
    try:
        wait_until(watch.stuck, "stuck after the unanswered probe", 10)
        assert not used.is_set()  # no probe while stuck: the caller has yet to restart Triton
        watch.reset()
        assert used.wait(10) and not watch.stuck()
    finally:
        watch.stop()


def test_a_triton_that_cannot_be_asked_is_not_stuck(monkeypatch):
    used = scripted(monkeypatch, [None, None, True, None])
    watch = liveness.Liveness("127.0.0.1:1", "m", interval_s=0.01, timeout_s=1.0)
    try:
        assert used.wait(10) and not watch.stuck()
    finally:
        watch.stop()


def test_liveness_settings_are_checked():
    with pytest.raises(ValueError, match="liveness"):
        TritonServerConfig(liveness_timeout_s=0)
    with pytest.raises(ValueError, match="liveness"):
        TritonServerConfig(liveness_interval_s=-1)
    with pytest.raises(ValueError, match="interval_s"):
        liveness.Liveness("127.0.0.1:1", "m", interval_s=0, timeout_s=1.0)
